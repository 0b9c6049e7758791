"""The GRPO objective, as pure functions of per-token log-probabilities (the estimator's, dlm/rl/estimators.py).

GRPO (Shao et al. 2024, DeepSeekMath) as TRL's ``GRPOTrainer`` (huggingface/trl, trl/trainer/grpo_trainer.py) and
d1's diffu-GRPO (Zhao et al. 2025, github.com/dllm-reasoning/d1, diffu-grpo/diffu_grpo_trainer.py) compute it:

* group-normalised advantages ``A = (r - mean_group(r)) / (std_group(r) + eps)``, ``std`` the unbiased (N-1)
  standard deviation as ``torch.std`` (TRL, d1); ``scale=False`` drops the division (Dr. GRPO, Liu et al. 2025);
* the clipped policy ratio of PPO with separate low/high ranges (DAPO's "clip-higher"), per token:
  ``min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A)``, ``ρ = exp(log π - log π_old)``;
* the KL to a frozen reference by the k3 estimator (of the estimator's ``kl_logp``) (Schulman, "Approximating KL divergence"):
  ``exp(log π_ref - log π) - (log π_ref - log π) - 1`` per token (>= 0, unbiased for KL(π || π_ref) under π);
* or the KL in the reward (the RLHF-PPO form: Ziegler et al. 2019, Stiennon et al. 2020; TRL's PPOTrainer
  ``kl_coef``): ``r - β_r log(π(o) / π_ref(o))`` per sequence, the log-ratio the sum of the estimator's per-token
  differences (an ELBO difference for a diffusion family). In the policy gradient it is the exact gradient of
  ``E[r] - β_r KL(π || π_ref)`` (``E[∇ log π] = 0``), with no exponential of the estimate, so the ELBO estimator's
  importance weights enter linearly (the k3 term exponentiates them: dlm/rl/estimators.py); its optimum is
  ``π ∝ π_ref exp(r / β_r)``, the reference tilted towards high reward rather than a collapse onto a few strings;
* an entropy bonus in the reward (maximum-entropy RL: Ziebart et al. 2008; Haarnoja et al. 2017's soft RL):
  ``r - α log π(o)`` per sequence, whose policy gradient is that of ``E[r] + α H(π)`` (``∇H = -E[log π ∇ log π]``);
  it is the KL in the reward against a uniform reference, up to a constant; its optimum is ``π ∝ exp(r / α)``:
  every string of one reward equally likely, not a collapse onto the easiest one;
* the per-token loss ``-(min(...) - β kl)`` averaged per sequence then over sequences (``"sequence"``: TRL's
  default "grpo"), over all tokens (``"tokens"``: DAPO / TRL's "bnpo") or divided by a constant
  ``sequences × max completion length`` (``"constant"``: Dr. GRPO, no length bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NORMALISATIONS = ("sequence", "tokens", "constant")


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Advantages [N] of rewards [N] laid out as consecutive groups of ``group_size`` completions of one prompt."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size).to(torch.float64)
    centred = r - r.mean(1, keepdim=True)
    if scale:
        std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def sequence_log_prob(logp: Tensor, scored: Tensor) -> Tensor:
    """log π(o) per sequence [B]: the scored per-token estimates summed (detached)."""
    return (logp.detach() * scored).sum(1)


def entropy_shaped_rewards(rewards: Tensor, log_prob: Tensor, coef: float) -> Tensor:
    """``r - coef * log π(o)`` [N] (the entropy bonus in the reward), from rewards [N] and sequence log-probs [N]."""
    return rewards - coef * log_prob.to(rewards.dtype)


def kl_shaped_rewards(rewards: Tensor, log_ratio: Tensor, coef: float) -> Tensor:
    """``r - coef * log(π / π_ref)`` [N] (the KL in the reward), from rewards [N] and sequence log-ratios [N]."""
    return rewards - coef * log_ratio.to(rewards.dtype)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π || π_ref) from log π and log π_ref of the sampled tokens."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class PolicyLoss:
    loss: Tensor  # scalar to minimise
    clipped: Tensor  # bool [B, T]: the clipped branch is the active one (no gradient through the ratio there)
    kl: Tensor | None  # [B, T] per-token k3 (None without a reference)
    ratio: Tensor  # [B, T] detached


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    scored: Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    normalisation: str = "sequence",
    max_len: int | None = None,
    kl_logp: Tensor | None = None,
) -> PolicyLoss:
    """The GRPO loss of per-token log-probs ``logp`` [B, T] (with gradient), ``old_logp`` (detached: the policy
    that generated), ``advantages`` [B], ``scored`` [B, T] (bool: the completion tokens that count). ``max_len``:
    the constant of ``normalisation="constant"`` (default T). ``kl_logp`` (with gradient): the values the KL reads
    against ``ref_logp`` where they are not ``logp`` (the ELBO estimator's unweighted conditionals,
    dlm/rl/estimators.py); None: ``logp``."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
    scored = scored.bool()
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.to(logp.dtype)[:, None]
    unclipped = ratio * adv
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    objective = torch.minimum(unclipped, clipped_ratio * adv)
    kl = k3_kl(logp if kl_logp is None else kl_logp, ref_logp.detach()) if ref_logp is not None else None
    per_token = -objective if kl is None or beta == 0 else -(objective - beta * kl)
    per_token = per_token * scored
    if normalisation == "sequence":
        loss = (per_token.sum(1) / scored.sum(1).clamp(min=1)).mean()
    elif normalisation == "tokens":
        loss = per_token.sum() / scored.sum().clamp(min=1)
    else:
        loss = per_token.sum() / (per_token.shape[0] * (max_len or per_token.shape[1]))
    clipped = ((clipped_ratio * adv) < unclipped) & scored
    return PolicyLoss(loss, clipped, None if kl is None else kl.detach(), ratio.detach())

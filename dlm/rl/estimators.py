"""Per-token log-probability estimators for the policy ratio of GRPO (dlm/rl/objective.py), one class each.

A masked diffusion model has no tractable sequence log-probability: log π(o | q) of a completion o given a prompt
q is a sum over unmasking orders. Each estimator returns, for rows ``tokens`` [B, N] = [prompt (P) ; completion],
a per-token value [B, N] at the ``scored`` completion positions (zero elsewhere), with gradient, and the entropy of
the predictions it read (for logging). The same ``generator`` seed gives the same masks, so the old, current and
reference policies are compared under one draw (as d1 does with its per-iteration mask seeds).

Notation: for a completion position i of the family's denoising group g(i) (``policy.mask_groups``: MDLM, the whole
completion; BD3-LM, the completion part of i's block, earlier blocks being clean context) with n = |g(i)|, the
*per-token ELBO* is

    e_i = (1/n) Σ_{k=0}^{n-1} mean_{S ⊂ g(i) \\ {i}, |S| = k} log p_θ(x_i | x_S revealed, rest of g(i) masked, prompt),

i.e. the any-order autoregressive log-likelihood of token i averaged over a uniformly random order (Ou et al. 2024:
the MDLM NELBO is exactly this average; Σ_i e_i <= log π(o | q) by Jensen, equality for a model whose conditionals
are consistent). ``tests/test_grpo.py`` enumerates e_i, the mean-field value and the AR log-likelihood on a tiny
vocabulary and checks each estimator's mean against them within its stated error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenLogProbs:
    logp: Tensor  # [B, N] per-token estimate at the scored positions (zero elsewhere), with gradient
    entropy: Tensor  # [B, N] detached entropy of the predictions the estimate read (zero where none)
    # [B, N] the values the KL to the reference reads, with gradient; None: ``logp`` (ELBOLogProb: the unweighted
    # conditionals, whose k3 stays finite where the importance-weighted ``logp``'s does not)
    kl_values: Tensor | None = None

    @property
    def kl_logp(self) -> Tensor:
        return self.logp if self.kl_values is None else self.kl_values


class LogProbEstimator(ABC):
    """``estimator(policy, tokens, scored, prompt_len, generator) -> TokenLogProbs``; ``check(policy)`` refuses a
    family it cannot estimate for, naming the estimators that can. ``forwards``: backbone forwards per call."""

    forwards: int = 1

    @abstractmethod
    def check(self, policy) -> None: ...

    @abstractmethod
    def __call__(self, policy, tokens: Tensor, scored: Tensor, prompt_len: int,
                 generator: torch.Generator | None = None) -> TokenLogProbs: ...


def _needs_masked_family(estimator, policy) -> None:
    if not callable(getattr(policy, "masked_log_probs", None)):
        raise ValueError(
            f"{type(estimator).__name__} estimates a masked diffusion family's log-probabilities (mdlm, bd3lm); "
            f"{type(policy).__name__} has no masked_log_probs: use method.estimator=dlm.rl.estimators.ExactLogProb "
            f"for an exact-likelihood family (ar)"
        )


class MeanFieldLogProb(LogProbEstimator):
    """d1's one-step mean-field estimate (diffu-GRPO; Zhao et al. 2025, dllm-reasoning/d1,
    ``diffu-grpo/diffu_grpo_trainer.py``: ``forward_process`` + ``_get_per_token_logps``): the completion fully
    masked, each prompt token masked independently with probability ``p_mask_prompt`` (0.15 in d1), one forward;
    token i's estimate is log p_θ(x_i | q̃, completion masked). For BD3-LM each block is fully masked given the
    clean earlier blocks (its one vectorised forward), so the prompt mask acts only on a block shared with the prompt.

    Bias: it estimates m_i = E_q̃[log p_θ(x_i | q̃, all of g(i) masked)], the k = 0 term of the per-token ELBO e_i
    (module docstring) under a corrupted prompt, not e_i nor log π: Σ_i m_i is the log-likelihood of the fully
    factorised (mean-field) model and misses every dependency between completion tokens, with no bound either way.
    Exact (zero bias w.r.t. m_i) when the prompt mask is averaged over. Variance: from the prompt mask only
    (zero without a prompt, or with ``p_mask_prompt=0``); cost one forward. d1 argues the random prompt mask acts
    as a regulariser across the μ inner updates.
    """

    def __init__(self, p_mask_prompt: float = 0.15):
        if not 0 <= p_mask_prompt < 1:
            raise ValueError(f"method.estimator.p_mask_prompt must be in [0, 1), got {p_mask_prompt!r}")
        self.p_mask_prompt = float(p_mask_prompt)

    def check(self, policy) -> None:
        _needs_masked_family(self, policy)

    def __call__(self, policy, tokens, scored, prompt_len, generator=None) -> TokenLogProbs:
        xt = tokens.clone()
        xt[:, prompt_len:] = policy.mask_id
        if prompt_len and self.p_mask_prompt > 0:
            u = torch.rand(tokens[:, :prompt_len].shape, device=tokens.device, generator=generator)
            xt[:, :prompt_len] = torch.where(u < self.p_mask_prompt, policy.mask_id, tokens[:, :prompt_len])
        logp, entropy = policy.masked_log_probs(xt, tokens)
        scored = scored.bool()
        return TokenLogProbs(logp * scored, entropy * scored)

    def __repr__(self) -> str:
        return f"MeanFieldLogProb(p_mask_prompt={self.p_mask_prompt:g})"


class ELBOLogProb(LogProbEstimator):
    """A Monte-Carlo estimate of the per-token ELBO e_i (module docstring) with ``num_samples`` K forwards; LLaDA's
    likelihood estimator (Nie et al. 2025: a uniform number of masks ℓ ∈ {1..n}, weight n/ℓ) per denoising group,
    with coupled complementary masks (DiffuCoder's coupled-GRPO, Gong et al. 2025, apple/ml-diffucoder).

    ``coupled=False``: each draw picks ℓ ~ U{1..n} per row and group, masks ℓ random positions of the group (the
    prompt and other groups' context clean, for BD3-LM the earlier blocks), and scores a masked token as
    (n/ℓ) log p_θ(x_i | x_t); an unmasked token scores 0 in that draw. ``coupled=True`` (K even): draws come in
    pairs, the second masking exactly the positions the first revealed, so every token is scored once per pair; a
    token scored with k revealed group members is weighted w(k) = n / ((n - k)(1 + [k >= 1])), which makes the pair
    unbiased for e_i (the complement of ℓ masks reveals ℓ: the context sizes are not uniform without it).

    Bias: none for e_i (exact expectation, tested by enumeration), and e_i sums to a lower bound of log π(o | q)
    (the Jensen gap of the any-order average; zero for a consistent model). Variance: O(1/K); the independent draws
    score each token in a fraction ℓ/n of them with weights up to n; the coupled pairs score every token once per pair
    with weights at most n / (n - k) <= n, typically much lower variance at the same cost (tests/test_grpo.py prints
    both). Cost: K forwards per call.

    In the GRPO ratio the estimate enters as ``exp(new - old)`` under the same masks, so the weights multiply the
    per-token differences: prefer ``num_iterations=1`` (ratio 1, the policy gradient of the ELBO), as coupled-GRPO's
    single-iteration runs do. The KL to the reference does not read the weighted values (their k3 grew to 1e11
    within 100 steps of the bracket demonstration, recipes/grpo.md): ``kl_logp`` is each scored token's *unweighted*
    log p_θ(x_i | x_t), averaged over the draws that scored it, under the same masks for the policy and the
    reference. Its k3 is then, per token, the k3 of one conditional of the any-order model (with coupled pairs every
    token is scored once per pair), i.e. an estimate of the KL between the two models' conditionals averaged over the
    context sizes the draws visit (not the ELBO's weighting of them): >= 0 and zero exactly when the conditionals
    agree, which is what a regulariser needs.
    """

    def __init__(self, num_samples: int = 2, coupled: bool = True):
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"method.estimator.num_samples must be an integer >= 1, got {num_samples!r}")
        if coupled and num_samples % 2:
            raise ValueError(f"method.estimator.coupled=true pairs complementary masks: num_samples must be even, "
                             f"got {num_samples}")
        self.num_samples, self.coupled = int(num_samples), bool(coupled)
        self.forwards = self.num_samples

    def check(self, policy) -> None:
        _needs_masked_family(self, policy)

    def _first_masks(self, policy, tokens, prompt_len, generator) -> tuple[Tensor, Tensor]:
        """One draw: masked [B, N] (ℓ ~ U{1..n} random completion positions of each group masked) and each position's
        group size n [N]."""
        B, N = tokens.shape
        dev = tokens.device
        groups = policy.mask_groups(N, device=dev)
        completion = torch.arange(N, device=dev) >= prompt_len
        masked = torch.zeros(B, N, dtype=torch.bool, device=dev)
        size = torch.zeros(N, dtype=torch.long, device=dev)
        for g in torch.unique(groups[completion]).tolist():
            cols = torch.nonzero(completion & (groups == g))[:, 0]
            n = cols.numel()
            size[cols] = n
            ell = torch.randint(1, n + 1, (B, 1), device=dev, generator=generator)
            rank = torch.rand(B, n, device=dev, generator=generator).argsort(1).argsort(1)
            masked[:, cols] = rank < ell
        return masked, size

    def __call__(self, policy, tokens, scored, prompt_len, generator=None) -> TokenLogProbs:
        B, N = tokens.shape
        completion = (torch.arange(N, device=tokens.device) >= prompt_len)[None]
        total = torch.zeros(B, N, device=tokens.device)
        ent_sum = torch.zeros(B, N, device=tokens.device)
        ent_count = torch.zeros(B, N, device=tokens.device)
        raw = torch.zeros(B, N, device=tokens.device)  # unweighted log-probs, for the KL (kl_logp)
        draws = self.num_samples // 2 if self.coupled else self.num_samples
        for _ in range(draws):
            masked, size = self._first_masks(policy, tokens, prompt_len, generator)
            n = size.clamp(min=1).to(total.dtype)[None]
            ell = self._group_sums(policy, masked, size).to(total.dtype)  # masked count of each position's group
            sets = [masked, completion & ~masked] if self.coupled else [masked]
            for which, m in enumerate(sets):  # a forward even when m is empty: the same count on every rank (ZeRO-3)
                xt = torch.where(m, policy.mask_id, tokens)
                logp, entropy = policy.masked_log_probs(xt, tokens)
                if self.coupled:
                    k = n - ell if which == 0 else ell  # revealed group members a scored token saw
                    weight = n / ((n - k) * (1 + (k >= 1).to(n.dtype)))
                else:
                    weight = n / ell.clamp(min=1)
                total = total + torch.where(m, weight * logp, 0.0)
                raw = raw + torch.where(m, logp, 0.0)
                ent_sum = ent_sum + entropy
                ent_count = ent_count + m
        pairs = draws
        scored = scored.bool()
        return TokenLogProbs(total / pairs * scored, (ent_sum / ent_count.clamp(min=1)) * scored,
                             kl_values=raw / ent_count.clamp(min=1) * scored)

    @staticmethod
    def _group_sums(policy, masked: Tensor, size: Tensor) -> Tensor:
        """For each position, how many positions of its group are masked [B, N]."""
        N = masked.shape[1]
        groups = policy.mask_groups(N, device=masked.device)
        onehot = (groups[:, None] == groups[None, :]) & (size > 0)[None, :] & (size > 0)[:, None]
        return masked.to(torch.float32) @ onehot.to(torch.float32)

    def __repr__(self) -> str:
        return f"ELBOLogProb(num_samples={self.num_samples}, coupled={self.coupled})"


class ExactLogProb(LogProbEstimator):
    """The exact log-probabilities of an exact-likelihood family (method=ar): log p_θ(x_i | start, x_<i) from one
    causal forward, as TRL's ``_get_per_token_logps``. Bias: none; variance: none; cost one forward."""

    def check(self, policy) -> None:
        if not getattr(type(policy), "exact_nll", False) or not callable(getattr(policy, "next_token_logits", None)):
            raise ValueError(
                f"ExactLogProb needs an exact-likelihood family (method=ar); {type(policy).__name__} has none: use "
                f"dlm.rl.estimators.MeanFieldLogProb (d1) or dlm.rl.estimators.ELBOLogProb"
            )

    def __call__(self, policy, tokens, scored, prompt_len, generator=None) -> TokenLogProbs:
        logp_all = policy.next_token_logits(tokens).log_softmax(-1)
        logp = logp_all.gather(-1, tokens[..., None])[..., 0]
        with torch.no_grad():
            p = logp_all.exp()
            entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
        scored = scored.bool()
        return TokenLogProbs(logp * scored, entropy * scored)

    def __repr__(self) -> str:
        return "ExactLogProb()"


# the samplers whose reveal order is drawn from the schedule alone (the model only picks the tokens)
# samplers whose reveal order is drawn independently of the model: MDLM's ancestral one (the schedule decides), and the
# random-order one (uniform order, the LLaDA count per step: with steps >= the positions, one position per row per
# step, the sequential limit of the ancestral sampler at 1 call per position instead of ~1 per step for a batch)
_ORDER_FREE_SAMPLERS = ("AncestralSampler", "RandomOrderSampler")


class PathLogProb(LogProbEstimator):
    """The exact log-probability of a rollout *along the path its sampler took* (MDLM's ancestral sampler, or the
    random-order one: any sampler whose reveal order is drawn independently of the model).

    The ancestral sampler (dlm/sampling/ancestral.py) decides which positions to reveal at each step from the
    schedule alone, independently of the model, and draws each revealed token from p_θ(· | canvas of that step). So,
    given the reveal order σ the rollout recorded (``reveal_step`` [B, N]: the step that revealed each completion
    position; -1 on the prompt), the probability of the completion is exactly

        π_θ(o | q, σ) = Π_s Π_{i revealed at s} p_θ(o_i | q, o_{revealed before s}, the rest masked),

    and since P(σ) does not depend on θ, π_θ(o, σ | q) / π_old(o, σ | q) is exactly the ratio of these products:
    the per-token value of token i is log p_θ(o_i | canvas of its step). This replaces the approximations of the other
    estimators: d1's mean-field (Zhao et al. 2025, dllm-reasoning/d1, one forward with the completion fully masked)
    conditions every token on no other completion token; the ELBO averages over orders the sampler did not take.
    The values feed the clipped ratio and the k3 KL unchanged (as TRL's ``_get_per_token_logps`` do for an
    autoregressive policy): the ratio is that of the actual sampling policy, not importance-weighted.

    Bias: none for log π_θ(o | q, σ) (tests/test_grpo.py: the path probabilities of all sequences under one order sum
    to 1, and equal the sampler's own step-by-step probabilities); variance: none. Cost: one batched forward over one
    canvas per (row, distinct reveal step), about min(steps, completion length) times a row's forward, with gradient.
    Scores p_θ at temperature 1 without top-k/top-p (the sampler should draw with those settings for the ratio to be
    on-policy). Refuses a family without one mask canvas over the whole completion (BD3-LM's per-block sampling,
    AR: use ExactLogProb) and, in :meth:`check_sampler`, every sampler whose order depends on the model.
    """

    needs_reveal_order = True  # GRPO records each rollout's reveal_step and passes it (dlm/methods/grpo.py)

    def check(self, policy) -> None:
        _needs_masked_family(self, policy)
        if int(torch.unique(policy.mask_groups(256)).numel()) != 1:
            raise ValueError(
                f"PathLogProb scores one mask canvas over the whole completion (mdlm); {type(policy).__name__} "
                f"denoises in groups (blocks): use dlm.rl.estimators.ELBOLogProb or MeanFieldLogProb"
            )

    def check_sampler(self, sampler) -> None:
        name = type(sampler).__name__
        if name not in _ORDER_FREE_SAMPLERS:
            raise ValueError(
                f"PathLogProb needs a sampler whose reveal order does not depend on the model "
                f"({', '.join(_ORDER_FREE_SAMPLERS)}: sampler=ancestral or random_order); {name} chooses the positions from the "
                f"model's predictions (low_confidence, confidence, threshold, entropy_bounded, remdm and the like): "
                f"use dlm.rl.estimators.ELBOLogProb or MeanFieldLogProb"
            )
        if getattr(sampler, "eos_id", None) is not None:  # EOS-filled positions are not drawn from the model
            raise ValueError(f"PathLogProb needs every completion token drawn by the sampler: {name}(eos_id="
                             f"{sampler.eos_id}) fills a row's tail after EOS; set sampler.eos_id=null")

    def __call__(self, policy, tokens, scored, prompt_len, generator=None, reveal_step=None) -> TokenLogProbs:
        if reveal_step is None or reveal_step.shape != tokens.shape:
            raise ValueError("PathLogProb needs each rollout's reveal_step [B, N] (recorded by method=grpo's rollouts)")
        B, N = tokens.shape
        if int(torch.unique(policy.mask_groups(N, device=tokens.device)[prompt_len:]).numel()) > 1:
            raise ValueError(f"PathLogProb: {type(policy).__name__} denoises this completion in several groups "
                             f"(blocks); use dlm.rl.estimators.ELBOLogProb")
        steps = reveal_step.clamp(min=-1)
        # one canvas per (row, step at which that row revealed something): tokens revealed before it, masks after
        pairs = torch.unique(torch.stack([torch.arange(B, device=tokens.device)[:, None].expand(B, N), steps], -1)
                             [steps >= 0], dim=0)  # [M, 2] (row, step)
        rows, at = pairs[:, 0], pairs[:, 1]
        rs = steps[rows]  # [M, N]
        xt = torch.where(rs < at[:, None], tokens[rows], policy.mask_id)
        logp_all, ent_all = policy.masked_log_probs(xt, tokens[rows])
        here = rs == at[:, None]  # the tokens each canvas revealed
        logp = torch.zeros(B, N, device=tokens.device, dtype=logp_all.dtype)
        entropy = torch.zeros(B, N, device=tokens.device, dtype=ent_all.dtype)
        # every (row, position) is revealed at exactly one step: a sum over canvases puts each value in its place
        logp = logp.index_add(0, rows, logp_all * here)
        entropy = entropy.index_add(0, rows, ent_all * here)
        scored = scored.bool()
        return TokenLogProbs(logp * scored, entropy * scored)

    def __repr__(self) -> str:
        return "PathLogProb()"

"""GRPO's settings checks (dlm/methods/grpo.py), each problem named by its ``method.`` key: a ValueError, which the
config builder turns into one ConfigError line (dlm.config.build)."""

from __future__ import annotations

from dlm.rl.objective import NORMALISATIONS


def check_sync(every, alpha, base_is_reference: bool, tracks_reference: bool) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"method.ref_sync_every={every!r} must be a positive number of optimizer steps (TRL's "
                         f"ref_model_sync_steps, e.g. 512) or null (the reference stays the start)")
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"method.ref_mixup_alpha={alpha!r} must be in (0, 1] (TRL's ref_model_mixup_alpha, 0.6)")
    if base_is_reference:
        raise ValueError("method.ref_sync_every with model.lora: the reference is the adapter-free base, which cannot "
                         "move towards the policy (TRL refuses sync_ref_model with PEFT too); drop one of them")
    if not tracks_reference:
        raise ValueError("method.ref_sync_every needs a reference: method.track_kl=false with beta 0 and "
                         "kl_reward_coef 0 keeps none")


def check_settings(G, prompts, C, mu, eps_low, eps_high, beta, normalisation, every, kl_reward_coef=0.0,
                   entropy_reward_coef=0.0) -> None:
    problems = []
    for key, value, low in (("num_generations", G, 2), ("prompts_per_step", prompts, 1), ("completion_length", C, 1),
                            ("num_iterations", mu, 1), ("log_rollouts_every", every, 1)):
        if isinstance(value, bool) or int(value) != value or value < low:
            problems.append(f"method.{key} must be an integer >= {low}, got {value!r}")
    for key, value in (("epsilon_low", eps_low), ("epsilon_high", eps_high), ("beta", beta),
                       ("kl_reward_coef", kl_reward_coef), ("entropy_reward_coef", entropy_reward_coef)):
        if not value >= 0:
            problems.append(f"method.{key} must be >= 0, got {value!r}")
    if not eps_low < 1:
        problems.append(f"method.epsilon_low must be < 1 (the ratio's lower clip is 1 - epsilon_low), got {eps_low!r}")
    if normalisation not in NORMALISATIONS:
        problems.append(f"method.normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
    if problems:
        raise ValueError("; ".join(problems))

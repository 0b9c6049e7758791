"""The spindle schedule of DiffusionBERT (He et al. 2022): token-dependent masking in discrete time.

A :class:`dlm.schedules.MaskSchedule` gives one keep-probability per time, the same for every token. The spindle
schedule gives one per *(time, token)*: with ``u = t / T`` on the discrete grid ``t = 0 .. T``,

    ᾱ_t^i = clip(1 − u + λ · sin(π u) · (f_i − f̄), 0, 1)

is the probability that a token whose clean value is ``i`` is still unmasked at step ``t``. ``f_i`` is the
normalised log-frequency of token ``i`` in the training data (a proxy for the paper's negative entropy: frequent,
low-information tokens are masked *later*, rare ones earlier) and ``f̄`` its mean over the training tokens, so
that averaged over the data the masking rate is still the linear ``u`` (before clipping). ``sin(π u)`` vanishes at
both ends, so ``ᾱ_0 = 1`` and ``ᾱ_T = 0`` for every token: the forward process starts clean and ends all-mask.

Since ``|f_i − f̄| ≤ 1``, the formula is non-increasing in t for every token when ``λ ≤ 1/π`` (its t-derivative is
``(−1 + λ π cos(π u) (f_i − f̄)) / T ≤ 0``), so λ is restricted to ``[0, 1/π]`` (the paper's λ = 0.3 is inside):
ᾱ is then always a valid absorbing-state schedule, and any single time can be evaluated on its own.

How DiffusionBERT uses it (``dlm.methods.diffusionbert``)
-------------------------------------------------------
* The method counts the tokens of the training rows once (``trainer.datamodule.train_data["input_ids"]`` where
  ``loss_mask`` is set) in its ``setup`` hook, caches the counts next to the tokenised data under the data's cache
  key (:func:`token_counts`), and keeps them in a buffer (``token_counts``) so checkpoints carry them.
* From the counts it builds the ``[T + 1, V]`` table ``ᾱ_t^i`` with :meth:`SpindleSchedule.alpha_table` and reads
  the forward-process probabilities, the D3PM posterior and the sampler's unmasking probabilities from it.
* With any other schedule (``schedule=linear`` etc.) DiffusionBERT uses ``ᾱ_t^i = α(t / T)`` for every token:
  the plain absorbing D3PM.

The spindle schedule belongs to ``method=diffusionbert``: the per-time methods of ``MaskSchedule`` that the
continuous-time families call (``alpha``, ``mask_prob``, ``elbo_weight``, ``unmask_prob``) raise an error that
says so.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from dlm.data.cache import load_or_build

__all__ = ["SpindleSchedule", "count_tokens", "token_counts"]

_MEMORY_CACHE: dict[str, np.ndarray] = {}

_NOT_PER_TIME = (
    "schedule=spindle is a token-dependent, discrete-time schedule and belongs to method=diffusionbert "
    "(it has no single alpha(t) shared by all tokens); use method=diffusionbert with schedule=spindle, or a "
    "per-time schedule (schedule=linear, cosine, polynomial, geometric) with method={method}"
)


class SpindleSchedule:
    """ᾱ_t^i = clip(1 − t/T + λ sin(π t/T) (f_i − f̄), 0, 1) from token counts (see the module docstring).

    Args:
        lam: λ, the strength of the frequency-dependent bend (paper default 0.3). ``lam=0`` is the linear
            absorbing schedule for every token.
    """

    def __init__(self, lam: float = 0.3):
        lam = float(lam)
        if not (math.isfinite(lam) and 0 <= lam <= 1 / math.pi):
            raise ValueError(
                f"SpindleSchedule: lam must be in [0, 1/pi = {1 / math.pi:.4f}] so that every token's keep-probability "
                f"decreases in t; got {lam}"
            )
        self.lam = lam

    # ---- what DiffusionBERT calls --------------------------------------------------------------------------
    @staticmethod
    def centred_log_frequency(counts: Tensor) -> Tensor:
        """``f_i − f̄`` in [-1, 1] (float64): log(count + 1) scaled to [0, 1] over the vocabulary, minus its mean
        over the training tokens (count-weighted). Tokens never seen get the lowest value (masked earliest)."""
        counts = counts.double().clamp(min=0)
        if counts.sum() <= 0:
            raise ValueError("SpindleSchedule: the token counts are all zero; count the training data first")
        logc = torch.log1p(counts)
        span = logc.max() - logc.min()
        f = (logc - logc.min()) / span if span > 0 else torch.zeros_like(logc)
        mean = (f * counts).sum() / counts.sum()
        return f - mean

    def alpha_bar(self, u: Tensor, centred: Tensor) -> Tensor:
        """ᾱ at normalised times ``u = t / T`` (any shape, float64 advised) for every token: ``[*u.shape, V]``.
        ``centred`` is :meth:`centred_log_frequency` of the token counts."""
        u = torch.as_tensor(u, dtype=torch.float64, device=centred.device)
        bend = self.lam * torch.sin(math.pi * u)[..., None] * centred.double()
        alpha = (1 - u[..., None] + bend).clamp(0.0, 1.0)
        alpha = torch.where(u[..., None] <= 0, torch.ones_like(alpha), alpha)  # exact ends despite rounding
        return torch.where(u[..., None] >= 1, torch.zeros_like(alpha), alpha)

    def alpha_table(self, counts: Tensor, num_steps: int) -> Tensor:
        """``[num_steps + 1, V]`` float64 table of ᾱ_t^i for t = 0 .. T: non-increasing in t, ᾱ_0 = 1, ᾱ_T = 0."""
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        return self.alpha_bar(u, self.centred_log_frequency(counts))

    # ---- the per-time interface of MaskSchedule: not defined here ------------------------------------------
    def alpha(self, t):
        raise ValueError(_NOT_PER_TIME.format(method="mdlm"))

    def alpha_prime(self, t):
        raise ValueError(_NOT_PER_TIME.format(method="mdlm"))

    def mask_prob(self, t):
        raise ValueError(_NOT_PER_TIME.format(method="mdlm"))

    def elbo_weight(self, t):
        raise ValueError(_NOT_PER_TIME.format(method="mdlm"))

    def unmask_prob(self, t, s):
        raise ValueError(_NOT_PER_TIME.format(method="mdlm"))

    def __call__(self, t):
        raise ValueError(_NOT_PER_TIME.format(method="mdlm"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lam={self.lam:g})"


def count_tokens(input_ids: np.ndarray | Tensor, vocab_size: int, loss_mask: np.ndarray | Tensor | None = None) -> np.ndarray:
    """How often each id occurs (where loss_mask is set): ``[vocab_size]`` int64."""
    ids = np.asarray(input_ids).reshape(-1)
    if loss_mask is not None:
        ids = ids[np.asarray(loss_mask).reshape(-1).astype(bool)]
    ids = ids[(ids >= 0) & (ids < vocab_size)]
    return np.bincount(ids.astype(np.int64), minlength=vocab_size).astype(np.int64)


def token_counts(datamodule, vocab_size: int) -> np.ndarray:
    """Token counts of the datamodule's training rows, computed once: cached as
    ``<cache_dir>/<train cache key>-token-counts.npz`` next to the tokenised data (in memory when the datamodule
    has no cache folder or it cannot be written)."""

    data = getattr(datamodule, "train_data", None)
    if data is None:
        raise RuntimeError("token_counts: the datamodule has no train_data; call datamodule.setup('fit') first")
    key = None
    if hasattr(datamodule, "cache_key"):
        key = f"{datamodule.cache_key('train')}-token-counts-v{vocab_size}"
    if key is not None and key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]

    def build() -> dict[str, np.ndarray]:
        return {"counts": count_tokens(data["input_ids"], vocab_size, data.get("loss_mask"))}

    cache_dir = getattr(datamodule, "cache_dir", None)
    try:
        arrays = load_or_build(cache_dir if key is not None else None, key or "", build)
    except OSError:  # read-only cache folder: fall back to memory
        arrays = build()
    counts = np.asarray(arrays["counts"], dtype=np.int64)
    if counts.shape != (vocab_size,):  # a stale or foreign file: recount
        counts = build()["counts"]
    if key is not None:
        _MEMORY_CACHE[key] = counts
    return counts


"""Decoding settings of autoregressive models (method=ar): temperature, top-k, top-p, KV cache."""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.sampling.base import check_kv_cache_mode, filter_logits, sample_categorical

__all__ = ["ARSampler"]


class ARSampler:
    """Next-token decoding settings; the AR family runs the loop (it owns the backbone and its cache).

    Deliberately not a :class:`~dlm.sampling.base.Sampler`: a Sampler reverses a corruption of a whole ``[B, T]``
    state (a prior) by calling a denoiser on that state, and its loop is the sampler's. AR decoding has no state to
    denoise: the sequence grows by one token per forward, the KV cache that makes it fast lives in the backbone, and
    the stopping rule (EOS per row) is the family's. Routing it through ``sample(denoiser, x, prior=...)`` would
    mean a denoiser whose call is "append one token", i.e. the family's loop hidden behind the interface. So the
    family owns the loop and asks this object only for :meth:`draw`.

    Args:
        temperature: softmax temperature; 0 = greedy (argmax).
        top_k: keep the ``top_k`` most likely tokens (None: no top-k filtering).
        top_p: nucleus threshold in (0, 1] (None: no nucleus filtering).
        kv_cache: ``"prefix"``: decode with a KV cache of the prefix (one new token per forward; the AR family runs
            it, ``AR.kv_caches``); ``"none"`` recomputes the whole prefix every step (the reference the cached
            path is tested against: same tokens for a fixed seed); None: the family's default (prefix). Static or
            growing: ``static_kv_cache``.
        steps: checked (an integer >= 1 or None) but not used: AR takes one step per token. Kept so that
            ``sampler.steps=<n>`` composes for every method (``-m method=mdlm,ar sampler.steps=8``; Hydra refuses a
            key the config lacks), since dropping it broke those sweeps.
    """

    on_step = None  # an observer of the rows after every token (dlm.sampling.Sampler.on_step; the family calls it)
    kv_caches = ("none",)  # the caches it runs itself: none (the family runs the prefix cache)

    def __init__(
        self,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        kv_cache: str | None = None,
        steps: int | None = None,
    ):
        if temperature is None or not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        self.temperature = float(temperature)
        self.top_k = None if top_k is None else int(top_k)
        self.top_p = None if top_p is None else float(top_p)
        if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
            raise ValueError(f"steps must be an integer >= 1 or None (AR takes one step per token), got {steps!r}")
        self.kv_cache = check_kv_cache_mode(kv_cache)

    def draw(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One token per row of ``logits`` [..., V] (unnormalised) under these settings."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        return sample_categorical(filter_logits(logits, self.temperature, self.top_k, self.top_p), generator)

    def __repr__(self) -> str:
        return (
            f"ARSampler(temperature={self.temperature:g}, top_k={self.top_k}, top_p={self.top_p}, "
            f"kv_cache={self.kv_cache!r})"
        )

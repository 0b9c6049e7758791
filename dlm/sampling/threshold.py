"""Threshold parallel decoding (Fast-dLLM; Wu et al. 2025, "Fast-dLLM: Training-free Acceleration of
Diffusion LLM by Enabling KV Cache and Parallel Decoding").

Every step commits *every* masked position of the current block whose predicted token has probability above
``threshold`` (tau), and at least one (the most confident) when none does. Low thresholds commit many tokens
per network call; tau close to 1 approaches one token per step. ``steps`` caps the steps per block as for
the other confidence samplers (at least ``ceil(remaining / steps_left)`` are committed); the default
``steps`` is large so the threshold alone decides. Combine with ``block_length`` for Fast-dLLM's
semi-autoregressive block decoding.

Prefix KV cache (``kv_cache="prefix"``, Fast-dLLM's "prefix cache"): within a block, the keys/values of the
prompt and of the finished blocks (the *prefix*) are computed once and reused, and each step's forward runs
only over the positions from the current block on. The cache is refreshed at every block boundary by one full
forward, whose output is also that step's prediction, so the cached run makes exactly the same steps (and
network calls) as the uncached one, each but the first of a block over ``T - prefix_len`` positions instead of
``T``. ``kv_cache="dual"`` (Fast-dLLM's DualCache) also caches the *suffix*, every position after the current
block (mostly masks), as the refresh saw it: each step's forward then runs over the current block only. Both
need ``block_length`` (the refresh points; ``block_length >= completion length`` caches the prompt only). The
prefix of block ``j`` is every column before ``min_rows(first masked position) + j * block_length`` (clean in
every row, blocks being finished in order).

*Approximate* under bidirectional attention: the prefix's keys/values depend on the suffix, which changes
within a block, and the dual cache's suffix keys/values on the block; the cache keeps the ones of the block's
first step. It is exact when the prefix cannot attend to the suffix (e.g. a block-causal backbone whose blocks
align with the sampler's; tested), where cached and uncached runs give identical tokens for the same generator
(with the dual cache too: the block cannot attend to the later blocks either).

The hook (family-agnostic; the sampler never sees a backbone). The denoiser passed to :meth:`sample` must be a
:class:`~dlm.sampling.base.Denoiser` that declares ``has_prefix_cache`` and implements
``denoiser.with_prefix_cache(x, prefix_len) -> (logp, suffix_denoiser)``:

* ``x`` ``[B, T]`` is the current state; ``x[:, :prefix_len]`` has no masks and the caller keeps it fixed
  while it uses ``suffix_denoiser``;
* ``logp`` ``[B, T, V]`` is ``denoiser(x)`` (one full forward, which also fills the cache);
* ``suffix_denoiser(z)`` maps ``z = x'[:, prefix_len:]`` (any later state of the suffix) to log-probabilities
  ``[B, T - prefix_len, V]`` with the same conventions as the denoiser (SUBS, mask excluded), computed
  against the cached keys/values of ``x[:, :prefix_len]``.

The dual cache's hook is ``denoiser.with_dual_cache(x, start, end) -> (logp, block_denoiser)`` (declared by
``has_dual_cache``): the same, with
``block_denoiser(z)`` mapping ``z = x'[:, start:end]`` (the current block's columns in any later state) to
``[B, end - start, V]`` against the cached keys/values of ``x[:, :start]`` and ``x[:, end:]``. With ``eos_id`` a
committed EOS still fills the row's masks to its right, past the block too (the suffix's cached keys/values then
keep the masks until the next refresh).

``refresh_every=k`` also refreshes the cache on every k-th step inside a block (a full forward, as on the block's
first step), trading speed back for accuracy; ``refresh_every=1`` refreshes on every step, which is the uncached
sampler (tested: identical tokens). None: at block boundaries only (Fast-dLLM).

:meth:`dlm.methods.mdlm.MDLM.infill` hands a denoiser with both hooks (:class:`dlm.methods.mdlm.MDLMDenoiser`) for backbones that take ``past_key_values`` (the native
Transformer and HFCausalLM; the dual cache needs a static KV cache, :mod:`dlm.models.kv_cache`: sdpa or eager
attention on HF models). A denoiser without the hook is rejected (ValueError), not silently run uncached.
BD3-LM's exact block KV cache is the trained-for version of this speed-up.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.sampling.base import Denoiser, Generation
from dlm.sampling.confidence import ConfidenceSampler
from dlm.sampling.prior import MaskPrior

__all__ = ["ThresholdSampler"]


class ThresholdSampler(ConfidenceSampler):
    """Fast-dLLM threshold decoding: commit all positions with confidence > ``threshold``, at least one.

    Args: those of :class:`~dlm.sampling.confidence.OrderedUnmaskingSampler` plus ``threshold`` in [0, 1]
    and ``kv_cache``: ``"prefix"`` (Fast-dLLM's approximate prefix KV cache, refreshed at every block boundary:
    needs ``block_length`` and a denoiser with the ``with_prefix_cache`` hook; see the module docstring) or
    ``"dual"`` (Fast-dLLM's DualCache: the prefix and the suffix after the block; ``with_dual_cache`` hook),
    and ``refresh_every`` (with a cache: also refresh it every k steps inside a block).
    """

    kv_caches = ("none", "prefix", "dual")

    def __init__(
        self,
        steps: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        record_trajectory: bool = False,
        block_length: int | None = None,
        eos_id: int | None = None,
        threshold: float = 0.9,
        kv_cache: str | None = None,
        refresh_every: int | None = None,
    ):
        super().__init__(steps, temperature, top_k, top_p, record_trajectory, block_length, eos_id, kv_cache=kv_cache)
        if threshold is None or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        if self.kv_cache in ("prefix", "dual") and self.block_length is None:
            raise NotImplementedError(
                f"ThresholdSampler(kv_cache={self.kv_cache!r}) needs block_length: the cache is refreshed at block "
                "boundaries (Fast-dLLM); a block_length >= the completion length caches the prompt only"
            )
        if refresh_every is not None and (isinstance(refresh_every, bool) or int(refresh_every) != refresh_every
                                          or refresh_every < 1):
            raise ValueError(
                f"refresh_every must be an integer >= 1 or None (block boundaries only), got {refresh_every!r}"
            )
        self.threshold = float(threshold)
        self.refresh_every = None if refresh_every is None else int(refresh_every)

    def _extra_repr(self) -> str:
        cache = f", kv_cache={self.kv_cache!r}" if self.kv_cache in ("prefix", "dual") else ""
        if cache and self.refresh_every is not None:
            cache += f", refresh_every={self.refresh_every}"
        return f"threshold={self.threshold:g}, " + super()._extra_repr() + cache

    def extra_count(self, sorted_scores: Tensor, eligible: Tensor) -> Tensor:
        # scores are log-probabilities of the predicted tokens (ConfidenceSampler); compare in probability space
        return (sorted_scores.exp() > self.threshold).sum(dim=1)

    @torch.no_grad()
    def _sample(self, denoiser: Denoiser, x: Tensor, prior: MaskPrior, generator: torch.Generator | None) -> Generation:
        if self.kv_cache in ("prefix", "dual"):
            self._check_hook(denoiser)
        return super()._sample(denoiser, x, prior, generator)

    def _check_hook(self, denoiser) -> None:
        dual = self.kv_cache == "dual"
        declared = isinstance(denoiser, Denoiser) and (denoiser.has_dual_cache if dual else denoiser.has_prefix_cache)
        if not declared:
            signature = "with_dual_cache(x, start, end)" if dual else "with_prefix_cache(x, prefix_len)"
            raise ValueError(
                f"ThresholdSampler(kv_cache={self.kv_cache!r}) needs a denoiser with the {signature} hook (MDLM on a "
                f"backbone taking past_key_values: the native Transformer or HFCausalLM{', sdpa/eager' if dual else ''}"
                f"); use kv_cache=none for this family / backbone"
            )

    def _open_block(self, denoiser: Denoiser, j: int, first: int, in_block: Tensor, mask_id: int):
        if self.kv_cache not in ("prefix", "dual"):
            return super()._open_block(denoiser, j, first, in_block, mask_id)
        dual = self.kv_cache == "dual"
        T = in_block.shape[1]
        # every row's blocks < j are finished, so columns before p are clean in every row
        p = min(first + j * self.block_length, T)
        state = {"e": T, "cached": None}  # the recomputed columns are [p, e): the dual cache holds the rest

        def step(x: Tensor, i: int, eligible: Tensor, remaining: Tensor, steps_left: int, generator) -> Tensor:
            if p == 0 and not dual:  # nothing to cache (no prompt, first block)
                return self._step(x, self._call(denoiser, x), eligible, remaining, steps_left, mask_id, generator)
            if state["cached"] is None or (self.refresh_every is not None and i % self.refresh_every == 0):
                # the block's first step (and every refresh_every-th): a full forward refreshes the cache
                if dual:  # the block's last column over all rows (rows may start their blocks apart)
                    state["e"] = int(in_block.any(dim=0).nonzero()[-1]) + 1
                logp, state["cached"] = denoiser.with_dual_cache(x, p, state["e"]) if dual else \
                    denoiser.with_prefix_cache(x, p)
                return self._step(x, self._check(logp, x), eligible, remaining, steps_left, mask_id, generator)
            # later steps: only the columns [p, e), against the cached keys/values of the rest
            e = state["e"]
            z = x[:, p:e]
            logp = self._check(state["cached"](z), z)
            new = self._step(z, logp, eligible[:, p:e], remaining, steps_left, mask_id, generator)
            if self.eos_id is not None and e < T:  # a committed EOS fills the masks after it, past e too
                commit = torch.zeros_like(eligible)
                commit[:, p:e] = (z == mask_id) & (new != mask_id)
                return self._fill_after_eos(torch.cat([x[:, :p], new, x[:, e:]], dim=1), commit, mask_id)
            x = x.clone()
            x[:, p:e] = new
            return x

        return step

    @staticmethod
    def _check(logp: Tensor, x: Tensor) -> Tensor:
        if logp.dim() != 3 or logp.shape[:2] != x.shape:
            raise ValueError(
                f"the prefix-cache hook must return log-probabilities of shape [{x.shape[0]}, {x.shape[1]}, V], "
                f"got {tuple(logp.shape)}"
            )
        return logp

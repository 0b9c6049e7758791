"""Threshold parallel decoding (Fast-dLLM; Wu et al. 2025, "Fast-dLLM: Training-free Acceleration of
Diffusion LLM by Enabling KV Cache and Parallel Decoding").

Every step commits *every* masked position of the current block whose predicted token has probability above
``threshold`` (tau), and at least one (the most confident) when none does. Low thresholds commit many tokens
per network call; tau close to 1 approaches one token per step. ``steps`` caps the steps per block as for
the other confidence samplers (at least ``ceil(remaining / steps_left)`` are committed); the default
``steps`` is large so the threshold alone decides. Combine with ``block_length`` for Fast-dLLM's
semi-autoregressive block decoding.

Prefix KV cache (unfinished): Fast-dLLM additionally reuses the keys/values of the prompt and finished blocks
across the steps of a block (approximate for a bidirectional model: the prefix's keys/values depend on the
suffix). The native Transformer and HFCausalLM accept ``past_key_values``/``use_cache``, but samplers here
only see a ``denoiser(x) -> log p`` callable built by the family (``MDLM.infill``), so the cache needs a
family-side hook (a denoiser that can be asked for "the suffix from position p, given a cached prefix").
Until that lands, ``prefix_cache=True`` is rejected with this explanation rather than silently ignored.
BD3-LM's exact block KV cache already gives the semi-AR version of this speed-up.
"""

from __future__ import annotations

from torch import Tensor

from dlm.sampling.confidence import ConfidenceSampler

__all__ = ["ThresholdSampler"]


class ThresholdSampler(ConfidenceSampler):
    """Fast-dLLM threshold decoding: commit all positions with confidence > ``threshold``, at least one.

    Args: those of :class:`~dlm.sampling.confidence.OrderedUnmaskingSampler` plus ``threshold`` in [0, 1]
    and ``prefix_cache`` (must be False for now; see the module docstring).
    """

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
        prefix_cache: bool = False,
    ):
        super().__init__(steps, temperature, top_k, top_p, record_trajectory, block_length, eos_id)
        if threshold is None or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        if prefix_cache:
            raise NotImplementedError(
                "ThresholdSampler(prefix_cache=True) is not implemented yet: the sampler only sees the family's "
                "denoiser callable, not the backbone's KV cache. Use prefix_cache=false (exact, one full forward per "
                "step), or method=bd3lm whose exact block KV cache gives the semi-autoregressive speed-up."
            )
        self.threshold = float(threshold)
        self.prefix_cache = False

    def _extra_repr(self) -> str:
        return f"threshold={self.threshold:g}, " + super()._extra_repr()

    def extra_count(self, sorted_scores: Tensor, eligible: Tensor) -> Tensor:
        # scores are log-probabilities of the predicted tokens (ConfidenceSampler); compare in probability space
        return (sorted_scores.exp() > self.threshold).sum(dim=1)

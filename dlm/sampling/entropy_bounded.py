"""Entropy-bounded unmasking (EB-Sampler; Ben-Hamu et al. 2025, "Accelerated Sampling from Masked Diffusion
Models via Entropy Bounded Unmasking"; the sampler RND1 recommends for its A2D models).

Every step the masked positions of the current block are sorted by predictive entropy (ascending) and the
largest prefix U is committed whose entropies satisfy

    sum_{l in U} H(p_l) - max_{l in U} H(p_l) <= gamma,

i.e. the joint error of committing U at once (bounded by the sum of entropies) exceeds that of committing
its least certain member alone by at most ``gamma``. The first position always qualifies, so at least one
token is committed per step; ``gamma = 0`` commits one token per step (plus exact ties at zero entropy), a
large ``gamma`` everything at once. ``steps`` caps the number of steps per block the way it does for the
confidence samplers (the loop commits at least the even split ``ceil(remaining / steps_left)``); give a
large ``steps`` (e.g. the length) for the pure entropy-bounded rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.sampling.confidence import EntropySampler

__all__ = ["EntropyBoundedSampler"]


class EntropyBoundedSampler(EntropySampler):
    """EB-Sampler: order by entropy, commit the largest prefix within the entropy budget ``gamma`` (nats).

    Args: those of :class:`~dlm.sampling.confidence.OrderedUnmaskingSampler` plus ``gamma >= 0``.
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
        gamma: float = 0.1,
        kv_cache: str | None = None,
    ):
        super().__init__(steps, temperature, top_k, top_p, record_trajectory, block_length, eos_id, kv_cache=kv_cache)
        if gamma is None or not gamma >= 0:
            raise ValueError(f"gamma must be >= 0 (nats), got {gamma!r}")
        self.gamma = float(gamma)

    def _extra_repr(self) -> str:
        return f"gamma={self.gamma:g}, " + super()._extra_repr()

    def extra_count(self, sorted_scores: Tensor, eligible: Tensor) -> Tensor:
        h = (-sorted_scores).clamp(min=0.0)  # entropies ascending; ineligible (+inf) at the end
        valid = torch.isfinite(sorted_scores)
        h = torch.where(valid, h, torch.zeros_like(h))
        spent = h.cumsum(dim=1) - h.cummax(dim=1).values  # sum over the prefix minus its max
        ok = (spent <= self.gamma + 1e-12) & valid
        # the prefix property: count the leading run of positions that satisfy the bound
        return ok.long().cumprod(dim=1).sum(dim=1)

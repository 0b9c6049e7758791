"""A parameter's true size and shape under any strategy, and whole views of partitioned parameters.

Under DeepSpeed ZeRO-3 a parameter's own tensor is an empty placeholder (``numel() == 0``, shape ``[0]``) while
its shard lives in the engine; the whole size and shape are kept in ``ds_numel`` / ``ds_shape``. Everything that
counts, classifies or resizes parameters asks here instead of reading those attributes itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

__all__ = ["gathered", "is_partitioned", "numel", "shape"]


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partitioned parameter (its data lives in shards)."""
    return hasattr(param, "ds_id")


def numel(param: torch.Tensor) -> int:
    """The number of elements of the whole parameter (a ZeRO-3 placeholder's own numel is 0)."""
    return int(getattr(param, "ds_numel", 0) or param.numel())


def shape(param: torch.Tensor) -> torch.Size:
    """The shape of the whole parameter (a ZeRO-3 placeholder's own shape is [0])."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def gathered(params: Iterable[torch.Tensor | None], modifier_rank: int | None = None):
    """A context in which the ZeRO-3 partitioned tensors among ``params`` are whole (``None`` entries and plain
    tensors are ignored; with ``modifier_rank`` that rank's writes are kept and scattered back); a no-op context
    when none is partitioned, so callers need not know the strategy."""
    unique = {id(p): p for p in params if p is not None and is_partitioned(p)}
    if not unique:
        return contextlib.nullcontext()
    import deepspeed  # lazily: DeepSpeed only when a parameter is partitioned

    return deepspeed.zero.GatheredParameters(list(unique.values()), modifier_rank=modifier_rank)

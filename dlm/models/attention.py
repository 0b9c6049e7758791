"""Attention-pattern masks for the native transformer.

All masks are boolean with True meaning "this query may attend to this key", the convention of
``torch.nn.functional.scaled_dot_product_attention``.

Patterns:
    causal         query t attends to keys <= t (autoregressive LMs).
    bidirectional  every query attends to every key (masked diffusion LMs).
    block_causal   query in block i attends to keys in blocks <= i (block diffusion); blocks are
                   ``block_size`` consecutive positions counted from the start of the sequence.

``doc_ids`` adds document masking for packed sequences: a query only attends to keys of its own document.
It is a plain AND with the pattern, so block boundaries stay absolute (they do not restart per document).
"""

from __future__ import annotations

import torch
from torch import Tensor

PATTERNS = ("causal", "bidirectional", "block_causal")


def _check_args(pattern: str, seq_len: int, doc_ids: Tensor | None, block_size: int | None) -> None:
    if pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {pattern!r}; valid patterns are {', '.join(PATTERNS)}")
    if pattern == "block_causal" and (block_size is None or block_size <= 0):
        raise ValueError(
            f"attention pattern 'block_causal' needs a positive block_size (got {block_size}); "
            "set model.block_size"
        )
    if doc_ids is not None and (doc_ids.dim() != 2 or doc_ids.shape[1] != seq_len):
        raise ValueError(f"doc_ids must have shape [B, {seq_len}], got {list(doc_ids.shape)}")


def attention_mask(
    pattern: str,
    seq_len: int,
    *,
    doc_ids: Tensor | None = None,
    block_size: int | None = None,
    device=None,
) -> Tensor | None:
    """Boolean mask broadcastable to [B, 1, T, T]; True = query may attend to key.

    Returns None for plain bidirectional attention without doc_ids (the caller then runs SDPA with no
    mask). Without doc_ids the mask has shape [1, 1, T, T], with doc_ids [B, 1, T, T].
    Raises ValueError for an unknown pattern or a missing block_size.
    """
    _check_args(pattern, seq_len, doc_ids, block_size)
    if device is None and doc_ids is not None:
        device = doc_ids.device
    pos = torch.arange(seq_len, device=device)
    q, k = pos[:, None], pos[None, :]
    if pattern == "causal":
        mask = k <= q
    elif pattern == "block_causal":
        mask = (k // block_size) <= (q // block_size)
    else:
        mask = None
    if doc_ids is not None:
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
        mask = same_doc if mask is None else same_doc & mask
        return mask[:, None]
    return None if mask is None else mask[None, None]


def attention_mask_reference(
    pattern: str,
    seq_len: int,
    *,
    doc_ids: Tensor | None = None,
    block_size: int | None = None,
    device=None,
) -> Tensor | None:
    """Slow, obviously-correct double-loop version of :func:`attention_mask`, for tests only."""
    _check_args(pattern, seq_len, doc_ids, block_size)
    if pattern == "bidirectional" and doc_ids is None:
        return None
    batch = 1 if doc_ids is None else doc_ids.shape[0]
    mask = torch.zeros(batch, 1, seq_len, seq_len, dtype=torch.bool)
    for b in range(batch):
        for q in range(seq_len):
            for k in range(seq_len):
                if pattern == "causal":
                    allowed = k <= q
                elif pattern == "block_causal":
                    allowed = k // block_size <= q // block_size
                else:
                    allowed = True
                if doc_ids is not None:
                    allowed = allowed and bool(doc_ids[b, q] == doc_ids[b, k])
                mask[b, 0, q, k] = allowed
    return mask.to(device) if device is not None else mask


def implementation_mask(allowed: Tensor, attn_implementation: str, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = may attend) in the form an HF attention implementation takes: ``sdpa`` reads the
    boolean as-is, the eager kernels *add* the mask to the scores, so they get 0 where allowed and the dtype's
    minimum where blocked (in ``dtype``, the model's; float32 for a non-float dtype)."""
    if attn_implementation == "sdpa":
        return allowed
    if not dtype.is_floating_point:
        dtype = torch.float32
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), torch.finfo(dtype).min)

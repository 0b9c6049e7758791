"""Checks every backbone makes on its inputs, so a bad run fails with a message that names the fix (a token
id outside the embedding would otherwise be a CUDA device assert)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_inputs(
    input_ids: Tensor,
    *,
    vocab_size: int,
    max_seq_len: int,
    past: int = 0,
    position_ids: Tensor | None = None,
    doc_ids: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> None:
    B, T = input_ids.shape
    # Under torch.compile the value checks (a host sync each) are skipped: they would split the compiled forward
    # into graphs around a sync and recompile per observed value. Eager runs (compile=null) check them.
    values = input_ids.device.type != "meta" and input_ids.numel() and not torch.compiler.is_compiling()
    given_positions = position_ids is not None and position_ids.numel() and values
    longest = int(position_ids.max()) + 1 if given_positions else T + past
    if longest > max_seq_len:
        raise ValueError(
            f"sequence length {longest} exceeds the model's max_seq_len={max_seq_len}; "
            "raise model.max_seq_len or lower data.seq_len"
        )
    if values:  # one host sync: cheap next to an eager forward
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {vocab_size}) but got range [{lo}, {hi}]; "
                "model.vocab_size must cover the tokenizer (including any added mask/special tokens)"
            )
    if doc_ids is not None and doc_ids.shape != input_ids.shape:
        raise ValueError(f"doc_ids shape {list(doc_ids.shape)} must equal input_ids shape {[B, T]}")
    if doc_ids is not None and (attn_mask is not None or past):
        raise ValueError("doc_ids cannot be combined with attn_mask or a KV cache: fold documents into attn_mask")

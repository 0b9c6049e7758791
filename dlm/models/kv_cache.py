"""KV caches of the native backbone: a growing one (:class:`KVCache`) and a preallocated one
(:class:`StaticKVCache`), and what both backbones share about static caches.

Both hold per-layer keys/values [B, n_kv_heads, S, head_dim] after RoPE, and both are used the same way: a
forward with ``past_key_values=cache`` attends to the cached tokens and its own; with ``use_cache=True`` its
tokens are appended, with ``use_cache=False`` the cache is left as it was.

Why a static cache: the growing cache changes shape every call, so a compiled backbone would recompile (or run
dynamic shapes) and CUDA graphs could not replay it. The static cache allocates ``capacity`` slots once and
writes in place at slots ``length .. length + T`` (``length`` is a device tensor, so no call reads it on the
host). Every call then has the same shapes, ``[B, T]`` tokens against ``capacity`` keys, the not-yet-written
slots masked out, so one graph serves every decoding step. The buffers are marked as static addresses, which is
what lets CUDA graphs (``compile=reduce-overhead``) take their in-place updates. A call that does not keep its
tokens (``use_cache=False``) still writes them (its own queries read them) but does not advance ``length``: the
next call overwrites them. The HF backbone uses transformers' ``StaticCache`` the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.models.attention import PATTERNS


class KVCache:
    """Per-layer keys and values [B, n_kv_heads, S, head_dim] of the tokens seen so far (RoPE applied)."""

    def __init__(self):
        self.layers: list[tuple[Tensor, Tensor] | None] = []

    def get_seq_length(self) -> int:
        return 0 if not self.layers or self.layers[0] is None else self.layers[0][0].shape[2]

    def read(self, i: int, k: Tensor, v: Tensor, store: bool) -> tuple[Tensor, Tensor]:
        """Layer i's past keys/values followed by the new ones; kept for later calls when ``store``."""
        while len(self.layers) <= i:
            self.layers.append(None)
        if self.layers[i] is not None:
            k, v = torch.cat([self.layers[i][0], k], dim=2), torch.cat([self.layers[i][1], v], dim=2)
        if store:
            self.layers[i] = (k, v)
        return k, v

    def crop(self, length: int) -> None:
        """Keep the first ``length`` cached tokens (negative: drop the last ``-length``)."""
        self.layers = [None if kv is None else (kv[0][:, :, :length], kv[1][:, :, :length]) for kv in self.layers]


class StaticKVCache:
    """``capacity`` preallocated key/value slots per layer, written in place (see the module docstring).

    ``length`` (a 0-dim long tensor on the cache's device) counts the tokens kept so far."""

    is_compileable = True  # transformers' name for "fixed shapes": dlm.compile routes such calls to the graph

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, n_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.batch_size, self.capacity = batch_size, capacity
        for t in (*self.keys, *self.values, self.length):  # fixed data pointers: CUDA graphs may mutate them
            torch._dynamo.mark_static_address(t)

    def get_seq_length(self) -> int:
        return int(self.length)  # a host sync: eager bookkeeping only (the forward never calls it)

    def slots(self, T: int) -> Tensor:
        """The slots [T] the next call's tokens are written to."""
        return self.length + torch.arange(T, device=self.length.device)

    def read(self, i: int, k: Tensor, v: Tensor, store: bool) -> tuple[Tensor, Tensor]:
        """Write layer i's new keys/values at :meth:`slots` and return all ``capacity`` slots (``store`` is applied
        once per forward by :meth:`advance`, after every layer wrote at the same slots)."""
        slots = self.slots(k.shape[2])
        self.keys[i].index_copy_(2, slots, k.to(self.keys[i].dtype))
        self.values[i].index_copy_(2, slots, v.to(self.values[i].dtype))
        return self.keys[i].to(k.dtype), self.values[i].to(v.dtype)

    def advance(self, T: int) -> None:
        self.length += T

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (negative: drop the last ``-length``); the slots are overwritten later."""
        if length < 0:
            self.length -= -length
        else:
            self.length.clamp_(max=length)

    def reset(self) -> None:
        """Empty the cache for reuse (same buffers: a captured CUDA graph stays valid)."""
        self.length.zero_()


def is_static_cache(cache) -> bool:
    """Whether ``cache`` has fixed shapes: :class:`StaticKVCache` or a transformers cache whose layers are all
    static (``StaticCache``: ``is_compileable``)."""
    return cache is not None and bool(getattr(cache, "is_compileable", False))


def static_cache_mask(pattern: str, slots: Tensor, capacity: int, block_size: int | None = None) -> Tensor:
    """Bool [1, 1, T, capacity] for queries at ``slots`` [T] (consecutive, written this call) against every slot
    of a static cache: the pattern, and nothing at or after ``slots[-1] + 1`` (not written yet). Tensor ops only:
    no host sync, so it runs inside a compiled graph."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {pattern!r}; valid patterns are {', '.join(PATTERNS)}")
    keys = torch.arange(capacity, device=slots.device)[None, :]
    q = slots[:, None]
    if pattern == "causal":
        allowed = keys <= q
    elif pattern == "block_causal":
        allowed = (keys // block_size <= q // block_size) & (keys <= slots[-1])
    else:
        allowed = (keys <= slots[-1]).expand(slots.shape[0], capacity)
    return allowed[None, None]


def widen_mask(attn_mask: Tensor, capacity: int) -> Tensor:
    """An explicit mask [.., T, S] over the cached and new tokens, padded with False to [.., T, capacity]."""
    S = attn_mask.shape[-1]
    if S > capacity:
        raise ValueError(f"attn_mask covers {S} keys but the static KV cache holds only {capacity}")
    return attn_mask if S == capacity else torch.nn.functional.pad(attn_mask, (0, capacity - S), value=False)


def check_static_capacity(cache, B: int, T: int) -> None:
    """Eager runs: a clear error instead of an index error (or a CUDA assert) when a call does not fit the cache."""
    if torch.compiler.is_compiling():
        return
    if cache.batch_size not in (B, -1):  # -1: a transformers cache not initialised yet
        raise ValueError(f"the static KV cache was built for {cache.batch_size} rows, this call has {B}")
    capacity = cache.capacity if isinstance(cache, StaticKVCache) else cache.get_max_length()
    length = int(cache.get_seq_length())
    if length + T > capacity:
        raise ValueError(
            f"the static KV cache holds {capacity} tokens; {length} are cached and this call adds {T}: "
            "build it with a larger capacity"
        )

"""The native backbone: a pre-norm transformer (RMSNorm, RoPE, SwiGLU, grouped-query attention).

One file, read top to bottom. The attention pattern (causal / bidirectional / block_causal) is a
constructor argument and can be overridden per forward call, so the same weights serve autoregressive,
masked-diffusion and block-diffusion methods.

Packed sequences: when ``doc_ids`` is given, attention is restricted to each document and RoPE positions
restart at 0 at every document start (a document is a run of equal consecutive doc ids), so a packed
sequence gives the same logits as running each document on its own.

Methods with their own layout (block diffusion's [x_t ; x_0]) pass an explicit boolean ``attn_mask``
(True = may attend) and ``position_ids``. Decoding passes a :class:`KVCache`: keys/values of earlier tokens
(after RoPE), appended to when ``use_cache=True`` and only read when ``use_cache=False``, or a preallocated
:class:`StaticKVCache` (:meth:`Transformer.static_cache`: fixed shapes, for compiled decoding; see
:mod:`dlm.models.kv_cache`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlm.models.attention import PATTERNS, attention_mask
from dlm.models.capabilities import BackboneCapabilities
from dlm.models.inputs import check_inputs
from dlm.models.kv_cache import (  # noqa: F401  (KVCache re-exported)
    # safetensors is imported by from_pretrained only: start-up of every run that builds the model from config.
    KVCache,
    StaticKVCache,
    check_static_capacity,
    is_static_cache,
    static_cache_mask,
    widen_mask,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 so bf16/fp16 training stays stable.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables [B or 1, 1, T, head_dim/2] for integer positions [B or 1, T].

    Computed on the fly in float32 (cheap next to attention) rather than cached in a buffer, so they
    never get cast to bf16 and work for models built on the meta device.
    """
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # Rotate pairs (first half, second half) of each head's features.
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def positions_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """Position of every token within its document: [[7,7,7,9,9]] -> [[0,1,2,0,1]]."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.dropout = dropout

    def forward(self, x, cos, sin, mask, is_causal, cache=None) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # (KVCache, layer index, store?)
            k, v = cache[0].read(cache[1], k, v, cache[2])
        if self.n_kv_heads != self.n_heads:  # GQA: each kv head serves n_heads / n_kv_heads query heads
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)  # gate
        self.w3 = nn.Linear(d_model, d_ff, bias=False)  # value
        self.w2 = nn.Linear(d_ff, d_model, bias=False)  # output

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, d_model, n_heads, n_kv_heads, d_ff, norm_eps, dropout, time_conditioning):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = Attention(d_model, n_heads, n_kv_heads, dropout)
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        self.mlp = SwiGLU(d_model, d_ff)
        self.drop = nn.Dropout(dropout)
        self.time_proj = nn.Linear(d_model, d_model, bias=False) if time_conditioning else None

    def forward(self, x, cos, sin, mask, is_causal, cond=None, cache=None):
        if self.time_proj is not None:
            x = x + self.time_proj(cond)[:, None, :]  # layerwise time conditioning
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of t in [0, 1]; scaled by 1000 so the fastest frequencies resolve small steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


def check_logits_at(logits_at: Tensor | None, input_ids: Tensor, past_key_values, use_cache: bool) -> None:
    """Validate a backbone's ``logits_at`` (bool [B, T] like ``input_ids``; no KV cache with it)."""
    if logits_at is None:
        return
    if past_key_values is not None or use_cache:
        raise ValueError(
            "logits_at (logits at selected positions only) cannot be combined with a KV cache "
            "(past_key_values / use_cache); ask for full logits and select them instead"
        )
    if logits_at.dtype != torch.bool or logits_at.shape != input_ids.shape:
        raise ValueError(
            f"logits_at must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, "
            f"got {logits_at.dtype} {tuple(logits_at.shape)}"
        )


class Transformer(nn.Module):
    # model.lora's default targets (dlm/models/lora.py): the attention and SwiGLU projections
    lora_targets = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")

    def __init__(
        self,
        vocab_size: int,
        n_layers: int = 2,
        d_model: int = 128,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        d_ff: int | None = None,
        max_seq_len: int = 256,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        attention: str = "bidirectional",
        block_size: int | None = None,
        time_conditioning: bool = False,
        tie_embeddings: bool = True,
        init_std: float = 0.02,
    ):
        super().__init__()
        # The constructor's arguments: written to config.json by a native export (see from_pretrained).
        self.init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        sizes = {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "max_seq_len": max_seq_len,
                 "n_kv_heads": n_kv_heads, "d_ff": d_ff, "block_size": block_size}
        for name, value in sizes.items():  # None: the default of n_kv_heads, d_ff and block_size
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads:
            raise ValueError(
                f"n_heads={n_heads} must divide d_model={d_model}; pick n_heads among its divisors"
            )
        if (d_model // n_heads) % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {d_model // n_heads} must be even for RoPE")
        if n_heads % n_kv_heads:
            raise ValueError(
                f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads} (grouped-query attention)"
            )
        if attention not in PATTERNS:
            raise ValueError(
                f"unknown attention pattern {attention!r}; valid patterns are {', '.join(PATTERNS)}"
            )
        if attention == "block_causal" and not block_size:
            raise ValueError("attention='block_causal' needs a positive block_size; set model.block_size")
        if d_ff is None:  # SwiGLU has 3 matrices: 8/3 d keeps the MLP at ~the size of a 4d GELU MLP
            d_ff = 64 * math.ceil(8 * d_model / 3 / 64)
        self.vocab_size, self.max_seq_len, self.attention = vocab_size, max_seq_len, attention
        self.block_size, self.rope_theta = block_size, rope_theta
        self.head_dim = d_model // n_heads
        self.time_conditioning = time_conditioning

        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        if time_conditioning:
            self.time_mlp = nn.Sequential(
                nn.Linear(d_model, d_model, bias=False), nn.SiLU(), nn.Linear(d_model, d_model, bias=False)
            )
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, n_kv_heads, d_ff, norm_eps, dropout, time_conditioning)
            for _ in range(n_layers)
        )
        self.norm = RMSNorm(d_model, norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

        # GPT-2 init: N(0, std) everywhere, residual output projections shrunk so the residual stream's
        # variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=init_std)
        for block in self.blocks:
            for proj in (block.attn.wo, block.mlp.w2):
                nn.init.normal_(proj.weight, mean=0.0, std=init_std / math.sqrt(2 * n_layers))

    @property
    def capabilities(self) -> BackboneCapabilities:
        return BackboneCapabilities(time_conditioning=bool(self.time_conditioning), logits_at=True, kv_cache=True,
                                    static_cache=True)

    def forward(
        self,
        input_ids: Tensor,
        *,
        doc_ids: Tensor | None = None,
        time: Tensor | None = None,
        attention: str | None = None,
        attn_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_at: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, KVCache]:
        """input_ids [B, T] -> float32 logits [B, T, vocab_size] (and the KV cache when use_cache).

        attn_mask: bool [B|1, 1, T, S] (True = may attend; S = cached + T) replacing the pattern's mask.
        position_ids: [B|1, T] RoPE positions (default: after the cached tokens, or per document).
        past_key_values: a KVCache or StaticKVCache (:meth:`static_cache`) of earlier tokens; read always, appended
            to only when use_cache. With a static cache every key slot is attended to under a mask: the pattern's
            (built on the device) or ``attn_mask`` padded with False to the capacity.
        logits_at: bool [B, T]: only those positions' logits, [N, vocab_size] in ``input_ids[logits_at]``'s
            order (the final norm and the head run on the N selected hidden states only). Not with a KV cache.
        """
        B, T = input_ids.shape
        check_logits_at(logits_at, input_ids, past_key_values, use_cache)
        pattern = self.attention if attention is None else attention
        static = is_static_cache(past_key_values)
        if static:
            if doc_ids is not None:
                raise ValueError("doc_ids cannot be combined with a KV cache: fold documents into attn_mask")
            check_static_capacity(past_key_values, B, T)
            slots = past_key_values.slots(T)  # on the device: the compiled graph never reads the length on the host
            if position_ids is None:
                position_ids = slots[None]
            if attn_mask is None:
                attn_mask = static_cache_mask(pattern, slots, past_key_values.capacity, self.block_size)
            attn_mask = widen_mask(attn_mask, past_key_values.capacity)
        past = 0 if past_key_values is None or static else past_key_values.get_seq_length()
        check_inputs(input_ids, vocab_size=self.vocab_size, max_seq_len=self.max_seq_len, past=past,
                     position_ids=position_ids, doc_ids=doc_ids, attn_mask=None if static else attn_mask)

        # Plain causal / bidirectional take SDPA's mask-free fast paths; everything else gets a bool mask.
        is_causal = attn_mask is None and pattern == "causal" and doc_ids is None and past == 0
        mask = attn_mask
        if mask is None and not is_causal:
            mask = attention_mask(
                pattern, past + T, doc_ids=doc_ids, block_size=self.block_size, device=input_ids.device
            )
            mask = None if mask is None else mask[..., past:, :]  # the new queries' rows
        if position_ids is not None:
            positions = position_ids
        elif doc_ids is None:
            positions = torch.arange(past, past + T, device=input_ids.device)[None]
        else:
            positions = positions_from_doc_ids(doc_ids)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)

        cond = None
        if self.time_conditioning:
            if time is None:
                raise ValueError(
                    "this model has time_conditioning=True, so forward() needs time=[B] in [0, 1]"
                )
            time = time.expand(B) if time.dim() == 0 else time.reshape(B)
            emb = timestep_embedding(time, self.tok_emb.embedding_dim).to(self.tok_emb.weight.dtype)
            cond = F.silu(self.time_mlp(emb))

        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        x = self.drop(self.tok_emb(input_ids))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, is_causal, cond, None if cache is None else (cache, i, use_cache))
        if static and use_cache:
            cache.advance(T)  # after every layer wrote at the same slots
        if logits_at is not None:
            return self._logits_at(x, logits_at)
        logits = self.lm_head(self.norm(x)).float()
        return (logits, cache) if use_cache else logits

    @torch.compiler.disable
    def _logits_at(self, x: Tensor, logits_at: Tensor) -> Tensor:
        """The head on the selected hidden states only (the norm is per position: selecting first changes nothing).
        Eager even in a compiled backbone: the number of rows changes every step, so the compiled graph ends at
        the hidden states (one graph, one shape) and this runs after it."""
        return self.lm_head(self.norm(x[logits_at])).float()

    def static_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> StaticKVCache:
        """An empty :class:`StaticKVCache` of ``capacity`` tokens for ``batch_size`` rows (default: the
        parameters' dtype and device)."""
        if not 0 < capacity <= self.max_seq_len:
            raise ValueError(f"a static KV cache needs 0 < capacity <= max_seq_len={self.max_seq_len}, got {capacity}")
        weight = self.tok_emb.weight
        attn = self.blocks[0].attn
        return StaticKVCache(len(self.blocks), batch_size, attn.n_kv_heads, attn.head_dim, capacity,
                             dtype or weight.dtype, device or weight.device)

    @classmethod
    def from_pretrained(cls, path) -> Transformer:
        """Load a native export: ``config.json`` (the constructor's arguments) + ``model.safetensors``."""
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        config = json.loads((Path(path) / "config.json").read_text())
        config = {k: v for k, v in config.items() if k not in ("architecture", "format")}
        model = cls(**config)
        state = load_file(str(Path(path) / "model.safetensors"))
        if model.lm_head.weight is model.tok_emb.weight:
            state.setdefault("lm_head.weight", state["tok_emb.weight"])
        model.load_state_dict(state)
        return model


def count_parameters(module: nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Number of parameters (shared/tied ones counted once).

    exclude_embeddings drops every nn.Embedding weight and a submodule called ``lm_head`` (the output
    embedding, tied or not), giving the "non-embedding" count used in scaling-law papers.
    """
    params = {id(p): p for p in module.parameters()}
    if exclude_embeddings:
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Embedding) or name.split(".")[-1] == "lm_head":
                for p in sub.parameters():
                    params.pop(id(p), None)
    return sum(p.numel() for p in params.values())

"""Parameter counts of a backbone from its config alone: no torch, no transformers modeling code, no meta build.

``dry_run=true`` plans a 30B model in well under a second this way (issue #17): the counts are sums of the layers'
shapes, written here for the layouts dlm ships configs for. Each function mirrors the module tree of its class,
read from the code of the installed transformers release (5.x ``modeling_{llama,qwen2,qwen3,qwen3_moe,gpt2,bert}.py``;
``dlm/models/transformer.py`` for the native backbone) and checked exactly against the meta-device build of every
shipped model config in tests/test_param_count.py. Anything else (another class or model type, flags that add
layers, a LoRA target outside the counted layers, ``model.lora.modules_to_save``) returns None and the plan builds the model on the meta device
instead (dlm.plan). With ``model.lora`` the adapters are counted too (r x (in + out) per adapted Linear: peft's A and
B), on the layers dlm.models.lora adapts (its default targets, or ``target_modules`` by peft's name rule).

The counts follow the meta build's conventions exactly (dlm.models.transformer.count_parameters,
dlm.models.moe.count_active_parameters, dlm.flops.backbone_geometry):

    total          every parameter once (a tied output projection is the input embedding)
    non_embedding  without nn.Embedding weights (tokens, positions, token types) and a module named ``lm_head``
    active         routed experts count for top_k / num_experts of their size (the same float sum, rounded)
    matmul         the N of 6N: active less the input embedding (a lookup), plus it again when tied (the head)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["COUNTED_BACKBONES", "HF_DEFAULTS", "ParamCount", "count_model", "hf_causal_count", "hf_masked_count",
           "native_count"]


@dataclass(frozen=True)
class ParamCount:
    total: int
    non_embedding: int
    active: int
    matmul: int  # parameters a token passes through as matrix products (dlm.flops.backbone_geometry's N)
    layers: int
    width: int
    trainable: int | None = None  # with LoRA adapters: theirs (everything else is frozen); None: all


@dataclass
class _Tally:
    """Parameters by the kind the counts treat differently."""

    token_embedding: int = 0  # the input embedding (a lookup)
    other_embeddings: int = 0  # position / token-type tables (nn.Embedding, but products in N: counted as such)
    head: int = 0  # an untied output projection
    head_is_lm_head: bool = True  # named lm_head (left out of non-embedding) rather than e.g. BERT's `decoder`
    tied: bool = False
    body: int = 0
    experts: list[tuple[int, int, int]] | None = None  # per sparse layer: (size, num_experts, top_k)
    # the Linear (GPT-2: Conv1D) layers under the module LoRA wraps: (path, fan in, fan out); the output projection's
    # path; the names model.lora adapts by default (dlm.models.lora.default_targets: the attention and MLP layers)
    linears: list[tuple[str, int, int]] | None = None
    output: str = "lm_head"
    lora_defaults: tuple[str, ...] = ()
    # names peft also maps onto fused expert tensors (its transformers-5 MoE support: adapters of its own shapes on
    # the experts' gate_up_proj / down_proj), counted by a meta build only
    expert_names: tuple[str, ...] = ()

    def adapters(self, lora: Mapping[str, Any]) -> int | None:
        """Parameters of ``model.lora``'s adapters (peft: A [r, in] and B [out, r] per adapted layer), None where only
        the meta build can tell (a target that names no Linear here, or the output projection: dlm.models.lora then
        refuses or decides)."""
        r = lora.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or self.linears is None:
            return None
        targets = lora.get("target_modules") or self.lora_defaults
        adapted: dict[str, int] = {}
        for target in [targets] if isinstance(targets, str) else targets:
            if target.rpartition(".")[2] in self.expert_names:
                return None
            hits = [(path, i, o) for path, i, o in self.linears if path == target or path.endswith("." + target)]
            if not hits or any(path == self.output for path, _, _ in hits):
                return None
            adapted.update({path: r * (i + o) for path, i, o in hits})  # dlm.models.lora._matches: peft's rule
        return sum(adapted.values())

    def count(self, layers: int, width: int, lora: Mapping[str, Any] | None = None) -> ParamCount | None:
        adapters = 0 if lora is None else self.adapters(lora)
        if adapters is None:
            return None
        experts = self.experts or []
        total = (self.token_embedding + self.other_embeddings + self.head + self.body + sum(s for s, _, _ in experts)
                 + adapters)
        non_embedding = total - self.token_embedding - self.other_embeddings - (self.head if self.head_is_lm_head else 0)
        active = float(total)
        for size, n, k in experts:  # the same float arithmetic as dlm.models.moe.count_active_parameters
            active -= size * (1 - min(k, n) / n)
        active = round(active)
        matmul = active - self.token_embedding + (self.token_embedding if self.tied else 0)
        return ParamCount(total, non_embedding, active, matmul, layers, width, None if lora is None else adapters)


# The transformers config classes' defaults of the fields the counts read (transformers 5.x configuration_*.py);
# tests/test_param_count.py checks each against the installed class. None: derived (head_dim = hidden / heads,
# num_key_value_heads = heads, n_inner = 4 * n_embd).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "attention_bias": False,
              "mlp_bias": False, "tie_word_embeddings": False},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False},
    "qwen3": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "attention_bias": False,
              "tie_word_embeddings": False},
    "qwen3_moe": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "attention_bias": False,
                  "tie_word_embeddings": False, "decoder_sparse_step": 1, "moe_intermediate_size": 768,
                  "num_experts_per_tok": 8, "num_experts": 128, "mlp_only_layers": None},
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
             "tie_word_embeddings": True, "add_cross_attention": False},
    "bert": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2,
             "tie_word_embeddings": True, "is_decoder": False, "add_cross_attention": False},
}
# GPT-2's config.json names (transformers' GPT2Config.attribute_map): a config may use either.
_GPT2_NAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
               "max_position_embeddings": "n_positions"}


def _fields(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config's fields over its model type's defaults, None for a model type counted nowhere here."""
    model_type = config.get("model_type")
    if model_type not in HF_DEFAULTS or config.get("text_config") is not None:
        return None
    given = dict(config)
    if model_type == "gpt2":
        for alias, name in _GPT2_NAMES.items():
            if alias in given:
                given.setdefault(name, given.pop(alias))
    return {**HF_DEFAULTS[model_type], **given}


def _rows(c: Mapping[str, Any], vocab_size: int | None) -> int:
    """Embedding rows: the config's, grown to the tokenizer's when that is larger (dlm.models.hf_loading.grow_vocab)."""
    rows = int(c["vocab_size"])
    return max(rows, int(vocab_size)) if vocab_size is not None else rows


def _decoder(c: Mapping[str, Any], V: int, *, head_dim: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
             qk_norm: bool, mlp: Callable[[int], tuple[int, tuple[int, int, int] | None]],
             dense_width: Callable[[int], int] | None = None) -> _Tally:
    """The Llama-family decoder (Llama, Qwen2, Qwen3, Qwen3-MoE): embedding, L x (RMSNorm, attention, RMSNorm, MLP),
    final RMSNorm, lm_head. ``mlp(layer)``: (the dense parameters of that layer's MLP or router, its experts);
    ``dense_width(layer)``: a dense layer's MLP width (default intermediate_size)."""
    dense_width = dense_width or (lambda _: c["intermediate_size"])
    d, L, H = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or H)
    q, k = H * head_dim, kv * head_dim
    attention = d * q + 2 * d * k + q * d + (q + 2 * k if qkv_bias else 0) + (d if o_bias else 0)
    attention += 2 * head_dim if qk_norm else 0
    t = _Tally(token_embedding=V * d, tied=bool(c["tie_word_embeddings"]), experts=[], linears=[],
               lora_defaults=("q_proj", "k_proj", "v_proj", "o_proj"))
    t.head = 0 if t.tied else d * V
    t.body = d  # the final norm
    inner = set()
    for layer in range(L):
        dense, experts = mlp(layer)
        t.body += 2 * d + attention + dense
        at = f"model.layers.{layer}."
        t.linears += [(at + "self_attn.q_proj", d, q), (at + "self_attn.k_proj", d, k), (at + "self_attn.v_proj", d, k),
                      (at + "self_attn.o_proj", q, d)]
        if experts is not None:
            t.experts.append(experts)  # a router (not a Linear) and fused experts
            t.expert_names = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
        else:
            width = int(dense_width(layer))
            inner.add(width)
            t.linears += [(at + "mlp.gate_proj", d, width), (at + "mlp.up_proj", d, width), (at + "mlp.down_proj", width, d)]
    if inner:
        t.lora_defaults += ("gate_proj", "up_proj", "down_proj")
    t.linears.append(("lm_head", d, V))
    return t


def _swiglu(d: int, inner: int, bias: bool = False) -> int:
    return 3 * d * inner + (2 * inner + d if bias else 0)


def _llama(c: Mapping[str, Any], V: int) -> _Tally:
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    bias = bool(c["attention_bias"])
    return _decoder(c, V, head_dim=int(head_dim), qkv_bias=bias, o_bias=bias, mlp_bias=bool(c["mlp_bias"]),
                    qk_norm=False, mlp=lambda _: (_swiglu(c["hidden_size"], c["intermediate_size"], bool(c["mlp_bias"])), None))


def _qwen2(c: Mapping[str, Any], V: int) -> _Tally:
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return _decoder(c, V, head_dim=int(head_dim), qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False,
                    mlp=lambda _: (_swiglu(c["hidden_size"], c["intermediate_size"]), None))


def _qwen3(c: Mapping[str, Any], V: int) -> _Tally:
    bias = bool(c["attention_bias"])
    return _decoder(c, V, head_dim=int(c["head_dim"]), qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True,
                    mlp=lambda _: (_swiglu(c["hidden_size"], c["intermediate_size"]), None))


def _qwen3_moe(c: Mapping[str, Any], V: int) -> _Tally:
    d, E, k = int(c["hidden_size"]), int(c["num_experts"]), int(c["num_experts_per_tok"])
    dense_only = set(c.get("mlp_only_layers") or [])
    step = int(c["decoder_sparse_step"])

    def mlp(layer: int):  # Qwen3MoeDecoderLayer: a sparse block (router E x d + fused experts) or a dense MLP
        if layer not in dense_only and E > 0 and (layer + 1) % step == 0:
            return E * d, (3 * E * d * int(c["moe_intermediate_size"]), E, k)
        return _swiglu(d, int(c["intermediate_size"])), None

    head_dim = c.get("head_dim") or d // c["num_attention_heads"]
    bias = bool(c["attention_bias"])
    return _decoder(c, V, head_dim=int(head_dim), qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True, mlp=mlp)


def _gpt2(c: Mapping[str, Any], V: int) -> _Tally | None:
    if c["add_cross_attention"]:
        return None
    d, L = int(c["n_embd"]), int(c["n_layer"])
    inner = int(c.get("n_inner") or 4 * d)
    layer = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * inner + inner) + (inner * d + d)  # Conv1D: biased
    t = _Tally(token_embedding=V * d, other_embeddings=int(c["n_positions"]) * d, tied=bool(c["tie_word_embeddings"]),
               lora_defaults=("c_attn", "c_fc", "c_proj"), linears=[])
    t.head = 0 if t.tied else d * V
    t.body = L * layer + 2 * d  # ln_f
    for i in range(L):
        at = f"transformer.h.{i}."
        t.linears += [(at + "attn.c_attn", d, 3 * d), (at + "attn.c_proj", d, d), (at + "mlp.c_fc", d, inner),
                      (at + "mlp.c_proj", inner, d)]
    t.linears.append(("lm_head", d, V))
    return t


def _bert(c: Mapping[str, Any], V: int) -> _Tally | None:
    """BertForMaskedLM (no pooler): embeddings (+ LayerNorm), L encoder layers, the MLM head (transform, decoder
    with a bias of V, its weight the word embedding unless untied)."""
    if c["is_decoder"] or c["add_cross_attention"]:
        return None
    d, L, inner = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["intermediate_size"])
    layer = 4 * (d * d + d) + 2 * d + (d * inner + inner) + (inner * d + d) + 2 * d
    t = _Tally(token_embedding=V * d, other_embeddings=(int(c["max_position_embeddings"]) + int(c["type_vocab_size"])) * d,
               tied=bool(c["tie_word_embeddings"]), head_is_lm_head=False, linears=[],
               output="cls.predictions.decoder", lora_defaults=("dense", "key", "query", "value"))
    for i in range(L):
        at = f"bert.encoder.layer.{i}."
        t.linears += [(at + "attention.self.query", d, d), (at + "attention.self.key", d, d),
                      (at + "attention.self.value", d, d), (at + "attention.output.dense", d, d),
                      (at + "intermediate.dense", d, inner), (at + "output.dense", inner, d)]
    t.linears += [("cls.predictions.transform.dense", d, d), ("cls.predictions.decoder", d, V)]
    t.head = 0 if t.tied else d * V
    # the head's bias (V): the decoder's is BertLMPredictionHead.bias when tied, and after a resize (its tie_weights
    # ties the biases whatever tie_word_embeddings says); untied and not resized, transformers 5 keeps both
    biases = 1 if t.tied or V > int(c["vocab_size"]) else 2
    t.body = 2 * d + L * layer + (d * d + d + 2 * d) + biases * V
    return t


_CAUSAL = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "qwen3_moe": _qwen3_moe, "gpt2": _gpt2}
_MASKED = {"bert": _bert}


def _hf_count(table: Mapping[str, Callable], config: Mapping[str, Any], vocab_size: int | None,
              lora: Mapping[str, Any] | None = None) -> ParamCount | None:
    c = _fields(config)
    counter = None if c is None else table.get(c["model_type"])
    tally = None if counter is None else counter(c, _rows(c, vocab_size))
    if tally is None:
        return None
    layers = c.get("num_hidden_layers", c.get("n_layer"))
    width = c.get("hidden_size", c.get("n_embd"))
    return tally.count(int(layers), int(width), lora)


def hf_causal_count(config: Mapping[str, Any], vocab_size: int | None = None,
                    lora: Mapping[str, Any] | None = None) -> ParamCount | None:
    """An ``AutoModelForCausalLM`` of this config (``model_type`` + fields) as dlm.models.hf.HFCausalLM builds it,
    with ``lora`` (``model.lora``: r, target_modules) adapters."""
    return _hf_count(_CAUSAL, config, vocab_size, lora)


def hf_masked_count(config: Mapping[str, Any], vocab_size: int | None = None,
                    lora: Mapping[str, Any] | None = None) -> ParamCount | None:
    """An ``AutoModelForMaskedLM`` of this config as dlm.models.hf_masked_lm.HFMaskedLM builds it."""
    return _hf_count(_MASKED, config, vocab_size, lora)


def native_tally(vocab_size: int, n_layers: int = 2, d_model: int = 128, n_heads: int = 4,
                 n_kv_heads: int | None = None, d_ff: int | None = None, time_conditioning: bool = False,
                 tie_embeddings: bool = True, **_: Any) -> _Tally:
    """dlm.models.transformer.Transformer's parameters with these arguments (its defaults)."""
    d, kv, n_heads, n_layers = int(d_model), int(n_kv_heads or n_heads), int(n_heads), int(n_layers)
    head_dim = d // n_heads
    d_ff = int(d_ff) if d_ff is not None else 64 * math.ceil(8 * d / 3 / 64)
    q, k = n_heads * head_dim, kv * head_dim
    tc = d * d if time_conditioning else 0
    layer = 2 * d + 2 * d * q + 2 * d * k + 3 * d * d_ff + tc
    t = _Tally(token_embedding=int(vocab_size) * d, tied=bool(tie_embeddings), linears=[],
               lora_defaults=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))  # Transformer.lora_targets
    t.head = 0 if t.tied else d * int(vocab_size)
    t.body = n_layers * layer + d + 2 * tc
    if time_conditioning:
        t.linears += [("time_mlp.0", d, d), ("time_mlp.2", d, d)]
    for i in range(n_layers):
        at = f"blocks.{i}."
        t.linears += [(at + "attn.wq", d, q), (at + "attn.wk", d, k), (at + "attn.wv", d, k), (at + "attn.wo", q, d),
                      (at + "mlp.w1", d, d_ff), (at + "mlp.w3", d, d_ff), (at + "mlp.w2", d_ff, d)]
        if time_conditioning:
            t.linears.append((at + "time_proj", d, d))
    t.linears.append(("lm_head", d, int(vocab_size)))
    return t


def native_count(vocab_size: int, lora: Mapping[str, Any] | None = None, **fields: Any) -> ParamCount | None:
    """dlm.models.transformer.Transformer with these arguments (its defaults for the rest)."""
    return native_tally(vocab_size, **fields).count(int(fields.get("n_layers", 2)), int(fields.get("d_model", 128)), lora)


def _native(fields: dict, vocab_size: int | None, lora) -> ParamCount | None:
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    if not isinstance(fields.get("vocab_size"), int):
        return None
    return native_count(lora=lora, **fields)


def _hf(counter: Callable) -> Callable[[dict, int | None, Any], ParamCount | None]:
    def count(fields: dict, vocab_size: int | None, lora) -> ParamCount | None:
        if fields.get("pretrained") or fields.get("trust_remote_code") or not fields.get("config"):
            return None  # a checkpoint's geometry is merged into config by the caller (dlm.plan)
        return counter(fields["config"], vocab_size if vocab_size is not None else fields.get("vocab_size"), lora)
    return count


# The backbone classes counted here, by import path (reading `_target_` without importing the class, which imports
# torch): exact paths, so a subclass is built on the meta device. tests/test_param_count.py resolves each one.
COUNTED_BACKBONES: dict[str, Callable[[dict, int | None, Any], ParamCount | None]] = {
    "dlm.models.transformer.Transformer": _native,
    "dlm.models.Transformer": _native,
    "dlm.models.hf.HFCausalLM": _hf(hf_causal_count),
    "dlm.models.HFCausalLM": _hf(hf_causal_count),
    "dlm.models.zoo.PublishedDLM": _hf(hf_causal_count),  # the published layouts map to transformers geometries
    "dlm.models.zoo.backbone.PublishedDLM": _hf(hf_causal_count),
    "dlm.models.hf_masked_lm.HFMaskedLM": _hf(hf_masked_count),
    "dlm.models.HFMaskedLM": _hf(hf_masked_count),
}


def count_model(model_cfg: Mapping[str, Any], vocab_size: int | None = None) -> ParamCount | None:
    """The counts of a model config (``cfg.model`` as a plain dict, a checkpoint's geometry already merged into
    ``config`` and ``pretrained`` cleared) built with ``vocab_size`` and its ``lora`` adapters; None where only a
    meta build can tell (another class, another model type, a LoRA target not among the counted layers)."""
    fields = dict(model_cfg)
    lora = fields.pop("lora", None) or None
    if lora is not None and lora.get("r") is None:
        lora = None  # LoRA off
    if lora is not None and lora.get("modules_to_save"):
        return None  # modules trained in full (peft's name rule, ties): the meta build counts them exactly
    counter = COUNTED_BACKBONES.get(str(fields.pop("_target_", "")))
    if counter is None:
        return None
    fields.pop("layout", None)
    return counter(fields, vocab_size, lora)

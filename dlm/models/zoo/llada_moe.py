"""LLaDA-MoE-7B-A1B (inclusionAI/LLaDA-MoE-7B-A1B-Base, -Instruct) in its published layout, run as transformers'
Qwen3-MoE.

Source: the authors' ``modeling_lladamoe.py`` / ``configuration_lladamoe.py`` (read here from the copy in
ZHZisZZ/dllm, ``dllm/pipelines/llada/models/``; the inclusionAI hub repo itself is not in the store). The code is
OLMoE's with three changes that matter: attention is never causal, QK-norm is *per head* (``q_norm`` /
``k_norm`` are RMSNorms over ``head_dim``, applied to ``q.reshape(-1, head_dim)``, not OLMoE's norm over the whole
projection) and dense layers may replace MoE ones (``moe_layer_freq``). That is Qwen3-MoE's mathematics, not OLMoE's:

- RMSNorm float32 (``weight * x.to(dtype)``), RoPE rotate-half (``rope_theta`` 50000), ``head_dim = hidden_size /
  num_attention_heads``, no attention bias;
- ``LLaDAMoESparseMoeBlock``: router ``gate`` (no bias), softmax in float32, top-8 of 64, ``norm_topk_prob``
  hard-coded False (the config field is ignored by the authors' code, so here too), experts SwiGLU of
  ``expert_intermediate_size`` 1024; ``routed_scaling_factor`` and ``moe_router_score_function`` are read but
  unused by the forward; expert bias, a shared expert and ``clip_qkv`` are refused (Qwen3-MoE has none);
- layers with ``moe_layer_freq[i] == 0`` are dense (``dense_intermediate_size``) = Qwen3-MoE's ``mlp_only_layers``;
- untied ``lm_head``; no logit shift (trained from scratch as a mask predictor, like LLaDA).

Weight names: ``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``, ``self_attn.{q,k}_norm``,
``mlp.gate``, ``mlp.experts.E.{gate,up,down}_proj``, ``{input,post_attention}_layernorm``, ``model.norm``,
``lm_head``. The published config.json says ``model_type: "llada"`` (ZHZisZZ/dllm's README tells users to edit it to
``"lladamoe"`` for their loader); both are accepted, told apart from LLaDA-8B by the keys (no ``d_model``).
"""

from __future__ import annotations

from typing import Any

from dlm.models.zoo.layout import PublishedLayout, Target
from dlm.models.zoo.moe import qwen3_moe_names


class LLaDAMoELayout(PublishedLayout):
    name = "LLaDA-MoE"
    model_types = ("llada", "lladamoe")
    transformers_type = "qwen3_moe"

    def matches(self, published: dict) -> bool:
        return super().matches(published) and "num_experts" in published and "d_model" not in published

    def check(self, published: dict) -> None:
        if published.get("qk_layernorm") is False:
            self.refuse("qk_layernorm", False, "Qwen3-MoE always normalises q and k per head")
        if published.get("shared_expert_intermediate_size"):
            self.refuse("shared_expert_intermediate_size", published["shared_expert_intermediate_size"],
                        "Qwen3-MoE has no shared expert")
        if published.get("moe_router_enable_expert_bias"):
            self.refuse("moe_router_enable_expert_bias", True, "Qwen3-MoE's router has no expert bias")
        if published.get("clip_qkv") is not None:
            self.refuse("clip_qkv", published["clip_qkv"], "Qwen3-MoE does not clip q, k, v")
        if published.get("partial_rotary_factor", 1) not in (1, 1.0, -1, None):
            self.refuse("partial_rotary_factor", published["partial_rotary_factor"], "RoPE over the whole head only")
        if published.get("rope_scaling"):
            self.refuse("rope_scaling", published["rope_scaling"], "LLaDA-MoE uses unscaled RoPE")
        score = published.get("moe_router_score_function")
        if score not in (None, "softmax"):
            self.refuse("moe_router_score_function", score, "the authors' router is a softmax")

    def hf_config(self, published: dict) -> dict[str, Any]:
        hidden, heads = published["hidden_size"], published["num_attention_heads"]
        freq = published.get("moe_layer_freq") or [1] * published["num_hidden_layers"]
        return {
            "model_type": "qwen3_moe",
            "hidden_size": hidden,
            "num_hidden_layers": published["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": published.get("num_key_value_heads") or heads,
            "head_dim": hidden // heads,
            "intermediate_size": published.get("dense_intermediate_size", -1),
            "moe_intermediate_size": published["expert_intermediate_size"],
            "num_experts": published["num_experts"],
            "num_experts_per_tok": published["num_experts_per_tok"],
            "norm_topk_prob": False,  # hard-coded in LLaDAMoESparseMoeBlock
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, f in enumerate(freq) if f == 0],
            "vocab_size": published["vocab_size"],
            "max_position_embeddings": published.get("max_position_embeddings", 4096),
            "rms_norm_eps": published.get("rms_norm_eps", 1e-5),
            "rope_theta": published["rope_theta"],
            "tie_word_embeddings": bool(published.get("tie_word_embeddings", False)),
            "attention_bias": bool(published.get("attention_bias", False)),
            "attention_dropout": published.get("attention_dropout", 0.0),
            "router_aux_loss_coef": published.get("router_aux_loss_coef", 0.01),
            "hidden_act": published.get("hidden_act", "silu"),
            "pad_token_id": published.get("pad_token_id"),
            "eos_token_id": published.get("eos_token_id"),
            "bos_token_id": published.get("bos_token_id"),
            "use_sliding_window": False,
            "use_cache": False,
        }

    def geometry_fields(self) -> dict[str, str]:
        return {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
                "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_key_value_heads",
                "num_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
                "expert_intermediate_size": "moe_intermediate_size",
                "dense_intermediate_size": "intermediate_size",
                "max_position_embeddings": "max_position_embeddings"}

    def names(self, hf: dict) -> dict[str, Target]:
        return qwen3_moe_names(hf, attention_bias=bool(hf.get("attention_bias")))

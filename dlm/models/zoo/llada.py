"""LLaDA-8B (GSAI-ML/LLaDA-8B-Base, -Instruct, LLaDA-1.5) in its published layout, run as transformers' Llama.

Source: the authors' ``modeling_llada.py`` / ``configuration_llada.py`` shipped in the hub repos (read here from
the copy in ZHZisZZ/dllm, ``dllm/pipelines/llada/models/``; an OLMo-derived codebase). With the published
config (``block_type: llama``, ``layer_norm_type: rms``, ``activation_type: silu``, ``rope: true``, no biases, no
QK norm, ``weight_tying: false``, ``scale_logits: false``) a ``LLaDALlamaBlock`` is exactly a Llama decoder layer:

- ``x + attn_out(SDPA(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))`` with ``n = attn_norm(x)``, attention never
  causal (``is_causal=False``, no mask);
- ``x + ff_out(silu(ff_proj(m)) * up_proj(m))`` with ``m = ff_norm(x)``: ``ff_proj`` is the gate;
- RMSNorm in float32, ``weight * x.to(dtype)``, eps ``rms_norm_eps``;
- RoPE rotate-half (the OLMo ``rotate_half`` splits the head into halves: GPT-NeoX / Llama convention, not
  interleaved), ``inv_freq = theta^(-2i/d)`` over ``head_dim = d_model / n_heads``, computed in float32
  (``rope_full_precision``); Llama applies the same rotation (in the activations' dtype: equal in float32);
- ``ln_f`` then an untied ``transformer.ff_out`` head; no logit shift (token i is read at position i).

Weight names: ``model.transformer.wte``, ``model.transformer.blocks.N.{q_proj,k_proj,v_proj,attn_out,ff_proj,
up_proj,ff_out,attn_norm,ff_norm}``, ``model.transformer.ln_f``, ``model.transformer.ff_out``; bf16 shards with
``model.safetensors.index.json``. Mask token ``<|mdm_mask|>`` = ``mask_token_id`` 126336 of config.json.
"""

from __future__ import annotations

from typing import Any

from dlm.models.zoo.layout import PublishedLayout, Target

# The published config's switches and the values that make the block a Llama layer; anything else is refused.
REQUIRED = {
    "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "rope": True, "alibi": False,
    "attention_layer_norm": False, "scale_logits": False, "include_bias": False, "include_qkv_bias": False,
    "input_emb_norm": False, "block_group_size": 1, "multi_query_attention": None,
}
BLOCK = {  # published block weight -> Llama decoder-layer weight
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
}


class LLaDALayout(PublishedLayout):
    name = "LLaDA"
    model_types = ("llada",)
    transformers_type = "llama"

    def matches(self, published: dict) -> bool:  # LLaDA-MoE's config.json also says "llada"; it has no d_model
        return super().matches(published) and "d_model" in published

    def check(self, published: dict) -> None:
        for field, want in REQUIRED.items():
            if field in published and published[field] != want and not (field == "multi_query_attention"
                                                                         and published[field] is False):
                self.refuse(field, published[field], f"the Llama mapping needs {want!r}")
        if published.get("layer_norm_with_affine", True) is False:
            self.refuse("layer_norm_with_affine", False, "Llama's RMSNorm has a weight")
        if published.get("bias_for_layer_norm"):
            self.refuse("bias_for_layer_norm", True, "Llama's RMSNorm has no bias")
        if published.get("rope_scaling"):
            self.refuse("rope_scaling", published["rope_scaling"], "LLaDA's RoPE is unscaled")

    def hf_config(self, published: dict) -> dict[str, Any]:
        d, heads = published["d_model"], published["n_heads"]
        kv = published.get("n_kv_heads") or heads
        hidden = published.get("mlp_hidden_size") or published.get("mlp_ratio", 4) * d
        return {
            "model_type": "llama",
            "hidden_size": d,
            "num_hidden_layers": published["n_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": d // heads,
            "intermediate_size": hidden,
            "vocab_size": published.get("embedding_size") or published["vocab_size"],
            "max_position_embeddings": published.get("max_sequence_length", 4096),
            "rms_norm_eps": published.get("rms_norm_eps", 1e-5),
            "rope_theta": published.get("rope_theta", 10000.0),
            "tie_word_embeddings": bool(published.get("weight_tying", False)),
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
            "attention_dropout": published.get("attention_dropout", 0.0),
            "pad_token_id": published.get("pad_token_id"),
            "eos_token_id": published.get("eos_token_id"),
            "bos_token_id": published.get("bos_token_id"),
            "mask_token_id": published.get("mask_token_id"),
            "use_cache": False,
        }

    def geometry_fields(self) -> dict[str, str]:
        return {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                "n_kv_heads": "num_key_value_heads", "mlp_hidden_size": "intermediate_size",
                "embedding_size": "vocab_size", "max_sequence_length": "max_position_embeddings"}

    def published_config(self, original: dict, hf: dict) -> dict[str, Any]:
        out = super().published_config(original, hf)
        # vocab_size is the tokenizer's (<= embedding_size); a grown embedding raises it with the rows
        if "vocab_size" in out and hf.get("vocab_size", 0) > out["vocab_size"]:
            out["vocab_size"] = hf["vocab_size"]
        return out

    def names(self, hf: dict) -> dict[str, Target]:
        table = {"model.transformer.wte.weight": Target("model.embed_tokens.weight"),
                 "model.transformer.ln_f.weight": Target("model.norm.weight")}
        for i in range(hf["num_hidden_layers"]):
            for published, ours in BLOCK.items():
                table[f"model.transformer.blocks.{i}.{published}.weight"] = Target(f"model.layers.{i}.{ours}.weight")
        if not hf.get("tie_word_embeddings"):
            table["model.transformer.ff_out.weight"] = Target("lm_head.weight")
        return table

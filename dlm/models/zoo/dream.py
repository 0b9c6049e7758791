"""Dream-v0-7B (Dream-org/Dream-v0-Base-7B, -Instruct-7B) in its published layout, run as transformers' Qwen2.

Source: the authors' ``modeling_dream.py`` / ``configuration_dream.py`` (hub repos; read here from the copy in
ZHZisZZ/dllm, ``dllm/pipelines/dream/models/``). Dream is Qwen2.5-7B continued as a masked diffusion model, and its
network is Qwen2's with attention never causal:

- q/k/v projections with bias, o_proj without (``DreamAttention``: ``bias=True`` on q, k, v);
- RMSNorm (float32, ``weight * x.to(dtype)``), SwiGLU MLP (gate/up/down), RoPE rotate-half over ``head_dim =
  hidden_size / num_attention_heads`` with ``rope_theta``; untied ``lm_head``;
- the weight names are Qwen2's own (``model.layers.N.self_attn.q_proj`` ...), so the mapping is the identity.

Logit shift: Dream's sampler (``generation_utils.py``) reads token i from position i - 1
(``logits = cat([logits[:, :1], logits[:, :-1]])``): the model kept its AR head. config.json ``model_type:
"Dream"``, ``architectures: ["DreamModel"]``, ``mask_token_id`` 151666 (``<|mask|>``), ``pad_token_id`` 151643.
"""

from __future__ import annotations

from typing import Any

from dlm.models.zoo.layout import PublishedLayout, Target, architecture_fields

LAYER = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
         "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
         "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")


class DreamLayout(PublishedLayout):
    name = "Dream"
    model_types = ("Dream", "dream")
    transformers_type = "qwen2"

    def check(self, published: dict) -> None:
        self.require_full_unscaled_attention(published)

    def hf_config(self, published: dict) -> dict[str, Any]:
        fields = architecture_fields(published)
        fields.update(model_type="qwen2", use_sliding_window=False, use_cache=False)
        fields.pop("sliding_window", None)
        if not fields.get("rope_scaling"):  # None: unscaled (transformers 5 reads rope_parameters)
            fields.pop("rope_scaling", None)
        return fields

    def geometry_fields(self) -> dict[str, str]:
        return {k: k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "max_position_embeddings")}

    def names(self, hf: dict) -> dict[str, Target]:
        table = {"model.embed_tokens.weight": Target("model.embed_tokens.weight")}
        for i in range(hf["num_hidden_layers"]):
            for name in LAYER:
                table[f"model.layers.{i}.{name}"] = Target(f"model.layers.{i}.{name}")
        table["model.norm.weight"] = Target("model.norm.weight")
        if not hf.get("tie_word_embeddings"):
            table["lm_head.weight"] = Target("lm_head.weight")
        return table

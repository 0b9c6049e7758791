"""RND1-Base (radicalnumerics/RND1-Base-0910) in its published layout, run as transformers' Qwen3-MoE.

Source: RadicalNumerics/RND1 ``rnd/modeling_rnd.py`` and ``configuration_rnd.py`` (read in the RadicalNumerics/RND1
repo and its copy in ZHZisZZ/dllm). RND1 is Qwen3-30B-A3B converted to a bidirectional masked diffusion model by
continual pretraining (500B tokens), and its network is Qwen3-MoE's with ``is_causal = False``:

- per-head RMSNorm on q and k (``q_norm``/``k_norm`` over ``head_dim``) before RoPE (rotate-half, Qwen3-MoE's
  ``apply_rotary_pos_emb``), GQA 32 query / 4 kv heads of 128;
- ``RND1SparseMoeBlock``: router ``gate`` (no bias), softmax in float32, top-``num_experts_per_tok`` (8 of 128),
  renormalised when ``norm_topk_prob`` (true), experts ``Qwen3MoeMLP`` (SwiGLU, ``moe_intermediate_size`` 768),
  no shared expert; every layer sparse (``decoder_sparse_step`` 1, ``mlp_only_layers`` []);
- untied ``lm_head``. Weight names are transformers 4.x Qwen3-MoE's, one tensor per expert
  (``model.layers.N.mlp.experts.E.gate_proj.weight``), mapped onto the fused experts of transformers 5 (moe.py).

Conventions: mask token id 151669 (``RND1GenerationConfig``, ``RND1Config``); the sampler shifts predictions
("pos i predicts token i+1", ``rnd/sampling.py``) and orders commits by entropy; ``eb_gamma`` selects the
entropy-bounded (EB) sampler. Note: the authors' ``RND1Config.set_config_defaults`` overwrites the geometry read
from config.json with Qwen3-30B-A3B's, so their code loads only the full-size geometry; dlm reads config.json as
written (identical for the published checkpoint).
"""

from __future__ import annotations

from typing import Any

from dlm.models.zoo.layout import PublishedLayout, Target, architecture_fields
from dlm.models.zoo.moe import qwen3_moe_names

# RND1-only config.json fields (generation and backend settings): kept in config.json, not architecture.
RND1_FIELDS = ("moe_backend", "num_diffusion_steps")


class RND1Layout(PublishedLayout):
    name = "RND1"
    model_types = ("rnd1",)
    transformers_type = "qwen3_moe"

    def check(self, published: dict) -> None:
        self.require_full_unscaled_attention(published)

    def hf_config(self, published: dict) -> dict[str, Any]:
        fields = {k: v for k, v in architecture_fields(published).items() if k not in RND1_FIELDS}
        fields.update(model_type="qwen3_moe", use_sliding_window=False, use_cache=False)
        for key in ("sliding_window", "rope_scaling", "is_causal"):  # False in RND1's file = "none"
            fields.pop(key, None)
        return fields

    def geometry_fields(self) -> dict[str, str]:
        return {k: k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "num_experts", "num_experts_per_tok",
                               "moe_intermediate_size", "max_position_embeddings")}

    def names(self, hf: dict) -> dict[str, Target]:
        return qwen3_moe_names(hf, attention_bias=bool(hf.get("attention_bias")))

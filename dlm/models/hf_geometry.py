"""Geometries of the hub checkpoints our model configs name, so that plans (dry_run=true), parameter counts and
consolidation work offline, on the meta device, without the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# transformers is imported where a checkpoint's config is read: planning a native model needs none of it.

# Geometry of Qwen/Qwen3-30B-A3B-Base (the RND1 starting point): ~30.5B parameters, ~3.3B active per token.
# Used to build the model on the meta device (dry runs, parameter counts) without the checkpoint.
QWEN3_30B_A3B: dict[str, Any] = {
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "intermediate_size": 6144,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}

# Geometry of Qwen/Qwen3-0.6B-Base: ~0.6B parameters (tied embeddings).
QWEN3_0P6B: dict[str, Any] = {
    "model_type": "qwen3",
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}

# Geometry of openai-community/gpt2 (124M).
GPT2_SMALL: dict[str, Any] = {
    "model_type": "gpt2",
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_positions": 1024,
    "vocab_size": 50257,
}

# The published diffusion LMs (dlm/models/zoo), as the transformers geometry their layout maps to: from the
# checkpoints' config.json as the model cards and the authors' code give them (sources in dlm/models/zoo/*.py).
# LLaDA-8B (Base, Instruct, 1.5 share it): 8,015,581,184 parameters (the LLaDA paper: 8.02B, 6.98B non-embedding).
LLADA_8B: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 126464,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False,
}
# LLaDA-MoE-7B-A1B: 64 experts top-8 (no renormalisation), per-head QK-norm, rope_theta 50000: 7.36B parameters,
# 1.72B active per token of which 1.40B besides the input embedding (the paper: "7B", "1.4B active"). Its own
# config.json was not in reach: vocab 157184 is inclusionAI's Ling tokenizer (pad/eos 156892, mask 156895 fit it).
LLADA_MOE_7B: dict[str, Any] = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
    "num_key_value_heads": 16, "head_dim": 128, "intermediate_size": 8192, "moe_intermediate_size": 1024,
    "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "vocab_size": 157184, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 50000.0, "tie_word_embeddings": False, "attention_bias": False, "router_aux_loss_coef": 0.01,
}
# Dream-v0-7B (Base, Instruct): Qwen2.5-7B's geometry, 7,615,616,512 parameters (Qwen2.5 report: 7.61B).
DREAM_7B: dict[str, Any] = {
    "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False, "use_sliding_window": False,
}
# RND1-Base-0910: Qwen3-30B-A3B's geometry (RND1Config's CONFIG_DEFAULTS), top-8 renormalised.
RND1_30B: dict[str, Any] = {**QWEN3_30B_A3B, "max_position_embeddings": 40960, "norm_topk_prob": True,
                            "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001}
# Geometry of bert-base-uncased (110M), the DiffusionBERT initialisation (model=bert_base).
BERT_BASE_UNCASED: dict[str, Any] = {
    "model_type": "bert",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "vocab_size": 30522,
}

# Attention implementations that accept an arbitrary explicit 4D mask.

# Geometries of the hub checkpoints our configs name, so that a plan (dry_run=true) works offline.
KNOWN_GEOMETRIES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-30B-A3B-Base": QWEN3_30B_A3B,
    "Qwen/Qwen3-30B-A3B": QWEN3_30B_A3B,
    "Qwen/Qwen3-0.6B-Base": QWEN3_0P6B,
    "Qwen/Qwen3-0.6B": QWEN3_0P6B,
    "openai-community/gpt2": GPT2_SMALL,
    "gpt2": GPT2_SMALL,
    "GSAI-ML/LLaDA-8B-Base": LLADA_8B,
    "GSAI-ML/LLaDA-8B-Instruct": LLADA_8B,
    "GSAI-ML/LLaDA-1.5": LLADA_8B,
    "inclusionAI/LLaDA-MoE-7B-A1B-Base": LLADA_MOE_7B,
    "inclusionAI/LLaDA-MoE-7B-A1B-Instruct": LLADA_MOE_7B,
    "Dream-org/Dream-v0-Base-7B": DREAM_7B,
    "Dream-org/Dream-v0-Instruct-7B": DREAM_7B,
    "radicalnumerics/RND1-Base-0910": RND1_30B,
    "bert-base-uncased": BERT_BASE_UNCASED,
    "google-bert/bert-base-uncased": BERT_BASE_UNCASED,
}


def pretrained_geometry(pretrained: str) -> dict[str, Any]:
    """The config of a checkpoint as a plain dict with model_type: read from a local folder or the hub cache,
    else from KNOWN_GEOMETRIES (offline). Never loads weights."""
    from transformers import AutoConfig

    from dlm.models.zoo.registry import published_geometry  # a DLM's own layout (unknown to transformers)

    zoo = published_geometry(pretrained)
    if zoo is not None:
        return zoo
    if pretrained in KNOWN_GEOMETRIES and not Path(pretrained).is_dir():
        try:  # the hub cache only: a plan or a refusal must not wait on the network
            return AutoConfig.from_pretrained(pretrained, local_files_only=True).to_dict()
        except (OSError, ValueError):
            return dict(KNOWN_GEOMETRIES[pretrained])
    try:
        return AutoConfig.from_pretrained(pretrained).to_dict()
    except (OSError, ValueError) as err:
        if pretrained in KNOWN_GEOMETRIES:
            return dict(KNOWN_GEOMETRIES[pretrained])
        raise ValueError(
            f"cannot read the config of {pretrained!r} (offline, or no such checkpoint) and its geometry is not "
            f"among the known ones ({', '.join(KNOWN_GEOMETRIES)}): pass a local folder as model.pretrained"
        ) from err

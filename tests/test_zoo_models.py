"""The published diffusion LMs in their own checkpoint layouts (dlm/models/zoo): tiny random checkpoints written in
each layout (config keys, weight names, bf16, a sharded index, a tokenizer with the mask token) load through the
model configs, land where they should, export back bit for bit, and give the logits of independent
implementations; the zoo configs plan at their published sizes; a tiny LLaDA and a tiny Dream train and export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLI, run_dir_of

VOCAB = 40  # tiny tokenizer: 38 words, EOS, mask
WORDS = [f"w{i}" for i in range(VOCAB - 2)]

# ---- tiny published configs: the keys of the real config.json files, shrunk ---------------------------------------
LLADA_CONFIG = {  # GSAI-ML/LLaDA-8B-Base's config.json keys
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 32,
    "embedding_dropout": 0.0, "embedding_size": VOCAB, "eos_token_id": VOCAB - 2, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": VOCAB - 1, "max_sequence_length": 64, "mlp_hidden_size": 48,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 2,
    "n_layers": 2, "pad_token_id": VOCAB - 2, "precision": "amp_bf16", "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
    "scale_logits": False, "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": False,
    "vocab_size": VOCAB, "weight_tying": False,
}
LLADA_MOE_CONFIG = {  # inclusionAI/LLaDA-MoE-7B-A1B-Base's keys (configuration_lladamoe.py), model_type "llada"
    "architectures": ["LLaDAMoEModelLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
                 "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                 "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
    "bos_token_id": None, "clip_qkv": None, "dense_intermediate_size": 64, "eos_token_id": VOCAB - 2,
    "expert_intermediate_size": 16, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
    "max_position_embeddings": 64, "model_type": "llada", "moe_layer_freq": [1, 0, 1],  # layer 1 dense
    "moe_router_enable_expert_bias": False, "moe_router_score_function": "softmax", "norm_topk_prob": False,
    "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 3,
    "num_key_value_heads": 4, "output_router_logits": False, "pad_token_id": VOCAB - 2,
    "partial_rotary_factor": 1, "qk_layernorm": True, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 50000, "routed_scaling_factor": 1, "router_aux_loss_coef": 0.01, "router_num_group": None,
    "router_topk_group": None, "shared_expert_intermediate_size": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.52.4", "use_cache": False, "vocab_size": VOCAB,
}
DREAM_CONFIG = {  # Dream-org/Dream-v0-Base-7B's keys
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 2, "hidden_act": "silu", "hidden_size": 32,
    "initializer_range": 0.02, "intermediate_size": 48, "mask_token_id": VOCAB - 1,
    "max_position_embeddings": 64, "max_window_layers": 2, "model_type": "Dream", "num_attention_heads": 4,
    "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": VOCAB - 2, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": False, "use_sliding_window": False,
    "vocab_size": VOCAB,
}
RND1_CONFIG = {  # radicalnumerics/RND1-Base-0910's keys (configuration_rnd.py CONFIG_DEFAULTS + RND1 fields)
    "architectures": ["RND1LM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_rnd.RND1Config", "AutoModel": "modeling_rnd.RND1Model",
                 "AutoModelForMaskedLM": "modeling_rnd.RND1LM"},
    "bos_token_id": VOCAB - 2, "decoder_sparse_step": 1, "dtype": "bfloat16", "eos_token_id": VOCAB - 2,
    "head_dim": 8, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48,
    "is_causal": False, "mask_token_id": VOCAB - 1, "max_position_embeddings": 64, "max_window_layers": 2,
    "mlp_only_layers": [], "model_type": "rnd1", "moe_backend": "hf", "moe_intermediate_size": 16,
    "norm_topk_prob": True, "num_attention_heads": 4, "num_diffusion_steps": 256, "num_experts": 4,
    "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 2, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": False, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": False, "tie_word_embeddings": False, "transformers_version": "4.57.1", "use_cache": False,
    "use_sliding_window": False, "vocab_size": VOCAB,
}


def llada_names(c: dict) -> dict[str, tuple]:
    d, h, kv, m = c["d_model"], c["n_heads"], c["n_kv_heads"], c["mlp_hidden_size"]
    hd = d // h
    out = {"model.transformer.wte.weight": (c["embedding_size"], d)}
    for i in range(c["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        out.update({p + "q_proj.weight": (d, d), p + "k_proj.weight": (kv * hd, d), p + "v_proj.weight": (kv * hd, d),
                    p + "attn_out.weight": (d, d), p + "ff_proj.weight": (m, d), p + "up_proj.weight": (m, d),
                    p + "ff_out.weight": (d, m), p + "attn_norm.weight": (d,), p + "ff_norm.weight": (d,)})
    out["model.transformer.ln_f.weight"] = (d,)
    out["model.transformer.ff_out.weight"] = (c["embedding_size"], d)
    return out


def moe_names(c: dict, expert: int, head_dim: int) -> dict[str, tuple]:
    d, h, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (c["vocab_size"], d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h * head_dim, d), p + "self_attn.k_proj.weight": (kv * head_dim, d),
                    p + "self_attn.v_proj.weight": (kv * head_dim, d), p + "self_attn.o_proj.weight": (d, h * head_dim),
                    p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,),
                    p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
        if c.get("moe_layer_freq", [1] * 99)[i] == 0:
            dense = c["dense_intermediate_size"]
            out.update({p + "mlp.gate_proj.weight": (dense, d), p + "mlp.up_proj.weight": (dense, d),
                        p + "mlp.down_proj.weight": (d, dense)})
            continue
        out[p + "mlp.gate.weight"] = (c["num_experts"], d)
        for e in range(c["num_experts"]):
            out.update({f"{p}mlp.experts.{e}.gate_proj.weight": (expert, d),
                        f"{p}mlp.experts.{e}.up_proj.weight": (expert, d),
                        f"{p}mlp.experts.{e}.down_proj.weight": (d, expert)})
    out["model.norm.weight"] = (d,)
    out["lm_head.weight"] = (c["vocab_size"], d)
    return out


def dream_names(c: dict) -> dict[str, tuple]:
    d, h, kv, m = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    hd = d // h
    out = {"model.embed_tokens.weight": (c["vocab_size"], d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,),
                    p + "self_attn.k_proj.weight": (kv * hd, d), p + "self_attn.k_proj.bias": (kv * hd,),
                    p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.v_proj.bias": (kv * hd,),
                    p + "self_attn.o_proj.weight": (d, d), p + "mlp.gate_proj.weight": (m, d),
                    p + "mlp.up_proj.weight": (m, d), p + "mlp.down_proj.weight": (d, m),
                    p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    out["model.norm.weight"] = (d,)
    out["lm_head.weight"] = (c["vocab_size"], d)
    return out


# name -> (model config, published config.json, weight names and shapes, mask token)
ARCHS = {
    "llada": ("llada_8b", LLADA_CONFIG, llada_names(LLADA_CONFIG), "<|mdm_mask|>"),
    "llada_moe": ("llada_moe", LLADA_MOE_CONFIG, moe_names(LLADA_MOE_CONFIG, 16, 8), "<|mask|>"),
    "dream": ("dream_7b", DREAM_CONFIG, dream_names(DREAM_CONFIG), "<|mask|>"),
    "rnd1": ("rnd1_30b", RND1_CONFIG, moe_names(RND1_CONFIG, 16, 8), "<|mask|>"),
}


def write_tokenizer(folder: Path, mask: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)} | {"<|endoftext|>": VOCAB - 2, mask: VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            mask_token=mask, unk_token="w0").save_pretrained(folder)


def write_checkpoint(folder: Path, arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random checkpoint in ``arch``'s published layout: config.json, bf16 weights in 2+ safetensors shards with
    model.safetensors.index.json, a tokenizer with the mask token, and a stand-in for the authors' code file."""
    from safetensors.torch import save_file

    _, config, names, mask = ARCHS[arch]
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in names.items():
        if name.endswith("norm.weight"):  # around 1, as trained norms are
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        state[name] = t.to(torch.bfloat16)
    keys = list(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for file, part in shards.items():
        save_file({k: state[k] for k in part}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in state.values())},
             "weight_map": {k: f for f, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "modeling_stub.py").write_text("# the authors' modeling file (never imported by dlm)\n")
    write_tokenizer(folder, mask)
    return state


def load_backbone(arch: str, folder: Path, *overrides: str):
    from dlm.config import build, compose_train

    name = ARCHS[arch][0]
    # the tiny tokenizer's mask id (the config's is the published checkpoint's)
    cfg = compose_train([f"model={name}", f"model.pretrained={folder}",
                         f"model.conventions.mask_token_id={VOCAB - 1}", *overrides])
    from dlm.models.lora import instantiate_backbone

    backbone = instantiate_backbone(cfg.model, instantiate=lambda node, **kw: build(node, "model", **kw),
                                    vocab_size=VOCAB)
    return backbone, cfg


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {arch: (root / arch, write_checkpoint(root / arch, arch, seed=i)) for i, arch in enumerate(ARCHS)}


# ---- load, land, export -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_published_layout_loads_and_exports_bit_for_bit(arch, checkpoints, tmp_path):
    from dlm.models.zoo import PublishedDLM

    folder, state = checkpoints[arch]
    backbone, cfg = load_backbone(arch, folder)
    assert isinstance(backbone, PublishedDLM) and cfg.model.trust_remote_code is False
    model = backbone.hf_model
    assert type(model).__name__ == {"llada": "LlamaForCausalLM", "dream": "Qwen2ForCausalLM"}.get(
        arch, "Qwen3MoeForCausalLM")
    # every published weight where the layout says, unchanged (bf16 kept); nothing left unloaded
    hf_state = model.state_dict()
    from dlm.models.zoo.layout import hf_fields

    table = backbone.layout.names(hf_fields(model.config))
    assert set(table) == set(state)
    for name, tensor in state.items():
        target = table[name]
        landed = hf_state[target.key] if target.index is None else hf_state[target.key][target.index]
        assert landed.dtype == torch.bfloat16 and torch.equal(landed, tensor), name
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    # spot checks of the mapping, written out (not through the table)
    if arch == "llada":
        assert torch.equal(model.model.layers[1].mlp.gate_proj.weight, state["model.transformer.blocks.1.ff_proj.weight"])
        assert torch.equal(model.lm_head.weight, state["model.transformer.ff_out.weight"])
        assert torch.equal(model.model.layers[0].mlp.down_proj.weight, state["model.transformer.blocks.0.ff_out.weight"])
    if arch in ("llada_moe", "rnd1"):
        experts = model.model.layers[0].mlp.experts
        assert torch.equal(experts.gate_up_proj[3, :16], state["model.layers.0.mlp.experts.3.gate_proj.weight"])
        assert torch.equal(experts.gate_up_proj[3, 16:], state["model.layers.0.mlp.experts.3.up_proj.weight"])
        assert torch.equal(experts.down_proj[2], state["model.layers.0.mlp.experts.2.down_proj.weight"])
    if arch == "llada_moe":  # moe_layer_freq [1, 0, 1]: layer 1 dense
        assert torch.equal(model.model.layers[1].mlp.up_proj.weight, state["model.layers.1.mlp.up_proj.weight"])
        assert model.config.norm_topk_prob is False
    # export: the same names, dtypes and tensors, the original config keys, sharded, tokenizer and code copied
    out = backbone.save_published(tmp_path / "export", max_shard_bytes=4096)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2 and set(index["weight_map"]) == set(state)
    from safetensors import safe_open

    exported = {}
    for shard in set(index["weight_map"].values()):
        with safe_open(str(out / shard), framework="pt") as f:
            exported.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(exported) == set(state)
    for name, tensor in state.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert json.loads((out / "config.json").read_text()) == ARCHS[arch][1]
    for file in ("tokenizer.json", "tokenizer_config.json", "modeling_stub.py"):
        assert (out / file).read_bytes() == (folder / file).read_bytes()
    # and the export loads back as the published layout
    again, _ = load_backbone(arch, out)
    for k, v in again.hf_model.state_dict().items():
        assert torch.equal(v, hf_state[k]), k


def test_layout_errors_name_the_problem(checkpoints, tmp_path):
    import shutil

    from dlm.config import ConfigError
    from dlm.models.zoo import LayoutError

    llada, _ = checkpoints["llada"]
    with pytest.raises((LayoutError, ConfigError), match="model_type='llada'.*not the Dream layout"):
        load_backbone("dream", llada)
    with pytest.raises((LayoutError, ConfigError), match="not the LLaDA layout"):  # LLaDA-MoE says "llada" too
        load_backbone("llada", checkpoints["llada_moe"][0])
    broken = tmp_path / "broken"
    shutil.copytree(llada, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.transformer.blocks.1.up_proj.weight"]
    index["weight_map"]["model.transformer.blocks.1.extra.weight"] = "model-00002-of-00002.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises((LayoutError, ConfigError), match="blocks.1.extra.weight"):
        load_backbone("llada", broken)
    del index["weight_map"]["model.transformer.blocks.1.extra.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises((LayoutError, ConfigError), match="missing.*blocks.1.up_proj.weight"):
        load_backbone("llada", broken)
    config = json.loads((llada / "config.json").read_text()) | {"attention_layer_norm": True}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises((LayoutError, ConfigError), match="attention_layer_norm=True"):
        load_backbone("llada", broken)


# ---- logits against independent implementations ---------------------------------------------------------------
def _f32(state):
    return {k: v.float() for k, v in state.items()}


def _bidirectional_transformers(model_cls, config_cls, fields: dict, state: dict):
    """The transformers class with an equivalent config written here by hand, weights renamed by hand, and the
    causal mask removed (is_causal off, an all-zero additive mask under eager attention)."""
    config = config_cls(**fields, attn_implementation="eager")
    model = model_cls(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False

    def run(ids):
        T = ids.shape[1]
        return model(input_ids=ids, attention_mask=torch.zeros(1, 1, T, T)).logits

    return run


def _reference_transformers(arch: str, state: dict):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    s = _f32(state)
    if arch == "llada":
        c = LLADA_CONFIG
        renamed = {"model.embed_tokens.weight": s["model.transformer.wte.weight"],
                   "model.norm.weight": s["model.transformer.ln_f.weight"],
                   "lm_head.weight": s["model.transformer.ff_out.weight"]}
        for i in range(c["n_layers"]):
            p, q = f"model.transformer.blocks.{i}.", f"model.layers.{i}."
            for a, b in [("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"), ("v_proj", "self_attn.v_proj"),
                         ("attn_out", "self_attn.o_proj"), ("ff_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"),
                         ("ff_out", "mlp.down_proj"), ("attn_norm", "input_layernorm"),
                         ("ff_norm", "post_attention_layernorm")]:
                renamed[f"{q}{b}.weight"] = s[f"{p}{a}.weight"]
        fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=500000.0, tie_word_embeddings=False)
        return _bidirectional_transformers(LlamaForCausalLM, LlamaConfig, fields, renamed)
    if arch == "dream":
        fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-6,
                      rope_theta=1e6, tie_word_embeddings=False)
        return _bidirectional_transformers(Qwen2ForCausalLM, Qwen2Config, fields, s)
    c = LLADA_MOE_CONFIG if arch == "llada_moe" else RND1_CONFIG
    renamed = {}
    for name, t in s.items():
        if ".mlp.experts." not in name:
            renamed[name] = t
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        if p + "gate.weight" not in s:
            continue
        E = c["num_experts"]
        renamed[p + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([s[f"{p}experts.{e}.gate_proj.weight"], s[f"{p}experts.{e}.up_proj.weight"]]) for e in range(E)])
        renamed[p + "experts.down_proj"] = torch.stack([s[f"{p}experts.{e}.down_proj.weight"] for e in range(E)])
    fields = dict(hidden_size=32, num_hidden_layers=c["num_hidden_layers"], num_attention_heads=4,
                  num_key_value_heads=c["num_key_value_heads"], head_dim=8, moe_intermediate_size=16,
                  num_experts=4, num_experts_per_tok=2, vocab_size=VOCAB, max_position_embeddings=64,
                  rms_norm_eps=c["rms_norm_eps"], rope_theta=float(c["rope_theta"]), tie_word_embeddings=False,
                  norm_topk_prob=arch == "rnd1", intermediate_size=64,
                  mlp_only_layers=[1] if arch == "llada_moe" else [])
    return _bidirectional_transformers(Qwen3MoeForCausalLM, Qwen3MoeConfig, fields, renamed)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_equal_transformers_without_the_causal_mask(arch, checkpoints):
    folder, state = checkpoints[arch]
    backbone, _ = load_backbone(arch, folder, "model.torch_dtype=float32")
    backbone.eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = _reference_transformers(arch, state)
    with torch.no_grad():
        ours = backbone(ids).float()
        ref = torch.cat([reference(ids[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    # bidirectional: a later token changes an earlier position's logits
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    with torch.no_grad():
        assert not torch.allclose(backbone(changed)[:, 0], ours[:, 0])


# The published modeling files' mathematics, written out over the raw published state dict (float32).
def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, theta):  # rotate-half over the whole head (OLMo/LLaDA RotaryEmbedding, OLMoE apply_rotary_pos_emb)
    B, H, T, D = x.shape
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float) / D)
    freqs = torch.arange(T, dtype=torch.float)[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


def _attention(q, k, v, heads, kv_heads):  # full (never causal) attention, GQA by repeating kv heads
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    att = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return att @ v


def llada_reference(s: dict, c: dict, ids):
    """modeling_llada.py: LLaDAModel.forward with LLaDALlamaBlock blocks (block_type llama), no causal mask."""
    x = s["model.transformer.wte.weight"][ids]
    B, T, d = x.shape
    H, KV = c["n_heads"], c["n_kv_heads"]
    hd = d // H
    for i in range(c["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        n = _rms(x, s[p + "attn_norm.weight"], c["rms_norm_eps"])
        q = (n @ s[p + "q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
        k = (n @ s[p + "k_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        v = (n @ s[p + "v_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        q, k = _rope(q, c["rope_theta"]), _rope(k, c["rope_theta"])
        att = _attention(q, k, v, H, KV).transpose(1, 2).reshape(B, T, d)
        x = x + att @ s[p + "attn_out.weight"].T
        m = _rms(x, s[p + "ff_norm.weight"], c["rms_norm_eps"])
        x = x + (F.silu(m @ s[p + "ff_proj.weight"].T) * (m @ s[p + "up_proj.weight"].T)) @ s[p + "ff_out.weight"].T
    x = _rms(x, s["model.transformer.ln_f.weight"], c["rms_norm_eps"])
    return x @ s["model.transformer.ff_out.weight"].T


def moe_reference(s: dict, c: dict, ids, norm_topk: bool):
    """modeling_lladamoe.py (norm_topk_prob hard-coded False) / modeling_rnd.py (norm_topk_prob True): per-head
    QK RMSNorm before RoPE, softmax router, top-k experts (SwiGLU) weighted by their probabilities."""
    x = s["model.embed_tokens.weight"][ids]
    B, T, d = x.shape
    H, KV = c["num_attention_heads"], c["num_key_value_heads"]
    hd, eps = c.get("head_dim") or d // H, c["rms_norm_eps"]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        n = _rms(x, s[p + "input_layernorm.weight"], eps)
        q = _rms((n @ s[p + "self_attn.q_proj.weight"].T).view(B, T, H, hd), s[p + "self_attn.q_norm.weight"], eps)
        k = _rms((n @ s[p + "self_attn.k_proj.weight"].T).view(B, T, KV, hd), s[p + "self_attn.k_norm.weight"], eps)
        v = (n @ s[p + "self_attn.v_proj.weight"].T).view(B, T, KV, hd)
        q, k = _rope(q.transpose(1, 2), float(c["rope_theta"])), _rope(k.transpose(1, 2), float(c["rope_theta"]))
        att = _attention(q, k, v.transpose(1, 2), H, KV).transpose(1, 2).reshape(B, T, H * hd)
        x = x + att @ s[p + "self_attn.o_proj.weight"].T
        m = _rms(x, s[p + "post_attention_layernorm.weight"], eps)
        if p + "mlp.gate.weight" not in s:  # a dense layer (moe_layer_freq 0)
            x = x + (F.silu(m @ s[p + "mlp.gate_proj.weight"].T) * (m @ s[p + "mlp.up_proj.weight"].T)) \
                @ s[p + "mlp.down_proj.weight"].T
            continue
        probs = (m @ s[p + "mlp.gate.weight"].T).softmax(-1)
        top, chosen = probs.topk(c["num_experts_per_tok"], dim=-1)
        if norm_topk:
            top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(m)
        for e in range(c["num_experts"]):
            e_p = f"{p}mlp.experts.{e}."
            y = (F.silu(m @ s[e_p + "gate_proj.weight"].T) * (m @ s[e_p + "up_proj.weight"].T)) @ s[e_p + "down_proj.weight"].T
            out = out + y * (top * (chosen == e)).sum(-1, keepdim=True)
        x = x + out
    x = _rms(x, s["model.norm.weight"], eps)
    return x @ s["lm_head.weight"].T


@pytest.mark.parametrize("arch", ["llada", "llada_moe", "rnd1"])
def test_logits_equal_the_published_modeling_maths(arch, checkpoints):
    folder, state = checkpoints[arch]
    backbone, _ = load_backbone(arch, folder, "model.torch_dtype=float32")
    backbone.eval()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    s = _f32(state)
    if arch == "llada":
        ref = llada_reference(s, LLADA_CONFIG, ids)
    else:
        ref = moe_reference(s, ARCHS[arch][1], ids, norm_topk=arch == "rnd1")
    with torch.no_grad():
        torch.testing.assert_close(backbone(ids).float(), ref, atol=2e-5, rtol=1e-4)


# ---- plans at the published sizes ---------------------------------------------------------------------------
# (total, active per token) computed from each checkpoint's published geometry (KNOWN_GEOMETRIES) and the published
# figure it must round to. Sources: LLaDA paper (arXiv 2502.09992) Table: 8.02B total, 6.98B non-embedding;
# Qwen2.5 model card: Qwen2.5-7B 7.61B (Dream-v0-7B is Qwen2.5-7B continued; 7,615,616,512 is 7.62 rounded,
# the card truncates: the figure is accepted rounded or truncated); Qwen3-30B-A3B model card:
# 30.5B total, 3.3B activated (RND1's README: "30B-parameter ... 3B active"); LLaDA-MoE paper (arXiv 2509.24389):
# 7B, 1.4B active (the active count without the input embedding table: 1.72B - 0.32B).
PUBLISHED_SIZES = {
    "llada_8b": (8_015_581_184, 8_015_581_184, "8.02"),
    "llada_8b_instruct": (8_015_581_184, 8_015_581_184, "8.02"),
    "llada_1p5_8b": (8_015_581_184, 8_015_581_184, "8.02"),
    "dream_7b": (7_615_616_512, 7_615_616_512, "7.61"),
    "dream_7b_instruct": (7_615_616_512, 7_615_616_512, "7.61"),
    "rnd1_30b": (30_532_122_624, 3_353_032_704, "30.5"),
    "llada_moe": (7_356_880_896, 1_719_736_320, "7"),
    "llada_moe_instruct": (7_356_880_896, 1_719_736_320, "7"),
}


@pytest.mark.parametrize("name", list(PUBLISHED_SIZES))
def test_dry_run_plans_the_published_size(name, train_cli, tmp_path):
    code, out, err = train_cli(f"model={name}", "dry_run=true", f"paths.output_root={tmp_path}",
                               f"paths.cache_dir={tmp_path / 'cache'}", "logger=none")
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("parameters:"))
    total, active, rounded = PUBLISHED_SIZES[name]
    assert f"{total:,} total" in line and f"{active:,} active per token" in line, line
    decimals = len(rounded.partition(".")[2])  # the published figure, to the digits it is given with
    scaled = total / 1e9 * 10**decimals
    assert rounded in {f"{round(scaled) / 10**decimals:.{decimals}f}", f"{math.floor(scaled) / 10**decimals:.{decimals}f}"}
    if name == "rnd1_30b":
        assert 3.3e9 <= active < 3.4e9  # the card's "3.3B activated"
    if name.startswith("llada_moe"):  # the paper's 1.4B: active without the input embedding (157184 x 2048)
        assert round((active - 157184 * 2048) / 1e9, 1) == 1.4
    assert not list(tmp_path.glob("**/checkpoints"))


def test_dry_run_plans_a_published_folder(checkpoints, train_cli, tmp_path):
    folder, _ = checkpoints["rnd1"]
    code, out, err = train_cli("model=rnd1_30b", f"model.pretrained={folder}", "dry_run=true",
                               f"paths.output_root={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", "logger=none")
    assert code == 0, err
    n = sum(math.prod(s) for s in ARCHS["rnd1"][2].values())
    assert f"{n:,} total" in out


# ---- training runs that export back to the published layout ----------------------------------------------------
def _train(train_cli, arch, folder, tmp_path, *extra):
    corpus = tmp_path / "corpus.txt"
    rng = torch.Generator().manual_seed(0)
    corpus.write_text("\n\n".join(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (20,), generator=rng))
                                  for _ in range(60)))
    args = [a for a in TINY_CLI if not a.startswith("name=")] + [
        f"model={ARCHS[arch][0]}", f"model.pretrained={folder}", f"model.conventions.mask_token_id={VOCAB - 1}",
        "model.torch_dtype=float32", "method=mdlm",
        "data=text_files", f"data.source.paths={corpus}", "data.seq_len=16", "data.batch_size=4",
        "data.tokenizer._target_=dlm.data.tokenizers.HFTokenizer", f"+data.tokenizer.name_or_path={folder}",
        f"paths.output_root={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}", "trainer=cpu",
        "name=zoo", *extra]
    code, out, err = train_cli(*args)
    assert code == 0, err[-3000:]
    return run_dir_of(out)


@pytest.mark.parametrize("arch,extra", [("llada", ()), ("dream", ("method.shift_logits=true",))])
def test_training_run_exports_the_published_layout(arch, extra, checkpoints, train_cli, tmp_path):
    from dlm.parallel.checkpoint import load_state_dict
    from dlm.run import find_checkpoint

    folder, state = checkpoints[arch]
    run = _train(train_cli, arch, folder, tmp_path, *extra)
    hf = run / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config == ARCHS[arch][1] | {"torch_dtype": "float32"}  # trained in float32: the dtype says so
    assert (hf / "modeling_stub.py").is_file() and (hf / "tokenizer.json").is_file()
    backbone, _ = load_backbone(arch, hf)  # the authors' layout again
    names = set(json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]) \
        if (hf / "model.safetensors.index.json").is_file() else None
    if names is None:
        from safetensors import safe_open

        with safe_open(str(hf / "model.safetensors"), framework="pt") as f:
            names = set(f.keys())
    assert names == set(state)
    trained = load_state_dict(find_checkpoint(run, "last"))
    for k, v in backbone.hf_model.state_dict().items():
        assert torch.equal(v, trained[f"backbone.hf_model.{k}"].to(v.dtype)), k


def test_a_lora_run_on_a_published_model_exports_merged_into_its_layout(checkpoints, train_cli, tmp_path):
    """model.lora on a zoo model: only the adapters train, and <run>/hf is the published layout with the adapters
    merged (W + scaling B A), so the authors' code loads the fine-tuned model."""
    from dlm.models.lora_export import merged_state
    from dlm.parallel.checkpoint import load_state_dict
    from dlm.run import find_checkpoint, load_run

    folder, state = checkpoints["llada"]
    run = _train(train_cli, "llada", folder, tmp_path, "model.lora.r=4", "optimizer.lr=0.05")
    assert all(".lora_" in k for k in load_state_dict(find_checkpoint(run, "last")))  # adapter-only checkpoint
    trained = load_run(run, setup_data=False).module.state_dict()  # the base rebuilt from the folder, checked
    assert any(".lora_A." in k for k in trained)
    backbone, _ = load_backbone("llada", run / "hf")  # the published layout again
    scaling = 1.0  # alpha null = r
    merged = merged_state(trained, scaling, fan_in_fan_out=False)
    changed = 0
    for k, v in backbone.hf_model.state_dict().items():
        assert torch.allclose(v, merged[f"backbone.hf_model.{k}"].to(v.dtype), atol=1e-6), k
        module, _, leaf = f"backbone.hf_model.{k}".rpartition(".")
        base = trained.get(f"{module}.base_layer.{leaf}", trained.get(f"backbone.hf_model.{k}"))
        changed += not torch.equal(v, base.to(v.dtype))
    assert changed > 0  # merged weights differ from the frozen base: the adapters are in them


# ---- conventions and random-weight builds ------------------------------------------------------------------
CONVENTIONS = {  # config -> (mask id, shift, sampler, chat template)
    "llada_8b": (126336, False, "low_confidence", False), "llada_8b_instruct": (126336, False, "low_confidence", True),
    "llada_1p5_8b": (126336, False, "low_confidence", True), "llada_moe": (156895, False, "low_confidence", False),
    "llada_moe_instruct": (156895, False, "low_confidence", True), "dream_7b": (151666, True, "entropy", False),
    "dream_7b_instruct": (151666, True, "entropy", True), "rnd1_30b": (151669, True, "entropy_bounded", False),
}


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_zoo_config_conventions(name):
    from omegaconf import OmegaConf

    from dlm.config import CONF_DIR, compose_train
    from dlm.models.capabilities import ModelConventions

    cfg = compose_train([f"model={name}"])
    conv = ModelConventions.from_config(cfg.model.conventions)
    assert (conv.mask_token_id, conv.shift_logits, conv.sampler, conv.chat_template) == CONVENTIONS[name]
    assert conv.tokenizer == cfg.model.pretrained and cfg.model.trust_remote_code is False
    sampler = OmegaConf.load(CONF_DIR / "sampler" / f"{conv.sampler}.yaml")
    assert set(conv.sampler_fields) <= set(sampler) - {"_target_"}, conv.sampler_fields
    from dlm.models.hf_geometry import KNOWN_GEOMETRIES

    assert cfg.model.pretrained in KNOWN_GEOMETRIES  # plans offline


def test_load_weights_false_keeps_the_published_geometry_and_exports(checkpoints, tmp_path):
    folder, state = checkpoints["llada_moe"]
    backbone, _ = load_backbone("llada_moe", folder, "model.load_weights=false")
    out = backbone.save_published(tmp_path / "random", max_shard_bytes=1 << 20)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in written.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert not torch.equal(written["lm_head.weight"].to(torch.bfloat16), state["lm_head.weight"])  # random
    assert json.loads((out / "config.json").read_text()) == LLADA_MOE_CONFIG | {"torch_dtype": "float32"}


# ---- ZeRO-3: the gathered, parameter-at-a-time loading path ----------------------------------------------------
@pytest.mark.parametrize("arch", ["llada", "rnd1"])
def test_parameter_at_a_time_loading_equals_the_stream(arch, checkpoints):
    """load_published_into (the ZeRO-3 path: a built model, each parameter gathered and written) gives the same
    weights as the meta-device stream; here nothing is partitioned, so gathering is a no-op."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dlm.models.zoo.layout import hf_fields, load_published_into

    folder, _ = checkpoints[arch]
    streamed, _ = load_backbone(arch, folder)
    hf = streamed.layout.hf_config(ARCHS[arch][1])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf), dtype=torch.bfloat16)
    load_published_into(model, streamed.layout, folder, hf_fields(model.config))
    ours = model.state_dict()
    for k, v in streamed.hf_model.state_dict().items():
        assert torch.equal(ours[k], v), k


@pytest.mark.slow
def test_zero3_cpu_run_loads_a_published_layout_into_partitions(checkpoints, tmp_path):
    """python -m dlm.train under DeepSpeed ZeRO-3 on the CPU (tests/zero_cpu_strategy.py) from a tiny RND1-layout
    checkpoint at learning rate 0: the run's export, in the published layout, is the checkpoint bit for bit."""
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    folder, state = checkpoints["rnd1"]
    tests = Path(__file__).resolve().parent
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(20)) for i in range(40)))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    args = [*[a for a in TINY_CLI if not a.startswith("name=")], "name=zoo3", "trainer=deepspeed",
            "trainer.strategy._target_=zero_cpu_strategy.CPUDeepSpeedStrategy", "trainer.accelerator=cpu",
            "trainer.devices=1", "trainer.precision=bf16-mixed", "optimizer.lr=0", "model=rnd1_30b",
            f"model.pretrained={folder}", f"model.conventions.mask_token_id={VOCAB - 1}",
            "model.gradient_checkpointing=false", "method=mdlm", "method.shift_logits=true", "data=text_files",
            f"data.source.paths={corpus}", "data.seq_len=16", "data.batch_size=4",
            "data.tokenizer._target_=dlm.data.tokenizers.HFTokenizer", f"+data.tokenizer.name_or_path={folder}",
            f"paths.output_root={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run([sys.executable, "-m", "dlm.train", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the partitioned path was taken: the backbone was built inside zero.Init (dlm.parallel.deepspeed prints it)
    assert f"zero3: rank 0 loaded {folder} into ZeRO-3 partitions" in proc.stdout, proc.stdout[-2000:]
    run = run_dir_of(proc.stdout)
    hf = run if run.is_absolute() else tmp_path / run
    hf = hf / "hf"
    files = [hf / "model.safetensors"] if (hf / "model.safetensors").is_file() else sorted(hf.glob("model-*.safetensors"))
    exported = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            exported.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(exported) == set(state)
    for name, tensor in state.items():
        assert torch.equal(exported[name].to(torch.bfloat16), tensor), name

"""Parameter counts from the config alone (dlm/param_count.py) equal the meta-device build's, exactly: total,
non-embedding, active per token and the FLOPs geometry (N, layers, width), for every shipped model config (at its own
vocabulary and with the embedding grown to a larger tokenizer) and for the layout variants a config can switch on
(untied heads, biases, GQA, dense layers among MoE ones, time conditioning). What the counter cannot count is handed
to the meta build (None), and a plan (dry_run) imports neither torch nor transformers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from dlm.config import CONF_DIR, group_options
from dlm.param_count import COUNTED_BACKBONES, HF_DEFAULTS, ParamCount, count_model
from dlm.plan import _meta_counts, _model_fields
from tests.conftest import compose

SHIPPED = group_options("model")


def _both(cfg, vocab_size):
    """(analytic counts, meta-build counts) of cfg.model, as dlm.plan computes them."""
    fields = _model_fields(cfg)
    meta, _ = _meta_counts(cfg, fields, vocab_size)
    return count_model(fields, vocab_size), meta


# a larger tokenizer grows the embedding (and an untied head): one model per class and layout
GROWN = ["tiny", "qwen3_tiny", "gpt2", "bert_base", "moe30b", "llada_8b", "dream_7b", "llada_moe"]


@pytest.mark.parametrize("model, grown", [(m, False) for m in SHIPPED] + [(m, True) for m in GROWN],
                         ids=[*SHIPPED, *(f"{m}-grown" for m in GROWN)])
def test_every_shipped_model_counts_as_its_meta_build(model, grown):
    cfg = compose([f"model={model}"])
    vocab = 300 if not grown else 200_003  # the native models take the tokenizer's; HF ones grow to a larger one
    if not grown and "Transformer" not in cfg.model._target_:
        vocab = None
    analytic, meta = _both(cfg, vocab)
    assert analytic == meta, model


# Layout switches the shipped configs leave at their defaults, each on a tiny geometry.
QWEN3_MOE = dict(model_type="qwen3_moe", num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                 intermediate_size=96, vocab_size=512, max_position_embeddings=64)
VARIANTS = {
    "llama-untied-biased-gqa": dict(model_type="llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=8,
                                    num_key_value_heads=2, intermediate_size=80, vocab_size=300, attention_bias=True,
                                    mlp_bias=True, tie_word_embeddings=False, max_position_embeddings=64),
    "llama-head-dim": dict(model_type="llama", num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                           head_dim=24, intermediate_size=80, vocab_size=300, max_position_embeddings=64),
    "qwen2-tied": dict(model_type="qwen2", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                       num_key_value_heads=1, intermediate_size=80, vocab_size=300, tie_word_embeddings=True,
                       max_position_embeddings=64),
    "qwen3-biased-untied": dict(model_type="qwen3", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=32, intermediate_size=80, vocab_size=300,
                                attention_bias=True, tie_word_embeddings=False, max_position_embeddings=64),
    "qwen3_moe-dense-layers": {**QWEN3_MOE, "mlp_only_layers": [0], "decoder_sparse_step": 2},
    "qwen3_moe-tied": {**QWEN3_MOE, "tie_word_embeddings": True, "num_experts_per_tok": 8},
    "gpt2-untied-inner": dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=4, n_inner=100, n_positions=64,
                              vocab_size=300, tie_word_embeddings=False),
    "gpt2-hf-names": dict(model_type="gpt2", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                          max_position_embeddings=32, vocab_size=300),
}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("vocab", [None, 1000])
def test_hf_layout_variants_count_as_their_meta_build(name, vocab):
    config = VARIANTS[name]
    cfg = compose(["model=qwen3_tiny"])
    cfg.model.config = config
    analytic, meta = _both(cfg, vocab)
    assert analytic == meta


@pytest.mark.parametrize("vocab", [None, 1000])
def test_an_untied_bert_counts_its_decoder_as_non_embedding(vocab):
    cfg = compose(["model=bert_tiny", "+model.config.tie_word_embeddings=false", "+model.config.type_vocab_size=3"])
    analytic, meta = _both(cfg, vocab)
    assert analytic == meta


@pytest.mark.parametrize("overrides", [
    ["model.tie_embeddings=false", "model.n_kv_heads=2", "model.d_ff=100"],
    ["model.time_conditioning=true", "model.n_heads=8"],
], ids=["untied-gqa-dff", "time-conditioned"])
def test_native_variants_count_as_their_meta_build(overrides):
    cfg = compose(["model=tiny", *overrides])
    analytic, meta = _both(cfg, 77)
    assert analytic == meta


def test_moe_active_share_is_top_k_over_experts():
    cfg = compose(["model=moe_tiny"])
    counts = count_model(_model_fields(cfg), None)
    experts = 2 * 3 * 8 * 64 * 32  # layers x (gate, up, down) x experts x hidden x expert width
    assert counts.total - counts.active == round(experts * (1 - 2 / 8))


def test_what_it_cannot_count_goes_to_the_meta_build():
    """Another model type, another class, LoRA adapters: None (dlm.plan then builds on the meta device)."""
    cfg = compose(["model=qwen3_tiny"])
    fields = _model_fields(cfg)
    assert isinstance(count_model(fields), ParamCount)
    assert count_model({**fields, "config": {**fields["config"], "model_type": "mistral"}}) is None
    assert count_model({**fields, "_target_": "my.own.Backbone"}) is None
    assert count_model({**fields, "lora": {"r": 4, "target_modules": ["mlp"]}}) is None  # not a Linear: refused there
    assert count_model({**fields, "lora": {"r": 4, "target_modules": ["lm_head"]}}) is None
    # peft maps MLP names onto an MoE's fused experts with shapes of its own: a meta build counts those
    moe = _model_fields(compose(["model=moe_tiny", "+model.config.mlp_only_layers=[1]"]))
    assert count_model({**moe, "lora": {"r": 4}}) is None and count_model(moe) is not None
    assert count_model({**fields, "config": {**fields["config"], "text_config": {}}}) is None
    gpt2 = {**fields, "config": {"model_type": "gpt2", "add_cross_attention": True}}
    assert count_model(gpt2) is None


def test_the_defaults_are_the_installed_transformers_defaults():
    """A config that leaves a field out gets transformers' default: the table must say the same."""
    from transformers import AutoConfig

    for model_type, defaults in HF_DEFAULTS.items():
        config = AutoConfig.for_model(model_type)
        derived = {"head_dim": config.hidden_size // config.num_attention_heads if hasattr(config, "num_attention_heads")
                   else None, "num_key_value_heads": getattr(config, "num_attention_heads", None), "mlp_only_layers": []}
        for key, value in defaults.items():
            want = derived.get(key) if value is None and key in derived else value
            assert getattr(config, key, None if value is None else "absent") == want, (model_type, key)


def test_the_counted_classes_exist():
    from hydra.utils import get_class

    from dlm.models import HFCausalLM, HFMaskedLM, Transformer

    for path in COUNTED_BACKBONES:
        assert get_class(path) in (Transformer, HFCausalLM, HFMaskedLM) or issubclass(get_class(path), HFCausalLM)
    for option in SHIPPED:  # every shipped model is counted without a meta build
        target = OmegaConf.load(CONF_DIR / "model" / f"{option}.yaml")._target_
        assert target in COUNTED_BACKBONES, option


def test_the_known_mask_samplers_are_their_classes():
    """dlm.conventions reads whether a shipped sampler reverses the mask prior from a table (no torch import)."""
    from hydra.utils import get_class

    from dlm.conventions import MASK_PRIOR_SAMPLERS
    from dlm.sampling.prior import MaskPrior

    targets = {OmegaConf.load(p).get("_target_") for p in (CONF_DIR / "sampler").glob("*.yaml")} - {None}
    assert targets <= set(MASK_PRIOR_SAMPLERS)
    for path, masks in MASK_PRIOR_SAMPLERS.items():
        assert (MaskPrior in getattr(get_class(path), "priors", ())) == masks, path


# A plan reads configs and prints numbers: it must not pay for torch or transformers' modeling code (seconds).
def test_a_plan_imports_no_torch_and_no_transformers(tmp_path):
    probe = ("import runpy, sys; sys.argv = ['dlm.train', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('dlm.train', run_name='__main__')\n"
             "finally:\n    print('heavy:', sorted(m for m in ('torch', 'transformers', 'lightning', 'numpy') "
             "if m in sys.modules))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DLM_OUTPUT_ROOT": str(tmp_path / "runs")}
    for model in ("moe30b", "tiny", "llada_moe"):  # a hub checkpoint offline, the default, a published layout
        out = subprocess.run([sys.executable, "-c", probe, f"model={model}", "dry_run=true"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert "parameters:" in out.stdout and "heavy: []" in out.stdout, (model, out.stdout[-800:], out.stderr[-2000:])


def test_a_checkpoint_folder_is_counted_from_its_config_json(tmp_path):
    """model.pretrained=<folder>: the plan reads config.json (no transformers) and counts what the meta build of
    that checkpoint's architecture holds."""
    import json

    from dlm.plan import checkpoint_geometry

    geometry = {**VARIANTS["qwen3-biased-untied"], "architectures": ["Qwen3ForCausalLM"], "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(geometry))
    assert checkpoint_geometry(str(tmp_path)) == geometry
    cfg = compose(["model=qwen3_0p6b", f"model.pretrained={tmp_path}"])
    analytic, meta = _both(cfg, 640)
    assert analytic == meta and analytic.total > 0


# LoRA (model.lora): the adapters on the default targets (the attention and MLP layers) or the named ones, counted as
# peft adds them; the plan's trainable count and its LoRA line come from the config too.
LORA_CASES = [
    ("tiny", ["model.lora.r=4"]),
    ("tiny", ["model.lora.r=3", "model.lora.target_modules=[wq,w2]", "model.time_conditioning=true"]),
    ("qwen3_tiny", ["model.lora.r=8"]),
    ("qwen3_tiny", ["model.lora.r=2", "model.lora.target_modules=[self_attn.q_proj,down_proj]"]),
    ("moe_tiny", ["model.lora.r=4"]),
    ("llama_tiny", ["model.lora.r=8", "model.lora.alpha=16"]),
    ("bert_tiny", ["model.lora.r=4"]),
    ("gpt2", ["model.lora.r=4"]),
    ("moe30b", ["model.lora.r=16"]),
    ("llada_8b", ["model.lora.r=16", "model.lora.target_modules=[q_proj,v_proj]"]),
]


@pytest.mark.parametrize("model, overrides", LORA_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(LORA_CASES)])
def test_lora_adapters_count_as_their_meta_build(model, overrides):
    cfg = compose([f"model={model}", *overrides])
    vocab = 300 if "Transformer" in cfg.model._target_ else None
    analytic, meta = _both(cfg, vocab)
    assert analytic == meta and analytic.trainable > 0


def test_the_lora_plan_line_comes_from_the_config():
    from dlm.plan import _counts, _meta_counts

    cfg = compose(["model=qwen3_tiny", "model.lora.r=8", "model.lora.alpha=16"])
    counts, line = _counts(cfg, 64)
    assert line == _meta_counts(cfg, _model_fields(cfg), 64)[1]
    assert line.startswith("LoRA r=8 alpha=16: ") and f"{counts.trainable:,} trainable of {counts.total:,}" in line

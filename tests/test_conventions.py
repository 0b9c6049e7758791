"""What a checkpoint brings (dlm/conventions.py): its tokenizer replaces the data config's default (an explicit
other one is refused), method.shift_logits=null follows the model, its sampler is the default unless sampler= was
chosen, its mask id is checked against the tokenizer; and the bare reference command plans the real recipe."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from tiny_checkpoint import MASK, MASK_ID, tiny_model_overrides, write_tiny_checkpoint

from dlm.config import ConfigError
from dlm.conventions import apply_conventions, check_mask_token, sampler_node
from dlm.models.capabilities import ModelConventions


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3")


def composed(compose, ckpt, *extra, **conventions):
    return compose(["paths.run_dir=/tmp/x", "paths.cache_dir=/tmp/x", *tiny_model_overrides(ckpt, **conventions),
                    *extra])


@pytest.fixture
def compose():
    from conftest import compose as c

    return c


def test_the_models_tokenizer_replaces_the_data_default(compose, ckpt):
    cfg = composed(compose, ckpt, "data=brackets")
    assert cfg.data.tokenizer._target_ == "dlm.data.tokenizers.CharTokenizer"
    notes = apply_conventions(cfg, overrides=[], choices={"method": "mdlm", "sampler": "mdlm"})
    assert cfg.data.tokenizer == {"_target_": "dlm.data.tokenizers.HFTokenizer", "name_or_path": str(ckpt),
                                  "mask_token": MASK}
    assert any("tokenizer:" in n and "CharTokenizer" in n for n in notes)
    assert apply_conventions(cfg, overrides=[], choices={}) == []  # idempotent: a second pass changes nothing


def test_an_explicit_other_data_tokenizer_is_refused_naming_both(compose, ckpt):
    over = ["data.tokenizer.alphabet=xyz"]
    cfg = composed(compose, ckpt, "data=brackets", *over)
    with pytest.raises(ConfigError) as err:
        apply_conventions(cfg, overrides=over, choices={})
    text = str(err.value)
    assert "data.tokenizer=CharTokenizer(xyz)" in text and str(ckpt) in text and "conventions.tokenizer=null" in text
    # the same tokenizer given explicitly is no contradiction; opting out keeps the data's
    same = ["data.tokenizer._target_=dlm.data.tokenizers.HFTokenizer", f"+data.tokenizer.name_or_path={ckpt}"]
    cfg = composed(compose, ckpt, "data=brackets", *same)
    apply_conventions(cfg, overrides=same, choices={})
    cfg = composed(compose, ckpt, "data=brackets", *over, "model.conventions.tokenizer=null")
    apply_conventions(cfg, overrides=over, choices={})
    assert cfg.data.tokenizer.alphabet == "xyz"


def test_the_training_cli_refuses_another_tokenizer_in_one_line(train_cli, ckpt, tmp_path):
    code, out, err = train_cli(*tiny_model_overrides(ckpt), "data=brackets", "data.tokenizer.alphabet=xyz",
                               f"paths.output_root={tmp_path}/runs", f"paths.cache_dir={tmp_path}/cache", "logger=none")
    assert code == 2 and "differs from the model's own tokenizer" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))


@pytest.mark.parametrize(("model_shift", "method_shift", "expect"), [
    (True, None, True), (False, None, False), (None, None, False), (None, True, True), (True, True, True),
])
def test_shift_null_follows_the_model(compose, ckpt, model_shift, method_shift, expect):
    extra = [] if method_shift is None else [f"method.shift_logits={str(method_shift).lower()}"]
    cfg = composed(compose, ckpt, *extra, shift_logits=model_shift)
    apply_conventions(cfg, overrides=extra, choices={})
    assert cfg.method.shift_logits is expect


def test_a_contradicting_shift_is_an_error_naming_both(compose, ckpt):
    cfg = composed(compose, ckpt, "method.shift_logits=false", shift_logits=True)
    with pytest.raises(ConfigError, match=r"method.shift_logits=false contradicts .*conventions.shift_logits=true"):
        apply_conventions(cfg, overrides=["method.shift_logits=false"], choices={})
    cfg = composed(compose, ckpt, "method=bd3lm", "method.shift_logits=true", shift_logits=False)
    with pytest.raises(ConfigError, match="method.shift_logits=true contradicts"):
        apply_conventions(cfg, overrides=[], choices={})


def test_the_models_sampler_is_the_default_unless_one_was_chosen(compose, ckpt):
    conv = {"sampler": "low_confidence", "sampler_fields": {"block_length": 4}}
    mdlm = {"method": "mdlm", "sampler": "mdlm"}
    cfg = composed(compose, ckpt, **conv)
    apply_conventions(cfg, overrides=[], choices=mdlm)
    assert cfg.sampler._target_ == "dlm.sampling.LowConfidenceSampler" and cfg.sampler.block_length == 4
    # a field override applies on top of the model's sampler
    cfg = composed(compose, ckpt, "sampler.steps=7", **conv)
    apply_conventions(cfg, overrides=["sampler.steps=7"], choices=mdlm)
    assert cfg.sampler._target_ == "dlm.sampling.LowConfidenceSampler" and cfg.sampler.steps == 7
    # sampler= on the command line, or an experiment's choice, wins
    cfg = composed(compose, ckpt, "sampler=margin", **conv)
    apply_conventions(cfg, overrides=["sampler=margin"], choices={"method": "mdlm", "sampler": "margin"})
    assert cfg.sampler._target_ != "dlm.sampling.LowConfidenceSampler"
    cfg = composed(compose, ckpt, "sampler=margin", **conv)
    apply_conventions(cfg, overrides=[], choices={"method": "mdlm", "sampler": "margin"})
    assert cfg.sampler._target_ != "dlm.sampling.LowConfidenceSampler"
    # a family that does not sample through a mask sampler keeps its own
    cfg = composed(compose, ckpt, "method=sundae", **conv)
    before = OmegaConf.to_container(cfg.sampler)
    apply_conventions(cfg, overrides=[], choices={"method": "sundae", "sampler": "sundae"})
    assert OmegaConf.to_container(cfg.sampler) == before


def test_sampler_node_merges_the_options_defaults():
    assert sampler_node("mdlm")._target_ == sampler_node("ancestral")._target_
    with pytest.raises(ConfigError, match="valid options for sampler"):
        sampler_node("nosuch")


def test_the_mask_id_is_checked_against_the_tokenizer(ckpt):
    from dlm.data.tokenizers import HFTokenizer

    tok = HFTokenizer(str(ckpt), mask_token=MASK)
    check_mask_token(ModelConventions(mask_token=MASK, mask_token_id=MASK_ID), tok)
    with pytest.raises(ConfigError) as err:
        check_mask_token(ModelConventions(mask_token=MASK, mask_token_id=7), tok)
    assert "model.conventions.mask_token_id=7" in str(err.value) and f"the id {MASK_ID}" in str(err.value)


def test_a_run_trains_with_the_models_tokenizer_shift_and_sampler(run_cfg, ckpt):
    from dlm.train import train

    cfg = run_cfg(*tiny_model_overrides(ckpt, shift_logits=True, sampler="low_confidence"), "data=brackets",
                  "trainer.max_steps=2", "trainer.val_check_interval=2", "samples.num_prompted=1",
                  "samples.num_infill=1", "samples.num_unconditional=1", "data.batch_size=4")
    run_dir = train(cfg)
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml") if (run_dir / ".hydra").is_dir() else cfg
    assert saved.data.tokenizer.name_or_path == str(ckpt) and saved.method.shift_logits is True
    assert saved.sampler._target_ == "dlm.sampling.LowConfidenceSampler"
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"


def test_a_wrong_mask_id_stops_the_run_before_training(run_cfg, ckpt):
    from dlm.train import train

    with pytest.raises(ConfigError, match="model.conventions.mask_token_id=9"):
        train(run_cfg(*tiny_model_overrides(ckpt, mask_token_id=9), "data=brackets"))


# ---- the reference command -----------------------------------------------------------------------------------------
def test_the_reference_command_plans_the_real_recipe(train_cli, tmp_path):
    code, out, err = train_cli("model=moe30b", "schedule=linear", "trainer=deepspeed", "dry_run=true",
                               f"paths.output_root={tmp_path}/runs", f"paths.cache_dir={tmp_path}/cache")
    assert code == 0, err[-2000:]
    assert "tokenizer: Qwen/Qwen3-30B-A3B-Base (the model's own" in out and "id 151669" in out
    assert "HuggingFaceFW/fineweb-edu, sample-100BT" in out and "seq_len 4096" in out
    assert "method.shift_logits: true (the model's convention)" in out and "sampler: entropy_bounded" in out
    assert "vocabulary 151,936" in out  # offline: planned with the checkpoint's vocabulary
    assert "on GPU nodes (devices=auto: 8 per node" in out and "H100-hours" in out and "zero3" in out


def test_the_cpu_variant_is_one_override_away(compose):
    cfg = compose(["paths.run_dir=/tmp/x", "paths.cache_dir=/tmp/x", "model=moe30b", "data=brackets"])
    assert cfg.data.source._target_ == "dlm.data.sources.BracketsSource"  # the command line beats the model's data
    apply_conventions(cfg, overrides=["model=moe30b", "data=brackets"], choices={"method": "mdlm", "sampler": "mdlm"})
    assert cfg.data.tokenizer.name_or_path == "Qwen/Qwen3-30B-A3B-Base"  # still the model's tokenizer
    small = compose(["paths.run_dir=/tmp/x", "paths.cache_dir=/tmp/x", "model=moe_tiny"])
    assert small.data.source._target_ == "dlm.data.sources.BracketsSource" and small.data.seq_len == 16


def test_a_continued_runs_export_brings_its_tokenizer(train_cli, ckpt, tmp_path):
    """The CLI run records the conventions in .hydra, and its <run>/hf export carries the tokenizer (mask token
    included), so the export loads back as a checkpoint that brings its tokenizer."""
    from conftest import run_dir_of
    from tiny_checkpoint import conventions_override

    from dlm.run import load_model

    code, out, err = train_cli(*tiny_model_overrides(ckpt, shift_logits=True), "data=brackets",
                               "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                               "data.batch_size=4", "samples.num_unconditional=1", "samples.num_prompted=1",
                               "samples.num_infill=1", "logger=none", f"paths.output_root={tmp_path}/runs",
                               f"paths.cache_dir={tmp_path}/cache", "+trainer.enable_model_summary=false")
    assert code == 0, err[-3000:]
    run_dir = run_dir_of(out)
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.data.tokenizer.name_or_path == str(ckpt) and saved.method.shift_logits is True
    assert "model conventions: method.shift_logits: true" in out
    export = run_dir / "hf"
    assert (export / "tokenizer.json").is_file()
    back = load_model("qwen3_tiny", [f"model.pretrained={export}", "model.config=null",
                                     conventions_override(export, shift_logits=True)])
    assert back.datamodule.tokenizer.mask_token_id == MASK_ID and back.module.shift_logits is True


@pytest.mark.parametrize(("model", "tokenizer", "mask"), [
    ("qwen3_0p6b", "Qwen/Qwen3-0.6B-Base", "id 151669"), ("gpt2", "openai-community/gpt2", "id 50257"),
    ("bert_base", "bert-base-uncased", "id 103"),
])
def test_every_pretrained_config_plans_offline_with_its_tokenizer(train_cli, tmp_path, model, tokenizer, mask):
    code, out, err = train_cli(f"model={model}", "dry_run=true", f"paths.output_root={tmp_path}/runs")
    assert code == 0, err[-2000:]
    assert f"tokenizer: {tokenizer} (the model's own" in out and mask in out and "parameters:" in out

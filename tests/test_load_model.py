"""Straight from a checkpoint: dlm.run.load_model builds a family around a model config's checkpoint with its
conventions, and `dlm.generate model=`, `dlm.evaluate model=` and the lm-eval adapter's model= use it (no run
folder); a chat model's prompt goes through its template; run= and model= together are refused."""

from __future__ import annotations

import json

import pytest
from tiny_checkpoint import CHAT_TEMPLATE, MASK_ID, tiny_model_overrides, write_tiny_checkpoint

from dlm.run import load_model

CONV = {"shift_logits": True, "sampler": "low_confidence", "sampler_fields": {"steps": 4}, "chat_template": True}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3_chat", chat=True)


@pytest.fixture
def model_args(ckpt):
    return tiny_model_overrides(ckpt, **CONV)[1:]  # after model=qwen3_tiny


def test_load_model_wraps_the_checkpoint_with_its_conventions(model_args, ckpt):
    from dlm.methods.bd3lm import BD3LM
    from dlm.methods.mdlm import MDLM
    from dlm.sampling import LowConfidenceSampler

    run = load_model("qwen3_tiny", model_args)
    assert type(run.module) is MDLM and run.module.shift_logits is True and not run.module.training
    assert isinstance(run.module.sampler, LowConfidenceSampler) and run.module.sampler.steps == 4
    assert run.datamodule.tokenizer.name_or_path == str(ckpt) and run.module.mask_id == MASK_ID
    assert run.run_dir is None and run.ckpt_path is None and run.choices["sampler"] == "low_confidence"
    # the checkpoint's weights, not a fresh init
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(ckpt))
    ours = run.module.backbone.hf_model.get_input_embeddings().weight
    assert (ours[: ref.config.vocab_size] == ref.get_input_embeddings().weight).all()
    other = load_model("qwen3_tiny", [*model_args, "method.block_size=4"], method="bd3lm")
    assert type(other.module) is BD3LM and other.module.shift_logits is True


def test_load_model_refuses_a_bad_override_naming_it(model_args):
    from dlm.config import ConfigError

    with pytest.raises(ConfigError, match="model.nosuch"):
        load_model("qwen3_tiny", [*model_args, "model.nosuch=1"])
    with pytest.raises(ConfigError, match="method.shift_logits=false contradicts"):
        load_model("qwen3_tiny", [*model_args, "method.shift_logits=false"])


def test_a_chat_models_prompt_goes_through_its_template(model_args):
    from omegaconf import OmegaConf

    from dlm.generate import GenerationSource, prompt_ids

    run = load_model("qwen3_tiny", model_args)
    tok = run.datamodule.tokenizer
    assert tok.hf_tokenizer.chat_template == CHAT_TEMPLATE
    source = GenerationSource(run.module, tok, None, None, run.run_dir, "model")
    chat = prompt_ids(OmegaConf.create({"prompt": "hi"}), source)
    assert chat == tok.encode("user:hi\nassistant:")
    assert prompt_ids(OmegaConf.create({"prompt": "hi", "raw_prompt": True}), source) == tok.encode("hi")


def test_generate_cli_from_a_model_config(run_cli, model_args, tmp_path, monkeypatch):
    from dlm.generate import main

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(main, "model=qwen3_tiny", *model_args, "prompt=hi", "length=6", "num_samples=2")
    assert code == 0, err[-3000:]
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("hi") and "sampler: LowConfidenceSampler(steps=4" in lines[-1]
    assert "model conventions: sampler: low_confidence" in err
    code, out, err = run_cli(main, "model=qwen3_tiny", *model_args, f"run={tmp_path}", "prompt=hi")
    assert code == 2 and "and model= are both given" in err and "Traceback" not in err
    code, out, err = run_cli(main, "prompt=hi")
    assert code == 2 and "run= is required" in err and "model=<conf/model option>" in err


def test_evaluate_cli_from_a_model_config(run_cli, model_args, tmp_path, monkeypatch):
    from dlm.evaluate import main

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(main, "model=qwen3_tiny", *model_args, "data=brackets", "data.source.num_train=16",
                             "data.source.num_val=8", "data.batch_size=8", "num_mc=1", "samples.num_unconditional=1",
                             "samples.num_prompted=1", "samples.num_infill=1", "progress_bar=false")
    assert code == 0, err[-3000:]
    results = tmp_path / "evals" / "mdlm-qwen3_tiny" / "results.json"
    assert out.strip().splitlines()[-1] == f"results: {results}"
    metrics = json.loads(results.read_text())
    assert metrics["eval/nll_bound"] > 0 and metrics["eval/sampler"] == "low_confidence"


def test_lm_eval_adapter_from_a_model_config(ckpt):
    import math

    from lm_eval.api.instance import Instance

    from dlm.lm_eval_model import DLMHarnessModel, ModelArgsError

    args = dict(a.split("=", 1) for a in tiny_model_overrides(ckpt, **CONV)[1:])
    harness = DLMHarnessModel(model="qwen3_tiny", mc_num=2, batch_size=2, device="cpu", **args)
    assert harness.module.shift_logits is True
    (ll, _), = harness.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=("ab", "c"), idx=0)])
    assert math.isfinite(ll) and ll <= 0
    with pytest.raises(ModelArgsError, match="run=<run folder | .ckpt> or model="):
        DLMHarnessModel(model="qwen3_tiny", run="/x")
    with pytest.raises(ModelArgsError, match="need model=<option>"):
        DLMHarnessModel(run="/x", **{"model.pretrained": "/y"})


def test_chat_cli_from_a_model_config(run_cli, model_args, tmp_path, monkeypatch):
    """`dlm.chat model=...`: the checkpoint's template renders the turn and its recommended sampler replies."""
    import io
    import sys

    from dlm.chat import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/reset\nho\n"))
    code, out, err = run_cli(main, "model=qwen3_tiny", *model_args, "max_new_tokens=4", "temperature=0")
    assert code == 0, err[-3000:]
    assert out.count("model> ") == 2 and "you> hi" in out and "you> ho" in out
    assert "model conventions: sampler: low_confidence" in err
    code, out, err = run_cli(main, "model=qwen3_tiny", *model_args, f"run={tmp_path}")
    assert code == 2 and "and model= are both given" in err and "Traceback" not in err

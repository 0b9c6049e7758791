"""A2D end to end on CPU: an AR run on a tiny HF Qwen3 exports an HF folder; a second run converts it into a
masked diffusion LM (model.pretrained=<run>/hf) starting from exactly those weights; the logit shift reads
position j-1 everywhere; consolidation writes an HF folder transformers loads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from dlm.build import build_module
from dlm.methods.mdlm import MDLM
from dlm.models.hf import HFCausalLM
from dlm.safe_load import load_checkpoint
from dlm.schedules import LinearSchedule
from dlm.train import train


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    from conftest import FAST, compose

    tmp = tmp_path_factory.mktemp("a2d")
    cfg = compose(FAST + [f"paths.run_dir={tmp / 'ar'}", f"paths.cache_dir={tmp / 'cache'}", "name=ar",
                          "method=ar", "model=qwen3_tiny", "samples.num_unconditional=2", "samples.num_prompted=2"])
    return train(cfg), tmp


def test_ar_run_exports_an_hf_folder_that_a_diffusion_run_starts_from(ar_run, run_cfg):
    ar_dir, tmp = ar_run
    hf = ar_dir / "hf"
    assert (hf / "config.json").is_file() and json.loads((hf / "dlm_export.json").read_text())["method"] == "ar"
    cfg = run_cfg("model=qwen3_tiny", f"model.pretrained={hf}", "model.config=null", f"paths.cache_dir={tmp / 'cache'}")
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    ar_state = load_checkpoint(ar_dir / "checkpoints" / "last.ckpt")["state_dict"]
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, ar_state[name], rtol=0, atol=0, msg=name)
    assert module.backbone.attention == "bidirectional" and module.backbone.converted
    # converted with its causal mask restored == the AR model it came from
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(hf).eval()
    x = torch.randint(0, datamodule.tokenizer.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(module.backbone.eval()(x, attention="causal"), original(x).logits.float())
    # and the conversion trains as a diffusion LM
    cfg = run_cfg("model=qwen3_tiny", f"model.pretrained={hf}", "model.config=null", "method.shift_logits=true",
                  "trainer.max_steps=3", "trainer.val_check_interval=3", f"paths.cache_dir={tmp / 'cache'}",
                  run_dir=tmp / "mdlm")
    run_dir = train(cfg)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["val/nll_bound"] > 0

    # consolidation: the run's checkpoint as an HF folder that transformers loads with the trained weights
    from dlm.parallel.checkpoint import load_state_dict
    from dlm.parallel.export import export_hf_folder

    state = load_state_dict(run_dir / "checkpoints" / "last.ckpt")
    out = export_hf_folder(cfg, state, tmp / "mdlm_hf", {"method": "mdlm", "shift_logits": True})
    assert json.loads((out / "dlm_export.json").read_text())["shift_logits"] is True
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    trained = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, trained[f"backbone.hf_model.{name}"], rtol=0, atol=0, msg=name)
    # config.json keeps is_causal: false, so plain transformers already runs the export bidirectionally, as does
    # dlm's backbone loading the folder
    reloaded = HFCausalLM(pretrained=str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), loaded(x).logits.float(), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(reloaded(x, attention="causal"), loaded(x).logits.float(), atol=1e-3)


def test_logit_shift_reads_the_previous_position_in_loss_and_sampling():
    tok = SimpleNamespace(vocab_size=60, pad_token_id=57, eos_token_id=58, mask_token_id=59)
    torch.manual_seed(0)
    backbone = HFCausalLM(config={"model_type": "qwen3", "num_hidden_layers": 1, "hidden_size": 32,
                                  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                                  "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 64}).eval()
    shifted = MDLM(backbone, tok, LinearSchedule(), shift_logits=True)
    plain = MDLM(backbone, tok, LinearSchedule())
    x = torch.randint(0, 57, (2, 8))
    with torch.no_grad():
        a, b = shifted.logits(x), plain.logits(x)
        torch.testing.assert_close(a[:, 1:], b[:, :-1])
        torch.testing.assert_close(a[:, 0], b[:, 0])
        xt = x.clone()
        xt[:, 3] = tok.mask_token_id
        logp = shifted.denoise(xt)  # the samplers' view: position 3 is predicted from position 2's output
        expected = plain.logits(xt)[:, 2].float().clone()
        expected[:, tok.mask_token_id] = float("-inf")  # SUBS: the mask is never predicted
        torch.testing.assert_close(logp[:, 3, :57], expected.log_softmax(-1)[:, :57], atol=1e-5, rtol=0)
    batch = {"input_ids": x, "loss_mask": torch.ones_like(x, dtype=torch.bool)}
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert not torch.allclose(shifted.nll_bound(batch, g1), plain.nll_bound(batch, g2))


@pytest.mark.slow
def test_converted_model_beats_scratch_after_the_same_steps(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "a2d_vs_scratch.py"
    out = subprocess.run([sys.executable, str(script), "--ar-steps", "300", "--steps", "100", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    ratio = float(out.stdout.strip().splitlines()[-1].split("=")[-1])
    assert ratio < 1.0

"""Adapter-only LoRA checkpoints (dlm/models/lora_checkpoint.py, ``model.lora.checkpoint``): the checkpoint holds the
trainable parameters and a fingerprint of the frozen base, far smaller than the whole module; load_run rebuilds the
base and gives the full checkpoint's logits; a base that differs from the one the adapters were trained on is
refused, by load_run and by a resume, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import train_recorded

from dlm.models.lora_checkpoint import KEY, BaseMismatchError, fingerprint
from dlm.safe_load import load_checkpoint
from dlm.train import train

COMMON = ["model.lora.r=4", "trainer.max_steps=2", "trainer.val_check_interval=2", "lr_scheduler=constant"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny pretrained Qwen3 (qwen3_tiny's geometry, random weights) as an HF folder."""
    from conftest import write_tiny_qwen3

    return write_tiny_qwen3(tmp_path_factory.mktemp("lora_ckpt") / "base")


@pytest.fixture(scope="module")
def runs(pretrained, tmp_path_factory) -> dict[str, Path]:
    """The same LoRA run twice on the pretrained base: adapter-only checkpoints and full ones."""
    from conftest import FAST, compose

    tmp = tmp_path_factory.mktemp("lora_ckpt_runs")
    out = {}
    for mode in ("adapters", "full"):
        cfg = compose(FAST + [f"paths.run_dir={tmp / mode}", f"paths.cache_dir={tmp / 'cache'}", "name=test",
                              "model=qwen3_tiny", "model.config=null", f"model.pretrained={pretrained}",
                              *COMMON, f"model.lora.checkpoint={mode}"])
        out[mode] = train_recorded(cfg)
    return out


def test_an_adapter_only_checkpoint_holds_the_trainable_parameters_and_the_fingerprint(runs):
    small = load_checkpoint(runs["adapters"] / "checkpoints" / "last.ckpt")
    full = load_checkpoint(runs["full"] / "checkpoints" / "last.ckpt")
    trainable = {k for k, v in small["state_dict"].items()}
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    assert KEY in small and KEY not in full
    # the base left out is exactly what the full checkpoint holds beyond the adapters, each tensor fingerprinted
    assert set(small[KEY]["tensors"]) == set(full["state_dict"]) - trainable
    for key in trainable:
        assert torch.equal(small["state_dict"][key], full["state_dict"][key]), key  # the same training
    assert small["optimizer_states"][0]["state"].keys() == full["optimizer_states"][0]["state"].keys()
    size = {m: (runs[m] / "checkpoints" / "last.ckpt").stat().st_size for m in runs}
    adapters = sum(v.numel() * v.element_size() for v in small["state_dict"].values())
    base = sum(v.numel() * v.element_size() for k, v in full["state_dict"].items() if k not in trainable)
    assert size["full"] - size["adapters"] >= 0.95 * base  # the frozen base's bytes are what it saves
    assert size["adapters"] < 3 * adapters + 200_000  # adapters, their two Adam moments, the loops' state


def test_load_run_of_an_adapter_only_run_gives_the_full_checkpoints_logits(runs):
    from dlm.run import load_run

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    small, full = (load_run(runs[m], setup_data=False).module for m in ("adapters", "full"))
    assert small.state_dict().keys() == full.state_dict().keys()
    with torch.no_grad():
        want = full.backbone(ids)
        assert torch.equal(small.backbone(ids), want)


def test_a_changed_base_is_refused_by_load_run_and_by_a_resume(runs, pretrained, tmp_path, run_cfg):
    from transformers import AutoModelForCausalLM

    from dlm.run import load_run

    run = runs["adapters"]
    changed = tmp_path / "changed"
    model = AutoModelForCausalLM.from_pretrained(pretrained)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(1e-3)  # one tensor of the base, slightly
    model.save_pretrained(changed)
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg.model.pretrained = str(changed)
    moved = tmp_path / "moved"
    (moved / ".hydra").mkdir(parents=True)
    (moved / "checkpoints").mkdir()
    OmegaConf.save(cfg, moved / ".hydra" / "config.yaml")
    (moved / "checkpoints" / "last.ckpt").write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(BaseMismatchError, match=r"model\.pretrained=\S*changed is not the one they were trained on "
                                                r"\(1 tensors differ \(backbone\.hf_model\.model\.layers\.1\.mlp"
                                                r"\.down_proj\.base_layer\.weight\)"):
        load_run(moved, setup_data=False)
    # a resume onto the changed base: refused before the run folder gets a record of it
    before = sorted(str(p) for p in moved.rglob("*"))
    with pytest.raises(BaseMismatchError, match="not the one they were trained on"):
        train(run_cfg("model=qwen3_tiny", "model.config=null", f"model.pretrained={changed}", *COMMON,
                      "trainer.max_steps=4", f"ckpt_path={moved / 'checkpoints' / 'last.ckpt'}", run_dir=moved))
    assert sorted(str(p) for p in moved.rglob("*")) == before


def test_a_base_from_init_is_rebuilt_from_the_seed_and_another_seed_is_refused(run_cfg, tmp_path):
    """No pretrained weights: the base is the init of the run's seed, rebuilt the same by load_run; a resume
    under another seed would adapt another base."""
    from dlm.run import load_run

    run = train_recorded(run_cfg(*COMMON, run_dir=tmp_path / "a"))
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert KEY in ckpt and all(".lora_" in k for k in ckpt["state_dict"])
    module = load_run(run, setup_data=False).module
    assert fingerprint(module)["sha256"] == ckpt[KEY]["sha256"]
    with pytest.raises(BaseMismatchError, match="init weights of the run's seed"):
        train(run_cfg(*COMMON, "trainer.max_steps=4", "seed=1", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                      run_dir=tmp_path / "b"))


def test_full_keeps_the_whole_module(runs):
    full = load_checkpoint(runs["full"] / "checkpoints" / "last.ckpt")
    assert any(".base_layer." in k for k in full["state_dict"]) and KEY not in full

"""init_from=<run>: a new run (step 0, fresh optimizer) from a trained run's weights (dlm/init_from.py): the weights
equal the run's after init, the run's model config is adopted (or a differing command refused), a different tokenizer
is refused, LoRA on top trains the adapters with the base bit-identical to the run's, a family change (mdlm -> bd3lm)
works, and ckpt_path=last resumes an init_from run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_CLI, run_dir_of, train_recorded

from dlm.init_from import InitFromError
from dlm.run import load_run
from dlm.safe_load import load_checkpoint
from dlm.train import train


@pytest.fixture
def base(run_cfg, tmp_path):
    """A trained mdlm run on a 1-layer tiny model (not the composed default: 2 layers)."""
    return train_recorded(run_cfg("model.n_layers=1", "trainer.max_steps=3", "optimizer.lr=0.01",
                                   run_dir=tmp_path / "base"))


def _backbone_state(run: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_run(run, setup_data=False, use_ema=False).module.backbone.state_dict().items()}


def test_a_new_run_starts_at_the_runs_weights_with_its_model_config_at_step_0(base, run_cfg, tmp_path):
    """lr 0: the new run's weights after its steps are its initial weights, which must be the base run's; its global
    step counts from 0 and its recorded model is the run's (1 layer), though the command composed 2."""
    want = _backbone_state(base)
    new = train_recorded(run_cfg(f"init_from={base}", "method=bd3lm", "optimizer.lr=0", "trainer.max_steps=2",
                                  "trainer.val_check_interval=2", run_dir=tmp_path / "new"))
    ckpt = load_checkpoint(new / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2  # a fresh run: not 3 + 2
    got = {k.removeprefix("backbone."): v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # a family change: the mdlm run's backbone as bd3lm's; the recorded config loads back (n_layers from the run)
    run = load_run(new, setup_data=False)
    assert type(run.module).__name__ == "BD3LM" and run.cfg.model.n_layers == 1


def test_a_command_that_chooses_another_geometry_or_tokenizer_is_refused(base, run_cfg, tmp_path):
    from dlm.init_from import adopt_run_model
    from dlm.run import load_config

    cfg = run_cfg(f"init_from={base}", "model.d_model=64", run_dir=tmp_path / "x")
    with pytest.raises(InitFromError, match=r"model\.d_model: 128 in the run, 64 now"):
        adopt_run_model(cfg, load_config, overrides=["model.d_model=64"])
    # no model override: the run's model config is taken (and model.lora stays the new run's)
    cfg = run_cfg(f"init_from={base}", "model.lora.r=2", run_dir=tmp_path / "y")
    notes = adopt_run_model(cfg, load_config, overrides=[f"init_from={base}", "model.lora.r=2"])
    assert cfg.model.n_layers == 1 and cfg.model.lora.r == 2 and "model.n_layers" in notes[0]
    cfg = run_cfg(f"init_from={tmp_path / 'nope'}", run_dir=tmp_path / "w")
    with pytest.raises(InitFromError, match=r"init_from=.*nope: .*no such file or folder"):
        adopt_run_model(cfg, load_config, overrides=[])
    # another alphabet: the run's tokenizer is not the data's
    cfg = run_cfg(f"init_from={base}", "data.tokenizer.alphabet='[]()'", run_dir=tmp_path / "z")
    with pytest.raises(InitFromError, match=r"token 0: .\(. in the run, .\[. in data\.tokenizer"):
        train(cfg)


def test_lora_on_top_trains_the_adapters_and_keeps_the_runs_weights_bit_identical(base, run_cfg, tmp_path):
    want = _backbone_state(base)
    new = train_recorded(run_cfg(f"init_from={base}", "model.lora.r=4", "optimizer.lr=0.05", "trainer.max_steps=3",
                                  run_dir=tmp_path / "lora"))
    backbone = load_run(new, setup_data=False, use_ema=False).module.backbone
    state = backbone.state_dict()
    trained = [k for k in state if ".lora_B." in k]
    assert trained and all(state[k].abs().sum() > 0 for k in trained)  # B starts at 0: the adapters moved
    for key, value in want.items():  # every base tensor, adapted layers under .base_layer.
        live = key if key in state else key.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[live], value), key
    assert {n for n, p in backbone.named_parameters() if p.requires_grad} == {k for k in state if ".lora_" in k}


def test_an_init_from_run_resumes_with_ckpt_path_last(train_cli, workdir):
    code, out, err = train_cli(*TINY_CLI, "model.n_layers=1", "name=base")
    assert code == 0, err
    base = run_dir_of(out)
    args = [*TINY_CLI, f"init_from={base}", "name=ft", "callbacks.last_checkpoint.every_n_train_steps=1"]
    code, out, err = train_cli(*args)
    assert code == 0, err
    assert "init_from: the model config is the run's" in out
    first = run_dir_of(out)
    code, out, err = train_cli(*args, "ckpt_path=last", "trainer.max_steps=4")
    assert code == 0, err
    assert run_dir_of(out) == first and load_checkpoint(first / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert (first / "resumes.jsonl").is_file()

"""A NaN never eats the last good state (dlm/callbacks/nonfinite.py): non-finite gradients, losses and parameters
are caught before the optimizer step, no checkpoint holding a non-finite tensor is written, the stop names a
finite checkpoint, an lr given on resume takes effect, and action=skip goes on. Tiny in-process runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

import dlm.train
from dlm.callbacks.nonfinite import (
    NonFiniteCheckpointError,
    NonFiniteGuard,
    nonfinite_mask,
    nonfinite_tensors,
)
from dlm.config import ConfigError
from dlm.methods.base import NonFiniteLossError
from dlm.train import train

# 4 rows of 16 tokens a step, validation on one batch every 5 steps, no end-of-fit samples: a step is a few ms.
SHORT = ["data.batch_size=4", "trainer.val_check_interval=5", "trainer.limit_val_batches=1", "samples.num_unconditional=0",
         "samples.num_prompted=0", "samples.num_infill=0", "callbacks.last_checkpoint.every_n_train_steps=5"]


class InjectNaN(L.Callback):
    """NaN gradients (after backward, before the optimizer step) at the given optimizer steps; records the weights
    and the optimizer state that the step started from, and those after it."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    def on_after_backward(self, trainer, pl_module):
        step = trainer.global_step
        if step in self.steps:
            self.before[step] = _snapshot(trainer, pl_module)
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 in self.before:
            self.after[trainer.global_step - 1] = _snapshot(trainer, pl_module)


class InjectNaNLoss(L.Callback):
    """The loss becomes NaN from optimizer step `step` on (importable by a subprocess run: tests/ on PYTHONPATH)."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            real = type(pl_module).loss

            def nan_loss(batch, generator=None):
                out = real(pl_module, batch, generator)
                return {**out, "loss": out["loss"] * float("nan")}

            pl_module.loss = nan_loss


def _snapshot(trainer, pl_module) -> dict:
    state = {f"w.{n}": p.detach().clone() for n, p in pl_module.named_parameters()}
    for i, s in enumerate(trainer.optimizers[0].state.values()):
        state.update({f"opt.{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    return state


@pytest.fixture
def with_callback(monkeypatch):
    """Add a callback to the run's configured ones (the training CLI's own list, in-process)."""

    def add(callback):
        real = dlm.train.build_callbacks
        monkeypatch.setattr(dlm.train, "build_callbacks", lambda cfg: real(cfg) + [callback])
        return callback

    return add


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_every_checkpoint_finite(run_dir: Path) -> list[Path]:
    files = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    for f in files:
        ckpt = _load(f)
        tensors = [t for t in ckpt["state_dict"].values() if t.is_floating_point()]
        for state in ckpt["optimizer_states"][0]["state"].values():
            tensors += [t for t in state.values() if torch.is_tensor(t) and t.is_floating_point()]
        assert tensors and all(torch.isfinite(t).all() for t in tensors), f"{f.name} holds a non-finite tensor"
    return files


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_screen_flags_exactly_the_tensors_holding_a_nan_or_inf(dtype):
    """The cheap 2-norm screen overflows on large finite values (squares past the dtype's max): those tensors are
    decided by the exact max-abs norm, so only a real NaN/inf is flagged."""
    big = 1e30 if dtype == torch.float32 else 3e4  # finite, but the 2-norm of a few of them overflows the dtype
    ts = [torch.randn(64, 64, dtype=dtype, requires_grad=True) for _ in range(4)] + [torch.full((16,), big, dtype=dtype)]
    x = [t.detach().clone() for t in ts]
    x[1][3, 5] = float("nan")
    x[2][0, 0] = float("-inf")
    x[3][7, 7] = big
    assert nonfinite_mask(ts) == [False] * 5  # requires_grad tensors need no detach
    assert nonfinite_mask(x) == [False, True, True, False, False]


def test_nan_gradients_stop_before_the_step_and_leave_a_finite_last_checkpoint(run_cfg, with_callback):
    inject = with_callback(InjectNaN([12]))
    cfg = run_cfg(*SHORT, "trainer.max_steps=20")
    run_dir = Path(cfg.paths.run_dir)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert "step 12" in message and "gradient" in message and f"last finite checkpoint is {last}" in message
    assert f"ckpt_path={last} optimizer.lr=" in message
    files = _assert_every_checkpoint_finite(run_dir)
    assert {f.name for f in files} == {"last.ckpt", "best-step000010.ckpt"}
    ckpt = _load(last)
    assert ckpt["global_step"] == 13  # the skipped step counts (its LR-schedule step happened), its update did not
    before = inject.before[12]
    for name, value in ckpt["state_dict"].items():
        if f"w.{name}" in before:
            assert torch.equal(value, before[f"w.{name}"]), f"{name} changed in the dropped update"
    assert json.loads((run_dir / "results.json").read_text())["status"].startswith("stopped: non-finite")


def test_skip_drops_the_update_counts_it_and_goes_on(run_cfg, with_callback, capsys):
    inject = with_callback(InjectNaN([7]))
    run_dir = train(run_cfg(*SHORT, "trainer.max_steps=10", "callbacks.nonfinite.action=skip"))
    before, after = inject.before[7], inject.after[7]
    assert before.keys() == after.keys() and any(k.startswith("opt.") and "exp_avg" in k for k in before)
    for key in before:  # weights and Adam moments exactly as before the step (weight decay did not run either)
        assert torch.equal(before[key], after[key]), key
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 10 and results["train/nonfinite_skips"] == 1
    assert "nonfinite: skipped the update of step 7" in capsys.readouterr().out
    _assert_every_checkpoint_finite(run_dir)
    with open(run_dir / "metrics.csv") as f:
        skips = {int(r["step"]): float(r["train/nonfinite_skips"]) for r in csv.DictReader(f) if r["train/nonfinite_skips"]}
    assert skips[6] == 0 and skips[9] == 1


def test_skip_stops_after_too_many_in_a_row(run_cfg, with_callback):
    with_callback(InjectNaN(range(3, 100)))
    cfg = run_cfg(*SHORT, "trainer.max_steps=20", "callbacks.nonfinite.action=skip",
                  "callbacks.nonfinite.max_consecutive_skips=3")
    with pytest.raises(NonFiniteLossError, match=r"step 5: .*3 steps in a row .*max_consecutive_skips=3"):
        train(cfg)
    ckpt = _load(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6 and not nonfinite_tensors(ckpt)


class PoisonWeights(L.Callback):
    """A parameter becomes NaN after the update of `step` (finite gradients, an overflowing update)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def test_a_checkpoint_holding_nan_is_never_written(run_cfg, with_callback):
    """The weights break at step 10, when last.ckpt is due: the write is refused and step 5's file stays."""
    with_callback(PoisonWeights(10))
    cfg = run_cfg(*SHORT, "trainer.max_steps=20")
    with pytest.raises(NonFiniteCheckpointError, match=r"refused to write a checkpoint at step 10: "):
        train(cfg)
    files = _assert_every_checkpoint_finite(Path(cfg.paths.run_dir))
    assert [_load(f)["global_step"] for f in files if f.name == "last.ckpt"] == [5]


def test_broken_weights_stop_the_run_whatever_the_action(run_cfg, with_callback):
    """Weights broken after step 7's update (no checkpoint due): caught before step 8's update, even under
    action=skip (nothing to roll back to), naming the newest checkpoint written, which is finite."""
    with_callback(PoisonWeights(7))
    cfg = run_cfg(*SHORT, "trainer.max_steps=20", "callbacks.nonfinite.action=skip")
    with pytest.raises(NonFiniteLossError, match="step 7: parameter .* non-finite") as err:
        train(cfg)
    run_dir = Path(cfg.paths.run_dir)
    files = _assert_every_checkpoint_finite(run_dir)
    newest = max(files, key=lambda f: f.stat().st_mtime)
    assert f"last finite checkpoint is {newest}" in str(err.value) and _load(newest)["global_step"] == 5


class PoisonUnreadWeight(L.Callback):
    """A weight the loss never reads (an extra optimizer parameter) becomes NaN after the update of `step`."""

    def __init__(self, step):
        self.step, self.weight = step, torch.nn.Parameter(torch.zeros(3))

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].param_groups[0]["params"].append(self.weight)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                self.weight.fill_(float("nan"))


@pytest.mark.parametrize("every, caught", [(10, 10), (1, 3)])
def test_a_broken_weight_no_loss_reads_is_caught_by_the_periodic_screen(run_cfg, with_callback, every, caught):
    """The loss and gradients stay finite: the weights' own screen, every param_check_every steps, finds it."""
    with_callback(PoisonUnreadWeight(3))
    cfg = run_cfg(*SHORT, "trainer.max_steps=20", f"callbacks.nonfinite.param_check_every={every}")
    with pytest.raises(NonFiniteLossError, match=f"step {caught}: parameter <optimizer parameter> was non-finite"):
        train(cfg)


def test_an_lr_given_on_resume_takes_effect(run_cfg, tmp_path, capsys):
    """The checkpoint's optimizer state would restore its lr; the composed optimizer.lr wins, moments kept."""
    common = [*SHORT, "lr_scheduler=constant", "lr_scheduler.warmup_steps=0", "trainer.log_every_n_steps=1"]
    run_dir = train(run_cfg(*common, "trainer.max_steps=4", run_dir=tmp_path / "r"))
    saved = _load(run_dir / "checkpoints" / "last.ckpt")["optimizer_states"][0]
    capsys.readouterr()
    train(run_cfg(*common, "trainer.max_steps=7", f"ckpt_path={run_dir}/checkpoints/last.ckpt", "optimizer.lr=1e-4",
                  "optimizer.weight_decay=0.0", run_dir=run_dir))
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("resume: the config's optimizer settings")]
    assert len(line) == 1 and "lr[mlp] 0.001 -> 0.0001" in line[0] and "weight_decay[mlp] 0.01 -> 0.0" in line[0]
    with open(run_dir / "metrics.csv") as f:
        lrs = {int(r["step"]): float(r["lr-AdamW/mlp"]) for r in csv.DictReader(f) if r.get("lr-AdamW/mlp")}
    assert lrs[3] == pytest.approx(1e-3) and lrs[4] == pytest.approx(1e-4) and lrs[6] == pytest.approx(1e-4)
    final = _load(run_dir / "checkpoints" / "last.ckpt")
    groups = final["optimizer_states"][0]["param_groups"]
    assert all(g["lr"] == pytest.approx(1e-4) and g["weight_decay"] == 0.0 for g in groups)
    assert final["lr_schedulers"][0]["base_lrs"] == pytest.approx([1e-4] * len(groups))
    # the moments continued: Adam's step count went on from the checkpoint's
    assert {float(s["step"]) for s in final["optimizer_states"][0]["state"].values()} == {7.0}
    assert {float(s["step"]) for s in saved["state"].values()} == {4.0}


def test_a_resume_with_the_same_settings_says_nothing(run_cfg, tmp_path, capsys):
    run_dir = train(run_cfg(*SHORT, "trainer.max_steps=2", run_dir=tmp_path / "r"))
    capsys.readouterr()
    train(run_cfg(*SHORT, "trainer.max_steps=3", "ckpt_path=last", run_dir=run_dir))
    assert "resume: the config's optimizer settings" not in capsys.readouterr().out


def test_a_bad_action_is_one_config_error(run_cfg):
    with pytest.raises(ConfigError, match=r"callbacks\.nonfinite\.action='maybe': must be one of stop, skip"):
        train(run_cfg("callbacks.nonfinite.action=maybe"))
    with pytest.raises(ConfigError, match="max_consecutive_skips"):
        NonFiniteGuard(action="skip", max_consecutive_skips=0)
    with pytest.raises(ConfigError, match=r"param_check_every=0 must be an integer >= 1 \(1: the weights are"):
        NonFiniteGuard(param_check_every=0)


def test_skip_is_refused_under_deepspeed():
    """DeepSpeed's ZeRO optimizer holds the gradients, so an update cannot be dropped: refused at setup (the
    strategy object is built on the CPU; nothing is initialised)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    trainer = SimpleNamespace(strategy=DeepSpeedStrategy(stage=2))
    with pytest.raises(ConfigError, match="action=skip is not supported under DeepSpeed"):
        NonFiniteGuard(action="skip").setup(trainer, None, "fit")
    NonFiniteGuard(action="stop").setup(trainer, None, "fit")


@pytest.mark.slow  # ~1-2 min here: DeepSpeed's setup in a subprocess
def test_under_deepspeed_a_nan_loss_stops_before_the_engine_steps(tmp_path):
    """ZeRO-2 (the test-only CPU strategy): the gradients live in the engine, so the guard raises before
    engine.step; Lightning's "None from training_step is not supported by DeepSpeed" no longer fires; the
    last ZeRO folder written (step 4) is finite and named."""
    import os
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
           "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "DLM_CACHE_DIR": str(tmp_path / "c")}
    proc = subprocess.run(
        [sys.executable, "-m", "dlm.train", "trainer=deepspeed_zero2",
         "trainer.strategy._target_=zero_cpu_strategy.CPUDeepSpeedStrategy", "trainer.accelerator=cpu",
         "trainer.devices=1", "trainer.precision=32-true", "trainer.max_steps=10", "trainer.val_check_interval=100",
         "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "data.batch_size=4",
         "data.source.num_train=256", "logger=none", "callbacks.last_checkpoint.every_n_train_steps=2",
         "+callbacks.inject._target_=test_nonfinite.InjectNaNLoss", "+callbacks.inject.step=5",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert f"training stopped at step 5: the loss was nan; the last finite checkpoint is {ckpt}" in proc.stderr
    assert "action=skip" not in proc.stderr.split("training stopped")[-1]
    states = torch.load(ckpt / "checkpoint" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert states["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in states["module"].values() if t.is_floating_point())


@pytest.mark.parametrize("clip", [0.05, 1e6])  # clipping every step; a limit never reached (a scale of exactly 1)
def test_clipping_reuses_the_screens_gradient_norms_with_the_same_weights(run_cfg, tmp_path, monkeypatch, clip):
    """With the guard on, gradient clipping takes the guard's 2-norms (DiffusionLM.clip_gradients: no
    clip_grad_norm_ call), and the weights and optimizer moments after training are bit for bit those of Lightning's
    own clipping (the guard off), gradient accumulation included."""
    real = torch.nn.utils.clip_grad_norm_
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or real(*a, **k))
    states = {}
    for guard in (True, False):
        cfg = run_cfg(*SHORT, "trainer.max_steps=6", f"trainer.gradient_clip_val={clip}",
                      "trainer.accumulate_grad_batches=2", *([] if guard else ["~callbacks.nonfinite"]),
                      run_dir=tmp_path / f"guard-{guard}")
        calls.clear()
        train(cfg)
        states[guard] = _load(tmp_path / f"guard-{guard}" / "checkpoints" / "last.ckpt")
        assert len(calls) == (0 if guard else 6)
    for key, value in states[False]["state_dict"].items():
        assert torch.equal(states[True]["state_dict"][key], value), key
    for a, b in zip(states[True]["optimizer_states"][0]["state"].values(),
                    states[False]["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b if torch.is_tensor(b[k]))

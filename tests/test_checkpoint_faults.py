"""Faults around checkpoint writes: SIGTERM saves last.ckpt and exits non-zero; a write that fails or is killed
leaves the previous checkpoint intact and no partial file in $TMPDIR (dlm/checkpoint_io.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from dlm.checkpoint_io import AtomicCheckpointIO


def _env(tmp_path: Path) -> dict:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TMPDIR": str(tmpdir),
            "DLM_OUTPUT_ROOT": str(tmp_path / "runs"), "DLM_CACHE_DIR": str(tmp_path / "cache")}


def test_sigterm_saves_a_finite_last_checkpoint_and_exits_nonzero(tmp_path):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlm.train", "trainer.max_steps=100000", "trainer.val_check_interval=100000",
         "trainer.limit_val_batches=1", "callbacks.last_checkpoint.every_n_train_steps=3", "logger=none",
         "data.batch_size=4", "data.source.num_train=256", "trainer.enable_progress_bar=false",
         "+trainer.enable_model_summary=false", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # training is under way once the first periodic checkpoint is there
        assert ckpt.exists(), "no periodic checkpoint appeared"
        first = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    lines = [line for line in err.splitlines() if "SIGTERM" in line and line.startswith("error:")]
    assert len(lines) == 1 and str(ckpt) in lines[0] and "ckpt_path=last" in lines[0], err[-3000:]
    assert out.strip().splitlines()[-1] == f"run_dir: {run_dir}"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] >= first
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point())
    assert '"status": "interrupted: SIGTERM"' in (run_dir / "results.json").read_text()
    assert not list((tmp_path / "tmpdir").iterdir()) and not list(ckpt.parent.glob(".*.tmp"))


def test_the_trainer_writes_checkpoints_through_the_atomic_writer(tmp_path):
    from conftest import compose

    cfg = compose([f"paths.run_dir={tmp_path}", "logger=none"])
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_write_that_fails_midway_keeps_the_old_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR
    checkpoints = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, checkpoints / "last.ckpt")
    good = (checkpoints / "last.ckpt").read_bytes()

    def half_then_disk_full(obj, f, *args, **kwargs):
        f.write(b"x" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, checkpoints / "last.ckpt")
    assert (checkpoints / "last.ckpt").read_bytes() == good
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert not list(tmpdir.iterdir())


KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys, torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from dlm.checkpoint_io import AtomicCheckpointIO
    io = AtomicCheckpointIO() if sys.argv[1] == "atomic" else TorchCheckpointIO()
    target = sys.argv[2]
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, target)
    def killed_midway(obj, f, *args, **kwargs):
        f.write(b"x" * 4096)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[1] == "atomic":
        torch.save = killed_midway
    else:  # Lightning's writer serialises into memory first, then writes the bytes through fsspec
        import fsspec.implementations.local as local
        real = local.LocalFileOpener.write
        def write(self, data):
            real(self, data[: len(data) // 2])
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        local.LocalFileOpener.write = write
    io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, target)
""")


@pytest.mark.parametrize("writer", ["lightning", "atomic"])
def test_a_write_killed_midway_leaves_nothing_in_tmpdir(tmp_path, writer):
    """kill -9 inside a checkpoint write. Lightning's own writer (the contrast) leaves the partial file in $TMPDIR;
    dlm's leaves the old checkpoint intact and a hidden partial file next to it, which the next write removes."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    target = checkpoints / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, writer, str(target)], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(target, weights_only=True)["step"] == 1
    leftovers = list((tmp_path / "tmpdir").iterdir())
    if writer == "lightning":
        assert leftovers, "Lightning's fsspec transaction writes through $TMPDIR"
        return
    assert not leftovers
    assert len(list(checkpoints.glob(".last.ckpt.*.tmp"))) == 1
    AtomicCheckpointIO().save_checkpoint({"step": 3}, target)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert torch.load(target, weights_only=True)["step"] == 3

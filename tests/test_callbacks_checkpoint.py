"""dlm.callbacks.checkpoint.ModelCheckpoint: Lightning's, with its state key built once and a quick return on the
batches that are no save step; the key (checkpoints' callback state) and the saves are Lightning's."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from dlm.build import build_callbacks
from dlm.callbacks.checkpoint import ModelCheckpoint
from dlm.train import train
from tests.conftest import compose


def test_the_state_key_is_lightnings(tmp_path):
    for kwargs in ({"monitor": "val/loss", "mode": "min"}, {"every_n_train_steps": 100, "save_last": True}):
        ours, theirs = ModelCheckpoint(dirpath=tmp_path, **kwargs), LightningModelCheckpoint(dirpath=tmp_path, **kwargs)
        assert ours.state_key == theirs.state_key and ours.state_key == ours.state_key


def test_the_default_callbacks_use_it(tmp_path):
    cfg = compose(["logger=none", f"paths.run_dir={tmp_path}"])
    checkpoints = [c for c in build_callbacks(cfg) if isinstance(c, LightningModelCheckpoint)]
    assert len(checkpoints) == 2 and all(type(c) is ModelCheckpoint for c in checkpoints)


def test_last_is_written_every_n_steps_and_best_at_validation(run_cfg, tmp_path, monkeypatch):
    saved = []
    real = LightningModelCheckpoint._save_last_checkpoint

    def spy(self, trainer, candidates):
        saved.append(trainer.global_step)
        return real(self, trainer, candidates)

    monkeypatch.setattr(LightningModelCheckpoint, "_save_last_checkpoint", spy)
    cfg = run_cfg("trainer.max_steps=7", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
                  "callbacks.last_checkpoint.every_n_train_steps=3", "samples.num_unconditional=0",
                  "samples.num_prompted=0", "samples.num_infill=0")
    train(cfg)
    checkpoints = Path(cfg.paths.run_dir) / "checkpoints"
    assert 3 in saved and 6 in saved  # the every-3-steps saves (the validation end's save_last may add more)
    assert [p.name for p in checkpoints.glob("best-*.ckpt")] == ["best-step000004.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 7

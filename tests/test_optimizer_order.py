"""DiffusionLM clears the gradients right after each optimizer step (not in the next step's closure, after its
forward, as Lightning does): the same training, bit for bit, with the gradients gone between steps."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

import dlm.train
from dlm.methods.base import DiffusionLM
from dlm.train import train

QUIET = ["trainer.val_check_interval=4", "trainer.limit_val_batches=1", "samples.num_unconditional=0",
         "samples.num_prompted=0", "samples.num_infill=0", "data.batch_size=4"]


class GradsBetweenSteps(L.Callback):
    """Records, at each batch end, whether any parameter still holds a gradient."""

    def __init__(self):
        self.held = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.held.append(any(p.grad is not None for p in pl_module.parameters()))


@pytest.mark.parametrize("method", ["mdlm", "ar"])
def test_the_weights_are_lightnings_and_no_gradient_outlives_its_step(run_cfg, tmp_path, monkeypatch, method):
    states, held = {}, {}
    for order in ("dlm", "lightning"):
        with monkeypatch.context() as m:
            if order == "lightning":  # Lightning's own hooks: zero_grad inside the next closure
                m.setattr(DiffusionLM, "optimizer_step", L.LightningModule.optimizer_step)
                m.setattr(DiffusionLM, "optimizer_zero_grad", L.LightningModule.optimizer_zero_grad)
            spy = GradsBetweenSteps()
            real = dlm.train.build_callbacks
            m.setattr(dlm.train, "build_callbacks", lambda cfg, real=real, spy=spy: real(cfg) + [spy])
            cfg = run_cfg(*QUIET, f"method={method}", "trainer.max_steps=5", "trainer.accumulate_grad_batches=2",
                          "trainer.gradient_clip_val=0.05", run_dir=tmp_path / order)
            train(cfg)
        states[order] = torch.load(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)
        held[order] = spy.held
    for key, value in states["lightning"]["state_dict"].items():
        assert torch.equal(states["dlm"]["state_dict"][key], value), key
    # accumulation: the window's first micro-batch holds its gradients, the step's batch none (with dlm's order)
    assert held["dlm"] == [True, False] * 5
    assert held["lightning"] == [True] * 10

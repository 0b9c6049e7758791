"""The weights' exponential moving average (callbacks=ema, dlm/callbacks/ema.py): the update is the closed-form EMA
of the trajectory, one per optimizer step; validation runs on the EMA weights and training continues on the raw
ones; checkpoints keep the raw weights and the shadow, so a run resumes exactly; load_run gives the EMA weights;
sharded strategies are refused with a message."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dlm.callbacks.ema import EMA
from dlm.parallel.checkpoint import ema_weights
from dlm.safe_load import load_checkpoint
from dlm.train import train


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def fake_trainer(step=0, fn="fit"):
    return SimpleNamespace(global_step=step, state=SimpleNamespace(fn=fn), sanity_checking=False)


@pytest.mark.parametrize("warmup", [False, True])
def test_the_update_is_the_closed_form_ema_once_per_optimizer_step(warmup):
    torch.manual_seed(0)
    module, ema = Tiny(), EMA(decay=0.9, warmup=warmup)
    trainer = fake_trainer()
    ema.on_fit_start(trainer, module)
    expected = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert set(ema.shadow) == {"a.weight", "a.bias"}  # frozen parameters are not averaged
    for step in range(1, 6):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        trainer.global_step = step
        for _ in range(2):  # two batches per optimizer step (accumulation): one update
            ema.on_train_batch_end(trainer, module, None, None, 0)
        d = min(0.9, step / (9 + step)) if warmup else 0.9  # update n = step - 1: (1 + n) / (10 + n)
        for n, p in module.named_parameters():
            if p.requires_grad:
                expected[n] = d * expected[n] + (1 - d) * p.detach()
    assert ema.updates == 5
    for n, value in expected.items():
        torch.testing.assert_close(ema.shadow[n], value)


def test_validation_swaps_in_and_out_and_a_checkpoint_keeps_the_raw_weights():
    torch.manual_seed(0)
    module, ema = Tiny(), EMA(decay=0.5, warmup=False)
    trainer = fake_trainer()
    ema.on_fit_start(trainer, module)
    with torch.no_grad():
        module.a.weight.add_(1.0)
    trainer.global_step = 1
    ema.on_train_batch_end(trainer, module, None, None, 0)
    raw = module.a.weight.detach().clone()
    ema.on_validation_start(trainer, module)
    torch.testing.assert_close(module.a.weight, ema.shadow["a.weight"])  # validated on the EMA weights
    checkpoint = {"state_dict": {k: v.clone() for k, v in module.state_dict().items()}}
    ema.on_save_checkpoint(trainer, module, checkpoint)
    torch.testing.assert_close(checkpoint["state_dict"]["a.weight"], raw)  # ...but saved raw
    ema.on_validation_end(trainer, module)
    torch.testing.assert_close(module.a.weight, raw)  # training continues on the raw weights
    ema.on_fit_end(trainer, module)
    torch.testing.assert_close(module.a.weight, ema.shadow["a.weight"])  # the end of fit keeps the EMA weights
    ema.on_validation_end(trainer, module)
    torch.testing.assert_close(module.a.weight, ema.shadow["a.weight"])


def test_bad_decay_and_sharded_strategies_are_refused():
    with pytest.raises(ValueError, match="decay must be in \\[0, 1\\)"):
        EMA(decay=1.0)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    trainer = SimpleNamespace(strategy=DeepSpeedStrategy(stage=3))
    with pytest.raises(ValueError, match="needs every rank to hold whole parameters.*deepspeed_zero2"):
        EMA().setup(trainer, Tiny(), "fit")
    EMA().setup(SimpleNamespace(strategy=DeepSpeedStrategy(stage=2)), Tiny(), "fit")  # ZeRO-2: whole parameters


def test_a_run_with_ema_resumes_exactly_and_loads_its_ema_weights(run_cfg, tmp_path):
    """3 steps + resume to 6 == 6 straight (raw weights and shadow); results.json measured the EMA weights, which
    load_run returns (use_ema=False: the raw ones)."""
    from dlm.run import load_run

    common = ["callbacks=ema", "callbacks.ema.decay=0.9", "callbacks.last_checkpoint.every_n_train_steps=1",
              "lr_scheduler=constant"]
    cfg = run_cfg(*common, "trainer.max_steps=6", run_dir=tmp_path / "a")
    straight = train(cfg)
    (straight / ".hydra").mkdir(exist_ok=True)  # what the CLI writes: load_run rebuilds the module from it
    OmegaConf.save(cfg, straight / ".hydra" / "config.yaml")
    split = tmp_path / "b"
    train(run_cfg(*common, "trainer.max_steps=3", run_dir=split))
    train(run_cfg(*common, "trainer.max_steps=6", "ckpt_path=last", run_dir=split))
    ckpts = [load_checkpoint(d / "checkpoints" / "last.ckpt") for d in (straight, split)]
    for key in ckpts[0]["state_dict"]:
        torch.testing.assert_close(ckpts[0]["state_dict"][key], ckpts[1]["state_dict"][key], rtol=0, atol=1e-6)
    shadows = [c["callbacks"]["EMA"] for c in ckpts]
    assert shadows[0]["updates"] == shadows[1]["updates"] == 6
    for name in shadows[0]["shadow"]:
        torch.testing.assert_close(shadows[0]["shadow"][name], shadows[1]["shadow"][name], rtol=0, atol=1e-6)

    shadow = ema_weights(straight / "checkpoints" / "last.ckpt")
    # the tied output embedding is listed under its own name too (state-dict consumers: dlm.consolidate)
    assert shadow["backbone.lm_head.weight"] is shadow["backbone.tok_emb.weight"]
    ema_run, raw_run = load_run(straight), load_run(straight, use_ema=False)
    params, raw_params = dict(ema_run.module.named_parameters()), dict(raw_run.module.named_parameters())
    name = next(iter(shadow))
    torch.testing.assert_close(params[name], shadow[name])
    torch.testing.assert_close(raw_params[name], ckpts[0]["state_dict"][name])
    assert not torch.equal(params[name], raw_params[name])
    results = json.loads((straight / "results.json").read_text())
    assert results["status"] == "completed" and "val/nll_bound" in results

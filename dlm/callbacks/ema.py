"""Exponential moving average of the weights (``callbacks=ema``), as MDLM, SEDD and BD3-LM train and evaluate.

After every optimizer step the callback updates a float32 shadow of each trainable parameter,

    shadow <- d * shadow + (1 - d) * param,   d = min(decay, (1 + n) / (10 + n)) with ``warmup`` (n: updates so far),

and the EMA weights are what the run is judged by: validation (``val/nll_bound`` ...) runs on them, and from the
end of training on the module holds them, so the end-of-fit samples, ``results.json`` and the ``<run>/hf`` export
use them. The warm-up (timm's) keeps a short run's average from being dominated by its random initialisation; a
plain 0.9999 over 2,000 steps would still be 82% initialisation.

Checkpoints always hold the raw training weights in ``state_dict`` and the shadow in this callback's state, so a run
resumes exactly (``ckpt_path=last``: the same raw weights, the same shadow and update count).
:func:`dlm.run.load_run` (``dlm.generate``, ``dlm.evaluate``, the notebooks) loads the EMA weights when the
checkpoint has them (``use_ema=False``: the raw ones).

Every rank must hold whole parameters: single device, DDP, DeepSpeed ZeRO-1/2. Under ZeRO-3 or FSDP the parameters
are shards and the run stops at setup with a message (a shadow per shard is not implemented).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from dlm.parallel.deepspeed import zero_stage


class EMA(L.Callback):
    """Args:
    decay: the EMA decay (MDLM / BD3-LM: 0.9999).
    warmup: use ``min(decay, (1 + n) / (10 + n))`` for the n-th update (see the module docstring).
    evaluate_with_ema: validate on the EMA weights and leave them in the module at the end of training.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, evaluate_with_ema: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1), got {decay!r}")
        self.decay, self.warmup, self.evaluate_with_ema = float(decay), bool(warmup), bool(evaluate_with_ema)
        self.shadow: dict[str, Tensor] = {}
        self.aliases: dict[str, str] = {}  # tied parameters' other names -> the shadow's (e.g. lm_head -> embedding)
        self.updates = 0
        self._last_step = -1  # the optimizer step of the last update (gradient accumulation: one update per step)
        self._backup: dict[str, Tensor] | None = None  # the raw weights while the EMA ones are swapped in
        self._final = False  # training ended: the EMA weights stay in the module

    @property
    def state_key(self) -> str:
        return "EMA"

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:


        sharded = zero_stage(trainer.strategy) == 3 or isinstance(trainer.strategy, FSDPStrategy)
        if sharded:
            raise ValueError(
                f"callbacks=ema needs every rank to hold whole parameters; {type(trainer.strategy).__name__} shards "
                "them (ZeRO-3 / FSDP). Use trainer=deepspeed_zero2, ddp or a single device, or drop the EMA callback"
            )
        # first in line, so that the EMA weights are in place before the other callbacks' on_fit_end (the samples);
        # a new list: Lightning is iterating the current one to call this hook
        if getattr(trainer, "callbacks", None) and trainer.callbacks[0] is not self:
            trainer.callbacks = [self] + [c for c in trainer.callbacks if c is not self]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = self._params(pl_module)
        if self.shadow:  # restored from a checkpoint
            if set(self.shadow) != set(params):
                raise ValueError("the checkpoint's EMA shadow does not match the model's trainable parameters")
            self.shadow = {n: t.to(params[n].device, torch.float32) for n, t in self.shadow.items()}
        else:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
        names = {id(p): n for n, p in params.items()}
        self.aliases = {n: names[id(p)] for n, p in pl_module.named_parameters(remove_duplicate=False)
                        if id(p) in names and names[id(p)] != n}
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # no optimizer step in this batch (accumulation, skipped step)
            return
        self._last_step = trainer.global_step
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        params = self._params(pl_module)
        names = list(self.shadow)
        with torch.no_grad():
            torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1 - d)
        self.updates += 1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluate_with_ema and trainer.state.fn == "fit":
            self._swap_in(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not self._final:  # back to the raw weights to train on
            self._swap_out(pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # from here on (end-of-fit samples, results.json, the export) the module holds the EMA weights; the last
        # checkpoint was saved before (on_train_end) with the raw ones
        if self.evaluate_with_ema:
            self._swap_in(pl_module)
            self._final = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # a crash during validation: the checkpoint written after this (ModelCheckpoint comes last) gets the raw
        # weights, also under DeepSpeed, whose engine saves the live module
        self._swap_out(pl_module)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"shadow": {n: t.detach().cpu() for n, t in self.shadow.items()}, "aliases": dict(self.aliases),
                "updates": self.updates, "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = dict(state_dict["shadow"])
        self.updates = int(state_dict["updates"])

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._backup is None or "state_dict" not in checkpoint:
            return
        # the EMA weights are swapped in (a checkpoint saved during validation, or by hand after fit): the
        # checkpoint's state_dict must hold the raw ones (resume trains on them)
        by_id = {id(p): n for n, p in self._params(pl_module).items()}
        for key, tensor in pl_module.state_dict(keep_vars=True).items():
            name = by_id.get(id(tensor))
            if name is not None and key in checkpoint["state_dict"]:
                checkpoint["state_dict"][key] = self._backup[name].detach().cpu().clone()

    # ---- helpers -----------------------------------------------------------------------------------------------
    @staticmethod
    def _params(pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if self._backup is not None or not self.shadow:
            return
        params = self._params(pl_module)
        self._backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._backup is None:
            return
        with torch.no_grad():
            for n, p in self._params(pl_module).items():
                p.copy_(self._backup[n])
        self._backup = None

"""The non-finite guard (``callbacks.nonfinite``): a NaN/inf never reaches the weights or a checkpoint.

Before every optimizer step (Lightning's ``on_before_optimizer_step``: after backward and gradient accumulation,
before clipping and the step) the guard checks, with one device sync, that the step's losses and every gradient are
finite, and before every ``param_check_every``-th step (10) every parameter the optimizer updates too (finite weights
and gradients make a finite update, and a broken weight the loss reads breaks the next loss; the periodic screen finds
one it does not read, such as an unused embedding row). The gradients' 2-norms from this screen are what gradient
clipping uses: DiffusionLM.clip_gradients, no second pass over the gradients. When one is not, the step's gradients are dropped, so the
optimizer leaves the weights and its moments as they were (torch optimizers skip a parameter without a gradient;
the LR schedule still advances, as for a step a GradScaler skips), and then

    action: stop   training stops; checkpoints/last.ckpt is written with this (finite) state and the run exits 1
                   with a message naming the step, that checkpoint and how to resume with other settings;
    action: skip   training goes on; skipped steps are counted (``train/nonfinite_skips``) and printed, and after
                   ``max_consecutive_skips`` in a row the run stops as above.

Parameters already non-finite (a previous update overflowed with finite gradients) cannot be rolled back: the run
stops, whatever the action, and names the newest checkpoint written. That one is finite, because every checkpoint
is checked where it is written: ``on_save_checkpoint`` runs inside Lightning's ``dump_checkpoint`` for every
writer (ModelCheckpoint's last and best, ``trainer.save_checkpoint`` in dlm.train, the SIGTERM save) before any
file is touched, and a checkpoint holding a non-finite tensor (weights, optimizer state, EMA shadow, ...) is
refused with :class:`NonFiniteCheckpointError`; the files already there stay as they are.

Mixed precision with a loss scaler (``16-mixed``): overflowing gradients are the scaler's to handle (it skips the
step and lowers the scale), so gradients are not checked there; losses and parameters are.
DeepSpeed: its ZeRO optimizer holds the gradients in its own partitions (``param.grad`` is None), so the guard sees
the losses and the optimizer's (fp32 master) parameters only, and cannot drop an update: on a non-finite value it
raises before the engine steps (the weights are untouched, the run stops with the last checkpoint written), and
``action: skip`` is refused at setup (DeepSpeed's fp16 loss scaler skips overflowing steps by itself).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor

from dlm.config import ConfigError
from dlm.log_interval import logs_this_step
from dlm.methods.base import NonFiniteLossError
from dlm.run_folder import LAST_CKPT, RunFolder

ACTIONS = ("stop", "skip")


class NonFiniteCheckpointError(NonFiniteLossError):
    """A checkpoint holding a non-finite tensor was about to be written; nothing was written."""


def _tensors(obj: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Every floating-point tensor in a (nested) checkpoint dict, with its dotted path."""
    if isinstance(obj, Tensor):
        return [(prefix, obj)] if obj.is_floating_point() and obj.numel() else []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    found = []
    for key, value in items:
        found += _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def nonfinite_mask(tensors: list[Tensor]) -> list[bool]:
    """Which tensors hold a NaN/inf, with one sync per device on the usual (all finite) path: each tensor's 2-norm
    (fused per device and dtype, accumulated in float32 at least; NaN and inf propagate into it) screens them, 7x
    cheaper on a CPU than the max-abs norm, and the few whose 2-norm is not finite (a NaN/inf, or finite values whose
    squares overflow) are then decided exactly by their max-abs norm, which does not overflow on finite values."""
    return screen(tensors)[0]


def screen(tensors: list[Tensor]) -> tuple[list[bool], list[Tensor | None]]:
    """:func:`nonfinite_mask` and the screen's 2-norms: ``norms[i]`` is tensor i's 2-norm as
    ``torch.nn.utils.clip_grad_norm_`` computes it (``torch._foreach_norm``, the tensor's dtype) where that dtype is
    32-bit or wider; None for half-precision tensors (screened in float32)."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    bad = [False] * len(tensors)
    norms: list[Tensor | None] = [None] * len(tensors)
    with torch.no_grad():
        for (_, dtype), indices in groups.items():
            wide = torch.float32 if dtype.itemsize < 4 else None  # a half-precision 2-norm overflows at 65504
            group_norms = torch._foreach_norm([tensors[i] for i in indices], 2, dtype=wide)
            if wide is None:
                for i, norm in zip(indices, group_norms):
                    norms[i] = norm
            screened = [i for i, finite in zip(indices, torch.stack(group_norms).isfinite().tolist()) if not finite]
            if screened:
                exact = torch._foreach_norm([tensors[i] for i in screened], math.inf)
                for i, finite in zip(screened, torch.stack(exact).isfinite().tolist()):
                    bad[i] = not finite
    return bad, norms


# Not model state: the loops' logged metrics, and the scores of checkpoint/early-stopping callbacks (inf by design
# before the first comparison).
_METRIC_KEYS = ("loops",)
_METRIC_CALLBACKS = ("ModelCheckpoint", "EarlyStopping")


def nonfinite_tensors(checkpoint: dict) -> list[str]:
    """The dotted paths of the non-finite tensors of the model's state in a checkpoint dict: weights, optimizer and
    schedule state, callbacks' state (the EMA shadow), anything a hook added; not logged metrics."""
    state = {k: v for k, v in checkpoint.items() if k not in _METRIC_KEYS}
    if isinstance(state.get("callbacks"), dict):
        state["callbacks"] = {k: v for k, v in state["callbacks"].items() if not str(k).startswith(_METRIC_CALLBACKS)}
    named = _tensors(state)
    return [name for (name, _), bad in zip(named, nonfinite_mask([t for _, t in named])) if bad]


def _bad_names(tensors: list[Tensor], names: dict[int, str]) -> list[str]:
    """The names (by tensor id) of the non-finite tensors among these (on the bad path only: a sync per device)."""
    tensors = [t for t in tensors if t.is_floating_point() and t.numel()]
    return [names.get(id(t), "<optimizer parameter>") for t, bad in zip(tensors, nonfinite_mask(tensors)) if bad]


def newest_checkpoint(dirpath: Path) -> Path | None:
    """The most recently written checkpoint file or DeepSpeed folder in dirpath."""
    found = [p for p in Path(dirpath).glob("*.ckpt")] if Path(dirpath).is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class NonFiniteGuard(L.Callback):
    """Args:
    action: ``stop`` (save last.ckpt and stop) or ``skip`` (drop the step's update and go on).
    max_consecutive_skips: with ``skip``, stop after this many skipped steps in a row.
    dirpath: the run's checkpoint folder (last.ckpt is written there on a stop).
    param_check_every: screen the weights themselves before every N-th optimizer step (the loss and gradients are
        screened before every one; a non-finite weight that reaches either is caught there, the next step).
    """

    def __init__(self, action: str = "stop", max_consecutive_skips: int = 10, dirpath: str | None = None,
                 param_check_every: int = 10):
        if action not in ACTIONS:
            raise ConfigError([f"callbacks.nonfinite.action={action!r}: must be one of {', '.join(ACTIONS)}"])
        if isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int) \
                or max_consecutive_skips < 1:
            raise ConfigError([f"callbacks.nonfinite.max_consecutive_skips={max_consecutive_skips!r} must be an "
                               f"integer >= 1"])
        if isinstance(param_check_every, bool) or not isinstance(param_check_every, int) or param_check_every < 1:
            raise ConfigError([f"callbacks.nonfinite.param_check_every={param_check_every!r} must be an integer >= 1 "
                               f"(1: the weights are screened before every optimizer step)"])
        self.action, self.max_consecutive_skips = action, max_consecutive_skips
        self.param_check_every = param_check_every
        self.dirpath = Path(dirpath) if dirpath else None
        self.skipped = 0  # steps whose update was dropped, over the whole run (resumes included)
        self.consecutive = 0
        self._stop: dict | None = None  # set by a bad step: the run stops at the end of this batch

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))

    def _checkpoints(self, trainer: L.Trainer) -> Path:
        return self.dirpath or RunFolder(trainer.default_root_dir).checkpoints

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:

        if self.action == "skip" and isinstance(trainer.strategy, DeepSpeedStrategy):
            raise ConfigError([
                "callbacks.nonfinite.action=skip is not supported under DeepSpeed (the ZeRO optimizer holds the "
                "gradients, so an update cannot be dropped): use action=stop (DeepSpeed's fp16 loss scaler skips "
                "overflowing steps by itself)"
            ])

    # ---- before every optimizer step ------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:

        loss = getattr(pl_module, "nonfinite_loss", None)  # set by DiffusionLM.training_step for this step
        pl_module.nonfinite_loss = None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grads = [p.grad for p in params if p.grad is not None] if scaler is None else []
        # finite weights and gradients make a finite update, so broken weights show in the loss and gradients of
        # the next step; the weights are screened every param_check_every steps for a NaN that reaches neither
        # (an unused embedding row), and on every step where no gradient is screened (a loss scaler, DeepSpeed)
        screened = params if not grads or trainer.global_step % self.param_check_every == 0 else []
        tensors = [t for t in grads + screened if t.is_floating_point() and t.numel()]
        flags, norms = screen(tensors)
        bad = loss is not None or any(flags)
        pl_module.screened_grad_norms = None
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):  # any rank: every rank drops the step
            self.consecutive = 0
            # the gradients' 2-norms, for gradient clipping to reuse (DiffusionLM.clip_gradients): one pass over the
            # gradients less per step; only when every gradient was screened in its own dtype
            grad_norms = norms[:len(grads)]
            if all(t is g for t, g in zip(tensors, grads)) and all(n is not None for n in grad_norms):
                pl_module.screened_grad_norms = (grads, grad_norms)
            return
        step = trainer.global_step
        names = {id(p): n for n, p in pl_module.named_parameters()}
        bad_params = _bad_names(params, names)
        if bad_params:  # the cause of a non-finite loss too, when there is one
            reason = f"parameter {bad_params[0]} was non-finite (after the previous update)"
        elif loss is not None:
            reason = f"the loss was {loss}"
        else:
            bad_grads = _bad_names([p.grad for p in params if p.grad is not None],
                                   {id(p.grad): names.get(id(p), "?") for p in params if p.grad is not None})
            reason = f"the gradient of {bad_grads[0] if bad_grads else 'a parameter on another rank'} was non-finite"
        if isinstance(trainer.strategy, DeepSpeedStrategy):  # the engine steps after this hook: raise before it
            raise NonFiniteLossError(self._message(trainer, step, reason, newest_checkpoint(self._checkpoints(
                trainer)), saved=False))
        for p in params:
            p.grad = None  # the optimizer skips these parameters: no update, no moment or weight-decay change
        self.skipped += 1
        self.consecutive += 1
        if bad_params:
            self._stop = {"step": step, "reason": reason, "save": False}
        elif self.action == "stop":
            self._stop = {"step": step, "reason": reason, "save": True}
        elif self.consecutive >= self.max_consecutive_skips:
            self._stop = {"step": step, "reason": f"{reason}; {self.consecutive} steps in a row were skipped "
                          f"(callbacks.nonfinite.max_consecutive_skips={self.max_consecutive_skips})", "save": True}
        elif trainer.is_global_zero:
            print(f"nonfinite: skipped the update of step {step}: {reason} ({self.skipped} skipped in all, "
                  f"{self.consecutive} in a row)", flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if logs_this_step(trainer):  # the other steps' value reaches no logger (dlm/log_interval.py)
            pl_module.log("train/nonfinite_skips", float(self.skipped), batch_size=1)
        if self._stop is None:
            return
        stop, self._stop = self._stop, None
        ckpt = self._checkpoints(trainer) / LAST_CKPT
        if stop["save"]:
            trainer.save_checkpoint(ckpt, weights_only=False)  # a full, resumable checkpoint; the update was dropped: this state is finite (and checked on save)
        else:
            ckpt = newest_checkpoint(self._checkpoints(trainer))
        message = self._message(trainer, stop["step"], stop["reason"], ckpt, saved=stop["save"])
        pl_module.nonfinite_stop = {"step": stop["step"], "reason": stop["reason"], "checkpoint": str(ckpt),
                                    "message": message}
        trainer.should_stop = True

    def _message(self, trainer: L.Trainer, step: int, reason: str, ckpt: Path | None, saved: bool) -> str:

        where = (f"the last finite checkpoint is {ckpt}" + (f" (step {trainer.global_step}, the update of step "
                 f"{step} not applied)" if saved else "")) if ckpt else "no checkpoint was written yet"
        other = ["raise trainer.gradient_clip_val"]
        if str(trainer.precision) not in ("32-true", "32", "64-true", "64"):
            other.append("use trainer.precision=32-true")
        if self.action == "stop" and not isinstance(trainer.strategy, DeepSpeedStrategy):
            other.append("callbacks.nonfinite.action=skip")
        resume = f"ckpt_path={ckpt} " if ckpt else ""
        return (f"training stopped at step {step}: {reason}; {where}. Lower the learning rate (or "
                f"{', or '.join(other)}), then resume: {resume}optimizer.lr=<lower>")

    # ---- every checkpoint written ------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        bad = nonfinite_tensors(checkpoint)
        if bad:
            newest = newest_checkpoint(self._checkpoints(trainer))
            raise NonFiniteCheckpointError(
                f"refused to write a checkpoint at step {trainer.global_step}: {len(bad)} non-finite tensors "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the checkpoints already written are kept"
                + (f" (the newest: {newest})" if newest else "")
            )

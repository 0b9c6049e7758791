"""Three per-step costs of Lightning that buy nothing in a dlm run, removed (benchmarks/overhead.py measures them).

- **The default profiler.** Lightning wraps every hook it calls (each callback's, the module's, the strategy's:
  about 150 a training step with dlm's callbacks) in ``trainer.profiler.profile(name)``, a ``@contextmanager``
  generator even when the profiler does nothing: ~2 us a call. :class:`NoProfiler` returns a shared
  ``nullcontext``. A profiler asked for (``+trainer.profiler=simple``, or any Profiler) is left as it is.
- **Moving a logged metric to the device it is on.** Every ``self.log`` call runs ``_ResultMetric.to(value.device)``
  (lightning/pytorch/trainer/connectors/logger_connector/result.py), which rebuilds the metric's whole ``__dict__``
  through ``apply_to_collection`` (a deep copy of its metadata dataclass included): ~0.5 ms a call on a CPU, 7 calls
  a logged step. :func:`_move_logged_metric` skips it when the metric was last moved to that device by ``.to`` and
  every tensor it holds is there; anything else (a first call, another device, a state moved some other way) takes
  Lightning's path. What is logged is unchanged (tests/test_lightning_fast_paths.py).
- **Calling every callback for every hook.** Each of the six callback hooks of a training step
  (lightning/pytorch/trainer/call.py ``_call_callback_hooks``) visits every callback (nine in a dlm run), builds
  a profiler label from its ``state_key`` (a ``repr`` of its arguments for some) and calls the hook, mostly the
  base class's empty one. :func:`_call_overridden_callback_hooks` calls only the callbacks whose class (or the
  instance itself) defines the hook, in the same order, with the same ``_current_fx_name`` around each; the base
  hooks it leaves out do nothing. It does so only for a trainer with :class:`NoProfiler` (a profiler asked for
  sees every call, labelled as Lightning labels them).

:func:`apply` installs all three; dlm.train and the benchmark call it on the trainer they build.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, EarlyStopping
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.trainer import call as lightning_call
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultMetric

_NOTHING = nullcontext()  # reusable: entering and leaving it does nothing
_MOVED_TO = "_dlm_moved_to"  # the device a _ResultMetric's last .to(device) moved it to


class NoProfiler(PassThroughProfiler):
    """Profiles nothing, at no cost per ``profile`` call."""

    def profile(self, action_name: str):  # noqa: ARG002 (Profiler's signature)
        return _NOTHING


_lightning_move = _ResultMetric.to


def _move_logged_metric(self, *args, **kwargs):
    """``_ResultMetric.to``, skipped where it would move nothing (see the module docstring)."""
    if len(args) == 1 and not kwargs:
        device = args[0]  # Lightning's own calls: .to(value.device), .to(device="cpu")
    else:
        device = kwargs["device"] if not args and set(kwargs) == {"device"} else None
    if not isinstance(device, (torch.device, str, int)):  # another form of .to: Lightning's path, nothing remembered
        self.__dict__.pop(_MOVED_TO, None)
        return _lightning_move(self, *args, **kwargs)
    device = torch.device(device)
    state = self.__dict__
    if state.get(_MOVED_TO) == device and all(
            value.device == device for value in state.values() if isinstance(value, torch.Tensor)):
        return self
    _lightning_move(self, *args, **kwargs)
    state[_MOVED_TO] = device
    return self


_lightning_call_hooks = lightning_call._call_callback_hooks
_defines_hook: dict[tuple[type, str], bool] = {}  # (callback class, hook name) -> not Callback's empty hook


def _defines(callback, hook_name: str) -> bool:
    key = (type(callback), hook_name)
    if key not in _defines_hook:
        _defines_hook[key] = getattr(type(callback), hook_name, None) is not getattr(Callback, hook_name, None)
    return _defines_hook[key] or hook_name in callback.__dict__  # a hook set on the instance counts too


def _call_overridden_callback_hooks(trainer, hook_name: str, *args, monitoring_callbacks=None, **kwargs) -> None:
    """``_call_callback_hooks``, calling only the callbacks that define ``hook_name`` (see the module docstring)."""
    if not isinstance(trainer.profiler, NoProfiler):
        return _lightning_call_hooks(trainer, hook_name, *args, monitoring_callbacks=monitoring_callbacks, **kwargs)
    callbacks = [callback for callback in trainer.callbacks if _defines(callback, hook_name)]
    if monitoring_callbacks is not None:  # Lightning's split of on_train_epoch_end: monitoring callbacks last
        callbacks = [callback for callback in callbacks
                     if isinstance(callback, (EarlyStopping, Checkpoint)) is monitoring_callbacks]
    if not callbacks:
        return None
    pl_module = trainer.lightning_module
    if pl_module:
        previous, pl_module._current_fx_name = pl_module._current_fx_name, hook_name
    for callback in callbacks:
        fn = getattr(callback, hook_name)
        if callable(fn):
            fn(trainer, trainer.lightning_module, *args, **kwargs)
    if pl_module:
        pl_module._current_fx_name = previous  # restored for a nested call, as Lightning does
    return None


def apply(trainer) -> None:
    """Install the fast paths for ``trainer`` (built, not yet fitted)."""
    if type(trainer.profiler) is PassThroughProfiler:
        trainer.profiler = NoProfiler()
    if _ResultMetric.to is _lightning_move:
        _ResultMetric.to = _move_logged_metric
    if lightning_call._call_callback_hooks is _lightning_call_hooks:
        lightning_call._call_callback_hooks = _call_overridden_callback_hooks

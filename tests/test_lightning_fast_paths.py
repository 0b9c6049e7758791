"""dlm/lightning_fast_paths.py: the no-op profiler and the logged-metric move that skips moving what is in place
log exactly what Lightning's own paths log."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch.profilers import PassThroughProfiler, SimpleProfiler
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection

from dlm import lightning_fast_paths as fast


def _logged(collection: _ResultCollection, values) -> list[float]:
    out = []
    for i, value in enumerate(values):
        collection.log("training_step", "train/loss", value, on_step=True, on_epoch=True, batch_size=i + 1)
        out.append(collection["training_step.train/loss"].compute().item())
    return out


@pytest.fixture
def fast_move(monkeypatch):
    monkeypatch.setattr(fast._ResultMetric, "to", fast._move_logged_metric)


def test_logged_values_are_lightnings(fast_move):
    values = [torch.tensor(v) for v in (1.0, 2.5, -3.0, 4.0)]
    fast._ResultMetric.to = fast._lightning_move
    expected = _logged(_ResultCollection(training=True), values)
    fast._ResultMetric.to = fast._move_logged_metric
    assert _logged(_ResultCollection(training=True), values) == expected


def test_only_a_move_to_where_everything_already_is_is_skipped(fast_move, monkeypatch):
    moves = []

    def lightning_move(self, *args, **kwargs):
        moves.append(args or kwargs)
        return original(self, *args, **kwargs)

    original = fast._lightning_move
    monkeypatch.setattr(fast, "_lightning_move", lightning_move)
    collection = _ResultCollection(training=True)
    collection.log("training_step", "x", torch.tensor(1.0), on_step=True, on_epoch=False, batch_size=1)
    metric = collection["training_step.x"]
    assert len(moves) == 1 and metric.__dict__[fast._MOVED_TO] == torch.device("cpu")  # a new metric moves
    metric.to(torch.device("cpu"))
    metric.to(device="cpu")
    assert len(moves) == 1  # in place: skipped
    metric.to(torch.device("meta"))  # another device: the states move
    assert len(moves) == 2 and metric.value.device.type == "meta"
    metric.value = torch.tensor(2.0)  # a state put elsewhere some other way: the check of the tensors sees it
    metric.to(torch.device("meta"))
    assert len(moves) == 3 and metric.value.device.type == "meta"
    metric.to(torch.float64)  # another form of .to: Lightning's path, and nothing remembered
    assert len(moves) == 4 and fast._MOVED_TO not in metric.__dict__


def test_the_profile_context_is_free_and_a_chosen_profiler_is_kept():
    class Trainer:
        profiler = PassThroughProfiler()

    trainer = Trainer()
    fast.apply(trainer)
    assert isinstance(trainer.profiler, fast.NoProfiler)
    with trainer.profiler.profile("run_training_batch"):
        pass
    chosen = Trainer()
    chosen.profiler = SimpleProfiler()
    fast.apply(chosen)
    assert isinstance(chosen.profiler, SimpleProfiler)


def test_a_run_logs_every_metric_with_the_fast_paths(run_cfg):
    """A training run through dlm.train (which applies them) writes the step metrics at the log interval."""
    from dlm.train import train

    run = train(run_cfg("trainer.max_steps=6", "trainer.log_every_n_steps=2"))
    rows = [r for r in csv.DictReader(open(Path(run) / "metrics.csv")) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5] and all(float(r["train/loss"]) > 0 for r in rows)
    assert fast._ResultMetric.to is fast._move_logged_metric


class _Recorder(__import__("lightning").pytorch.Callback):
    """Records each hook it defines with the module's ``_current_fx_name`` at the time."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls.append((self.name, "on_train_batch_start", batch_idx, pl_module._current_fx_name))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls.append((self.name, "on_before_optimizer_step", trainer.global_step, pl_module._current_fx_name))

    def on_train_epoch_end(self, trainer, pl_module):
        self.calls.append((self.name, "on_train_epoch_end", trainer.global_step, pl_module._current_fx_name))


class _MonitoringRecorder(__import__("lightning").pytorch.callbacks.Checkpoint, _Recorder):
    pass


def _hook_calls(fast_paths: bool, profiler=None) -> list:
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    calls: list = []
    monitoring = _MonitoringRecorder("monitoring", calls)
    plain = _Recorder("plain", calls)
    on_instance = pl.Callback()  # a hook given to the instance, not its class, is called too
    on_instance.on_after_backward = lambda trainer, module: calls.append(
        ("instance", "on_after_backward", trainer.global_step, module._current_fx_name))
    trainer = pl.Trainer(max_steps=4, max_epochs=2, logger=False, enable_checkpointing=True,
                         enable_progress_bar=False, enable_model_summary=False, profiler=profiler,
                         callbacks=[monitoring, plain, on_instance])
    if fast_paths:
        fast.apply(trainer)
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2))
    return calls


@pytest.fixture
def restore_callback_hooks(monkeypatch):
    monkeypatch.setattr(fast.lightning_call, "_call_callback_hooks", fast._lightning_call_hooks)


def test_the_callbacks_see_the_same_hook_calls(restore_callback_hooks):
    """Only the callbacks that define a hook are called: the same calls, in the same order, with the same
    ``_current_fx_name``, as Lightning's call of every callback (monitoring callbacks last at an epoch's end)."""
    expected = _hook_calls(fast_paths=False)
    assert fast.lightning_call._call_callback_hooks is fast._lightning_call_hooks
    got = _hook_calls(fast_paths=True)
    assert fast.lightning_call._call_callback_hooks is fast._call_overridden_callback_hooks
    assert got == expected
    assert ("instance", "on_after_backward", 0, "on_after_backward") in got
    epoch_ends = [name for name, hook, *_ in got if hook == "on_train_epoch_end"]
    assert epoch_ends == ["plain", "monitoring"] * 2


def test_a_chosen_profiler_sees_every_callback_hook(restore_callback_hooks):
    """With a profiler asked for, Lightning's own call runs: each callback's hook is profiled under its label."""
    profiler = SimpleProfiler()
    _hook_calls(fast_paths=True, profiler=profiler)
    labels = set(profiler.recorded_durations)
    assert any(label.startswith("[Callback]") and label.endswith(".on_train_batch_end") for label in labels)

"""Training metrics are logged only at the steps a logger writes (dlm/log_interval.py), with the same values."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest

from dlm.log_interval import logs_this_step
from dlm.methods.base import DiffusionLM
from dlm.train import train

QUIET = ["trainer.max_steps=7", "trainer.val_check_interval=7", "samples.num_unconditional=0",
         "samples.num_prompted=0", "samples.num_infill=0"]


def train_rows(run_dir) -> dict[int, dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): r for r in csv.DictReader(f) if r.get("train/loss")}


def test_metrics_at_the_logged_steps_are_those_of_a_run_logging_every_step(run_cfg, tmp_path, monkeypatch):
    every = train(run_cfg(*QUIET, "trainer.log_every_n_steps=1", run_dir=tmp_path / "every"))
    calls = []
    log = DiffusionLM.log
    monkeypatch.setattr(DiffusionLM, "log", lambda self, name, *a, **k: (calls.append(name), log(self, name, *a, **k)))
    sparse = train(run_cfg(*QUIET, "trainer.log_every_n_steps=3", run_dir=tmp_path / "sparse"))
    dense_rows, sparse_rows = train_rows(every), train_rows(sparse)
    assert len(dense_rows) == 7 and len(sparse_rows) == 2 and set(sparse_rows) <= set(dense_rows)
    for step, row in sparse_rows.items():
        for key in ("train/loss", "train/nll_bound", "train/masked_acc", "train/tokens_seen"):
            if key in row:
                assert float(row[key]) == pytest.approx(float(dense_rows[step][key]), rel=1e-6), (step, key)
    # logged at steps 3 and 6 (written) and 7 (the last: results.json), not at the other four
    assert calls.count("train/loss") == 3 and calls.count("train/tokens_seen") == 3
    a, b = (json.loads((d / "results.json").read_text()) for d in (every, sparse))
    assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)
    assert b["train/tokens_seen"] == a["train/tokens_seen"]


def fake_trainer(step: int, every: int, max_steps: int, writes: bool):
    epoch_loop = SimpleNamespace(_batches_that_stepped=step)
    return SimpleNamespace(_logger_connector=SimpleNamespace(should_update_logs=writes), max_steps=max_steps,
                           log_every_n_steps=every, fit_loop=SimpleNamespace(epoch_loop=epoch_loop))


def test_logs_this_step_at_written_steps_and_the_last():
    assert logs_this_step(None)  # a step called without a trainer logs as Lightning would
    assert logs_this_step(fake_trainer(2, 3, 100, writes=True))
    assert not logs_this_step(fake_trainer(3, 3, 100, writes=False))
    assert logs_this_step(fake_trainer(99, 3, 100, writes=False))  # the last step
    assert not logs_this_step(fake_trainer(99, 3, -1, writes=False))  # no step limit: no last step


def test_the_answer_is_computed_once_per_batch_and_again_when_the_run_stops():
    asked = []

    class Connector:
        writes = False

        @property
        def should_update_logs(self):
            asked.append(1)
            return self.writes

    trainer = fake_trainer(3, 3, 100, writes=False)
    trainer._logger_connector = connector = Connector()
    assert [logs_this_step(trainer) for _ in range(3)] == [False] * 3 and len(asked) == 1
    trainer.should_stop, connector.writes = True, True  # Lightning writes a stopping step's metrics
    assert logs_this_step(trainer) and len(asked) == 2
    trainer.should_stop, connector.writes = False, False
    trainer.fit_loop.epoch_loop._batches_that_stepped = 4  # the next batch
    assert not logs_this_step(trainer) and len(asked) == 3

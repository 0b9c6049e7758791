"""Sweeps through the CLI: Optuna hyper-parameter search with sqlite storage, parallel jobs with joblib."""

from __future__ import annotations

import json

import pytest
import yaml
from test_train import _cli

TINY = ["trainer.max_steps=2", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
        "data.source.num_train=256", "data.batch_size=8", "samples.num_prompted=1", "samples.num_infill=1",
        "samples.num_unconditional=1", "logger=none", "trainer.enable_progress_bar=false"]


def test_optuna_search_optimises_the_named_metric_and_stores_the_study(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = _cli("hparams_search=optuna", "hydra.sweeper.n_trials=2", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "runs" / "multirun" / "optuna").iterdir()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [json.loads((sweep / str(i) / "results.json").read_text())["val/nll_bound"] for i in (0, 1)]
    assert best["best_value"] == pytest.approx(min(values))
    assert (tmp_path / "runs" / "optuna.db").is_file()


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = _cli("-m", "launcher=joblib", "schedule=linear,cosine", f"hydra.sweep.dir={sweep}", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "results.json").read_text())["status"] == "completed"

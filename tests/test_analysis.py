"""dlm.analysis over a real sweep folder made by the training CLI (`python -m dlm.train -m ...`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dlm.analysis import find_runs, load_evals, load_metrics, load_runs, load_samples, varying_columns

REPO = Path(__file__).resolve().parent.parent
# As tests/conftest.py FAST, with wandb off (the CLI otherwise starts an offline wandb run per job).
TINY = [
    "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "+trainer.enable_model_summary=false",
    "data=arithmetic", "data.batch_size=16", "data.source.num_train=512", "data.source.num_val=64", "samples.num_unconditional=4",
    "samples.num_prompted=4", "samples.num_infill=4", "sampler.steps=4", "logger=none",
]


def make_tiny_sweep(base: Path) -> Path:
    """A two-job sweep (schedule=linear,cosine) under base/sweep, made once per test session (the other test
    files reuse it through the session's base temp folder)."""
    sweep = base / "tiny_sweep"
    if (sweep / "1" / "results.json").is_file():
        return sweep
    if sweep.exists():
        shutil.rmtree(sweep)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "DLM_OUTPUT_ROOT": str(base / "runs"),
           "DLM_CACHE_DIR": str(base / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "dlm.train", "-m", "schedule=linear,cosine", f"hydra.sweep.dir={sweep}", *TINY],
        cwd=base, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Path:
    return make_tiny_sweep(tmp_path_factory.getbasetemp())


@pytest.fixture
def sweep_copy(tiny_sweep, tmp_path) -> Path:
    """A copy the test may change (a failed job added, evaluations appended)."""
    return Path(shutil.copytree(tiny_sweep, tmp_path / "sweep"))


def test_one_row_per_job_with_choices_and_results(tiny_sweep):
    runs = load_runs(tiny_sweep)
    assert len(runs) == 2
    assert list(runs["schedule"]) == ["linear", "cosine"]
    assert set(runs["method"]) == {"mdlm"} and set(runs["model"]) == {"tiny"}
    assert list(runs["job_num"]) == [0, 1]
    assert set(runs["status"]) == {"completed"}
    assert (runs["val/nll_bound"] > 0).all() and (runs["global_step"] == 6).all()
    assert (runs["trainer.max_steps"] == 6).all()  # overridden config values are columns too
    assert "schedule" in varying_columns(runs) and "method" not in varying_columns(runs)
    assert set(runs["name"]) == {"mdlm-tiny"}


def test_extra_config_keys_and_a_parent_folder(tiny_sweep):
    runs = load_runs(tiny_sweep.parent, config_keys=["sampler.steps", "model.d_model"])
    assert len(runs) >= 2
    row = runs[runs["run_dir"] == str((tiny_sweep / "0").resolve())].iloc[0]
    assert row["sampler.steps"] == 4 and row["model.d_model"] == 128


def test_a_failed_job_is_reported_and_the_others_kept(sweep_copy):
    failed = sweep_copy / "2"
    failed.mkdir()
    shutil.copytree(sweep_copy / "0" / ".hydra", failed / ".hydra")
    runs = load_runs(sweep_copy)
    assert len(runs) == 3
    assert runs.set_index("run_dir").loc[str(failed.resolve()), "status"] == "failed"
    assert runs["val/nll_bound"].notna().sum() == 2


def test_metrics_long_table(tiny_sweep):
    metrics = load_metrics(tiny_sweep, metrics=["train/loss", "val/nll_bound"])
    assert set(metrics["metric"]) == {"train/loss", "val/nll_bound"}
    assert set(metrics["schedule"]) == {"linear", "cosine"}
    loss = metrics[(metrics["metric"] == "train/loss") & (metrics["schedule"] == "linear")]
    assert sorted(loss["step"]) == list(range(6))
    assert pd.api.types.is_float_dtype(metrics["value"])


def test_samples_and_evaluations(sweep_copy):
    samples = load_samples(sweep_copy)
    assert set(samples["kind"]) == {"unconditional", "prompted", "infill"}
    assert set(samples["schedule"]) == {"linear", "cosine"}
    assert load_evals(sweep_copy).empty
    (sweep_copy / "0" / "eval.jsonl").write_text(
        '{"eval/sampler": "mdlm", "eval/sampler/steps": 2, "eval/sample/valid_frac": 0.5}\n'
        '{"eval/sampler": "mdlm", "eval/sampler/steps": 8, "eval/sample/valid_frac": 0.75}\n')
    evals = load_evals(sweep_copy)
    assert list(evals["sampler/steps"]) == [2, 8] and list(evals["schedule"]) == ["linear", "linear"]


def test_not_a_folder_of_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="DLM_SWEEP"):
        find_runs(tmp_path / "nothing")
    assert load_runs(tmp_path).empty

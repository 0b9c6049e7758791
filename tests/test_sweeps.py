"""Optuna hyper-parameter search with sqlite storage; every sweep command of the README runs as written (its default sweep folder included), as a subprocess, with
tiny settings appended; a sweep ends with one table of its jobs and exits non-zero when a job failed."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TINY = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "data.batch_size=8",
        "data.source.num_train=128", "samples.num_unconditional=1", "samples.num_prompted=1",
        "samples.num_infill=1", "logger=none"]
SLOW = ("method=", "hparams_search=")  # five families; an Optuna study: marked slow


def readme_sweeps() -> list[str]:
    """The README's `python -m dlm.train` commands that start a sweep (-m, or a sweeper such as hparams_search)."""
    commands = []
    text = (REPO / "README.md").read_text().replace("\\\n", " ")  # a command continued over lines is one
    for line in text.splitlines():
        command = line.strip().split("#")[0].strip()
        if not command.startswith("python -m dlm.train "):
            continue
        args = shlex.split(command)[3:]
        if "-m" in args or "--multirun" in args or any(a.startswith("hparams_search=") for a in args):
            commands.append(command)
    return commands


def sweep(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "DLM_OUTPUT_ROOT": str(cwd / "runs"),
           "DLM_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "dlm.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_readme_has_sweep_commands():
    assert len(readme_sweeps()) >= 3


@pytest.mark.parametrize("command", [pytest.param(c, marks=pytest.mark.slow) if any(s in c for s in SLOW) else c
                                     for c in readme_sweeps()])
def test_a_readme_sweep_runs_with_its_default_folder(command, tmp_path):
    args = shlex.split(command)[3:] + TINY
    if "hparams_search=optuna" in command:
        args.append("hydra.sweeper.n_trials=2")
    proc = sweep(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((tmp_path / "runs" / "multirun").rglob("results.json"))
    assert results and all(json.loads(p.read_text())["status"] == "completed" for p in results)
    match = re.search(r"sweep (\S+): (\d+) jobs, 0 failed", proc.stdout)
    assert match and int(match.group(2)) == len(results), proc.stdout[-2000:]
    assert Path(match.group(1)).parent.name in ("multirun", "optuna")


def test_a_sweep_with_a_failed_job_says_so_and_exits_non_zero(tmp_path):
    proc = sweep(["-m", "data.seq_len=16,300", *TINY], tmp_path)  # 300 > the tiny model's max_seq_len
    assert proc.returncode == 1
    assert "2 jobs, 1 failed" in proc.stdout
    table = proc.stdout[proc.stdout.index("2 jobs, 1 failed"):]
    assert re.search(r"\n0\s+data.seq_len=16\s.*completed", table) and "failed: ConfigError" in table


def test_optuna_search_optimises_the_named_metric_and_stores_the_study(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = sweep(["hparams_search=optuna", "hydra.sweeper.n_trials=2", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (tmp_path / "runs" / "multirun" / "optuna").iterdir()  # the default sweep folder
    best = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    values = [json.loads((folder / str(i) / "results.json").read_text())["val/nll_bound"] for i in (0, 1)]
    assert best["best_value"] == pytest.approx(min(values))
    assert (tmp_path / "runs" / "optuna.db").is_file()

"""Run folders never collide, and a run that never started leaves none behind (dlm/run_folder.py)."""

from __future__ import annotations

import json
import multiprocessing
from datetime import datetime
from pathlib import Path

from conftest import TINY_CLI as TINY
from conftest import run_dir_of

import dlm.run_folder
from dlm.run_folder import claim_run_dir, forget_claims


def _claim(parent: str, queue) -> None:
    queue.put(str(claim_run_dir(parent)))


def test_concurrent_claims_get_a_folder_each(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(tmp_path / "name"), queue)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
    folders = [queue.get(timeout=5) for _ in procs]
    assert len(set(folders)) == 6 and all(Path(f).is_dir() for f in folders)


def test_a_claim_is_stable_within_a_run_and_new_after_it(tmp_path):
    first = claim_run_dir(tmp_path)
    assert claim_run_dir(tmp_path) == first  # Hydra resolves the run folder more than once
    forget_claims()
    second = claim_run_dir(tmp_path)
    forget_claims()
    assert second != first and second.name.startswith(first.name[:19])  # same second: a suffix


def test_two_runs_of_one_name_in_the_same_second_keep_their_own_records(workdir, train_cli, monkeypatch):
    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 1, 12, 0, 0)

    monkeypatch.setattr(dlm.run_folder, "datetime", FrozenClock)
    runs = []
    for seed in (1, 2):
        code, out, err = train_cli(*TINY, f"seed={seed}", "trainer.max_steps=1")
        assert code == 0, err[-2000:]
        runs.append(run_dir_of(out))
    assert [r.name for r in runs] == ["2026-01-01_12-00-00", "2026-01-01_12-00-00-1"]
    for run, seed in zip(runs, (1, 2)):
        assert f"seed={seed}" in (run / ".hydra" / "overrides.yaml").read_text()
        assert json.loads((run / "results.json").read_text())["status"] == "completed"


def test_a_dry_run_or_a_refused_config_leaves_no_folder(workdir, train_cli):
    code, out, _ = train_cli("dry_run=true", "name=plan")
    assert code == 0 and "outputs:" in out
    code, _, err = train_cli(*TINY, "name=refused", "data.seq_len=300")  # > the model's 256
    assert code == 2 and "max_seq_len" in err
    assert not (workdir / "runs").exists()  # nor the name and output folders the claims created

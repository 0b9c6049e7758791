"""A stale torch-extension build lock (a killed DeepSpeed op build) is named with its fix before DeepSpeed starts,
instead of the start waiting on it forever."""

from __future__ import annotations

import os
import time

from dlm.parallel.extension_locks import stale_locks, warn_stale_locks


def _lock(root, op: str, age_s: float):
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_only_a_lock_older_than_any_build_is_named_with_its_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    stale = _lock(tmp_path, "deepspeed_shm_comm", 3600)
    _lock(tmp_path, "cpu_adam", 5)  # a build in progress
    assert [lock for lock, _ in stale_locks()] == [stale]
    lines = warn_stale_locks()
    assert len(lines) == 1 and str(stale) in lines[0] and "60 min old" in lines[0] and f"rm {stale}" in lines[0]
    assert capsys.readouterr().out.strip() == lines[0]


def test_other_local_ranks_stay_quiet_and_no_locks_is_silent(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert warn_stale_locks() == []
    _lock(tmp_path, "deepspeed_shm_comm", 3600)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert warn_stale_locks() == []


def test_the_strategy_names_a_stale_lock_before_deepspeed_starts(tmp_path, monkeypatch, capsys):
    from dlm.parallel import deepspeed as ds

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    stale = _lock(tmp_path, "deepspeed_shm_comm", 3600)
    started = []
    monkeypatch.setattr(ds.LightningDeepSpeedStrategy, "setup_environment", lambda self: started.append(True))
    ds.DeepSpeedStrategy.setup_environment(object.__new__(ds.DeepSpeedStrategy))
    assert started and str(stale) in capsys.readouterr().out

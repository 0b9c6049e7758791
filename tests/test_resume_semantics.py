"""Resume semantics through the training CLI (dlm/resume.py, dlm/run_folder.py): a resume keeps the run's own
overrides, `ckpt_path=last` picks the newest run whose model and data fit, a checkpoint that does not fit is refused
before anything is written, metrics.csv has one row per step and metric, and the wall time adds up."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY_CLI as TINY
from conftest import run_dir_of

from dlm.resume import merge_overrides
from dlm.safe_load import load_checkpoint
from dlm.train import train


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_merge_overrides_lets_the_command_line_win_key_by_key():
    saved = ["data=arithmetic", "trainer.max_steps=2", "+trainer.profiler=simple", "ckpt_path=old.ckpt"]
    assert merge_overrides(saved, ["trainer.max_steps=8", "seed=3"]) == [
        "data=arithmetic", "+trainer.profiler=simple", "trainer.max_steps=8", "seed=3"]


def test_a_resume_keeps_the_original_overrides_and_records_what_it_used(workdir, train_cli):
    code, out, err = train_cli(*TINY, "data=arithmetic", "data.source.num_train=128")
    assert code == 0, err[-2000:]
    run = run_dir_of(out)
    first = json.loads((run / "results.json").read_text())
    checkpointed = load_checkpoint(run / "checkpoints" / "last.ckpt")["callbacks"]["RunContinuity"]["wall_time_s"]
    assert 0 < checkpointed <= first["wall_time_s"]  # the clock as it stood when last.ckpt was saved
    code, out, err = train_cli("ckpt_path=last", "name=resume", "trainer.max_steps=4")
    assert code == 0, err[-2000:]
    assert run_dir_of(out) == run
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    assert "data=arithmetic" in overrides and "data.source.num_train=128" in overrides  # kept
    assert "trainer.max_steps=4" in overrides and "trainer.max_steps=2" not in overrides  # the new value won
    assert "choices" not in overrides and "arithmetic" in (run / ".hydra" / "hydra.yaml").read_text()
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 4
    # the wall time of both segments: the first one's (as checkpointed) plus this one's
    assert results["segment_wall_time_s"] > 0
    assert results["wall_time_s"] == pytest.approx(checkpointed + results["segment_wall_time_s"], abs=0.02)
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert len(resumes) == 1 and resumes[0]["step"] == 2 and "trainer.max_steps=4" in resumes[0]["overrides"]


def test_last_picks_the_newest_run_whose_data_fits_or_says_why_none_does(workdir, train_cli):
    code, out, _ = train_cli(*TINY, "data=arithmetic", "data.source.num_train=128")
    arithmetic = run_dir_of(out)
    code, out, _ = train_cli(*TINY, "data.source.num_train=128")  # brackets: the newest run
    brackets = run_dir_of(out)
    assert code == 0 and brackets != arithmetic
    code, out, err = train_cli("ckpt_path=last", "name=resume", "data=arithmetic",
                         "trainer.max_steps=3")
    assert code == 0, err[-2000:]
    assert run_dir_of(out) == arithmetic
    code, out, err = train_cli("ckpt_path=last", "name=resume", "model=small")
    assert code == 2 and "Traceback" not in err
    assert str(arithmetic) in err and str(brackets) in err and "model.d_model" in err


def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_written(workdir, train_cli):
    code, out, _ = train_cli(*TINY)
    run = run_dir_of(out)
    before = snapshot(run)
    code, out, err = train_cli(f"ckpt_path={run}/checkpoints/last.ckpt", "model=small")
    assert code == 2 and "Traceback" not in err
    assert "model.d_model: 128 in the run, 384 now" in err and "drop the overrides" in err
    assert snapshot(run) == before  # .hydra/config.yaml, metrics.csv, results.json untouched


def test_tensor_mismatch_names_the_tensors_and_the_run(run_cfg, tmp_path):
    """What the config comparison cannot see (here a config composed around it) the tensor check still refuses."""
    from dlm.config import ConfigError

    source = train(run_cfg("trainer.max_steps=2", run_dir=tmp_path / "src"))
    (tmp_path / "src" / ".hydra").mkdir(exist_ok=True)
    with pytest.raises(ConfigError) as err:
        train(run_cfg("model.d_model=64", f"ckpt_path={source}/checkpoints/last.ckpt", run_dir=tmp_path / "src"))
    assert "does not fit the model" in str(err.value) and "[128]" in str(err.value) and "[64]" in str(err.value)


def _metric_rows(run: Path) -> list[tuple[int, str]]:
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return sorted((int(r["step"]), k) for r in rows for k, v in r.items() if v and k not in ("step", "epoch")
                  and not k.startswith("sample/"))


def test_metrics_after_a_resume_have_the_uninterrupted_runs_steps_without_duplicates(run_cfg, tmp_path):
    common = ["callbacks.last_checkpoint.every_n_train_steps=1", "trainer.val_check_interval=3"]
    straight = train(run_cfg(*common, "trainer.max_steps=6", run_dir=tmp_path / "a"))
    split = tmp_path / "b"
    train(run_cfg(*common, "trainer.max_steps=3", run_dir=split))
    # the first segment logged past its last checkpoint (as a crash after step 3 would): those rows go
    with open(split / "metrics.csv", "a") as f:
        header = next(csv.reader(open(split / "metrics.csv")))
        f.write(",".join("1.0" if h == "train/loss" else "4" if h == "step" else "" for h in header) + "\n")
    train(run_cfg(*common, "trainer.max_steps=6", "ckpt_path=last", run_dir=split))
    rows = _metric_rows(split)
    assert len(rows) == len(set(rows)), "a step logged twice"
    assert rows == _metric_rows(straight)

"""The training entry point end to end: in-process runs, resume, NaN stop, and the CLI as a subprocess."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlm.config import ConfigError
from dlm.methods.base import NonFiniteLossError
from dlm.safe_load import load_checkpoint
from dlm.train import train

REPO = Path(__file__).resolve().parent.parent


def load_state(path: Path) -> dict:
    return load_checkpoint(path)["state_dict"]


def test_run_writes_the_documented_outputs(run_cfg, tmp_path):
    run_dir = train(run_cfg())
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 6
    assert results["val/nll_bound"] > 0 and results["val/ppl_bound"] == pytest.approx(
        torch.tensor(results["val/nll_bound"]).exp().item(), rel=1e-4
    )
    assert results["train/tokens_seen"] == 6 * 16 * 16
    for key in ("sample/valid_frac", "sample/prompted_acc", "sample/infill_acc"):
        assert 0.0 <= results[key] <= 1.0
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"unconditional", "prompted", "infill"}
    with open(run_dir / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"train/loss", "val/nll_bound", "train/tokens_per_s", "train/tokens_seen"} <= set(header)


def test_resume_continues_steps_schedule_and_data_order(run_cfg, tmp_path):
    """3 steps + resume to 6 == 6 steps straight: same weights, so the step count, LR schedule (warmup),
    optimizer state and data order all continued."""
    common = ["lr_scheduler=constant", "lr_scheduler.warmup_steps=4", "callbacks.last_checkpoint.every_n_train_steps=1"]
    straight = train(run_cfg(*common, "trainer.max_steps=6", run_dir=tmp_path / "a"))
    split = tmp_path / "b"
    train(run_cfg(*common, "trainer.max_steps=3", run_dir=split))
    resumed = train(run_cfg(*common, "trainer.max_steps=6", "ckpt_path=last", run_dir=split))
    assert resumed == split
    a, b = load_state(straight / "checkpoints" / "last.ckpt"), load_state(split / "checkpoints" / "last.ckpt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert json.loads((split / "results.json").read_text())["global_step"] == 6
    with open(split / "metrics.csv") as f:
        steps = {int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]}
    assert {0, 1, 5} <= steps, "metrics.csv keeps the first segment's rows after the resume"


def test_resume_without_a_checkpoint_says_what_to_do(run_cfg, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(run_cfg("ckpt_path=last", run_dir=tmp_path / "empty"))


def test_nan_loss_stops_with_a_checkpoint(run_cfg, monkeypatch):
    from dlm.methods.mdlm import MDLM

    real_loss = MDLM.loss

    def loss_that_diverges(self, batch, generator=None):
        out = real_loss(self, batch, generator)
        if self.global_step >= 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MDLM, "loss", loss_that_diverges)
    cfg = run_cfg()
    with pytest.raises(NonFiniteLossError, match="step 2"):
        train(cfg)
    run_dir = Path(cfg.paths.run_dir)
    state = load_state(run_dir / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert json.loads((run_dir / "results.json").read_text())["status"].startswith("stopped")


def test_bad_values_are_reported_together(run_cfg):
    with pytest.raises(ConfigError) as err:
        train(run_cfg("trainer.max_steps=0", "data.batch_size=-1", "data.seq_len=1"))
    message = str(err.value)
    assert "trainer.max_steps" in message and "data.batch_size" in message and "data.seq_len" in message


def test_sequence_longer_than_the_model_is_refused(run_cfg):
    with pytest.raises(ConfigError, match="model.max_seq_len"):
        train(run_cfg("data.seq_len=32", "model.max_seq_len=16"))


def test_gpu_trainer_without_gpu_fails_fast_with_the_reason(run_cfg):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        train(run_cfg("trainer=deepspeed"))


def test_dry_run_prints_the_plan_and_trains_nothing(run_cfg, capsys):
    run_dir = train(run_cfg("dry_run=true"))
    out = capsys.readouterr().out
    assert "parameters:" in out and "tokens per optimizer step: 256" in out and "zero3" in out
    assert not (run_dir / "checkpoints").exists()


# A plan (dry_run) needs no trainer: it must not pay Lightning's import (seconds). The FLOPs line reads the family's
# training layout from its method yaml (dlm.flops.TrainingLayout), not from the family class (a LightningModule).
def test_dry_run_and_cfg_job_import_no_lightning(tmp_path):
    probe = ("import runpy, sys; sys.argv = ['dlm.train', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('dlm.train', run_name='__main__')\n"
             "finally:\n    print('lightning imported:', 'lightning' in sys.modules, 'torch:', 'torch' in sys.modules)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DLM_OUTPUT_ROOT": str(tmp_path / "runs")}
    for flags in (["--cfg", "job"], ["dry_run=true"]):
        out = subprocess.run([sys.executable, "-c", probe, "model=moe30b", "schedule=linear", "trainer=deepspeed",
                              *flags], env=env, capture_output=True, text=True, timeout=120)
        assert "lightning imported: False" in out.stdout, (flags, out.stdout[-500:], out.stderr[-2000:])
        if flags[0] == "--cfg":  # printing the config needs no torch either (seconds of start-up)
            assert "torch: False" in out.stdout, out.stdout[-500:]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "DLM_OUTPUT_ROOT": str(cwd / "runs"),
           "DLM_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "dlm.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_trains_and_prints_the_run_dir_last(tmp_path):
    proc = _cli("trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                "data.source.num_train=256", "data.batch_size=8", "samples.num_prompted=2", "samples.num_infill=2",
                "samples.num_unconditional=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run_dir: ")
    run_dir = Path(last.removeprefix("run_dir: "))
    run_dir = run_dir if run_dir.is_absolute() else tmp_path / run_dir
    for name in (".hydra", "metrics.csv", "results.json", "samples.jsonl", "checkpoints/last.ckpt", "wandb"):
        assert (run_dir / name).exists(), name

    # An evaluation later resumes that wandb run by id (offline here) to put its metrics in the run's summary.
    from dlm.evaluate import update_wandb_summary, wandb_run_id
    from dlm.run import load_run

    run_id = wandb_run_id(run_dir)
    assert run_id and update_wandb_summary(load_run(run_dir), {"eval/probe": 1.0}) == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_cli_lists_every_bad_override_with_the_valid_choices(tmp_path):
    proc = _cli("model=nosuch", "trainer.max_stepz=3", cwd=tmp_path)
    assert proc.returncode != 0
    assert "valid options for model:" in proc.stderr and "tiny" in proc.stderr
    assert "did you mean trainer.max_steps" in proc.stderr


def test_missing_data_path_and_empty_corpus_are_clear_errors(run_cfg, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        train(run_cfg("data=text_files", f"data.source.paths={tmp_path / 'missing.txt'}"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="corpus is empty"):
        train(run_cfg("data=text_files", f"data.source.paths={tmp_path / 'empty.txt'}"))


def test_text_files_train_packed_with_document_masking(run_cfg, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document number {i} says hello" for i in range(200)))
    run_dir = train(run_cfg("data=text_files", f"data.source.paths={corpus}", "data.seq_len=64"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["val/nll_bound"] > 0
    assert "sample/valid_frac" not in results  # no checkable task for free text


def test_a_failing_sweep_job_is_reported_and_the_others_keep_their_results(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _cli("-m", "trainer.max_steps=2,0", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
                "data.source.num_train=256", "data.batch_size=8", "samples.num_prompted=1", "samples.num_infill=1",
                "samples.num_unconditional=1", "logger=none", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep's exit status says a job failed
    good = json.loads((sweep / "0" / "results.json").read_text())
    bad = json.loads((sweep / "1" / "results.json").read_text())
    assert good["status"] == "completed" and bad["status"].startswith("failed") and "max_steps" in bad["status"]
    assert "job 1 failed" in proc.stderr
    assert "2 jobs, 1 failed" in proc.stdout

"""End-of-run work (dlm/end_of_run.py): each stage after the last step prints one line with its time, and the
config trims every stage but the last checkpoint (end_of_run.validate, end_of_run.export, samples.num_* = 0)."""

from __future__ import annotations

import json
import re

from dlm.train import train

# the last validation (step 3) is earlier than the last step (4): the final validation runs unless trimmed
ENDS_OFF_SCHEDULE = ["trainer.max_steps=4", "method=ar", "sampler=ar"]


def _stages(out: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^end of run: (\w+) (.*)$", out, re.M)}


def test_every_stage_prints_one_timed_line(run_cfg, capsys):
    run_dir = train(run_cfg(*ENDS_OFF_SCHEDULE))
    stages = _stages(capsys.readouterr().out)
    # last.ckpt before the last validation: under ZeRO-3 trainer.validate rebuilds an engine that cannot save
    assert list(stages) == ["samples", "checkpoint", "validation", "export"]
    for name, rest in stages.items():
        assert re.match(r"\d+\.\d s", rest), (name, rest)
    assert "at step 4, val/loss" in stages["validation"]
    assert str(run_dir / "hf") in stages["export"] and (run_dir / "hf").is_dir()
    assert (run_dir / "samples.jsonl").is_file()
    assert json.loads((run_dir / "results.json").read_text())["global_step"] == 4


def test_the_config_trims_validation_samples_and_export(run_cfg, capsys):
    run_dir = train(run_cfg(*ENDS_OFF_SCHEDULE, "end_of_run.validate=false", "end_of_run.export=false",
                            "samples.num_unconditional=0", "samples.num_prompted=0", "samples.num_infill=0"))
    stages = _stages(capsys.readouterr().out)
    assert stages["samples"].startswith("skipped (samples.num_")
    assert stages["validation"] == "skipped (end_of_run.validate=false; the last validation was at step 3)"
    assert stages["export"] == "skipped (end_of_run.export=false)"
    assert re.match(r"\d+\.\d s -> ", stages["checkpoint"])  # always written: a resume needs it
    assert not (run_dir / "hf").exists() and not (run_dir / "samples.jsonl").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and "val/loss" in results  # the step-3 validation's

"""`dlm.train method=ar` and `method=bd3lm` end to end (in-process, tiny settings): results.json with
val/nll_bound, samples written."""

from __future__ import annotations

import json

import pytest

from dlm.train import train


@pytest.mark.parametrize(
    "overrides",
    [
        # AR cannot infill: the end-of-training writer would call module.infill, so holes are switched off here
        ("method=ar", "samples.num_infill=0"),
        ("method=bd3lm",),
        ("method=bd3lm", "method.shift_logits=true", "sampler=low_confidence", "sampler.steps=4"),
    ],
    ids=["ar", "bd3lm", "bd3lm-shift-lowconf"],
)
def test_train_writes_results_with_the_bound(run_cfg, overrides):
    run_dir = train(run_cfg(*overrides))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 6
    assert 0 < results["val/nll_bound"] < 10
    assert 0.0 <= results["sample/valid_frac"] <= 1.0 and 0.0 <= results["sample/prompted_acc"] <= 1.0
    kinds = {json.loads(line)["kind"] for line in (run_dir / "samples.jsonl").read_text().splitlines()}
    assert kinds == ({"unconditional", "prompted"} if "method=ar" in overrides else
                     {"unconditional", "prompted", "infill"})

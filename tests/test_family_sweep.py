"""One multirun over the three families on the embedded data: every job records its sample-correctness metric."""

from __future__ import annotations

import json

from test_train import _cli


def test_multirun_mdlm_sundae_diffusionbert_records_sample_metrics(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _cli(
        "-m", "method=mdlm,sundae,diffusionbert",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
        "data.source.num_train=256", "data.source.num_val=32", "data.batch_size=8",
        "samples.num_unconditional=2", "samples.num_prompted=2", "samples.num_infill=2", "sampler.steps=4",
        "logger=none", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
        method = next(line.split("=", 1)[1] for line in (job / ".hydra" / "overrides.yaml").read_text().splitlines()
                      if line.startswith("- method="))
        table[method] = json.loads((job / "results.json").read_text())
    assert set(table) == {"mdlm", "sundae", "diffusionbert"}
    for method, results in table.items():
        assert results["status"] == "completed", method
        assert 0.0 <= results["sample/valid_frac"] <= 1.0, method
        assert results["val/loss"] > 0, method
    assert "val/nll_bound" in table["mdlm"] and "val/nll_bound" in table["diffusionbert"]
    assert "val/nll_bound" not in table["sundae"]

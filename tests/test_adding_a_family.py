"""Adding a family takes one class and one yaml (README "Adding a family"): this file defines a toy family and its
config in a folder of its own (``hydra.searchpath``), and runs it through train, evaluate and generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_dir_of

import dlm.evaluate
import dlm.generate
from dlm.methods.base import DiffusionLM
from dlm.sampling import Generation


class Unigram(DiffusionLM):
    """The smallest family: every position is predicted from a fully masked row, a per-position unigram model.
    Its likelihood is exact (the model is a product of per-position distributions), so it says ``exact_nll``."""

    exact_nll = True

    def loss(self, batch, generator=None):
        nll = self.nll_bound(batch, generator)
        return {"loss": nll.sum() / batch["loss_mask"].sum().clamp(min=1)}

    def nll_bound(self, batch, generator=None):
        x = batch["input_ids"]
        logp = self.logits(torch.full_like(x, self.mask_id), **self.backbone_kwargs(batch)).float().log_softmax(-1)
        return -logp.gather(-1, x[..., None])[..., 0] * batch["loss_mask"]

    @torch.no_grad()
    def infill(self, tokens, fill_mask, sampler=None, generator=None):
        tokens = tokens.to(self.compute_device)
        logits = self.logits(torch.where(fill_mask.to(tokens.device), self.mask_id, tokens)).float()
        logits[..., self.mask_id] = float("-inf")
        return Generation(torch.where(fill_mask.to(tokens.device), logits.argmax(-1), tokens), 1)


FAST = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "data.batch_size=8",
        "data.source.num_train=128", "samples.num_unconditional=2", "samples.num_prompted=2", "samples.num_infill=2",
        "logger=none"]


@pytest.fixture
def family_conf(tmp_path) -> Path:
    """The one yaml: conf/method/unigram.yaml in a config folder of the user's own."""
    folder = tmp_path / "my_conf"
    (folder / "method").mkdir(parents=True)
    (folder / "method" / "unigram.yaml").write_text(f"_target_: {__name__}.Unigram\n")
    return folder


def test_a_family_of_one_class_and_one_yaml_trains_evaluates_and_generates(family_conf, workdir, train_cli, run_cli):
    code, out, err = train_cli("method=unigram", f"hydra.searchpath=[file://{family_conf}]", *FAST)
    assert code == 0, err[-3000:]
    run = run_dir_of(out)
    assert run.parent.name == "unigram-tiny"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["val/nll_bound"] > 0
    assert {json.loads(line)["kind"] for line in (run / "samples.jsonl").read_text().splitlines()} == {
        "unconditional", "prompted", "infill"}

    code, out, err = run_cli(dlm.evaluate.main, f"run={run}", "max_batches=1", "num_mc=4")
    assert code == 0, err[-3000:]
    evaluated = json.loads((run / "results.json").read_text())
    assert evaluated["eval/nll_bound_stderr"] == 0.0  # exact_nll: one pass, not Monte-Carlo draws
    assert evaluated["eval/nll_bound"] == pytest.approx(results["val/nll_bound"], rel=0.3)

    code, out, err = run_cli(dlm.generate.main, f"run={run}", "prompt=((", "length=6")
    assert code == 0, err[-3000:]
    assert out.splitlines()[0].startswith("((") and "network calls: 1" in out

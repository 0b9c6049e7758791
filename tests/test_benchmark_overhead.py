"""benchmarks/overhead.py runs in-process (no timing asserted: speed is measured in benchmarks/, never in a test):
both baselines interleave with the Lightning steps, and the profile difference names where the extra time goes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import overhead  # noqa: E402

TINY = ["data.source.num_train=64", "data.source.num_val=16"]


@pytest.mark.parametrize("baseline", ["module", "stock"])
def test_overhead_interleaves_both_loops_and_reports_ratios(baseline, capsys):
    args = ["--chunk", "2", "--chunks", "2", "--baseline", baseline, *TINY]
    result = overhead.main(args + (["--profile"] if baseline == "module" else []))
    assert result["pairs"] == 2 and result["baseline"] == baseline
    for key in ("ratio", "cpu_ratio", "lightning_ms", "plain_ms"):
        assert math.isfinite(result[key]) and result[key] > 0
    for key in ("ratio", "cpu_ratio"):  # the bootstrap interval holds the figure from all the pairs
        low, high = result[f"{key}_90"]
        assert low <= result[key] <= high
    out = capsys.readouterr().out
    assert f"baseline: {baseline}" in out and "CPU time" in out
    if baseline == "module":
        assert "the Lightning steps' extra own time" in out and "_call_lightning_module_hook" in out


def test_the_stock_loss_is_mdlm_on_the_masked_tokens():
    import torch

    class Echo(torch.nn.Module):  # a perfect denoiser of the clean tokens: zero loss whatever is masked
        def __init__(self, clean):
            super().__init__()
            self.clean = clean

        def forward(self, x):
            return torch.nn.functional.one_hot(self.clean, 5).float() * 100

    x = torch.randint(0, 4, (3, 8))
    batch = {"input_ids": x, "loss_mask": torch.ones_like(x, dtype=torch.bool)}
    assert overhead.stock_mdlm_loss(Echo(x), batch, mask_id=4, vocab_size=5).item() == pytest.approx(0, abs=1e-6)
    torch.manual_seed(0)
    uniform = overhead.stock_mdlm_loss(lambda z: torch.zeros(*z.shape, 5), batch, mask_id=4, vocab_size=5)
    torch.manual_seed(0)  # the same draws: t per row, then the masks
    t = torch.rand(3, 1) * (1 - 1e-3) + 1e-3
    masked = torch.rand(3, 8) < t
    # a masked token under uniform logits costs log 5, weighted 1/t; averaged over all tokens
    assert uniform.item() == pytest.approx((masked / t).sum().item() * math.log(5) / 24, rel=1e-5)

"""benchmarks/samplers.py --quick: trains a tiny model, times every sampler against the naive one in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~40 s on 2 CPU cores (training included)
def test_quick_benchmark_prints_ratios_against_the_naive_sampler():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "samplers.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("sampler"))
    end = next(i for i in range(header, len(lines)) if not lines[i].strip())
    rows = lines[header + 2 : end]
    assert rows[0].startswith("naive") and " 1.00 " in rows[0] and "1.000" in rows[0]
    names = " ".join(rows)
    for name in ("ancestral", "margin", "entropy", "random_order", "entropy_bounded", "threshold", "remdm"):
        assert name in names
    for row in rows:
        calls_per_token = float(row.split()[-4])
        assert 0 < calls_per_token <= 1.5  # no sampler needs more than ~1 call per token here
    # every family's default sampler: no more calls than its naive sampler (one forward per position to fill)
    family = lines.index(next(ln for ln in lines if ln.startswith("family defaults")))
    defaults = [ln for ln in lines[family + 3 :] if " default: " in ln]
    assert len(defaults) == 5
    for row in defaults:
        if row.startswith("bd3lm"):  # its number of blocks depends on when the rows emit EOS (differs by sampler)
            continue
        words = row.split()
        first = next(i for i, w in enumerate(words) if w.replace(".", "", 1).isdigit())  # tok/s, after the name
        calls_ratio = float(words[first + 4])  # tok/s, speed x, cpu x, calls/tok, calls x
        assert calls_ratio <= 1.0, row

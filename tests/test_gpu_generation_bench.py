"""benchmarks/gpu_generation.py --tiny on CPU: every sampler variant is timed (or its error recorded) through
module.generate, the JSON is complete, and --report reads the stock baselines' JSONs of the same call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_generation.py"
VARIANTS = {"naive_256", "naive_64", "semi_ar_b32", "bd3lm_b32", "threshold_cache_b32", "dual_cache_b32", "ar_kvcache"}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OUT": str(cwd)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # 15-35 s on 2 cores, depending on their load
def test_tiny_run_times_every_variant(tmp_path):
    proc = run("--tiny", "--device", "cpu", "--batches", "1,4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_generation.json").read_text())
    assert results["modes"] == ["eager"] and set(results["variants"]) == VARIANTS
    assert results["shape"] == {**results["shape"], "prompt": 16, "gen": 32, "block": 8, "batches": [1, 4]}
    runs = results["runs"]
    assert set(runs) == {f"eager/{v}/B{b}" for v in VARIANTS for b in (1, 4)}
    for key, r in runs.items():
        assert (r.get("tok_per_s", 0) > 0 and r["ms_per_call"] > 0) or isinstance(r.get("error"), str), key
    # on CPU nothing should fail: every variant ran all its calls (no early stop on EOS, nothing left masked)
    assert all("tok_per_s" in r for r in runs.values()), {k: r for k, r in runs.items() if "error" in r}
    assert runs["eager/naive_256/B1"]["calls"] == 32 and runs["eager/naive_64/B4"]["calls"] == 8
    assert runs["eager/ar_kvcache/B1"]["calls"] == 32
    assert runs["eager/bd3lm_b32/B1"]["calls"] == 8 + 2 + 3  # denoiser calls + prompt-block and block appends
    assert all(isinstance(v, float) and v > 0 for v in results["forward_ms"].values())
    assert "x naive256" in proc.stdout and "stock H200" in proc.stdout


def test_report_puts_the_same_call_stock_baselines_beside_each_row(tmp_path, capsys):
    """--report reads the stock scripts' JSON keys (gpu_baseline.py --only sample, ar_generate_baseline.py)."""
    run_row = {"tok_per_s": 80.0, "ms_per_call": 1.0, "calls": 8, "seconds": 0.1, "warmup_s": 0.1}
    (tmp_path / "gpu_generation.json").write_text(json.dumps({
        "shape": {"prompt": 16, "gen": 32, "block": 8, "batches": [1, 4], "params_M": 0.1}, "env": {"device": "cpu"},
        "runs": {"eager/naive_256/B4": dict(run_row, tok_per_s=20.0), "eager/naive_64/B4": run_row,
                 "eager/ar_kvcache/B4": run_row, "reduce-overhead/bd3lm_b32/B4": {"error": "skipped: budget"}},
        "forward_ms": {"eager/B1": 2.0}}))
    (tmp_path / "gpu_baseline.json").write_text(json.dumps({"sample": {
        "dlm_naive_B1_steps32_tok_per_s": 10, "dlm_naive_B4_steps32_tok_per_s": 20,
        "dlm_naive_B1_steps8_tok_per_s": 30, "dlm_naive_B4_steps8_tok_per_s": 40,
        "ar_kvcache_B1_tok_per_s": 5, "ar_kvcache_B4_tok_per_s": 6}}))
    (tmp_path / "ar_baseline.json").write_text(json.dumps({
        "hf_dynamic_B1_tok_per_s": 7.0, "hf_dynamic_B4_tok_per_s": 8.0, "hf_static_compiled_B1_tok_per_s": 9.0,
        "hf_static_compiled_B4": "FAIL RuntimeError: x", "full_forward_B1_ms": 1.5}))
    load_script().main(["--report", str(tmp_path)])
    same_call, readme = capsys.readouterr().out.split("(and against the README's H200 figures)")
    assert "stock = same-call" in same_call and "same-call HF eager B1: 1.5" in same_call
    rows = {tuple(ln.split()[:3]): ln.split() for ln in same_call.splitlines() if ln.startswith(("eager", "reduce"))}
    assert rows[("eager", "naive_64", "4")][6:9] == ["4.00", "40", "2.00"]  # x naive256, same-call stock, x stock
    assert rows[("eager", "ar_kvcache", "4")][-1] == "-"  # the static-compile baseline failed at B=4: no target
    assert "skipped: budget" in " ".join(rows[("reduce-overhead", "bd3lm_b32", "4")])
    assert "stock = stock H200" in readme


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_generation_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_all_script_parses():
    for script in ("gpu_all.sh", "gpu_check.sh", "copy_device_baselines.sh"):
        proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
        assert proc.returncode == 0, (script, proc.stderr)

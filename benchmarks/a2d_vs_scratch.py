"""A2D vs. scratch on CPU: does converting a pretrained AR model give a better diffusion LM than training the same
architecture from scratch for the same number of steps?

1. method=ar trains a tiny HF Qwen3 (model=qwen3_tiny) on the embedded arithmetic data and exports <run>/hf.
2. method=mdlm continues from that export (model.pretrained=<run>/hf: bidirectional attention, logit shift)
   for --steps steps.
3. method=mdlm trains the same architecture from a random init for --steps steps, same data, seed, LR.

Prints val/nll_bound (nats/token) of both diffusion runs and, last, `ratio a2d/scratch = <x>` (< 1: the
conversion helps). Usage: python benchmarks/a2d_vs_scratch.py [--ar-steps 300] [--steps 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

COMMON = [
    "logger=none", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
    "samples.num_unconditional=0", "samples.num_prompted=0", "samples.num_infill=0", "sampler.steps=4",
    "data.source.num_train=20000", "data.source.num_val=256", "trainer.limit_val_batches=4",
    "lr_scheduler=constant", "lr_scheduler.warmup_steps=10", "model=qwen3_tiny",
]


def run(out: Path, name: str, *overrides: str) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dlm.config import CONF_DIR, register_resolvers
    from dlm.train import train

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=COMMON + [f"paths.run_dir={out / name}", f"paths.cache_dir={out / 'cache'}",
                                                   f"name={name}", *overrides])
    started = time.perf_counter()
    run_dir = train(cfg)
    results = json.loads((run_dir / "results.json").read_text())
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ar-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="a2d_vs_scratch_"))
    steps = [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}"]

    ar = run(out, "ar", "method=ar", f"trainer.max_steps={args.ar_steps}", f"trainer.val_check_interval={args.ar_steps}")
    print(f"ar      {args.ar_steps:5d} steps  val/nll={ar['val/nll_bound']:.4f}  ({ar['seconds']}s)")
    a2d = run(out, "a2d", "method=mdlm", "method.shift_logits=true", f"model.pretrained={out / 'ar' / 'hf'}",
              "model.config=null", *steps)
    scratch = run(out, "scratch", "method=mdlm", "method.shift_logits=true", *steps)
    for name, r in (("a2d", a2d), ("scratch", scratch)):
        print(f"{name:7s} {args.steps:5d} steps  val/nll_bound={r['val/nll_bound']:.4f}  ({r['seconds']}s)")
    print(f"ratio a2d/scratch = {a2d['val/nll_bound'] / scratch['val/nll_bound']:.4f}")


if __name__ == "__main__":
    main()

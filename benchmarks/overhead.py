"""Lightning's per-step overhead: the CLI-built module inside Lightning against the same module in a plain loop.

    python benchmarks/overhead.py                       # the default run (method=mdlm model=tiny data=brackets)
    python benchmarks/overhead.py model=small --chunk 20 --chunks 12
    python benchmarks/overhead.py --profile             # + cProfile of the Lightning steps (top 25 by own time)

The module, datamodule, callbacks and loggers are built as ``dlm.train`` builds them (conf/train.yaml composed with
the overrides; ``logger=none``: the run's metrics.csv only). One ``trainer.fit`` runs; a callback interleaves, in
the same process and on the same module, optimizer and data stream: N Lightning steps, then N plain steps
(``training_step`` with logging off, ``backward``, gradient clipping as the trainer does, ``optimizer.step``,
the scheduler step, ``zero_grad``), then N Lightning steps, ... The first pair is a warm-up. A Lightning chunk is
timed from one plain chunk's end to the next one's start: N whole Lightning iterations, hooks, logging, progress
bar and checkpoint callbacks included. Reported: the median per-step time of each and their ratio, over all
chunk pairs (pairs are adjacent in time, so load changes hit both alike). Validation is moved past the end.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_step(module, batch, batch_idx: int, optimizer, scheduler, clip: float | None) -> None:
    import torch

    loss = module.training_step(batch, batch_idx)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="training config overrides (as for python -m dlm.train)")
    parser.add_argument("--chunk", type=int, default=10, help="steps per chunk (N)")
    parser.add_argument("--chunks", type=int, default=16, help="timed chunk pairs (after one warm-up pair)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on shared cores)")
    parser.add_argument("--profile", action="store_true", help="cProfile the Lightning chunks; print the top entries")
    parser.add_argument("--sort", default="tottime", help="the profile's order: tottime, cumulative, ...")
    parser.add_argument("--filter", help="only profile entries whose path matches this regex (e.g. lightning|dlm)")
    args = parser.parse_args(argv)

    import lightning as L
    import torch
    from hydra.utils import instantiate

    from dlm.config import compose_train
    from dlm.train import build_callbacks, build_datamodule, build_loggers, build_module

    torch.set_num_threads(args.threads)
    n, pairs = args.chunk, args.chunks + 1
    total = 2 * n * pairs
    with tempfile.TemporaryDirectory(prefix="dlm-overhead-") as tmp:
        os.environ.setdefault("WANDB_MODE", "offline")
        cfg = compose_train(["logger=none", f"paths.run_dir={tmp}/run", f"paths.cache_dir={tmp}/cache",
                             f"trainer.max_steps={n * pairs + 1}", f"trainer.val_check_interval={10 * total}",
                             "samples.num_unconditional=0", "samples.num_prompted=0", "samples.num_infill=0",
                             *args.overrides])
        L.seed_everything(cfg.seed, workers=True)
        dm = build_datamodule(cfg)
        dm.setup("fit")
        module = build_module(cfg, dm)
        plain_batches = iter(dm.train_dataloader())  # its own stream of the same data
        clip = cfg.trainer.get("gradient_clip_val")
        profiler = cProfile.Profile() if args.profile else None
        times = {"lightning": [], "plain": []}

        class Interleave(L.Callback):
            def __init__(self):
                self.mark, self.steps = None, 0

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.steps += 1
                if self.mark is None:  # the first Lightning step: start the first Lightning chunk here
                    self.mark = time.perf_counter()
                    self.steps = 0
                    if profiler:
                        profiler.enable()
                    return
                if self.steps < n:
                    return
                if profiler:
                    profiler.disable()
                times["lightning"].append((time.perf_counter() - self.mark) / n)
                optimizer = trainer.optimizers[0]
                configs = trainer.lr_scheduler_configs
                scheduler = configs[0].scheduler if configs else None
                log = pl_module.log
                pl_module.log = lambda *a, **k: None  # the plain loop logs nothing
                try:
                    start = time.perf_counter()
                    for i in range(n):
                        plain_step(pl_module, next(plain_batches), i, optimizer, scheduler, clip)
                    times["plain"].append((time.perf_counter() - start) / n)
                finally:
                    pl_module.log = log
                if len(times["plain"]) >= pairs:
                    trainer.should_stop = True
                self.steps, self.mark = 0, time.perf_counter()
                if profiler:
                    profiler.enable()

        trainer = instantiate(cfg.trainer, logger=build_loggers(cfg) or False,
                              callbacks=[*build_callbacks(cfg), Interleave()])
        trainer.fit(module, datamodule=dm)
    lightning, plain = times["lightning"][1:], times["plain"][1:]  # the first pair warms up
    ratios = [a / b for a, b in zip(lightning, plain)]
    result = {"lightning_ms": 1e3 * statistics.median(lightning), "plain_ms": 1e3 * statistics.median(plain),
              "ratio": statistics.median(ratios), "pairs": len(ratios)}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"overrides: {' '.join(args.overrides) or '(defaults)'} | {len(ratios)} pairs of {n} steps | torch threads "
          f"{args.threads} | load average {load:.2f} on {os.cpu_count()} cores")
    print(f"lightning step {result['lightning_ms']:.2f} ms | plain step {result['plain_ms']:.2f} ms | "
          f"ratio {result['ratio']:.3f} (median of pairs; min {min(ratios):.3f}, max {max(ratios):.3f}) | "
          f"overhead {100 * (result['ratio'] - 1):+.1f}%")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.filter or "", 30)
        print(out.getvalue())
    return result


if __name__ == "__main__":
    main()

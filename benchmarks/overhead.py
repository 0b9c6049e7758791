"""Lightning's per-step overhead: the CLI-built module inside Lightning against the same module in a plain loop.

    python benchmarks/overhead.py                       # the default run (method=mdlm model=tiny data=brackets)
    python benchmarks/overhead.py model=small --chunk 20 --chunks 12
    python benchmarks/overhead.py --profile             # + cProfile of both loops (CPU time): where the overhead goes
    python benchmarks/overhead.py --baseline stock      # dlm's step in Lightning against a hand-written MDLM loop
    DLM_NO_FAST_PATHS=1 python benchmarks/overhead.py   # without dlm/lightning_fast_paths.py: what it saves

The module, datamodule, callbacks and loggers are built as ``dlm.train`` builds them (conf/train.yaml composed with
the overrides; ``logger=none``: the run's metrics.csv only). One ``trainer.fit`` runs; a callback interleaves, in
the same process and on the same module, optimizer and data stream: N Lightning steps, then N plain steps
(``training_step`` with logging off, ``backward``, gradient clipping as the trainer does, ``optimizer.step``,
the scheduler step, ``zero_grad``), then N Lightning steps, ... The first pair is a warm-up. A Lightning chunk is
timed from one plain chunk's end to the next one's start: N whole Lightning iterations, hooks, logging, progress
bar and checkpoint callbacks included. Reported: the median per-step time of each and their ratio, over all
chunk pairs (pairs are adjacent in time, so load changes hit both alike), and the ratio of their CPU times (the
process's, all threads: the progress bar's refresh thread counts; on a loaded machine the wall time also holds the
time spent waiting for a core, which the CPU time leaves out, so it is the steadier figure there). Validation is
moved past the end.
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


def stock_mdlm_loss(backbone, batch, mask_id: int, vocab_size: int, t_eps: float = 1e-3):
    """MDLM's objective as a practitioner writes it from the paper (Sahoo et al. 2024, linear schedule: a token is
    masked with probability t and weighted by 1/t), on full logits: no dlm code but the backbone."""
    import torch
    import torch.nn.functional as F

    x, keep = batch["input_ids"], batch["loss_mask"]
    t = torch.rand(x.shape[0], 1, device=x.device) * (1 - t_eps) + t_eps
    masked = (torch.rand(x.shape, device=x.device) < t) & keep
    logits = backbone(x.masked_fill(masked, mask_id))[..., :vocab_size]
    nll = F.cross_entropy(logits[masked], x[masked], reduction="none")
    return (nll / t.expand_as(x)[masked]).sum() / keep.sum().clamp(min=1)


def stock_step(backbone, batch, optimizer, clip: float | None, mask_id: int, vocab_size: int) -> None:
    import torch

    loss = stock_mdlm_loss(backbone, batch, mask_id, vocab_size)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="training config overrides (as for python -m dlm.train)")
    parser.add_argument("--chunk", type=int, default=10, help="steps per chunk (N)")
    parser.add_argument("--chunks", type=int, default=16, help="timed chunk pairs (after one warm-up pair)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on shared cores)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile both loops; print the functions whose own time the Lightning steps add")
    parser.add_argument("--sort", default="tottime", help="the profile's order: tottime, cumulative, ...")
    parser.add_argument("--filter", help="only profile entries whose path matches this regex (e.g. lightning|dlm)")
    parser.add_argument("--baseline", choices=("module", "stock"), default="module",
                        help="the plain loop's step: module = the same module's training_step, optimizer and "
                             "schedule (Lightning's overhead); stock = a hand-written MDLM loss on a copy of the "
                             "backbone with its own torch AdamW (dlm's whole training step against a stock loop; "
                             "method=mdlm)")
    args = parser.parse_args(argv)

    import lightning as L
    import torch
    from hydra.utils import instantiate

    from dlm import lightning_fast_paths
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
        if args.baseline == "stock":
            import copy

            stock_backbone = copy.deepcopy(module.backbone)  # the same architecture and initial weights
            opt_cfg = cfg.optimizer
            stock_opt = torch.optim.AdamW(stock_backbone.parameters(), lr=opt_cfg.get("lr", 1e-3),
                                          weight_decay=opt_cfg.get("weight_decay", 0.0))
        clip = cfg.trainer.get("gradient_clip_val")
        profiler = cProfile.Profile(time.process_time) if args.profile else None  # CPU time: steady under load
        plain_profiler = cProfile.Profile(time.process_time) if args.profile else None  # CPU time: steady under load
        times = {"lightning": [], "plain": [], "lightning_cpu": [], "plain_cpu": []}

        class Interleave(L.Callback):
            def __init__(self):
                self.mark, self.cpu_mark, self.steps = None, None, 0

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.steps += 1
                if self.mark is None:  # the first Lightning step: start the first Lightning chunk here
                    self.mark, self.cpu_mark = time.perf_counter(), time.process_time()
                    self.steps = 0
                    if profiler:
                        profiler.enable()
                    return
                if self.steps < n:
                    return
                if profiler:
                    profiler.disable()
                times["lightning"].append((time.perf_counter() - self.mark) / n)
                times["lightning_cpu"].append((time.process_time() - self.cpu_mark) / n)
                optimizer = trainer.optimizers[0]
                configs = trainer.lr_scheduler_configs
                scheduler = configs[0].scheduler if configs else None
                log = pl_module.log
                pl_module.log = lambda *a, **k: None  # the plain loop logs nothing
                try:
                    if plain_profiler:
                        plain_profiler.enable()
                    start, cpu_start = time.perf_counter(), time.process_time()
                    for i in range(n):
                        if args.baseline == "stock":
                            stock_step(stock_backbone, next(plain_batches), stock_opt, clip, pl_module.mask_id,
                                       pl_module.vocab_size)
                        else:
                            plain_step(pl_module, next(plain_batches), i, optimizer, scheduler, clip)
                    times["plain"].append((time.perf_counter() - start) / n)
                    times["plain_cpu"].append((time.process_time() - cpu_start) / n)
                    if plain_profiler:
                        plain_profiler.disable()
                finally:
                    pl_module.log = log
                if len(times["plain"]) >= pairs:
                    trainer.should_stop = True
                    return  # the end of fit (validation, samples) is no step: not profiled
                self.steps, self.mark, self.cpu_mark = 0, time.perf_counter(), time.process_time()
                if profiler:
                    profiler.enable()

        trainer = instantiate(cfg.trainer, logger=build_loggers(cfg) or False,
                              callbacks=[*build_callbacks(cfg), Interleave()])
        if not os.environ.get("DLM_NO_FAST_PATHS"):  # (set: Lightning's own paths, to measure what they save)
            lightning_fast_paths.apply(trainer)  # as dlm.train does
        trainer.fit(module, datamodule=dm)
    lightning, plain = times["lightning"][1:], times["plain"][1:]  # the first pair warms up
    ratios = [a / b for a, b in zip(lightning, plain)]
    cpu_pairs = list(zip(times["lightning_cpu"][1:], times["plain_cpu"][1:]))
    cpu_ratios = [a / b for a, b in cpu_pairs]
    result = {"lightning_ms": 1e3 * statistics.median(lightning), "plain_ms": 1e3 * statistics.median(plain),
              "ratio": statistics.median(ratios), "pairs": len(ratios),
              "cpu_ratio": sum(a for a, _ in cpu_pairs) / sum(b for _, b in cpu_pairs), "baseline": args.baseline,
              "ratio_90": bootstrap_90(ratios, statistics.median),
              "cpu_ratio_90": bootstrap_90(cpu_pairs, lambda ps: sum(a for a, _ in ps) / sum(b for _, b in ps)),
              "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")}
    load = result["load"]
    print(f"baseline: {args.baseline} | overrides: {' '.join(args.overrides) or '(defaults)'} | {len(ratios)} pairs of {n} steps | torch threads "
          f"{args.threads} | load average {load:.2f} on {os.cpu_count()} cores")
    print(f"lightning step {result['lightning_ms']:.2f} ms | plain step {result['plain_ms']:.2f} ms | "
          f"ratio {result['ratio']:.3f} (median of pairs, 90% interval {interval(result['ratio_90'])}; min "
          f"{min(ratios):.3f}, max {max(ratios):.3f}) | "
          f"overhead {100 * (result['ratio'] - 1):+.1f}%")
    print(f"CPU time (all threads of the process; what a loaded machine's waiting leaves out): lightning/plain "
          f"{result['cpu_ratio']:.3f} over all pairs (90% interval {interval(result['cpu_ratio_90'])}; {1e3 * statistics.median(times['lightning_cpu'][1:]):.2f} / {1e3 * statistics.median(times['plain_cpu'][1:]):.2f} ms) (median of pairs {statistics.median(cpu_ratios):.3f}) | "
          f"overhead {100 * (result['cpu_ratio'] - 1):+.1f}%")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.filter or "", 30)
        print(out.getvalue())
        print(profile_difference(profiler, plain_profiler, steps=n * pairs, top=30, by=args.sort))
    return result


def bootstrap_90(samples: list, statistic, draws: int = 2000) -> tuple[float, float]:
    """The 5th and 95th percentiles of ``statistic`` over resamples of the pairs (with replacement; fixed seed): how
    far the figure moves with the machine's noise. On a shared 2-core host the per-pair ratios spread over +-20%, so
    a figure from 16 pairs is good to a few percent; more pairs (``--chunks``) narrow it."""
    import random

    rng = random.Random(0)
    values = sorted(statistic([rng.choice(samples) for _ in samples]) for _ in range(draws))
    return values[int(0.05 * draws)], values[int(0.95 * draws) - 1]


def interval(bounds: tuple[float, float]) -> str:
    return f"{bounds[0]:.3f}-{bounds[1]:.3f}"


def profile_difference(lightning: cProfile.Profile, plain: cProfile.Profile, steps: int, top: int,
                       by: str = "tottime") -> str:
    """The functions whose own time per step the Lightning steps add over the plain ones (both loops ran the same
    number of steps), largest first (``by``: own time, ``tottime``, or ``cumulative``): where the overhead goes."""
    own = {}
    for sign, prof in ((1, lightning), (-1, plain)):
        for (path, line, name), (_, calls, tottime, cumtime, _) in pstats.Stats(prof).stats.items():
            entry = own.setdefault((path, line, name), [0, 0.0, 0.0])
            entry[0] += sign * calls
            entry[1] += sign * tottime
            entry[2] += sign * cumtime
    rows = sorted(own.items(), key=lambda kv: -kv[1][2 if by.startswith("cum") else 1])[:top]
    total = sum(v[1] for v in own.values())
    lines = [f"the Lightning steps' extra own time: {1e3 * total / steps:.3f} ms per step over {steps} steps "
             f"(top {top}: extra calls per step, own ms per step, cumulative ms per step)"]
    for (path, line, name), (calls, tottime, cumtime) in rows:
        where = f"{Path(path).name}:{line}({name})" if line else name
        lines.append(f"{calls / steps:8.2f} {1e3 * tottime / steps:8.3f} {1e3 * cumtime / steps:8.3f}  {where}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

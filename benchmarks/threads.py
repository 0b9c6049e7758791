"""Training step time against the number of torch intra-op threads, per model size (the data for dlm/threads.py).

    python benchmarks/threads.py                         # model=tiny and model=small, 1 and 2 threads
    python benchmarks/threads.py --models tiny small --threads 1 2 4 --chunks 12

For each model the CLI-built module (conf/train.yaml with ``model=<name>``) runs training steps (training_step,
backward, optimizer step) in a plain loop, in chunks of N steps that cycle through the thread counts, so that a
change of load hits every count alike. Reported: the median per-step time per thread count and its ratio to the
first count, with the load average and the parameter count (the policy's input).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--chunk", type=int, default=5, help="steps per chunk")
    parser.add_argument("--chunks", type=int, default=8, help="timed chunks per thread count (after a warm-up)")
    parser.add_argument("overrides", nargs="*", help="more training config overrides (e.g. data.batch_size=32)")
    args = parser.parse_args(argv)

    import torch

    from dlm.config import compose_train
    from dlm.train import build_datamodule, build_module

    out = {}
    for model in args.models:
        with tempfile.TemporaryDirectory(prefix="dlm-threads-") as tmp:
            cfg = compose_train([f"model={model}", "logger=none", f"paths.run_dir={tmp}/run",
                                 f"paths.cache_dir={tmp}/cache", *args.overrides])
            torch.manual_seed(0)
            dm = build_datamodule(cfg)
            dm.setup("fit")
            module = build_module(cfg, dm)
            module.log = lambda *a, **k: None
            module.step_generator = lambda i: torch.Generator().manual_seed(i)  # no trainer here
            optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
            batches = iter(dm.train_dataloader())
            params = sum(p.numel() for p in module.parameters())
            times = {n: [] for n in args.threads}
            for chunk in range(args.chunks + 1):
                for n in args.threads:
                    torch.set_num_threads(n)
                    start = time.perf_counter()
                    for i in range(args.chunk):
                        module.training_step(next(batches), i).backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    if chunk:  # the first round warms up
                        times[n].append((time.perf_counter() - start) / args.chunk)
            first = statistics.median(times[args.threads[0]])
            load = os.getloadavg()[0]
            print(f"model={model} ({params / 1e6:.2f} M parameters, batch {dm.batch_size} x {dm.seq_len}) | load "
                  f"average {load:.2f} on {os.cpu_count()} cores | {args.chunks} chunks of {args.chunk} steps")
            for n in args.threads:
                med = statistics.median(times[n])
                print(f"  {n} thread(s): {1e3 * med:8.2f} ms/step   x{med / first:.2f} of {args.threads[0]} thread(s)")
            out[model] = {"params": params, **{n: statistics.median(t) for n, t in times.items()}}
    return out


if __name__ == "__main__":
    main()

"""Every ratio of the README's benchmark table, measured in one run, printed as that table (markdown).

    python benchmarks/all.py            # the table's figures (`make bench-all`; 12-20 min on 2 cores, mostly training)
    python benchmarks/all.py --runs DIR # keep those runs in DIR and reuse them next time (then about 2 min)
    python benchmarks/all.py --quick    # smoke mode: a few steps and prompts each (figures not meaningful)

Each figure is a ratio against a baseline measured beside it in the same process, so that the machine's load
hits both alike:

- training: dlm's step (the CLI-built MDLM module inside Lightning, every default callback) against a stock
  PyTorch loop (a hand-written MDLM loss on a copy of the same backbone, torch AdamW, the same gradient clipping),
  interleaved chunk by chunk (``benchmarks/overhead.py --baseline stock``); time per step, wall and CPU;
- Lightning overhead: the same module inside Lightning against itself in a plain loop (``benchmarks/overhead.py``);
- samplers: every family's default sampler against its naive one (one full forward per position to fill), speed
  (the median of per-round wall and CPU-time ratios, the two interleaved batch by batch) and network calls, with
  both accuracies (``benchmarks/samplers.py --no-main-table``: a tiny run per family);
- AR decoding: dlm's ``method=ar`` against Hugging Face ``generate`` on the same weights, eager
  (``benchmarks/ar_decoding.py --eager``; the compiled rows need a compiler warm-up and are left to that script).

The load average is printed with the table: on a loaded machine the wall-time ratios spread more than the CPU-time
ones (time spent waiting for a core is in the wall time only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke mode: a few steps and prompts per benchmark")
    parser.add_argument("--train-steps", type=int, default=2000,
                        help="training steps of each sampler benchmark run (samplers.py's default: `make train`'s length)")
    parser.add_argument("--prompts", type=int, default=128, help="prompts of the sampler benchmark")
    parser.add_argument("--runs", metavar="DIR", help="keep the sampler benchmark's trained runs in DIR and reuse them")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the sampler benchmark")
    parser.add_argument("--chunks", type=int, default=60,
                        help="chunk pairs of the two step benchmarks (10 steps each: one logged step per chunk)")
    args = parser.parse_args(argv)

    import ar_decoding
    import overhead
    import samplers

    chunks = ["--chunk", "2", "--chunks", "2"] if args.quick else ["--chunk", "10", "--chunks", str(args.chunks)]
    sampler_args = ["--quick"] if args.quick else ["--train-steps", str(args.train_steps), "--prompts",
                                                   str(args.prompts), "--rounds", str(args.rounds)]
    sampler_args.append("--no-main-table")  # the table reads the family defaults only
    if args.runs:
        sampler_args += ["--runs", args.runs]
    ar_args = ["--tiny", "--gen", "8", "--prompt", "8", "--repeats", "1"] if args.quick else ["--threads", "1"]
    started, loads = time.perf_counter(), [load()]
    stock = overhead.main([*chunks, "--baseline", "stock"])
    loads.append(load())
    lightning = overhead.main(chunks)
    loads.append(load())
    rows = samplers.main([*sampler_args, "--families", *samplers.FAMILIES])
    loads.append(load())
    ar = ar_decoding.main(["--eager", "--batches", "1,8", *ar_args])
    loads.append(load())

    def steps(r: dict) -> str:
        return (f"{r['ratio']:.3f} wall [{overhead.interval(r['ratio_90'])}], {r['cpu_ratio']:.3f} CPU "
                f"[{overhead.interval(r['cpu_ratio_90'])}] ({r['lightning_ms']:.1f} / {r['plain_ms']:.1f} ms)")

    table = [
        "| figure | ratio | command |",
        "| --- | --- | --- |",
        f"| training step time: dlm (CLI module in Lightning, default callbacks) / a stock PyTorch MDLM loop, tiny "
        f"model | {steps(stock)} | `python benchmarks/overhead.py --baseline stock` |",
        f"| Lightning overhead: step time in Lightning / the same module in a plain loop | {steps(lightning)} | "
        f"`python benchmarks/overhead.py` |",
    ]
    by_name = {r["sampler"]: r for r in rows}
    for method in samplers.FAMILIES:
        naive = by_name.get(f"{method} naive")
        default = next((r for name, r in by_name.items() if name.startswith(f"{method} default")), None)
        if naive is None or default is None:
            continue
        sampler = default["sampler"].split(": ", 1)[1]
        table.append(f"| sampler speed, {method}: default ({sampler}) / naive, wall and CPU (calls) [accuracy default, "
                     f"naive] | {default['speed_ratio']:.2f} wall, {default['cpu_ratio']:.2f} CPU "
                     f"({default['calls_ratio']:.2f}) [{default['accuracy']:.2f}, {naive['accuracy']:.2f}] | "
                     f"`python benchmarks/samplers.py` |")
    for name in ("dlm ar", "dlm ar static"):
        cells = [f"B{B} {ar['rows'][f'{name}/B{B}']['x_hf_generate']:.2f}" for B in (1, 8)
                 if f"{name}/B{B}" in ar["rows"]]
        same = all(ar["rows"][k]["same_tokens"] for k in ar["rows"] if k.startswith(f"{name}/"))
        table.append(f"| AR decoding speed: {name} / HF `generate` (eager, same tokens: {'yes' if same else 'NO'}) | "
                     f"{', '.join(cells)} | `python benchmarks/ar_decoding.py --eager` |")
    text = "\n".join(table)
    print(f"\nbenchmarks/all.py{' --quick' if args.quick else ''}: {time.perf_counter() - started:.0f} s, "
          f"{os.cpu_count()} cores, load average at each part's start and end {' -> '.join(loads)}\n")
    print(text)
    return text


if __name__ == "__main__":
    main()

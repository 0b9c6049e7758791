"""Start-up of the training CLI: `dry_run=true` plans and `--help` against `--cfg job` (composing the config).

    python benchmarks/startup.py                 # 5 rounds
    python benchmarks/startup.py --rounds 9 --cwd /path/to/another/checkout   # e.g. an older commit's dlm/

Each command runs as its own `python -m dlm.train` process (offline, outputs in a temporary folder), the commands
interleaved round by round so that a change of load hits each alike. Reported per command: the median wall time,
the median CPU time (user + system of the process) and both as ratios to `--cfg job`, with the load average.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "--cfg job": ["--cfg", "job"],
    "--help": ["--help"],
    "dry_run=true": ["dry_run=true"],
    "dry_run=true model=moe30b": ["dry_run=true", "model=moe30b"],
}


def run_once(args: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(wall s, CPU s) of one `python -m dlm.train <args>`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dlm.train", *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed: {proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cwd", type=Path, default=ROOT, help="the checkout whose dlm/ is timed")
    args = parser.parse_args(argv)
    out_root = tempfile.mkdtemp(prefix="dlm-startup-")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "DLM_OUTPUT_ROOT": out_root, "PYTHONPATH": str(args.cwd.resolve())}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    for cmd in COMMANDS.values():  # warm-up: the file cache, .pyc files
        run_once(cmd, args.cwd, env)
    for _ in range(args.rounds):
        for name, cmd in COMMANDS.items():
            times[name].append(run_once(cmd, args.cwd, env))
    result = {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()}
    base_wall, base_cpu = result["--cfg job"]
    print(f"{args.cwd} ({args.rounds} rounds, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    for name, (wall, cpu) in result.items():
        print(f"  {name:<28} wall {wall:5.2f} s ({wall / base_wall:4.2f}x --cfg job)   "
              f"CPU {cpu:5.2f} s ({cpu / base_cpu:4.2f}x)")
    return result


if __name__ == "__main__":
    main()

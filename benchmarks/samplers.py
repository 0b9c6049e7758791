"""Sampler speed against the naive sampler, on one trained tiny model and one prompt set, with task accuracy.

    python benchmarks/samplers.py                 # trains a tiny MDLM on the embedded default data (2000 steps, ~2 min CPU)
    python benchmarks/samplers.py --run runs/...  # or benchmark an existing run
    python benchmarks/samplers.py --quick         # smoke mode (a few training steps, few prompts): used by a test
    python benchmarks/samplers.py --compile default   # + the same samplers on a torch.compile'd backbone
    python benchmarks/samplers.py --no-main-table --runs /tmp/bench-runs   # family defaults only, runs kept

Every sampler completes the same prompts (the task's validation prompts, grouped by prompt length so a
group is one batch) through ``module.generate``. Reported per sampler: generated tokens per second, network
calls per generated position (a batched forward counts once), the prompted accuracy (a completion is correct
iff ``prompt + completion`` is valid under the task), and the ratios of speed and calls against the *naive*
sampler measured in the same process: one full forward per step and one token per step (confidence order,
``steps = length``, greedy). Speed is only interesting where the accuracy column holds. The ``+ cache`` rows use
Fast-dLLM's prefix KV cache (``ThresholdSampler(kv_cache="prefix")``; ``prompt cache``: one block, so only the
prompt is cached) and its DualCache (``+ dual``: the suffix after the block too, each step a forward over the block
alone; ``/2``: refreshed every 2nd step, ``refresh_every=2``): the same network calls as without them, each
cheaper, so their gain shows in tok/s only.

Timing: the samplers of a table are interleaved batch by batch (every batch is completed by each sampler in turn,
the order rotating), over ``--rounds`` rounds; ``speed x`` and ``cpu x`` are the medians of the per-round ratios
of wall and CPU time (``time.process_time``) against the naive sampler, so that a change of the machine's load hits
both sides of a ratio alike (on a loaded machine the CPU-time ratio is the steadier one: waiting for a core is in
the wall time only). ``tok/s`` is from a sampler's median round. The load average is printed with the tables.

``--compile MODE`` (``default``, ``reduce-overhead``: CUDA graphs, ``max-autotune``) then compiles the backbone
in place (:mod:`dlm.compile`) and times every sampler again: a second table whose ``speed x`` is against the
*compiled* naive sampler (interleaved as above), with ``vs eager`` the tok/s gain over the same sampler eager
(separate passes). Compilation (a static graph for the first batch size, one with a dynamic batch size for the
others; the ``+ cache`` rows through a static KV cache, :mod:`dlm.models.kv_cache`) happens in an untimed warm-up
in which every sampler completes every batch once.

``--runs DIR`` keeps the trained tiny runs (``DIR/<method>``) and reuses them on the next call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlm.compile import MODES, compile_backbone  # noqa: E402
from dlm.run import load_run  # noqa: E402
from dlm.sampling import (  # noqa: E402
    AncestralSampler,
    ARSampler,
    ConfidenceSampler,
    EntropyBoundedSampler,
    EntropySampler,
    LowConfidenceSampler,
    MarginSampler,
    RandomOrderSampler,
    ReMDMSampler,
    SundaeSampler,
    ThresholdSampler,
)
from dlm.sampling.base import cut_at_eos  # noqa: E402


def train_tiny(out: Path, steps: int, method: str = "mdlm") -> Path:
    """A tiny model of `method` on the embedded default data (balanced brackets), trained by the CLI into `out`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "DLM_OUTPUT_ROOT": str(out / "runs"),
           "DLM_CACHE_DIR": str(out / "cache")}
    args = [sys.executable, "-m", "dlm.train", f"method={method}", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={max(1, min(steps, 100))}", "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "logger=none",
            "samples.num_unconditional=0", "samples.num_prompted=0", "samples.num_infill=0"]
    if steps < 100:
        args += ["data.source.num_train=2048", "data.source.num_val=64"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training the benchmark model failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("run_dir: ")][-1]
    return Path(line.split("run_dir: ", 1)[1].strip())


def samplers(length: int) -> dict[str, object]:
    half = max(1, length // 2)
    return {
        "naive (confidence, 1 tok/step)": ConfidenceSampler(steps=length, temperature=0.0),
        "ancestral (cache unchanged)": AncestralSampler(steps=length, temperature=0.0),
        "low_confidence L/2 steps": LowConfidenceSampler(steps=half, temperature=0.0),
        "low_confidence blocks of 4": LowConfidenceSampler(steps=half, temperature=0.0, block_length=4),
        "margin L/2 steps": MarginSampler(steps=half, temperature=0.0),
        "entropy L/2 steps": EntropySampler(steps=half, temperature=0.0),
        "random_order L/2 steps": RandomOrderSampler(steps=half, temperature=0.0),
        "entropy_bounded gamma=0.1": EntropyBoundedSampler(gamma=0.1, temperature=0.0),
        "entropy_bounded gamma=1": EntropyBoundedSampler(gamma=1.0, temperature=0.0),
        "threshold tau=0.9": ThresholdSampler(threshold=0.9, temperature=0.0),
        "threshold tau=0.7": ThresholdSampler(threshold=0.7, temperature=0.0),
        "threshold tau=0.9 + eos fill": None,  # filled in below (needs the tokenizer's EOS id)
        # Fast-dLLM's prefix KV cache (approximate under bidirectional attention): the same steps, each but a
        # block's first one a forward over the columns from the current block on; compare with the row above it
        "threshold tau=0.9 blocks of 4": ThresholdSampler(threshold=0.9, temperature=0.0, block_length=4),
        "threshold tau=0.9 blocks 4 + cache": ThresholdSampler(threshold=0.9, temperature=0.0, block_length=4,
                                                               kv_cache="prefix"),
        "threshold tau=0.9 blocks 4 + dual": ThresholdSampler(threshold=0.9, temperature=0.0, block_length=4,
                                                              kv_cache="dual"),
        "threshold tau=0.9 blocks 4 + dual/2": ThresholdSampler(threshold=0.9, temperature=0.0, block_length=4,
                                                                kv_cache="dual", refresh_every=2),
        "threshold tau=0.9 + prompt cache": ThresholdSampler(threshold=0.9, temperature=0.0, block_length=length,
                                                             kv_cache="prefix"),
        "remdm cap 0.02, L steps": ReMDMSampler(steps=length, eta_cap=0.02, temperature=0.0),
    }


FAMILIES = ("mdlm", "diffusionbert", "bd3lm", "sundae", "ar")


def default_sampler(method: str):
    """The sampler a new run of ``method`` gets: conf/sampler/<method>.yaml as conf/train.yaml composes it."""
    from hydra.utils import instantiate

    from dlm.config import compose_train

    return instantiate(compose_train([f"method={method}"]).sampler)


def family_naive(module, length: int):
    """The family's naive sampler: one full forward per position to fill, at the default's temperature / top-k /
    top-p (so that both end alike where decoding stops at EOS: bd3lm, AR). Mask families: one token per step in
    confidence order (bd3lm: per block); SUNDAE: one step per free position, no early stop; AR: the default
    decoding without its KV cache (the same tokens for the same generator, so the same calls)."""
    default = module.sampler
    if isinstance(default, ARSampler):
        return ARSampler(temperature=default.temperature, top_k=default.top_k, top_p=default.top_p, kv_cache="none")
    if isinstance(default, SundaeSampler):
        return SundaeSampler(steps=length, temperature=default.temperature, stop_when_unchanged=False)
    return ConfidenceSampler(steps=getattr(module, "block_size", None) or length, temperature=default.temperature,
                             top_k=default.top_k, top_p=default.top_p)


@torch.no_grad()
def interleaved(module, tokenizer, task, groups, table: dict[str, object], seed: int, rounds: int,
                warmup: int = 1) -> list[dict]:
    """Time every sampler of ``table`` (name -> sampler; the first is the baseline) on the same batches, interleaved
    batch by batch: each batch is completed by every sampler in turn (the order rotating with the batch and the
    round), so that a change of the machine's load hits all of them alike. A sampler draws from its own generator,
    seeded ``seed + round`` at the start of each round, so it makes the same tokens and calls as in a pass of its own;
    each round is another sample (a stochastic sampler's calls vary with its draws: where decoding stops at EOS,
    a batch takes as many blocks as its longest row), and calls and accuracy are over all rounds.

    Per sampler: wall and CPU (``time.process_time``: the process, all threads) seconds of each round; its
    ``speed_ratio`` / ``cpu_ratio`` are the medians over rounds of the baseline's time / its time in that round
    (the same tokens are generated, so a time ratio is a tokens/s ratio); ``tokens_per_s`` is from its median round.
    """
    names = list(table)
    wall = {n: [0.0] * rounds for n in names}
    cpu = {n: [0.0] * rounds for n in names}
    calls = dict.fromkeys(names, 0)
    outputs: dict[str, list] = {n: [] for n in names}
    positions = sum(length for _, length, _ in groups)
    tokens = sum(length * ids.shape[0] for ids, length, _ in groups)
    for r in range(rounds):
        generators = {n: torch.Generator().manual_seed(seed + r) for n in names}
        for b, (prompt_ids, length, prompts) in enumerate(groups):
            shift = (r + b) % len(names)
            for n in names[shift:] + names[:shift]:
                start, cpu_start = time.perf_counter(), time.process_time()
                gen = module.generate(prompt_ids, length, sampler=table[n], generator=generators[n])
                wall[n][r] += time.perf_counter() - start
                cpu[n][r] += time.process_time() - cpu_start
                calls[n] += gen.num_network_calls
                outputs[n].append((prompts, gen.tokens[:, prompt_ids.shape[1]:]))
    eos, base = tokenizer.eos_token_id, names[0]
    rows = []
    for n in names:
        correct = total = 0
        for prompts, completions in outputs[n]:
            for prompt, row in zip(prompts, completions):
                correct += task.is_valid(prompt + tokenizer.decode(cut_at_eos(row.tolist(), eos)))
                total += 1
        per_round = [w0 / max(w, 1e-12) for w0, w in zip(wall[base], wall[n])]
        cpu_round = [c0 / max(c, 1e-12) for c0, c in zip(cpu[base], cpu[n])]
        seconds = statistics.median(wall[n])
        rows.append({"sampler": n, "seconds": seconds, "cpu_seconds": statistics.median(cpu[n]),
                     "tokens_per_s": tokens / seconds, "calls_per_token": calls[n] / (positions * rounds),
                     "accuracy": correct / max(total, 1), "calls": calls[n] / rounds, "rounds": rounds,
                     "speed_ratio": statistics.median(per_round), "cpu_ratio": statistics.median(cpu_round),
                     "speed_ratios": per_round})
    return rows


@torch.no_grad()
def warm_up(module, groups, table: dict[str, object], seed: int) -> None:
    """Every sampler of ``table`` completes every batch of ``groups`` once, untimed."""
    for prompt_ids, length, _ in groups:
        for sampler in table.values():
            module.generate(prompt_ids, length, sampler=sampler, generator=torch.Generator().manual_seed(seed))


def row_line(r: dict, naive: dict) -> str:
    """One table row; sets the row's calls ratio against the naive sampler (its speed and CPU ratios are the
    medians of the interleaved rounds, set by :func:`interleaved`)."""
    r["calls_ratio"] = r["calls_per_token"] / naive["calls_per_token"]
    return (f"{r['sampler']:34s} {r['tokens_per_s']:9.1f} {r['speed_ratio']:8.2f} {r['cpu_ratio']:6.2f} "
            f"{r['calls_per_token']:9.3f} {r['calls_ratio']:8.3f} {r['accuracy']:8.3f} "
            f"{r['accuracy'] - naive['accuracy']:+11.3f}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run folder (default: train a tiny MDLM into a temporary folder)")
    parser.add_argument("--runs", metavar="DIR", help="keep the trained tiny runs in DIR/<method> and reuse those "
                        "found there (default: a temporary folder, trained anew)")
    parser.add_argument("--train-steps", type=int, default=2000, help="the default run length of `make train`; fewer steps leave accuracy near 0")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--rounds", "--repeats", type=int, default=10, dest="rounds",
                        help="interleaved timed rounds (every ratio is the median of the per-round ratios)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on shared cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke mode: 10 training steps, 16 prompts, 1 round")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), metavar="METHOD",
                        help="also train a tiny run of each method and time its default sampler (conf/sampler/<method>"
                             ".yaml) against its naive one (none: skip); mdlm reuses the main run")
    parser.add_argument("--main-table", action=argparse.BooleanOptionalAction, default=True,
                        help="the table of every sampler on the MDLM run (--no-main-table: the family defaults only)")
    parser.add_argument("--compile", choices=MODES, metavar="MODE",
                        help=f"also time every sampler on the backbone compiled with torch.compile ({', '.join(MODES)})")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_steps, args.prompts, args.rounds = 10, 16, 1
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="dlm-bench-") as tmp:
        keep = Path(args.runs) if args.runs else Path(tmp)

        def run_of(method: str) -> Path:
            if method == "mdlm" and args.run:
                return Path(args.run)
            kept = sorted((keep / method / "runs").glob("*/*/checkpoints/last.ckpt")) if args.runs else []
            return kept[-1].parents[1] if kept else train_tiny(keep / method, args.train_steps, method)

        run_dir = run_of("mdlm")
        module, dm, tokenizer, task, groups = load(run_dir, args)
        length = max(g[1] for g in groups)
        rows, compiled, warmup = [], [], 0.0
        if args.main_table:
            table = samplers(length)
            table["threshold tau=0.9 + eos fill"] = ThresholdSampler(threshold=0.9, temperature=0.0,
                                                                     eos_id=tokenizer.eos_token_id)
            # every ratio is against the naive sampler, interleaved with it batch by batch
            rows = interleaved(module, tokenizer, task, groups, table, args.seed, args.rounds)
            if args.compile:
                compile_backbone(module.backbone, args.compile)
                started = time.perf_counter()  # compiles every batch shape: the timed rounds compile nothing
                warm_up(module, groups, table, args.seed)
                warmup = time.perf_counter() - started
                compiled = [{**r, "compile": args.compile}
                            for r in interleaved(module, tokenizer, task, groups, table, args.seed, args.rounds)]
        families = []
        for method in args.families:  # every family's default sampler against its own naive one, same prompts
            f_dir = run_dir if method == "mdlm" and not args.compile else run_of(method)
            f_module, _, f_tok, f_task, f_groups = load(f_dir, args)
            f_module.sampler = default_sampler(method)  # today's default, also for a kept run trained before it
            pair = {f"{method} naive": family_naive(f_module, length),
                    f"{method} default: {type(f_module.sampler).__name__}": f_module.sampler}
            base, default = interleaved(f_module, f_tok, f_task, f_groups, pair, args.seed, args.rounds)
            families.append((base, default, f_module.sampler))
    print(f"run: {run_dir} | {args.prompts} prompts in {len(groups)} batches, completion length {length} "
          f"(seq_len {dm.seq_len}) | torch threads {args.threads} | {args.rounds} rounds (seeds {args.seed}..{args.seed + args.rounds - 1}: calls and accuracy over all) interleaved batch by batch, "
          f"speed x and cpu x: medians of the per-round wall / CPU-time ratios | load average {load_average()}")
    head = (f"{'sampler':34s} {'tok/s':>9s} {'speed x':>8s} {'cpu x':>6s} {'calls/tok':>9s} {'calls x':>8s} "
            f"{'accuracy':>8s} {'acc - naive':>11s}")
    if rows:
        print(head)
        print("-" * len(head))
        for r in rows:
            print(row_line(r, rows[0]))
    if compiled:
        print(f"\ncompiled backbone (torch.compile mode={args.compile}; warm-up {warmup:.1f} s): speed x and cpu x "
              f"against the compiled naive sampler (interleaved), vs eager: tok/s against the same sampler eager "
              f"(separate passes)")
        print(head + f" {'vs eager':>8s}")
        print("-" * (len(head) + 9))
        for r, eager in zip(compiled, rows):
            r["compiled_ratio"] = r["tokens_per_s"] / eager["tokens_per_s"]
            print(row_line(r, compiled[0]) + f" {r['compiled_ratio']:8.2f}")
    family_rows = []
    if families:
        print("\nfamily defaults (conf/sampler/<method>.yaml; a tiny run per method trained as above): speed x, cpu x "
              "and calls x against the family's naive sampler (one full forward per position to fill), interleaved "
              "with it batch by batch")
        print(head)
        print("-" * len(head))
        for base, default, sampler in families:
            print(row_line(base, base))
            spread = default["speed_ratios"]
            print(row_line(default, base) + f"   per round {min(spread):.2f}-{max(spread):.2f}   {sampler!r}")
            family_rows += [base, default]
    return rows + compiled + family_rows


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def load(run_dir: Path, args):
    """The run's module and the benchmark prompts grouped by length (one batch per prompt length)."""
    run = load_run(run_dir)
    module, dm = run.module, run.datamodule
    tokenizer, task = dm.tokenizer, dm.task
    if task is None:
        raise SystemExit("the benchmark needs a run on data with a checkable task (data=brackets or data=arithmetic)")
    by_len = defaultdict(list)
    for prompt in task.prompts(args.prompts, args.seed):
        by_len[len(tokenizer.encode(prompt))].append(prompt)
    groups = [(torch.tensor([tokenizer.encode(p) for p in ps], dtype=torch.long), dm.seq_len - n, ps)
              for n, ps in sorted(by_len.items())]
    return module, dm, tokenizer, task, groups


if __name__ == "__main__":
    main()

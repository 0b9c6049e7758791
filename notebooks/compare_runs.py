# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Compare runs
#
# Loads a sweep (or any folder of runs) written by `python -m dlm.train -m ...` and compares the runs:
# loss and NLL-bound curves per method/schedule, the final metrics table, quality vs sampling steps (from
# `python -m dlm.evaluate ... steps=N` evaluations, when there are some), and samples side by side.
#
# Set `DLM_SWEEP` to the folder to read (default `runs/multirun`). Edit this `.py` file (jupytext percent
# format) and regenerate the `.ipynb` with `jupytext --to ipynb notebooks/compare_runs.py`.

# %%
import os
from pathlib import Path

import pandas as pd

from dlm.analysis import load_evals, load_metrics, load_runs, load_samples, varying_columns

try:
    import matplotlib.pyplot as plt
except ImportError:  # tables only
    plt = None

pd.set_option("display.width", 200)
pd.set_option("display.max_columns", 40)
SWEEP = Path(os.environ.get("DLM_SWEEP", "runs/multirun"))
print(f"reading runs under {SWEEP.resolve()}")

# %% [markdown]
# ## The runs
# One row per run: the Hydra choices and overridden values, the status (a failed job is listed, not lost),
# and the final results. `label` names each run by what the sweep varied.

# %%
runs = load_runs(SWEEP)
varied = [c for c in varying_columns(runs) if c in ("method", "model", "schedule", "sampler", "data")] or \
    varying_columns(runs)[:3]
runs["label"] = runs[varied].fillna("-").astype(str).agg(" ".join, axis=1) if varied else runs["name"].astype(str)
repeated = runs["label"].duplicated(keep=False)
runs.loc[repeated, "label"] += " (" + runs.loc[repeated, "run_dir"].map(lambda p: Path(p).name) + ")"
print(f"{len(runs)} runs; varied: {', '.join(varied) or 'nothing'}")
runs[["label", "status", *varied, "run_dir"]]

# %% [markdown]
# ## Final metrics

# %%
final_columns = [c for c in ("val/nll_bound", "val/ppl_bound", "eval/nll_bound", "eval/nll_bound_stderr",
                             "sample/valid_frac", "sample/prompted_acc", "sample/infill_acc",
                             "sample/unigram_entropy", "eval/gen_ppl", "train/tokens_seen", "wall_time_s")
                 if c in runs.columns]
final = runs.set_index("label")[["status", *final_columns]]
final

# %% [markdown]
# ## Training loss and validation NLL bound

# %%
metrics = load_metrics(runs, metrics=["train/loss", "val/nll_bound"])
metrics = metrics.merge(runs[["run_dir", "label"]], on="run_dir")
curves = metrics.pivot_table(index="step", columns=["metric", "label"], values="value")
if plt is not None and not metrics.empty:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, metric in zip(axes, ["train/loss", "val/nll_bound"]):
        for label, part in metrics[metrics["metric"] == metric].groupby("label"):
            ax.plot(part["step"], part["value"], marker="." if metric.startswith("val") else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(metric + " (nats/token)")
        ax.legend(fontsize=8)
    plt.tight_layout()
    plt.show()
curves.tail()

# %% [markdown]
# ## RL reward curves
# `method=grpo` runs (recipes/grpo.md) log the rollouts' mean reward `rl/reward_mean` every step (with `rl/kl` to
# the frozen start); their fresh end-of-fit samples' `sample/valid_frac` is in the final metrics above.

# %%
rl = load_metrics(runs, metrics=["rl/reward_mean", "rl/kl"]).merge(runs[["run_dir", "label"]], on="run_dir")
if rl.empty:
    print("no method=grpo runs here (no rl/reward_mean)")
elif plt is not None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric in zip(axes, ["rl/reward_mean", "rl/kl"]):
        for label, part in rl[rl["metric"] == metric].groupby("label"):
            # a 10-step running mean: one step's binary rewards are noisy
            ax.plot(part["step"], part["value"].rolling(10, min_periods=1).mean(), label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(metric + " (10-step mean)")
        if metric == "rl/kl":
            ax.set_yscale("symlog")  # it spans 0 to 1e11 across runs
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.15))
    plt.tight_layout()
    plt.show()
rl.pivot_table(index="step", columns=["metric", "label"], values="value").tail() if not rl.empty else rl

# %% [markdown]
# ## Quality vs sampling steps
# Each `python -m dlm.evaluate run=<run> steps=N` adds a row to the run's `eval.jsonl`.

# %%
evals = load_evals(runs)
if "sampler/steps" in evals.columns and not evals.empty:
    evals = evals.merge(runs[["run_dir", "label"]], on="run_dir")
    quality = [c for c in ("sample/valid_frac", "sample/prompted_acc", "sample/infill_acc", "gen_ppl")
               if c in evals.columns]
    table = evals.groupby(["label", "sampler", "sampler/steps"])[quality].mean()
    if plt is not None and quality:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for (label, sampler), part in evals.groupby(["label", "sampler"]):
            part = part.sort_values("sampler/steps")
            ax.plot(part["sampler/steps"], part[quality[0]], marker="o", label=f"{label} ({sampler})")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(quality[0])
        ax.legend(fontsize=8)
        plt.show()
else:
    table = pd.DataFrame()
    print("no evaluations yet: run `python -m dlm.evaluate run=<run> steps=N` for a few N")
table

# %% [markdown]
# ## Samples side by side

# %%
samples = load_samples(runs).merge(runs[["run_dir", "label"]], on="run_dir")
if samples.empty:
    side_by_side = pd.DataFrame()
else:
    samples["shown"] = samples["text"].astype(str) + samples["valid"].map({True: " ✓", False: ""}).fillna("")
    side_by_side = samples.pivot_table(index=["kind", "index"], columns="label", values="shown", aggfunc="first")
side_by_side.head(24)

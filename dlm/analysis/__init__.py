"""Run comparison: load run and sweep folders (and wandb runs) into tidy pandas DataFrames.

    from dlm.analysis import load_runs, load_metrics, load_samples
    runs = load_runs("runs/multirun/mdlm-tiny/2025-01-01_12-00-00")   # one row per run
    curves = load_metrics(runs)                                       # long: run_dir, step, metric, value
"""

from dlm.analysis.runs import (
    CHOICE_GROUPS,
    find_runs,
    load_evals,
    load_metrics,
    load_runs,
    load_samples,
    load_wandb_runs,
    varying_columns,
)

__all__ = [
    "CHOICE_GROUPS",
    "find_runs",
    "load_evals",
    "load_metrics",
    "load_runs",
    "load_samples",
    "load_wandb_runs",
    "varying_columns",
]

"""The number of torch intra-op threads a run uses, and the one line that says why.

Order: the config key ``threads`` > ``OMP_NUM_THREADS`` > the default rule. The rule (CPU runs on a host of at most
``SMALL_HOST`` cores; elsewhere torch's own default is kept): as many threads as there are free cores, from the
1-minute load average, at least one. An intra-op pool wider than the free cores waits at every op for a thread the
scheduler has parked; measured on 2 cores (benchmarks/threads.py, a training step of model=tiny 0.43 M and
model=small 9.4 M parameters): near idle (load 0.6-1.0) 2 threads took 0.61x / 0.55x the time of 1, under load
(about 5 on 2 cores) 24x / 6.9x. Model size did not change the better count in that range, so the rule reads the
load only.
"""

from __future__ import annotations

import os

from dlm.config import ConfigError

SMALL_HOST = 8  # cores: larger hosts keep torch's default (physical cores), which is fine when they are not shared


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(configured, env: str | None, cores: int, load: float, cpu_run: bool) -> tuple[int | None, str]:
    """(threads or None for torch's default, the reason). ``configured``: the config key; ``env``: OMP_NUM_THREADS."""
    if configured is not None:
        if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
            raise ConfigError([f"threads must be an integer >= 1 or null (the default rule), got {configured!r}"])
        return configured, "the config key threads"
    if env is not None and env.strip():
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError([f"OMP_NUM_THREADS must be an integer >= 1, got {env!r} (or unset it; or set threads=N)"])
        return n, "OMP_NUM_THREADS"
    if not cpu_run or cores > SMALL_HOST:
        return None, "torch's default"
    n = max(1, min(cores, round(cores - load)))
    return n, f"{cores} cores, 1-minute load {load:.1f}: the free cores; threads=N or OMP_NUM_THREADS to choose"


def apply_threads(cfg) -> int:
    """Set torch's intra-op threads for this run from ``cfg`` (see the module) and print the choice in one line."""
    import torch  # lazily: start-up: the policy is computed before torch is needed

    trainer = cfg.get("trainer") or {}
    cpu_run = str(trainer.get("accelerator", "cpu")) == "cpu"
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    n, reason = choose_threads(cfg.get("threads"), os.environ.get("OMP_NUM_THREADS"), host_cores(), load, cpu_run)
    if n is not None:
        torch.set_num_threads(n)
    print(f"threads: {torch.get_num_threads()} ({reason})")
    return torch.get_num_threads()

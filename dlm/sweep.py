"""Sweeps (``python -m dlm.train -m ...``): the sweep folder, and a one-table summary when the sweep ends.

The default sweep folder is ``<output_root>/multirun/<time>`` (claimed atomically, like a run folder): it cannot
depend on the run name, which is job-specific (``method=mdlm,sundae`` names two runs) and only known inside a job.
When the sweep ends, :class:`SweepSummary` (a Hydra callback, conf/train.yaml) prints one row per job: its
overrides, status and key metrics, read from each job's results.json; the CLI then exits non-zero when any job
failed (:func:`failed_jobs`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

_METRICS = ("global_step", "val/nll_bound", "val/loss", "sample/valid_frac", "wall_time_s")
_last: dict[str, Any] = {}  # the summary of the sweep that ended last in this process


def summary_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job of the sweep: job number, overrides, status and the key metrics of its results.json."""
    from dlm.analysis import load_runs  # lazily: start-up: pandas, at the end of a sweep only

    rows = []
    for record in load_runs(sweep_dir).to_dict("records"):
        row = {"job": record.get("job_num"), "overrides": (record.get("overrides") or "").split(),
               "status": record["status"]}
        row.update({k: record.get(k) for k in _METRICS})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["job"] is None, r["job"] if r["job"] is not None else 0))


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a plain-text table; overrides shared by every job are said once above it."""

    def cell(value: Any) -> str:
        if value is None or value != value:  # None, NaN
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    common = set.intersection(*(set(r["overrides"]) for r in rows)) if rows else set()
    columns = ["job", "overrides", *_METRICS, "status"]  # status last: a failure says why at length
    cells = [[cell(r.get(c)) if c != "overrides" else " ".join(o for o in r[c] if o not in common) or "-"
              for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [f"every job: {' '.join(o for o in rows[0]['overrides'] if o in common)}"] if common else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def job_failed(status: str | None) -> bool:
    return status not in ("completed", "interrupted")


class SweepSummary(Callback):
    """Prints the sweep's table when it ends and remembers how many jobs failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _last.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            rows = summary_rows(sweep_dir)
        except Exception as err:  # noqa: BLE001 - a summary must never hide the sweep's own outcome
            print(f"sweep: no summary ({type(err).__name__}: {err})", file=sys.stderr)
            return
        failed = [r for r in rows if job_failed(r["status"])]
        _last.update(sweep_dir=sweep_dir, jobs=len(rows), failed=len(failed))
        print(f"\nsweep {sweep_dir}: {len(rows)} jobs, {len(failed)} failed\n{format_table(rows)}", flush=True)


def failed_jobs() -> int:
    """How many jobs of the sweep that ended last in this process failed (0 when none ran)."""
    return int(_last.get("failed", 0))

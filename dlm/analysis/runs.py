"""Run and sweep folders (as written by `python -m dlm.train [-m]`) as tidy pandas DataFrames.

`path` arguments accept a run folder, a sweep folder (`<output_root>/multirun/<name>/<time>/`), any folder
above them (every run below is found), a list of those, or a DataFrame returned by `load_runs`.

* `load_runs`    one row per run: the group choices (method, model, schedule, sampler, ...), the overridden
                 config values, `status`, the final results (results.json, `eval/...` included), `run_dir`.
                 A job that failed before writing results.json is kept, with status `failed`.
* `load_metrics` metrics.csv of every run, long: run_dir, step, metric, value, plus the choice columns.
* `load_samples` samples.jsonl (and eval_samples.jsonl) rows, plus the choice columns.
* `load_evals`   every `python -m dlm.evaluate` of every run (eval.jsonl), e.g. quality vs sampling steps.
* `load_wandb_runs` the same table from the wandb API (online only).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from dlm.run import load_config, run_choices, run_overrides
from dlm.run_folder import RunFolder

CHOICE_GROUPS = ("method", "model", "schedule", "sampler", "data", "trainer", "optimizer", "lr_scheduler",
                 "experiment")
_BASE_COLUMNS = ("run_dir", "name", "sweep_dir", "job_num", "overrides", "status")

PathLike = str | Path


def find_runs(path: PathLike | Iterable[PathLike] | pd.DataFrame) -> list[Path]:
    """Every run folder (one holding .hydra/config.yaml) at or below the given path(s), sorted."""
    if isinstance(path, pd.DataFrame):
        return [Path(p) for p in path["run_dir"]]
    if isinstance(path, (str, Path)):
        paths = [Path(path).expanduser()]
    else:
        paths = [Path(p).expanduser() for p in path]
    found: set[Path] = set()
    for root in paths:
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such folder (set DLM_SWEEP or pass a run or sweep folder)")
        if RunFolder(root).is_run():
            found.add(root.resolve())
            continue
        for config in root.rglob(".hydra/config.yaml"):
            if "wandb" not in config.parts:
                found.add(config.parent.parent.resolve())
    return sorted(found, key=_run_sort_key)


def _run_sort_key(run_dir: Path) -> tuple:
    job = run_dir.name
    return (str(run_dir.parent), int(job) if job.isdigit() else 0, job)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _override_keys(overrides: list[str]) -> dict[str, str]:
    """key -> value of the plain `key=value` overrides that are not group choices (e.g. trainer.max_steps)."""
    out = {}
    for override in overrides:
        if "=" not in override:
            continue
        key, value = override.split("=", 1)
        key = key.lstrip("+~")
        if "/" in key or key in CHOICE_GROUPS or key.startswith("hydra") or "." not in key and key not in (
                "seed", "name"):
            continue
        out[key] = value
    return out


def _run_row(run_dir: Path, config_keys: Iterable[str]) -> dict[str, Any]:
    hydra_file = RunFolder(run_dir).hydra
    hydra_node = OmegaConf.load(hydra_file).get("hydra") if hydra_file.is_file() else None
    multirun = hydra_node is not None and str(OmegaConf.select(hydra_node, "mode", default="")).endswith("MULTIRUN")
    choices = run_choices(run_dir)
    overrides = run_overrides(run_dir)
    row: dict[str, Any] = {
        "run_dir": str(run_dir),
        "sweep_dir": str(run_dir.parent) if multirun else None,
        "job_num": OmegaConf.select(hydra_node, "job.num", default=None) if multirun else None,
        "overrides": " ".join(overrides),
    }
    for group in CHOICE_GROUPS:
        row[group] = choices.get(group)
    cfg = None
    try:
        cfg = load_config(run_dir)
        row["name"] = cfg.get("name")
    except Exception:  # noqa: BLE001 - an unreadable config still gives a row
        row["name"] = None
    values = _override_keys(overrides)
    for key in config_keys:
        values[key] = None
    for key in values:
        value = None
        if cfg is not None:
            try:
                value = OmegaConf.select(cfg, key, default=None)
            except Exception:  # noqa: BLE001 - an interpolation that cannot be resolved here
                value = values[key]
        if not isinstance(value, (str, int, float, bool, type(None))):
            value = str(value)
        row[key] = value
    results = _read_json(RunFolder(run_dir).results)
    row["status"] = results.pop("status", None) or ("failed" if not results else "unknown")
    row.update(results)
    return row


def load_runs(path: PathLike | Iterable[PathLike] | pd.DataFrame, config_keys: Iterable[str] = ()) -> pd.DataFrame:
    """One row per run: choices, overridden values (plus `config_keys`, dotted config paths such as
    "sampler.steps"), status, final results and run_dir."""
    config_keys = list(config_keys)
    rows = [_run_row(run_dir, config_keys) for run_dir in find_runs(path)]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(_BASE_COLUMNS) + list(CHOICE_GROUPS))
    return frame


def _with_choices(frame: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in ("run_dir", "name", "job_num", *CHOICE_GROUPS, *varying_columns(runs)) if c in runs.columns]
    keep = [c for c in dict.fromkeys(keep) if c == "run_dir" or c not in frame.columns]  # the frame's own win
    return frame.merge(runs[keep], on="run_dir", how="left")


def load_metrics(path: PathLike | Iterable[PathLike] | pd.DataFrame, metrics: Iterable[str] | None = None
                 ) -> pd.DataFrame:
    """metrics.csv of every run as a long table: run_dir, step, metric, value (+ the runs' choice columns)."""
    runs = path if isinstance(path, pd.DataFrame) else load_runs(path)
    wanted = set(metrics) if metrics is not None else None
    parts = []
    for run_dir in runs["run_dir"]:
        csv_path = RunFolder(run_dir).metrics
        if not csv_path.is_file():
            continue
        table = pd.read_csv(csv_path)
        value_columns = [c for c in table.columns if c not in ("step", "epoch")
                         and (wanted is None or c in wanted)]
        long = table.melt(id_vars=["step"], value_vars=value_columns, var_name="metric", value_name="value")
        long = long.dropna(subset=["value"])
        long["run_dir"] = str(run_dir)
        parts.append(long)
    if not parts:
        return pd.DataFrame(columns=["run_dir", "step", "metric", "value"])
    frame = pd.concat(parts, ignore_index=True)
    frame["step"] = frame["step"].astype(int)
    frame = frame.groupby(["run_dir", "metric", "step"], as_index=False)["value"].last()
    return _with_choices(frame, runs)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_samples(path: PathLike | Iterable[PathLike] | pd.DataFrame, source: str = "train") -> pd.DataFrame:
    """samples.jsonl rows (source="train"), eval_samples.jsonl (source="eval") or both ("all"), with a
    `source` column and the runs' choice columns."""
    files = {"train": ["samples.jsonl"], "eval": ["eval_samples.jsonl"],
             "all": ["samples.jsonl", "eval_samples.jsonl"]}
    if source not in files:
        raise ValueError(f"source={source!r}; valid: {', '.join(files)}")
    runs = path if isinstance(path, pd.DataFrame) else load_runs(path)
    rows = []
    for run_dir in runs["run_dir"]:
        for name in files[source]:
            for i, row in enumerate(_read_jsonl(Path(run_dir) / name)):
                rows.append({"run_dir": str(run_dir), "source": name.split("_")[0].replace("samples.jsonl", "train"),
                             "index": i, **row})
    if not rows:
        return pd.DataFrame(columns=["run_dir", "source", "index", "kind", "prompt", "text", "valid"])
    return _with_choices(pd.DataFrame(rows), runs)


def load_evals(path: PathLike | Iterable[PathLike] | pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation (eval.jsonl, appended by `python -m dlm.evaluate`): the `eval/...` keys with
    the prefix dropped, plus the runs' choice columns. Compare, e.g., sample/valid_frac against sampler/steps."""
    runs = path if isinstance(path, pd.DataFrame) else load_runs(path)
    rows = []
    for run_dir in runs["run_dir"]:
        for i, row in enumerate(_read_jsonl(Path(run_dir) / "eval.jsonl")):
            rows.append({"run_dir": str(run_dir), "eval_index": i,
                         **{k.removeprefix("eval/"): v for k, v in row.items()}})
    if not rows:
        return pd.DataFrame(columns=["run_dir", "eval_index"])
    return _with_choices(pd.DataFrame(rows), runs)


def varying_columns(runs: pd.DataFrame) -> list[str]:
    """The choice and overridden-config columns whose value differs between runs (what a sweep varied)."""
    if runs.empty:
        return []
    candidates = [c for c in runs.columns if c in CHOICE_GROUPS or "." in c and c.split("/")[0] not in (
        "train", "val", "sample", "eval") and "/" not in c]
    return [c for c in candidates if runs[c].astype(str).nunique(dropna=False) > 1]


def load_wandb_runs(project: str, entity: str | None = None, group: str | None = None,
                    config_keys: Iterable[str] = ()) -> pd.DataFrame:
    """The runs of a wandb project (optionally one group: a sweep) from the wandb API: needs network and
    credentials. Columns: the logged `choices`, `config_keys` (dotted), the summary, `wandb_id`, `group`."""
    import wandb  # lazily: only for the online API

    api = wandb.Api()
    filters = {"group": group} if group else None
    rows = []
    for run in api.runs(f"{entity}/{project}" if entity else project, filters=filters):
        config = dict(run.config)
        row: dict[str, Any] = {"wandb_id": run.id, "name": run.name, "group": run.group, "state": run.state}
        row.update(config.get("choices") or {})
        for key in config_keys:
            node: Any = config
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            row[key] = node
        row.update({k: v for k, v in run.summary.items() if not k.startswith("_")})
        rows.append(row)
    return pd.DataFrame(rows)

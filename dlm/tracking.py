"""Experiment tracking: wandb on every run without ever blocking it (online with credentials, offline
otherwise), and metrics.csv in the run folder."""

from __future__ import annotations

import csv
import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

_MODES = ("auto", "online", "offline", "disabled")


def wandb_credentials_present() -> bool:
    """True when an API key is in the environment or in ~/.netrc (where `wandb login` stores it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(str(netrc_path)).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def resolve_wandb_mode(mode: str = "auto") -> str:
    """auto → WANDB_MODE if set, else online with credentials, else offline."""
    if mode not in _MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is not one of {', '.join(_MODES)}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_credentials_present() else "offline"


def hydra_run_names() -> tuple[str | None, str | None]:
    """(group, name) for wandb from Hydra: a sweep's jobs share a group named after the sweep folder and are
    named by their overrides; a single run is grouped by its run name and named by its folder."""
    from hydra.types import RunMode

    from dlm.config import running_hydra_config

    hc = running_hydra_config()
    if hc is None:
        return None, None
    output_dir = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN:
        sweep = Path(hc.sweep.dir)
        return f"{sweep.parent.name}-{sweep.name}", hc.job.override_dirname or f"job{hc.job.num}"
    return output_dir.parent.name, f"{output_dir.parent.name}-{output_dir.name}"


def make_wandb_logger(
    project: str = "dlm",
    save_dir: str = ".",
    group: str | None = None,
    name: str | None = None,
    entity: str | None = None,
    mode: str = "auto",
    tags: list[str] | None = None,
    job_type: str = "train",
) -> WandbLogger:
    resolved = resolve_wandb_mode(mode)
    default_group, default_name = hydra_run_names()
    group, name = group or default_group, name or default_name
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if resolved == "offline":
        print(f"wandb: no credentials found, logging offline to {save_dir}/wandb (upload later: wandb sync {save_dir}/wandb/offline-run-*)")
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        group=group,
        name=name,
        entity=entity,
        mode=resolved,
        tags=list(tags or []),
        job_type=job_type,
        # Never let a slow or absent server hold up training.
        settings={"init_timeout": 60, "silent": True, "console": "off"},
    )


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (Lightning's writer deletes it), so a resumed run extends its history."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(header)


class RunCSVLogger(CSVLogger):
    """metrics.csv (and hparams.yaml) directly in the run folder, appended to when the run is resumed."""

    def __init__(self, save_dir: str) -> None:
        super().__init__(save_dir=save_dir, name="", version="")

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

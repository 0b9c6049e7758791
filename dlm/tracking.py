"""Experiment tracking: wandb on every run without ever blocking it (online with credentials and a reachable
server, offline otherwise, and offline again if an online start fails), continuing the run folder's wandb run
when the run is resumed; and metrics.csv in the run folder."""

from __future__ import annotations

import configparser
import csv
import netrc
import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from dlm.config import running_hydra_config

_MODES = ("auto", "online", "offline", "disabled")
DEFAULT_BASE_URL = "https://api.wandb.ai"  # when the installed wandb names no default
PROBE_TIMEOUT_S = 3.0  # how long the server may take to answer before the run goes offline
INIT_TIMEOUT_S = 30  # an online start past a good probe; a failure then falls back offline (wandb's default: 90)
RUN_ID_FILE = "run_id"  # <save_dir>/wandb/run_id: the run folder's wandb run, continued when the run resumes
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def wandb_credentials_present() -> bool:
    """True when an API key (or identity token file) is in the environment, or ~/.netrc (where `wandb login`
    stores it) holds a key for the server wandb will use or for any wandb host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(str(netrc_path)).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    server = urlsplit(wandb_base_url()).hostname
    return any(host == server or "wandb" in host for host in hosts)


def resolve_wandb_mode(mode: str = "auto") -> str:
    """auto → WANDB_MODE if set, else online with credentials, else offline."""
    if mode not in _MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is not one of {', '.join(_MODES)}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_credentials_present() else "offline"


def wandb_base_url() -> str:
    """The server wandb will use: WANDB_BASE_URL, else the host `wandb login --host` saved in wandb's settings files
    (./wandb/settings, then $WANDB_CONFIG_DIR or ~/.config/wandb), else the installed wandb's default."""
    url = os.environ.get("WANDB_BASE_URL")
    if not url:
        config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
        for path in (Path("wandb") / "settings", config_dir / "settings"):
            parser = configparser.ConfigParser()
            try:
                parser.read(path)
            except (configparser.Error, OSError):
                continue
            url = parser.get("default", "base_url", fallback=None)
            if url:
                break
    if not url:
        try:
            from wandb.sdk.lib.urls import (
                DEFAULT_BASE_URL as url,  # lazily: start-up: wandb is a slow import, only when a wandb logger is built
            )
        except ImportError:  # another wandb layout
            url = DEFAULT_BASE_URL
    return url.rstrip("/")


def probe_wandb_server(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the wandb server answers within ``timeout`` seconds, else why not. Any HTTP answer below 500
    counts (the server is there; credentials are wandb.init's business). Run in a thread so that a slow DNS
    lookup, which urllib's timeout does not bound, cannot hold the run either."""
    url = url or wandb_base_url()
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/healthz"), timeout=timeout):
                outcome.append(None)
        except urllib.error.HTTPError as err:
            outcome.append(None if err.code < 500 else f"it answered HTTP {err.code}")
        except TimeoutError:
            outcome.append(f"no answer within {timeout:g} s")
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            outcome.append(f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__)

    thread = threading.Thread(target=probe, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def choose_wandb_mode(mode: str = "auto") -> tuple[str, str]:
    """(mode, why it is offline) for a wandb run: online is kept only when the server answers (a short probe);
    an explicit online (WANDB_MODE=online, logger.wandb.mode=online) falls back too, since losing the live
    dashboard costs less than losing the run, and the offline run syncs later."""
    resolved = resolve_wandb_mode(mode)
    if resolved == "online":
        if not wandb_credentials_present():  # wandb would ask for a key on a terminal (blocking) or fail elsewhere
            return "offline", "online asked for, but no credentials found: WANDB_API_KEY or `wandb login`"
        problem = probe_wandb_server()
        return ("offline", f"{wandb_base_url()} unreachable: {problem}") if problem else ("online", "")
    if resolved in ("offline", "dryrun"):
        if mode != "auto":
            return resolved, f"logger.wandb.mode={mode}"
        if os.environ.get("WANDB_MODE"):
            return resolved, f"WANDB_MODE={os.environ['WANDB_MODE']}"
        return resolved, "no credentials found"
    return resolved, ""


def offline_note(reason: str, save_dir: str | Path, run_id: str | None) -> str:
    """The one line saying that wandb logs offline, why, where, and how to upload it later."""
    sync_id = f"--id {run_id} " if run_id else ""
    return (f"wandb: offline ({reason}): logging to {save_dir}/wandb; upload later with "
            f"`wandb sync {sync_id}{save_dir}/wandb/offline-run-*`")


def existing_run_id(save_dir: str | Path) -> str | None:
    """The wandb run id of a run folder: dlm's <save_dir>/wandb/run_id, else the newest wandb run folder's name
    (`[offline-]run-<time>-<id>`), else None (no wandb run there yet)."""
    wandb_dir = Path(save_dir) / "wandb"
    try:
        recorded = (wandb_dir / RUN_ID_FILE).read_text().strip()
    except OSError:
        recorded = ""
    if _RUN_ID.match(recorded):
        return recorded
    # [offline-]run-<YYYYmmdd_HHMMSS>-<id>, with -<k> added by wandb when a start in the same second took the name
    found = sorted((m.group(1), m.group(2)) for p in wandb_dir.glob("*run-*-*") if p.is_dir()
                   and (m := re.search(r"run-(\d{8}_\d{6})-([a-z0-9]+)(?:-\d+)?$", p.name)))
    return found[-1][1] if found else None


def record_run_id(save_dir: str | Path, run_id: str) -> None:
    path = Path(save_dir) / "wandb" / RUN_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")


def hydra_run_names() -> tuple[str | None, str | None]:
    """(group, name) for wandb from Hydra: a sweep's jobs share a group named after the sweep folder and are
    named by their overrides; a single run is grouped by its run name and named by its folder."""


    hc = running_hydra_config()
    if hc is None:
        return None, None
    output_dir = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN:
        sweep = Path(hc.sweep.dir)
        return f"{sweep.parent.name}-{sweep.name}", hc.job.override_dirname or f"job{hc.job.num}"
    return output_dir.parent.name, f"{output_dir.parent.name}-{output_dir.name}"


class RunWandbLogger(WandbLogger):
    """Lightning's WandbLogger, deciding when the run starts (on rank zero only, where the experiment lives):
    online only when the server answers a short probe, and offline again when an online start fails anyway; it
    continues the run folder's wandb run (the same id, resume="allow"), so a resumed run stays one wandb run."""

    def __init__(self, mode: str = "auto", **kwargs) -> None:
        if mode not in _MODES:
            raise ValueError(f"logger.wandb.mode={mode!r} is not one of {', '.join(_MODES)}")
        super().__init__(**kwargs)
        self._requested_mode = mode
        self._wandb_init.pop("anonymous", None)  # Lightning passes anonymous=None: wandb warns on every start

    @property
    @rank_zero_experiment
    def experiment(self):
        import wandb  # lazily: start-up: wandb is a slow import, only when a wandb logger is built
        from wandb.sdk.lib.runid import (
            generate_id,  # lazily: start-up: wandb is a slow import, only when a wandb logger is built
        )

        if self._experiment is not None:
            return self._experiment
        save_dir = self._wandb_init["dir"]
        run_id = self._wandb_init.get("id") or existing_run_id(save_dir) or generate_id()
        self._wandb_init["id"] = self._id = run_id
        mode, reason = choose_wandb_mode(self._requested_mode)
        self._wandb_init["mode"] = mode
        if reason:
            print(offline_note(reason, save_dir, run_id), flush=True)
        try:
            experiment = super().experiment
        except Exception as err:  # noqa: BLE001 - no tracking failure may stop a run: keep the data locally
            if mode != "online":
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            print(offline_note(f"online start failed: {type(err).__name__}: {first}", save_dir, run_id), flush=True)
            wandb.teardown()  # the failed start still holds the run id in wandb's service process
            self._experiment = None
            self._wandb_init["mode"] = "offline"
            experiment = super().experiment
        if self._wandb_init["mode"] != "disabled":
            record_run_id(save_dir, experiment.id)
        return experiment


def make_wandb_logger(
    project: str = "dlm",
    save_dir: str = ".",
    group: str | None = None,
    name: str | None = None,
    entity: str | None = None,
    mode: str = "auto",
    tags: list[str] | None = None,
    job_type: str = "train",
) -> RunWandbLogger:
    default_group, default_name = hydra_run_names()
    group, name = group or default_group, name or default_name
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return RunWandbLogger(
        mode=mode,
        project=project,
        save_dir=save_dir,
        group=group,
        name=name,
        entity=entity,
        tags=list(tags or []),
        job_type=job_type,
        settings={"init_timeout": INIT_TIMEOUT_S, "silent": True, "console": "off"},
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

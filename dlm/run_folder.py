"""The run folder: its layout, claiming a fresh one atomically, and the records written into it.

    <run_dir>/.hydra/{config,hydra,overrides}.yaml   what the run used (written once the run's checks passed)
    <run_dir>/checkpoints/last.ckpt                  and best-*.ckpt
    <run_dir>/metrics.csv  results.json  samples.jsonl  resumes.jsonl  wandb/  hf/

Two runs of one name started in the same second must not share a folder: :func:`claim_run_dir` creates the
timestamped folder with ``mkdir(exist_ok=False)`` and takes the next free suffix (``-1``, ``-2``, ...) when the name
is taken. A folder claimed by this process that holds nothing of a run yet (a dry run, a config refused before
training) is removed again by :func:`release_run_dir`, so no empty run folders are left behind.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

HYDRA_DIR = ".hydra"
CHECKPOINTS = "checkpoints"
LAST_CKPT = "last.ckpt"
RESULTS = "results.json"
METRICS = "metrics.csv"
RESUMES = "resumes.jsonl"


class RunFolder:
    """The paths of one run folder (``RunFolder(run_dir).last_ckpt``): the one place that knows the layout."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    hydra_dir = property(lambda self: self.path / HYDRA_DIR)
    config = property(lambda self: self.path / HYDRA_DIR / "config.yaml")
    hydra = property(lambda self: self.path / HYDRA_DIR / "hydra.yaml")
    overrides = property(lambda self: self.path / HYDRA_DIR / "overrides.yaml")
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    last_ckpt = property(lambda self: self.path / CHECKPOINTS / LAST_CKPT)
    results = property(lambda self: self.path / RESULTS)
    metrics = property(lambda self: self.path / METRICS)
    resumes = property(lambda self: self.path / RESUMES)

    def is_run(self) -> bool:
        """Whether the folder holds a run (its composed config)."""
        return self.config.is_file()


_claimed: dict[str, Path] = {}  # parent -> the folder this process claimed under it for the run in progress
_created_parents: set[str] = set()  # folders above a claimed one that the claim created


def claim_run_dir(parent: str | Path) -> Path:
    """``parent/<time>`` (``%Y-%m-%d_%H-%M-%S``), created now; ``parent/<time>-<k>`` for the smallest free k when
    another run holds it. Asked again in this process (Hydra resolves the run folder more than once) it returns the
    folder it already claimed, until :func:`forget_claims`."""
    key = str(parent)
    if key in _claimed:
        return _claimed[key]
    missing = [p for p in (Path(parent), *Path(parent).parents) if not p.exists()]
    _created_parents.update(str(p.resolve()) for p in missing)  # released with the folder when left empty
    Path(parent).mkdir(parents=True, exist_ok=True)
    stem = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for k in range(10_000):
        folder = Path(parent, stem if k == 0 else f"{stem}-{k}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        _claimed[key] = folder
        return folder
    raise RuntimeError(f"{parent}: no free run folder named {stem}-<k>")


def sweep_dir_for(parent: str) -> str:
    """A new sweep folder ``parent/<time>`` (``-<k>`` when a sweep started in the same second holds it): the
    ``dlm_sweep_dir`` resolver of conf/train.yaml."""
    return str(claim_run_dir(Path(parent)))


def forget_claims() -> None:
    """End of a run in this process: the next run claims a folder of its own (tests run several in one process)."""
    _claimed.clear()


def release_run_dir(run_dir: str | Path) -> bool:
    """Remove ``run_dir`` when this process claimed it and nothing of a run was written into it (only Hydra's own
    files, if any). Returns whether it was removed."""
    run_dir = Path(run_dir).resolve()
    if run_dir not in {p.resolve() for p in _claimed.values()} or not run_dir.is_dir():
        return False
    if any(p.name not in (HYDRA_DIR, "train.log") for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:  # the name and output folders the claim created, when nothing else is in them
        if str(parent) not in _created_parents:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty (another run), or gone
            break
    return True


def write_hydra_record(run_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """``.hydra/config.yaml`` (the task config, interpolations kept), ``hydra.yaml`` and ``overrides.yaml``, as
    Hydra writes them at job start; dlm writes them itself once the run's checks passed, so a refused resume never
    rewrites the record of the run it named."""
    folder = RunFolder(run_dir).hydra_dir
    folder.mkdir(parents=True, exist_ok=True)
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    files = {"config.yaml": task, "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
             "overrides.yaml": hydra_cfg.overrides.task}
    for name, node in files.items():
        _atomic_write(folder / name, OmegaConf.to_yaml(node))


def append_resume_record(run_dir: Path, checkpoint: str, step: int, overrides: list[str]) -> None:
    """One line per resume in ``resumes.jsonl``: when, from which checkpoint and step, with which overrides."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": checkpoint, "step": step,
              "overrides": list(overrides)}
    with open(RunFolder(run_dir).resumes, "a") as f:
        f.write(json.dumps(record) + "\n")


def drop_metrics_after(run_dir: Path, step: int) -> int:
    """Remove the rows of ``metrics.csv`` logged after ``step`` (a resume from that step logs them again).
    Returns the number of rows dropped."""
    path = RunFolder(run_dir).metrics
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        rows = list(reader)
    if not header or "step" not in header:
        return 0
    at = header.index("step")
    kept = [r for r in rows if not (len(r) > at and r[at].strip() and float(r[at]) > step)]
    if len(kept) == len(rows):
        return 0
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(kept)
    os.replace(tmp, path)
    return len(rows) - len(kept)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

"""The work a run does after its last step, one line per stage with its time (issue #17): the samples (printed by
dlm/callbacks/samples.py, inside fit), the final validation, the last checkpoint and the export. Each can be
trimmed by config except the checkpoint (a resume needs it):

    end_of_run.validate=false   no validation at the last step when the schedule's last one was earlier
    end_of_run.export=false     no <run_dir>/hf export
    samples.num_unconditional=0 samples.num_prompted=0 samples.num_infill=0   no samples
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Stage:
    """What a stage says after its time (``detail``), or that it was skipped and why (``skipped``)."""

    detail: str = ""
    skipped: str = ""


def line(name: str, seconds: float | None, detail: str = "") -> str:
    took = "" if seconds is None else f" {seconds:.1f} s"
    return f"end of run: {name}{took}{' ' + detail if detail else ''}"


@contextmanager
def stage(name: str, show: bool = True) -> Iterator[Stage]:
    """``with stage("export", show=rank == 0) as s: ...``: one line when it ends, ``end of run: export 1.2 s -> ...``
    (``s.detail``), or ``end of run: export skipped (...)`` when the body set ``s.skipped``."""
    start = time.perf_counter()
    s = Stage()
    yield s
    if show:
        print(line(name, None, f"skipped ({s.skipped})") if s.skipped else line(name, time.perf_counter() - start,
                                                                                 s.detail), flush=True)


def setting(cfg, key: str) -> bool:
    """``end_of_run.<key>`` (true when a config predates it)."""
    from omegaconf import OmegaConf

    return bool(OmegaConf.select(cfg, f"end_of_run.{key}", default=True))

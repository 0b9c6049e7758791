"""Stale torch C++-extension build locks. DeepSpeed builds its CPU ops (``shm_comm``, ``cpu_adam``) with torch's
``cpp_extension.load`` on first use; a build that is killed leaves ``<build dir>/<op>/lock`` behind, and every later
build of that op waits on the file forever (torch's ``FileBaton``) with no message: a 2-rank run that hangs at start.
A lock older than any build takes is named, with the fix, before DeepSpeed starts."""

from __future__ import annotations

import os
import time
from pathlib import Path

STALE_AFTER_S = 600.0  # a DeepSpeed CPU op builds in well under a minute; a lock this old has no build behind it


def extension_roots() -> list[Path]:
    """Where torch builds extensions: ``TORCH_EXTENSIONS_DIR`` (ops directly below it), else the default root with
    one ``py<ver>_<accelerator>`` folder per build flavour."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return [Path(explicit)]
    from torch.utils.cpp_extension import get_default_build_root

    return [p for p in Path(get_default_build_root()).glob("*") if p.is_dir()]


def stale_locks(now: float | None = None, older_than_s: float = STALE_AFTER_S) -> list[tuple[Path, float]]:
    """(lock file, age in seconds) of every build lock older than ``older_than_s``."""
    now = time.time() if now is None else now
    found = []
    for root in extension_roots():
        for lock in root.glob("*/lock"):
            try:
                age = now - lock.stat().st_mtime
            except FileNotFoundError:  # its build just finished
                continue
            if age > older_than_s:
                found.append((lock, age))
    return sorted(found)


def warn_stale_locks() -> list[str]:
    """Print (and return) one line per stale lock, from the first local process only."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return []
    lines = [f"warning: {lock} is a torch extension build lock {age / 60:.0f} min old: a killed build leaves one and "
             f"the next DeepSpeed start waits on it forever; if no build is running, delete it (rm {lock})"
             for lock, age in stale_locks()]
    for line in lines:
        print(line, flush=True)
    return lines

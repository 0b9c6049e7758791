"""Checkpoint files written atomically next to their target, never through $TMPDIR (``trainer.plugins``).

Lightning's TorchCheckpointIO serialises the whole checkpoint into memory and writes it through an fsspec
transaction, whose local files are first written to ``tempfile.mkstemp()``, i.e. $TMPDIR, then moved into place.
A process killed during that write leaves a partial checkpoint-sized file in $TMPDIR that nothing removes, and
where $TMPDIR is another file system the move is a copy into the final path, so a kill then can truncate last.ckpt.

Here a local checkpoint is streamed to a hidden temporary file in the target's own folder
(``.<name>.<random>.tmp``), flushed and fsynced, then renamed over the target (atomic on POSIX): a reader sees the
old file or the new one, never a part. A write that fails or is interrupted (an exception, KeyboardInterrupt)
removes its temporary file; one left by a kill -9 is removed by the next write of the same checkpoint. Remote paths
(s3://, ...) go through Lightning's own writer. DeepSpeed writes its ZeRO folders itself (not through this class).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp makes it 0600)


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """torch.save(obj, path) that leaves either the old file or the complete new one, and no temporary file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # Lightning's path: its own errors and remote writers
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

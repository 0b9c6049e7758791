"""Safe loading: no code runs from a checkpoint. Every load of a run's files goes through here — a Lightning
``.ckpt``, the EMA shadow in it, a DeepSpeed ZeRO checkpoint folder, cached data (``.npz``).

A checkpoint is a pickle, and unpickling may call any function the file names (``os.system``, ``builtins.exec``,
``subprocess.Popen``). So files are read with ``torch.load(weights_only=True)``: tensors, containers and numbers,
plus the short allowlist :data:`PLAIN_GLOBALS` of classes that dlm's own checkpoints hold and whose construction
only stores values (DeepSpeed's ZeRO optimizer states; pathlib paths). A file that asks for anything else is refused
with :class:`UnsafeCheckpointError`, naming the file and every global it asked for, before anything is loaded.

A global you trust can be allowed knowingly, for one command, by its dotted name:

    DLM_TRUSTED_GLOBALS=mypkg.scalers.MyScaler,collections.Counter python -m dlm.generate run=...

Names are matched as Python imports them (``os.system`` is the ``posix.system`` a Linux pickle names,
``subprocess.Popen`` the ``commands.Popen`` of torch's pickle protocol 2). Each name is imported and may then be
called by the file with any arguments: trust only what you would run yourself. Torch's restricted unpickler never
loads ``os``/``sys`` globals even when allowed; a file that needs one you trusted is loaded by the ordinary
unpickler, after the scan (which sees every global a torch checkpoint can name) showed it names nothing else.

DeepSpeed reads its ZeRO folders with its own, unrestricted unpickler, so :func:`check` first reads every file of
the folder with the restricted one (without running anything) and refuses the folder before DeepSpeed opens it.
An FSDP sharded folder (``trainer=fsdp``: torch.distributed.checkpoint, whose ``.metadata`` torch reads with plain
pickle and whose non-tensor entries with an unrestricted unpickler) is vetted the same way, entry by entry.

A file that is not a readable checkpoint (empty, truncated by an interrupted write, random bytes, a folder that is
not a ZeRO checkpoint) raises :class:`CorruptCheckpointError`, saying so, instead of torch's weights_only text.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import dataclasses
import importlib
import io
import os
import pickle
import re
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dlm.errors import UserError

__all__ = ["PLAIN_GLOBALS", "TRUSTED_ENV", "CheckpointError", "Checked", "CorruptCheckpointError",
           "UnsafeCheckpointError", "canonical", "check", "load_arrays", "load_checkpoint", "trusted_globals"]

TRUSTED_ENV = "DLM_TRUSTED_GLOBALS"

# Beyond torch's own weights_only set (tensors, OrderedDict, torch.Size, dtypes ...). Measured: Lightning checkpoints
# of every family (mdlm, ar, bd3lm, sundae, diffusionbert; native and HF backbones; callbacks=default, ema, a2d;
# bf16-mixed) need none of these; DeepSpeed ZeRO-2/-3 optimizer-state files and FSDP sharded folders need those
# marked "measured". Each is a class whose construction only stores its arguments (a weights_only unpickler may call
# an allowed class with the file's arguments, so no function, and no class that acts when built, is ever listed).
PLAIN_GLOBALS: dict[str, str] = {
    "deepspeed.runtime.zero.config.ZeroStageEnum": "an int enum: the ZeRO stage (measured, ZeRO-2 and ZeRO-3)",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": "the static loss scale, one float (measured, ZeRO-2/-3)",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": "the fp16 loss scale and its counters (16-mixed runs)",
    "deepspeed.utils.tensor_fragment.fragment_address": "a dataclass of two ints (measured, ZeRO-2)",
    "pathlib.PosixPath": "a path (measured: the checkpoint_id in an FSDP sharded folder's .metadata)",
    "pathlib.WindowsPath": "the same path, written on Windows",
}

_BLOCKED = ("os", "sys", "posix", "nt")  # torch's weights_only unpickler refuses these modules even when allowed


class CheckpointError(UserError):
    """A checkpoint that dlm will not load; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """The file asks for globals (functions, classes) outside the allowlist: loading it could run code."""

    def __init__(self, path: Path | str, names: list[str]):
        self.path, self.names = Path(path), sorted(set(names))
        super().__init__(
            f"{self.path}: refused to load: the checkpoint asks for {', '.join(self.names)}, outside dlm's "
            f"allowlist of plain types (loading it could run code). If you trust this file and its source, allow "
            f"them knowingly for one command with {TRUSTED_ENV}={','.join(self.names)} (see dlm/safe_load.py); "
            f"otherwise use another checkpoint (ckpt=best, an earlier one) or retrain"
        )


class CorruptCheckpointError(CheckpointError):
    """The file (or folder) is not a readable checkpoint."""

    def __init__(self, path: Path | str, what: str):
        self.path = Path(path)
        super().__init__(
            f"{self.path}: {what}; use another checkpoint (ckpt=best, an earlier one in its checkpoints/ folder, "
            f"or ckpt_path= another run's) or retrain"
        )


# ---- the allowlist ---------------------------------------------------------------------------------------------
def _key(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def canonical(name: str) -> str:
    """The importable name of a global as a pickle names it: torch.save writes protocol 2, which spells some
    modules the Python 2 way (``subprocess.Popen`` as ``commands.Popen``), and ``os.system`` is ``posix.system``."""
    head, dot, rest = name.partition(".")
    head = _compat_pickle.IMPORT_MAPPING.get(head, head)
    return ("os" if head in ("posix", "nt") else head) + dot + rest


def _resolve(name: str) -> Any:
    """The object of a dotted name (``module.Class`` or ``module.Class.Inner``); None when it does not import."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def trusted_globals() -> dict[str, Any]:
    """The globals named in ``DLM_TRUSTED_GLOBALS`` (comma-separated dotted names), by canonical name."""
    found: dict[str, Any] = {}
    for name in (n.strip() for n in os.environ.get(TRUSTED_ENV, "").split(",")):
        if not name:
            continue
        obj = _resolve(canonical(name))
        if obj is None:
            raise UserError(f"{TRUSTED_ENV}: {name!r} does not import; give dotted names such as "
                            f"mypkg.module.ClassName, separated by commas")
        found[canonical(name)] = obj
        with contextlib.suppress(AttributeError):
            found[canonical(_key(obj))] = obj
    return found


@dataclasses.dataclass(frozen=True)
class Checked:
    """What a checked checkpoint needs to load: the allowlisted (or trusted) globals it names, and whether the
    restricted unpickler can load it (False only when a knowingly trusted global is in a module torch blocks)."""

    globals: tuple = ()
    weights_only: bool = True

    @contextlib.contextmanager
    def allowing(self) -> Iterator[None]:
        """``torch.serialization.safe_globals`` for these globals: around ``trainer.fit(ckpt_path=...,
        weights_only=checked.weights_only)``, so Lightning's own load has the same allowlist."""
        import torch  # lazily: start-up: the data cache reads .npz files through this module without torch

        with torch.serialization.safe_globals(list(self.globals)):
            yield


def _plan(path: Path, names: set[str]) -> Checked:
    """Refuse ``names`` (the file's globals) unless each is allowlisted or trusted; import only those (DeepSpeed's
    classes only for DeepSpeed files)."""
    trusted = trusted_globals()
    needed, unsafe, weights_only = [], [], True
    for raw in sorted(names):
        name = canonical(raw)
        if name in PLAIN_GLOBALS:
            obj = _resolve(name)
            if obj is None:  # the package that wrote it is absent: the file cannot be loaded here anyway
                raise CheckpointError(f"{path}: the checkpoint needs {name}, which does not import here (is its "
                                      f"package installed?)")
        elif name in trusted:
            obj = trusted[name]
            weights_only &= raw.split(".")[0] not in _BLOCKED
        else:
            unsafe.append(name)
            continue
        needed.append(obj if _key(obj) == raw else (obj, raw))  # registered under the name the pickle uses
    if unsafe:
        raise UnsafeCheckpointError(path, unsafe)
    return Checked(tuple(needed), weights_only)


# ---- one file ------------------------------------------------------------------------------------------------
def _globals_in(path: Path) -> set[str]:
    """Every global the file's pickle names beyond torch's weights_only set, read without running anything (torch
    disassembles the pickle and rejects any opcode other than plain GLOBAL that could import, so the list is
    complete). Raises CorruptCheckpointError for a file that is not a (zip-format) torch checkpoint."""
    import torch  # lazily: start-up: the data cache reads .npz files through this module without torch

    if not path.is_file():
        raise CorruptCheckpointError(path, "no such checkpoint file" if not path.exists() else "not a file")
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(path, "the file is empty (0 bytes): not a torch checkpoint")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive (a legacy-format file would start with a pickle)
        raise CorruptCheckpointError(path, f"not a torch checkpoint ({size} bytes that do not start like the zip "
                                           f"archive torch.save writes)")
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist()):
                raise CorruptCheckpointError(path, "a zip archive, but not a torch checkpoint (no data.pkl)")
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except CorruptCheckpointError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError) as err:  # UnpicklingError: an opcode torch cannot vet
        what = "truncated or damaged" if isinstance(err, zipfile.BadZipFile) else "not a plain torch checkpoint"
        raise CorruptCheckpointError(path, f"the checkpoint is {what} ({size} bytes: {_first_line(err)}); an "
                                           f"interrupted write leaves such a file") from None
    except (RuntimeError, ValueError, EOFError, OSError, KeyError, struct.error) as err:
        raise CorruptCheckpointError(path, f"the checkpoint is truncated or damaged ({size} bytes: "
                                           f"{_first_line(err)}); an interrupted write leaves such a file") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def _torch_load(path: Path, checked: Checked, **kwargs: Any) -> Any:
    import torch  # lazily: start-up: the data cache reads .npz files through this module without torch

    try:
        with checked.allowing():
            return torch.load(path, weights_only=checked.weights_only, **kwargs)
    except pickle.UnpicklingError as err:  # not expected after the scan; never torch's weights_only advice
        found = re.findall(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise UnsafeCheckpointError(path, [canonical(n) for n in found]) from None
        raise CorruptCheckpointError(path, f"the checkpoint is damaged ({_first_line(err)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, struct.error) as err:
        raise CorruptCheckpointError(path, f"the checkpoint is truncated or damaged ({_first_line(err)}); an "
                                           f"interrupted write leaves such a file") from None


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file, safely: UnsafeCheckpointError when it names a global outside the
    allowlist (nothing is run), CorruptCheckpointError when it is not a readable torch checkpoint."""
    path = Path(path)
    return _torch_load(path, _plan(path, _globals_in(path)), map_location=map_location, mmap=mmap)


# ---- DeepSpeed ZeRO folders ------------------------------------------------------------------------------------
def _is_zero_folder(path: Path) -> bool:
    return (path / "latest").is_file()


def _check_zero_folder(path: Path) -> Checked:
    """Every file DeepSpeed may unpickle from the folder, scanned and then read with the restricted unpickler
    (memory-mapped: tensors are not read in): the folder reaches DeepSpeed only when all of them load safely."""
    if not (path / "latest").is_file():
        raise CorruptCheckpointError(path, "a folder, but not a DeepSpeed ZeRO checkpoint (no `latest` file) nor an "
                                           "FSDP sharded one (no `.metadata`); a Lightning checkpoint is a .ckpt file")
    tag = (path / "latest").read_text(errors="replace").strip()
    if not tag or not (path / tag).is_dir() or not any((path / tag).glob("*model_states.pt")):
        raise CorruptCheckpointError(path, f"a DeepSpeed ZeRO checkpoint folder without its shards (`latest` names "
                                           f"{tag!r}, which holds no *model_states.pt)")
    # every file but the tag and DeepSpeed's recovery scripts (zero_to_fp32.py: run by hand, never loaded)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "latest" and p.suffix != ".py")
    plans, hostile = [], {}
    for file in files:
        try:
            plans.append(_plan(file, _globals_in(file)))
        except UnsafeCheckpointError as err:
            hostile[file] = err.names
    if hostile:  # one message for the folder, naming every global asked for
        first, *others = hostile
        err = UnsafeCheckpointError(first, [n for names in hostile.values() for n in names])
        if others:
            err.args = (f"{err} (also in {', '.join(str(p.relative_to(path)) for p in others)})",)
        raise err
    for file, checked in zip(files, plans):
        if checked.weights_only:  # proof with the restricted unpickler (a trusted blocked global: the scan's word)
            _torch_load(file, checked, map_location="cpu", mmap=True)
    return Checked(tuple({id(g): g for c in plans for g in c.globals}.values()), all(c.weights_only for c in plans))


# ---- FSDP sharded folders (torch.distributed.checkpoint) ---------------------------------------------------------
# torch reads a DCP folder's `.metadata` with plain pickle.load and each non-tensor entry with torch.load(weights_only=
# False); both are vetted here first. Measured (a DCP save of a state dict with tensors, ints, strings): the metadata
# names torch's own metadata dataclasses, torch.Size, dtypes, torch.serialization._get_layout and pathlib.PosixPath.
_DCP_GLOBALS = {
    *(f"torch.distributed.checkpoint.metadata.{n}" for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    "torch.distributed.checkpoint.filesystem._StorageInfo",
}


class _Stub:
    """Stands in for every global while a pickle's globals are listed, so that nothing real is called."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


class _Restricted(pickle.Unpickler):
    """The pickle documentation's "restricting globals": only ``allowed`` names are imported (``stub``: none)."""

    def __init__(self, file: Any, allowed: dict[str, Any] | None):
        super().__init__(file)
        self.allowed, self.seen = allowed, set()

    def find_class(self, module: str, name: str) -> Any:
        self.seen.add(f"{module}.{name}")
        if self.allowed is None:
            return _Stub
        if f"{module}.{name}" not in self.allowed:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")
        return self.allowed[f"{module}.{name}"]


def _check_dcp_folder(path: Path) -> Checked:

    from torch._weights_only_unpickler import _get_allowed_globals  # lazily: start-up: torch

    metadata_file = path / ".metadata"
    raw = metadata_file.read_bytes()
    lister = _Restricted(io.BytesIO(raw), None)
    try:
        lister.load()
    except Exception as err:  # noqa: BLE001 - a stub cannot build everything; the names were read before
        if not lister.seen:
            raise CorruptCheckpointError(metadata_file, f"not a torch.distributed.checkpoint metadata file "
                                                        f"({_first_line(err)})") from None
    torch_own = _get_allowed_globals()
    plain = {n for n in lister.seen if n in torch_own or n in _DCP_GLOBALS}
    checked = _plan(metadata_file, lister.seen - plain)  # refuses anything beyond the allowlist
    allowed = {n: torch_own.get(n) or _resolve(n) for n in plain}
    allowed.update({(g[1] if isinstance(g, tuple) else _key(g)): (g[0] if isinstance(g, tuple) else g)
                    for g in checked.globals})
    try:
        metadata = _Restricted(io.BytesIO(raw), allowed).load()
    except pickle.UnpicklingError as err:  # a global past the point where the listing pass stopped
        found = re.findall(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise UnsafeCheckpointError(metadata_file, [canonical(n) for n in found]) from None
        raise CorruptCheckpointError(metadata_file, f"damaged metadata ({_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001
        raise CorruptCheckpointError(metadata_file, f"damaged metadata ({_first_line(err)})") from None
    # the non-tensor entries (torch.save blobs inside the .distcp files): each vetted like a checkpoint file
    byte_items = {k for k, v in metadata.state_dict_metadata.items()
                  if type(v).__name__ == "BytesStorageMetadata"}
    plans = [checked]
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in byte_items:
            continue
        with open(path / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        names = _globals_in_bytes(blob, path / info.relative_path)
        plans.append(_plan(path / info.relative_path, names))
    return Checked(tuple({id(g): g for c in plans for g in c.globals}.values()), all(c.weights_only for c in plans))


def _globals_in_bytes(blob: bytes, where: Path) -> set[str]:

    with tempfile.NamedTemporaryFile(suffix=".pt") as tmp:
        tmp.write(blob)
        tmp.flush()
        try:
            return _globals_in(Path(tmp.name))
        except CorruptCheckpointError as err:
            raise CorruptCheckpointError(where, str(err).split(": ", 1)[1].split("; use another")[0]) from None


# ---- the entry points ----------------------------------------------------------------------------------------------
def check(path: str | Path | None) -> Checked:
    """Refuse a checkpoint (a file or a DeepSpeed ZeRO folder) that is hostile or unreadable, without running
    anything from it; returns what it needs to load (:class:`Checked`: Lightning's resume uses it). ``None`` (no
    checkpoint) passes."""
    if path is None:
        return Checked()
    path = Path(path)
    if not path.is_dir():
        return _plan(path, _globals_in(path))
    if (path / ".metadata").is_file():  # an FSDP sharded checkpoint (trainer=fsdp); Lightning's meta.pt beside it
        meta = path / "meta.pt"
        plans = [_check_dcp_folder(path), *([_plan(meta, _globals_in(meta))] if meta.is_file() else [])]
        return Checked(tuple({id(g): g for c in plans for g in c.globals}.values()),
                       all(c.weights_only for c in plans))
    return _check_zero_folder(path)


def load_arrays(path: str | Path) -> dict[str, Any]:
    """The arrays of an ``.npz`` file (the data cache), without pickle: numpy refuses object arrays (ValueError)."""
    import numpy as np  # here: the CLIs import this module at start-up, where only checkpoints are vetted

    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}

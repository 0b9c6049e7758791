"""A tiny on-disk cache for tokenised data: ``<cache_dir>/<key>.npz``, keyed by a config hash."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from dlm.safe_load import load_arrays

__all__ = ["cache_key", "load_or_build"]


def _canon(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _canon(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_canon(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    try:  # OmegaConf containers
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return _canon(OmegaConf.to_container(x, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    return repr(x)


def cache_key(**parts: Any) -> str:
    """sha256 of a canonical JSON (sorted keys) of ``parts``, first 16 hex characters."""
    blob = json.dumps(_canon(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _load(path: str) -> dict[str, np.ndarray]:

    return load_arrays(path)  # no pickle


def load_or_build(
    cache_dir: str | os.PathLike | None, key: str, build_fn: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Return the arrays cached under ``key``; on a miss call ``build_fn()`` and save them atomically.

    ``cache_dir=None`` disables caching.  A corrupt/unreadable cache file is rebuilt.  The file is
    written to a temporary name in the same folder and renamed into place, so concurrent writers
    (e.g. several ranks) never expose a half-written file.
    """
    if cache_dir is None:
        return dict(build_fn())
    cache_dir = os.fspath(cache_dir)
    path = os.path.join(cache_dir, f"{key}.npz")
    if os.path.isfile(path):
        try:
            return _load(path)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError):
            pass  # corrupt: rebuild below
    arrays = dict(build_fn())
    for k, v in arrays.items():
        if not isinstance(v, np.ndarray):
            raise TypeError(f"load_or_build: build_fn must return numpy arrays; {k!r} is {type(v).__name__}")
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npz.tmp", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return arrays

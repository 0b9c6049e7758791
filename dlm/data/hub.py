"""Is a Hugging Face Hub dataset or tokenizer usable here? Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) a hub
id works only from the local caches; these checks answer before datasets/transformers try (and fail with pages of
retries and chained tracebacks), so the data module can say in one line what is missing and how to point at a
local copy. They only ever refuse what is certainly absent: a cache folder that exists is left to the loaders."""

from __future__ import annotations

import os
import re
from pathlib import Path

from dlm.errors import UserError

__all__ = ["HubUnavailableError", "dataset_problem", "hub_offline", "in_hub_cache", "model_problem",
           "tokenizer_problem"]

_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                                        "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants  # lazily: start-up: only when a Hub id is checked

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _cache_dirs(kind: str) -> list[Path]:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"  # huggingface_hub.constants' default
    home = Path(os.environ.get("HF_HOME", Path(cache) / "huggingface")).expanduser()
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub").expanduser()
    dirs = [hub]
    if kind == "dataset":
        dirs.append(Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")).expanduser())
    return dirs


def in_hub_cache(repo_id: str, kind: str) -> bool:
    """Whether a cache folder for ``repo_id`` (``kind``: "model" for tokenizers, or "dataset") may exist: the hub
    cache (``models--org--name`` / ``datasets--org--name``), or for datasets the datasets cache (``org___name``)."""
    want = _squash(repo_id)
    for folder in _cache_dirs(kind):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            name = entry.name
            if name.startswith(("models--", "datasets--")):
                if name.startswith(f"{kind}s--") and _squash(name.split("--", 1)[1]) == want:
                    return True
            elif _squash(name) == want:
                return True
    return False


class HubUnavailableError(UserError, OSError):
    """A hub dataset or tokenizer that cannot be had here (offline, not cached)."""


# datasets' packaged loaders read local files (data_files=...): never a hub download
PACKAGED_LOADERS = ("json", "csv", "text", "parquet", "arrow", "pandas", "sql", "webdataset", "xml",
                    "imagefolder", "audiofolder", "videofolder", "generator", "cache")


def looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id (``name`` or ``org/name``)."""
    return name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def dataset_problem(path: str) -> str | None:
    """Why the dataset ``path`` (data.source.path) cannot load here, or None when it may."""
    if looks_like_path(path) and not os.path.exists(os.path.expanduser(path)):
        return (f"data.source.path={path}: no such file or folder (cwd: {os.getcwd()}); give a local dataset folder, "
                f"a hub id (org/name), or a loader name (json, text, parquet ...) with data.source.data_files")
    if not hub_offline() or path in PACKAGED_LOADERS or os.path.exists(os.path.expanduser(path)) \
            or in_hub_cache(path, "dataset"):
        return None
    return (f"data.source.path={path} is a dataset on the Hugging Face Hub and this machine is offline "
            f"(HF_HUB_OFFLINE=1) with no copy in the local HF cache: point data.source.path=<a local folder of its "
            f"data files> at a local copy (or data.source.path=json data.source.data_files=<files>; or data=text_files "
            f"data.source.paths=<files>), or run once online to cache it")


def tokenizer_problem(name_or_path: str) -> str | None:
    """Why the tokenizer ``name_or_path`` (data.tokenizer.name_or_path) cannot load here, or None when it may."""
    if looks_like_path(name_or_path) or not hub_offline() or os.path.exists(os.path.expanduser(name_or_path)) \
            or in_hub_cache(name_or_path, "model"):
        return None
    return (f"data.tokenizer.name_or_path={name_or_path} is a tokenizer on the Hugging Face Hub and this machine is "
            f"offline (HF_HUB_OFFLINE=1) with no copy in the local HF cache: point data.tokenizer.name_or_path at a "
            f"local folder with its tokenizer files (written by save_pretrained), or run once online to cache it")


def model_problem(pretrained: str) -> str | None:
    """Why the checkpoint ``pretrained`` (model.pretrained) cannot load here, or None when it may."""
    if looks_like_path(pretrained) and not os.path.exists(os.path.expanduser(pretrained)):
        return f"model.pretrained={pretrained}: no such folder (cwd: {os.getcwd()}); give a local HF model folder or a hub id"
    if not hub_offline() or os.path.exists(os.path.expanduser(pretrained)) or in_hub_cache(pretrained, "model"):
        return None
    return (f"model.pretrained={pretrained} is a model on the Hugging Face Hub and this machine is offline "
            f"(HF_HUB_OFFLINE=1) with no copy in the local HF cache: point model.pretrained at a local folder "
            f"(written by save_pretrained), run once online to cache it, or dry_run=true to see the plan")

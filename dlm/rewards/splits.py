"""Split names the prompt sources accept: ``train`` and ``val`` (aliases ``validation``, ``test``, ``eval``)."""

from __future__ import annotations

from dlm.rewards.errors import RewardError


def split_name(split: str) -> str:
    name = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
            "test": "val", "eval": "val"}.get(str(split).lower())
    if name is None:
        raise RewardError(f"unknown prompt split {split!r}: use 'train' or 'val'")
    return name

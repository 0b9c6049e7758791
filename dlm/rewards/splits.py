"""Split names the prompt sources accept: ``train`` and ``val`` (aliases ``validation``, ``test``, ``eval``), and the
disjoint train/val draw of the generated tasks (Sudoku, Countdown)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from dlm.rewards.errors import RewardError


def split_name(split: str) -> str:
    name = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
            "test": "val", "eval": "val"}.get(str(split).lower())
    if name is None:
        raise RewardError(f"unknown prompt split {split!r}: use 'train' or 'val'")
    return name


def disjoint_splits(draw: Callable[[], Any], key: Callable[[Any], Hashable], num_train: int, num_val: int,
                    val_tries: int, train_tries: int, hint: str) -> dict[str, list]:
    """``num_val`` distinct validation items, then ``num_train`` train items that are never a validation one (train
    may repeat itself), drawn in that order from ``draw()`` (distinct by ``key``) within ``val_tries`` and
    ``train_tries`` draws; too few is a ValueError ending with ``hint``."""
    seen: set = set()
    val: list = []
    for _ in range(val_tries):
        if len(val) >= num_val:
            break
        item = draw()
        if key(item) not in seen:
            seen.add(key(item))
            val.append(item)
    train: list = []
    for _ in range(train_tries):
        if len(train) >= num_train:
            break
        item = draw()
        if key(item) not in seen:
            train.append(item)
    if len(val) < num_val or len(train) < num_train:
        raise ValueError(hint)
    return {"train": train, "val": val}

"""Reading a reward's columns: each a list aligned with the completions; a missing one is named with its source."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dlm.rewards.errors import RewardError


def column(columns: Mapping[str, Sequence[Any]], name: str, reward: str, n: int) -> Sequence[Any]:
    """``columns[name]``, checked present and aligned with the ``n`` completions."""
    if name not in columns:
        raise RewardError(
            f"reward {reward!r} reads the prompt column {name!r}, but the prompt rows have {sorted(columns)}: "
            f"pair it with a prompt source that provides {name!r}"
        )
    values = columns[name]
    if len(values) != n:
        raise RewardError(f"reward {reward!r}: column {name!r} has {len(values)} values for {n} completions")
    return values

"""A user's own reward function by import path, called TRL-style.

``FunctionReward(path="my_pkg.rewards:length_penalty")`` imports ``my_pkg.rewards`` and calls
``length_penalty(prompts=[...], completions=[...], **columns)`` (each column a list aligned with the completions;
extra keyword arguments from ``kwargs`` too), as TRL's ``GRPOTrainer`` calls its reward functions, so a function
written for TRL plugs in unchanged. It must return one number per completion; a bad path, a non-callable, an
exception at import, or a wrong return is a :class:`RewardError` naming the path.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from dlm.rewards.base import Reward
from dlm.rewards.errors import RewardError


def _resolve(path: str):
    module_name, sep, attr = str(path).partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward.path={path!r}: use 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"reward.path={path!r}: cannot import {module_name!r} ({err})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward.path={path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward.path={path!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


class FunctionReward(Reward):
    """See the module docstring. ``name`` defaults to the function's name."""

    def __init__(self, path: str, name: str | None = None, kwargs: Mapping[str, Any] | None = None):
        self.path = str(path)
        self.fn = _resolve(self.path)
        self.name = name or self.path.rpartition(":")[2].rpartition(".")[2]
        self.kwargs = dict(kwargs or {})

    def score(self, completions: Sequence[str], prompts: Sequence[str], **columns) -> list[float]:
        values = self.fn(prompts=list(prompts), completions=list(completions), **columns, **self.kwargs)
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not hasattr(values, "tolist"):
            raise RewardError(
                f"reward {self.path!r} returned {type(values).__name__}; it must return a list of numbers, one per "
                "completion"
            )
        values = values.tolist() if hasattr(values, "tolist") else list(values)
        if len(values) != len(completions):
            raise RewardError(f"reward {self.path!r} returned {len(values)} values for {len(completions)} completions")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise RewardError(f"reward {self.path!r} returned {v!r}; every value must be a finite number")
        return [float(v) for v in values]

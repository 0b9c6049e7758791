"""A reward from a data task's own checker: 1 when ``task.is_valid(prompt + completion)``, else 0.

The embedded tasks (dlm/data/brackets.py, dlm/data/arithmetic.py) check their strings exactly; this reward lets
method=grpo optimise exactly what ``sample/valid_frac`` measures at the end of fit (on fresh samples, not rollouts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dlm.rewards.base import Reward


class TaskValidity(Reward):
    name = "valid"

    def __init__(self, task: Any):
        if not callable(getattr(task, "is_valid", None)):
            raise ValueError(f"reward task {task!r} has no is_valid(text); use an embedded task such as "
                             f"dlm.data.brackets.BracketsTask")
        self.task = task

    def score(self, completions: Sequence[str], prompts: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        return [float(bool(self.task.is_valid(p + c))) for p, c in zip(prompts, completions)]

    def __repr__(self) -> str:
        return f"TaskValidity({type(self.task).__name__})"

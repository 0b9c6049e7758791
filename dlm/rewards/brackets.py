"""The bracket-grammar reward (Dyck-2 validity, as :class:`dlm.data.brackets.BracketsTask` defines it) and its
prompts: empty for unconditional generation (the issue's CPU demonstration), or left halves of validation strings."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from dlm.data.brackets import BracketsTask
from dlm.rewards.base import Reward
from dlm.rewards.splits import split_name


class BracketValidity(Reward):
    """1.0 when ``prompt + completion`` is a balanced Dyck-2 string (surrounding whitespace ignored), else 0.0.
    ``novel_bonus`` adds that much for a valid string that is not a training string of the task built from
    ``task`` (the grammar's own novelty check), so RL is not paid to replay the corpus; 0 by default."""

    name = "brackets_valid"

    def __init__(self, novel_bonus: float = 0.0, task: dict[str, Any] | None = None):
        self.novel_bonus = float(novel_bonus)
        self._task_kwargs = dict(task or {})
        self._train: set[str] | None = None

    def _train_set(self) -> set[str]:
        if self._train is None:
            self._train = set(BracketsTask(**self._task_kwargs).documents("train"))
        return self._train

    def score(self, completions: Sequence[str], prompts: Sequence[str], **columns) -> list[float]:
        out = []
        for prompt, completion in zip(prompts, completions):
            text = (prompt + completion).strip()
            valid = BracketsTask.is_valid(text)
            bonus = self.novel_bonus if valid and self.novel_bonus and text not in self._train_set() else 0.0
            out.append(float(valid) + bonus)
        return out


class BracketPrompts:
    """``num_train`` / ``num_val`` prompt rows. Unconditional (default): every prompt is ``""``, the rows differ
    only in their index. Conditional: the first half of a validation-split string for ``val`` and of a training
    string for ``train`` (the task's splits are disjoint), so some completion always makes it valid."""

    def __init__(self, conditional: bool = False, num_train: int = 1024, num_val: int = 128, seed: int = 0,
                 task: dict[str, Any] | None = None):
        self.conditional, self.num_train, self.num_val, self.seed = bool(conditional), int(num_train), int(num_val), int(seed)
        self._task_kwargs = dict(task or {})

    def rows(self, split: str) -> Iterator[dict[str, Any]]:
        split = split_name(split)
        n = self.num_train if split == "train" else self.num_val
        if not self.conditional:
            for i in range(n):
                yield {"prompt": "", "index": i}
            return
        task = BracketsTask(**{"seed": self.seed, **self._task_kwargs})
        docs = task.documents(split)
        for i in range(n):
            doc = docs[i % len(docs)]
            yield {"prompt": doc[: len(doc) // 2], "index": i}

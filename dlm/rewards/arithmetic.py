"""The addition-task reward (the format of :class:`dlm.data.arithmetic.ArithmeticTask`: ``"47+8=55"``) and its
prompts: the left side ``"47+8="`` of each equation, the completion being the sum."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from dlm.data.arithmetic import ArithmeticTask
from dlm.rewards.base import Reward
from dlm.rewards.splits import split_name


class ArithmeticCorrectness(Reward):
    """1.0 when ``prompt + completion`` is a correct equation by the task's own parser (canonical numbers, or
    zero-padded with ``fixed_width``), ``wellformed_score`` when it parses but is wrong, else 0.0."""

    name = "arithmetic_correct"

    def __init__(self, n_digits: int = 2, fixed_width: bool = False, wellformed_score: float = 0.0):
        self.task = ArithmeticTask(n_digits=n_digits, num_train=1, num_val=1, fixed_width=fixed_width)
        self.wellformed_score = float(wellformed_score)

    def score(self, completions: Sequence[str], prompts: Sequence[str], **columns) -> list[float]:
        out = []
        for prompt, completion in zip(prompts, completions):
            parsed = self.task.parse(prompt + completion)
            if parsed is None:
                out.append(0.0)
            else:
                out.append(1.0 if parsed[0] + parsed[1] == parsed[2] else self.wellformed_score)
        return out


class ArithmeticPrompts:
    """Rows ``{"prompt": "47+8=", "answer": "55"}`` from the task's train / val equations (disjoint sets of
    problems, deterministic per ``seed``)."""

    def __init__(self, n_digits: int = 2, num_train: int = 20000, num_val: int = 512, seed: int = 0,
                 fixed_width: bool = False):
        self.task = ArithmeticTask(n_digits=n_digits, num_train=num_train, num_val=num_val, seed=seed,
                                   fixed_width=fixed_width)

    def rows(self, split: str) -> Iterator[dict[str, Any]]:
        for doc in self.task.documents(split_name(split)):
            left, answer = doc.split("=")
            yield {"prompt": left + "=", "answer": answer}

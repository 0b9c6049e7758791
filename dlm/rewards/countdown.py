"""Countdown: combine the given numbers with ``+ - * /`` and parentheses to reach the target. Instances the package
generates (always solvable), a brute-force solver, and the reward.

Format (d1's countdown, from TinyZero; reimplemented): the prompt lists the numbers and the target, the completion
gives an expression inside ``<answer>...</answer>`` with no ``=`` and no target. The expression is parsed by
:mod:`dlm.rewards.expression` (never ``eval``); each given number may be used at most once (``use_all=true``: each
exactly once, d1's and TinyZero's rule). Score (d1's ``compute_score``): ``score`` (1.0) when it evaluates exactly
to the target, ``format_score`` (0.1) for an answer that is present but wrong, unparsable or uses other numbers, 0.0
for no answer.

Generation: ``num_numbers`` numbers uniform in ``1..max_number``; the target is the value of a random expression over
them (random split of the numbers, random operations, kept only when every intermediate value is a positive integer
and the target lies in ``1..max_target``), so a solution exists by construction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from dlm.rewards.answers import answer_tag
from dlm.rewards.base import Reward
from dlm.rewards.columns import column
from dlm.rewards.expression import ExpressionError, evaluate
from dlm.rewards.splits import disjoint_splits, split_name

__all__ = ["CountdownPrompts", "CountdownReward", "solve_countdown"]

PROMPT = (
    "Using only the numbers {numbers}, write an arithmetic expression that equals {target}. Use each number at most "
    "once{all_clause}; you may use +, -, * and / and parentheses. Give only the expression inside "
    "<answer></answer>, without '=' or the target.\n"
)


def solve_countdown(numbers: Sequence[int], target: int, use_all: bool = False) -> str | None:
    """An expression over ``numbers`` (each at most once; every one with ``use_all``) equal to ``target``, or None.
    Exhaustive over pairwise combinations with exact fractions: fine for the 3-4 numbers of the task."""
    goal = Fraction(target)

    def search(items: list[tuple[Fraction, str]]) -> str | None:
        if not use_all:
            for value, text in items:
                if value == goal:
                    return text
        elif len(items) == 1:
            return items[0][1] if items[0][0] == goal else None
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                (a, sa), (b, sb) = items[i], items[j]
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                candidates = [(a + b, f"({sa}+{sb})"), (a - b, f"({sa}-{sb})"), (a * b, f"({sa}*{sb})")]
                if b != 0:
                    candidates.append((a / b, f"({sa}/{sb})"))
                for value, text in candidates:
                    found = search(rest + [(value, text)])
                    if found is not None:
                        return found
        return None

    found = search([(Fraction(int(n)), str(int(n))) for n in numbers])
    if found is not None and found.startswith("(") and found.endswith(")"):
        try:  # drop the outermost parentheses when they wrap the whole expression
            evaluate(found[1:-1])
            found = found[1:-1]
        except ExpressionError:
            pass
    return found


def _random_target(rng: np.random.Generator, numbers: list[int], max_target: int) -> int | None:
    values = [Fraction(n) for n in numbers]
    while len(values) > 1:  # combine two random values until one is left: uses every number once
        i, j = (int(k) for k in rng.choice(len(values), size=2, replace=False))
        a, b = values[i], values[j]
        op = int(rng.integers(4))
        if op == 0:
            value = a + b
        elif op == 1:
            value = abs(a - b)
        elif op == 2:
            value = a * b
        else:
            if b == 0 or a % b != 0:
                return None
            value = a / b
        if value <= 0 or value.denominator != 1:
            return None
        values = [v for k, v in enumerate(values) if k not in (i, j)] + [value]
    target = int(values[0])
    return target if 1 <= target <= max_target else None


class CountdownReward(Reward):
    """Reads the ``numbers`` and ``target`` columns; see the module docstring. ``tag=null`` reads the whole
    completion as the expression (for tiny models that emit only the expression)."""

    name = "countdown"

    def __init__(self, score: float = 1.0, format_score: float = 0.1, use_all: bool = False,
                 tag: str | None = "answer"):
        self.correct, self.format_score, self.use_all, self.tag = float(score), float(format_score), bool(use_all), tag

    def _one(self, completion: str, numbers: Sequence[int], target: Any) -> float:
        text = completion.strip() if self.tag is None else answer_tag(completion, self.tag)
        if not text:
            return 0.0
        try:
            value = evaluate(text, [int(n) for n in numbers], use_all=self.use_all)
        except ExpressionError:
            return self.format_score
        return self.correct if value == Fraction(str(target)) else self.format_score

    def score(self, completions: Sequence[str], prompts: Sequence[str], **columns) -> list[float]:
        n = len(completions)
        numbers = column(columns, "numbers", self.name, n)
        targets = column(columns, "target", self.name, n)
        return [self._one(c, ns, t) for c, ns, t in zip(completions, numbers, targets)]


class CountdownPrompts:
    """``num_train`` / ``num_val`` solvable instances, deterministic per ``seed``; no validation instance (the
    multiset of numbers with the target) appears in training. Rows: ``prompt``, ``numbers`` (list of int),
    ``target`` (int)."""

    def __init__(self, num_numbers: int = 3, max_number: int = 99, max_target: int = 999, num_train: int = 2000,
                 num_val: int = 200, seed: int = 0, use_all: bool = False, template: str = PROMPT):
        if num_numbers < 2 or max_number < 1 or max_target < 1:
            raise ValueError("need num_numbers >= 2, max_number >= 1 and max_target >= 1")
        self.num_numbers, self.max_number, self.max_target = int(num_numbers), int(max_number), int(max_target)
        self.num_train, self.num_val, self.seed = int(num_train), int(num_val), int(seed)
        self.use_all, self.template = bool(use_all), template
        self._rows: dict[str, list[tuple[list[int], int]]] = {}

    def _instance(self, rng: np.random.Generator) -> tuple[list[int], int]:
        while True:
            numbers = [int(n) for n in rng.integers(1, self.max_number + 1, size=self.num_numbers)]
            target = _random_target(rng, numbers, self.max_target)
            if target is not None:
                return numbers, target

    def _generate(self) -> None:
        rng = np.random.default_rng([self.seed, 2677])
        self._rows = disjoint_splits(
            lambda: tuple(self._instance(rng)), lambda item: (tuple(sorted(item[0])), item[1]),
            self.num_train, self.num_val, 100 * self.num_val, 100 * self.num_train,
            "too few distinct countdown instances: raise max_number or lower num_val/num_train")

    def rows(self, split: str) -> Iterator[dict[str, Any]]:
        if not self._rows:
            self._generate()
        clause = ", and use every one of them" if self.use_all else ""
        for numbers, target in self._rows[split_name(split)]:
            prompt = self.template.format(numbers=numbers, target=target, all_clause=clause)
            yield {"prompt": prompt, "numbers": list(numbers), "target": target}

"""Prompt sources of this package for method=grpo (the contract: dlm.rewards.base.PromptSource)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class UnconditionalPrompts:
    """Rows with an empty prompt, forever: RL of unconditional generation (the CPU demonstration on the bracket
    grammar, recipes/grpo.md)."""

    def rows(self, split: str = "train") -> Iterator[dict[str, Any]]:
        while True:
            yield {"prompt": ""}

    def __repr__(self) -> str:
        return "UnconditionalPrompts()"

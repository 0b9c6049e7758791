"""Format rewards for d1's reasoning format ``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n``.

The three variants of d1's ``diffu-grpo/reward_func.py`` (after Will Brown's GRPO demo), reimplemented:
``XMLFormat(strict=true)`` pays ``value`` only for exactly that layout (newlines included, nothing before or after; the final newline
optional, since generation may stop at EOS right after the tag),
``XMLFormat(strict=false)`` for ``<reasoning>...</reasoning>`` then ``<answer>...</answer>`` at the start, any
whitespace; ``XMLTagCount`` gives partial credit, 0.125 per well-placed tag, less 0.001 per character after the
closing answer tag; ``IntegerAnswer`` pays for a bare integer inside the answer tag.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from dlm.rewards.answers import answer_tag
from dlm.rewards.base import Reward

_STRICT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?$", re.DOTALL)
_SOFT = re.compile(r"^\s*<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)


class XMLFormat(Reward):
    """``value`` when the completion has the reasoning/answer layout (strict or soft, above), else 0.0."""

    def __init__(self, strict: bool = True, value: float = 0.5):
        self.strict, self.value = bool(strict), float(value)
        self.name = "xml_strict" if self.strict else "xml_soft"

    def score(self, completions: Sequence[str], prompts: Sequence[str], **columns) -> list[float]:
        pattern = _STRICT if self.strict else _SOFT
        return [self.value if pattern.match(c) else 0.0 for c in completions]


class XMLTagCount(Reward):
    """Partial credit per tag (d1's ``xmlcount_reward_func``): at most 0.5, lowered by trailing text."""

    name = "xml_count"

    @staticmethod
    def _count(text: str) -> float:
        total = 0.0
        if text.count("<reasoning>\n") == 1:
            total += 0.125
        if text.count("\n</reasoning>\n") == 1:
            total += 0.125
        if text.count("\n<answer>\n") == 1:
            total += 0.125 - 0.001 * len(text.split("\n</answer>\n")[-1])
        if text.count("\n</answer>") == 1:
            total += 0.125 - 0.001 * max(len(text.split("\n</answer>")[-1]) - 1, 0)
        return total

    def score(self, completions: Sequence[str], prompts: Sequence[str], **columns) -> list[float]:
        return [self._count(c) for c in completions]


class IntegerAnswer(Reward):
    """``value`` when the ``<answer>`` tag holds a bare non-negative integer (d1's ``int_reward_func``: GSM8K answers
    are integers), else 0.0."""

    name = "int_answer"

    def __init__(self, value: float = 0.5):
        self.value = float(value)

    def score(self, completions: Sequence[str], prompts: Sequence[str], **columns) -> list[float]:
        out = []
        for completion in completions:
            text = answer_tag(completion)
            out.append(self.value if text is not None and re.fullmatch(r"[0-9]+", text) else 0.0)
        return out

"""GSM8K answer matching: the completion's final number against the number after ``####`` in the reference.

Extraction in :mod:`dlm.rewards.answers` (``\\boxed{}``, ``<answer>``, "The answer is", ``####``, else the last
number; commas, ``$`` and a trailing period dropped); the two numbers are compared by exact value, so ``18.00``
matches ``18`` and ``1,234`` matches ``1234``. Rows from :class:`dlm.rewards.hub.HubPrompts` over ``openai/gsm8k``
(``conf/prompts/gsm8k.yaml``) carry the reference in the ``answer`` column.
"""

from __future__ import annotations

from collections.abc import Sequence

from dlm.rewards.answers import gsm8k_prediction, gsm8k_reference, number_value
from dlm.rewards.base import Reward
from dlm.rewards.columns import column


def gsm8k_correct(completion: str, reference: str) -> bool:
    predicted = number_value(gsm8k_prediction(completion))
    return predicted is not None and predicted == number_value(gsm8k_reference(str(reference)))


class GSM8KReward(Reward):
    """``value`` (d1 uses 2.0; 1.0 here, set the weight in a RewardSet) when the final numbers agree, else 0.0."""

    name = "gsm8k"

    def __init__(self, value: float = 1.0, answer_column: str = "answer"):
        self.value, self.answer_column = float(value), answer_column

    def score(self, completions: Sequence[str], prompts: Sequence[str], **columns) -> list[float]:
        answers = column(columns, self.answer_column, self.name, len(completions))
        return [self.value if gsm8k_correct(c, a) else 0.0 for c, a in zip(completions, answers)]

"""A group-aware diversity term: a completion that duplicates others of its GRPO group is paid less.

GRPO's advantage is a completion's reward against its group's mean, so when the easiest rewarded strings are also the
likeliest (a one-pair ``[]`` under the bracket grammar's validity) every step pays the mode and the policy sharpens
onto it (recipes/grpo.md). :class:`GroupDistinct` divides the inner reward of each completion by the number of
identical completions in its group (to a ``power``), so a string drawn c times shares one string's reward among its
c copies and the group's total reward counts distinct rewarded strings. It is the count-based novelty/diversity
bonus of exploration in RL (Bellemare et al. 2016, "Unifying Count-Based Exploration and Intrinsic Motivation",
arXiv 1606.01868: a bonus decreasing in a state's visit count), applied within one group of rollouts.

The trainer (dlm/methods/grpo.py) passes each completion's group index as the ``rollout_group`` column; called
without it, the whole batch is one group.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from dlm.rewards.base import Reward

GROUP_COLUMN = "rollout_group"


class GroupDistinct(Reward):
    """``inner(c) * min(1, free_copies / count(c))**power``: ``count(c)`` is how many completions of c's group equal
    c as text (after ``strip()``, with its prompt), c itself included. ``free_copies=1, power=1`` splits one string's
    reward among its copies; ``free_copies=k`` pays up to k copies in full (a group of G is paid in full from G/k
    distinct rewarded strings on), so the policy may keep its easiest strings as long as it spreads over enough of
    them; ``power=0`` is the inner reward unchanged."""

    def __init__(self, reward: Reward, power: float = 1.0, free_copies: int = 1, name: str | None = None):
        if not isinstance(reward, Reward):
            raise ValueError(f"GroupDistinct: reward must be a dlm.rewards Reward, got {type(reward).__name__}")
        if power < 0:
            raise ValueError(f"GroupDistinct: power must be >= 0, got {power}")
        if int(free_copies) != free_copies or free_copies < 1:
            raise ValueError(f"GroupDistinct: free_copies must be an integer >= 1, got {free_copies}")
        self.reward, self.power, self.free_copies = reward, float(power), int(free_copies)
        self.name = name or f"{reward.name}_distinct"

    def score(self, completions: Sequence[str], prompts: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        groups = columns.get(GROUP_COLUMN) or [0] * len(completions)
        inner = self.reward(completions, prompts, **columns)
        keys = [(g, p, c.strip()) for g, p, c in zip(groups, prompts, completions)]
        counts = Counter(keys)
        return [v * min(1.0, self.free_copies / counts[k]) ** self.power for v, k in zip(inner, keys)]

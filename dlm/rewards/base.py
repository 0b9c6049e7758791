"""The reward interface: a reward scores decoded completions, given their prompts and the prompt rows' other columns.

The call convention follows TRL's reward functions (``prompts``, ``completions`` and each dataset column as keyword
arguments, one float per completion), so a user's own TRL-style function plugs in unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol


class Reward(ABC):
    """One reward: ``score(completions, prompts, **columns) -> list[float]``, one value per completion. ``columns``
    holds the prompt rows' other fields (e.g. ``answer``), each a list aligned with ``completions``."""

    name: str = "reward"

    @abstractmethod
    def score(self, completions: Sequence[str], prompts: Sequence[str], **columns: Sequence[Any]) -> list[float]: ...

    def __call__(self, completions: Sequence[str], prompts: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        values = [float(v) for v in self.score(completions, prompts, **columns)]
        if len(values) != len(completions):
            raise ValueError(f"reward {self.name!r} returned {len(values)} values for {len(completions)} completions")
        return values


class RewardSet:
    """Named rewards and their weights: ``components`` gives each reward's values (logged one by one), ``total`` their
    weighted sum (what the advantages are computed from)."""

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float] | None = None):
        if not rewards:
            raise ValueError("reward: at least one reward is needed")
        self.rewards = dict(rewards)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.rewards))
        if unknown:
            raise ValueError(f"reward weights name unknown reward(s) {unknown}; rewards: {sorted(self.rewards)}")
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.rewards}

    def components(self, completions: Sequence[str], prompts: Sequence[str], **columns) -> dict[str, list[float]]:
        return {name: r(completions, prompts, **columns) for name, r in self.rewards.items()}

    def total(self, components: Mapping[str, Sequence[float]]) -> list[float]:
        n = len(next(iter(components.values())))
        return [sum(self.weights[name] * components[name][i] for name in components) for i in range(n)]


class PromptSource(Protocol):
    """Prompt rows for RL: each a dict with ``prompt`` (str, may be empty for unconditional generation) plus the
    columns its reward reads (e.g. ``answer``). ``rows(split)`` yields them in a fixed order for a given seed."""

    def rows(self, split: str) -> Iterator[dict[str, Any]]: ...


def as_reward_set(reward: Reward | RewardSet) -> RewardSet:
    """A ``reward=`` config may build one :class:`Reward` or a :class:`RewardSet`; the trainer always gets a set."""
    if isinstance(reward, RewardSet):
        return reward
    if isinstance(reward, Reward):
        return RewardSet({reward.name: reward})
    raise TypeError(f"reward: expected a dlm.rewards Reward or RewardSet, got {type(reward).__name__}")

"""Rewards for reinforcement learning on verifiable tasks (``reward=`` configs), and the prompt sources they pair with."""

from dlm.rewards.base import PromptSource, Reward, RewardSet

__all__ = ["PromptSource", "Reward", "RewardSet"]

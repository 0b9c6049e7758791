"""Rewards for reinforcement learning on verifiable tasks (``reward=`` configs), and the prompt sources they pair with
(``prompts=`` configs). No reward ever executes model output: answers are parsed, never ``eval``-ed."""

from dlm.rewards.arithmetic import ArithmeticCorrectness, ArithmeticPrompts
from dlm.rewards.base import PromptSource, Reward, RewardSet, as_reward_set
from dlm.rewards.brackets import BracketPrompts, BracketValidity
from dlm.rewards.countdown import CountdownPrompts, CountdownReward
from dlm.rewards.diversity import GroupDistinct
from dlm.rewards.errors import RewardError
from dlm.rewards.format import IntegerAnswer, XMLFormat, XMLTagCount
from dlm.rewards.function import FunctionReward
from dlm.rewards.gsm8k import GSM8KReward
from dlm.rewards.hub import HubPrompts
from dlm.rewards.math_answer import MathReward
from dlm.rewards.sudoku import SudokuPrompts, SudokuReward

__all__ = [
    "ArithmeticCorrectness", "ArithmeticPrompts", "BracketPrompts", "BracketValidity", "CountdownPrompts",
    "CountdownReward", "FunctionReward", "GroupDistinct", "GSM8KReward", "HubPrompts", "IntegerAnswer", "MathReward", "PromptSource", "Reward",
    "RewardError", "RewardSet", "SudokuPrompts", "as_reward_set", "SudokuReward", "XMLFormat", "XMLTagCount",
]

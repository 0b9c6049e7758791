"""Reinforcement learning for the families (method=grpo, dlm/methods/grpo.py): the GRPO objective's maths
(objective.py) and the per-token log-probability estimators a policy ratio needs (estimators.py). Rewards and their
prompt sources are dlm/rewards/ (the reward= and prompts= groups)."""

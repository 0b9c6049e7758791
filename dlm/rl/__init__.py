"""Reinforcement learning for the families (method=grpo, dlm/methods/grpo.py): the GRPO objective's maths
(objective.py), the per-token log-probability estimators a policy ratio needs (estimators.py), prompt sources of
this package (prompts.py) and a reward from a data task's own checker (task_reward.py)."""

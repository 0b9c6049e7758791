"""Reinforcement learning for the families (method=grpo, dlm/methods/grpo.py): the GRPO objective's maths
(objective.py), the per-token log-probability estimators a policy ratio needs (estimators.py), the policy's
construction (policy.py), the rollouts' bookkeeping (rollouts.py) and the settings checks (settings.py). Rewards and
their prompt sources are dlm/rewards/ (the reward= and prompts= groups)."""

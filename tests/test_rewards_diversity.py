"""GroupDistinct (dlm/rewards/diversity.py): a completion's reward shared among its copies in its GRPO group."""

from __future__ import annotations

import json

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dlm.config import CONF_DIR
from dlm.rewards import BracketValidity, GroupDistinct, RewardSet, as_reward_set
from dlm.rewards.base import Reward
from dlm.rewards.diversity import GROUP_COLUMN


def test_group_distinct_by_hand():
    r = GroupDistinct(BracketValidity())
    completions = ["[]", "[]", " []", "()", "((", "((", "[]", "[()]"]
    groups = [0, 0, 0, 0, 0, 0, 1, 1]
    # group 0: "[]" three times (strip) -> 1/3 each, "()" once -> 1, "((" invalid twice -> 0; group 1: each once -> 1
    assert r(completions, [""] * 8, **{GROUP_COLUMN: groups}) == pytest.approx([1 / 3] * 3 + [1, 0, 0, 1, 1])
    # power 0.5: 1/sqrt(3); power 0: the inner reward
    half = GroupDistinct(BracketValidity(), power=0.5)(completions, [""] * 8, **{GROUP_COLUMN: groups})
    assert half[:3] == pytest.approx([3 ** -0.5] * 3)
    assert GroupDistinct(BracketValidity(), power=0)(completions, [""] * 8, **{GROUP_COLUMN: groups}) == \
        BracketValidity()(completions, [""] * 8)
    # free_copies=2: up to two copies paid in full, "[]" x3 -> 2/3 each
    free = GroupDistinct(BracketValidity(), free_copies=2)(completions, [""] * 8, **{GROUP_COLUMN: groups})
    assert free == pytest.approx([2 / 3] * 3 + [1, 0, 0, 1, 1])
    # without group ids the batch is one group: "[]" four times
    assert r(completions, [""] * 8)[:4] == pytest.approx([0.25, 0.25, 0.25, 1.0])


def test_group_distinct_counts_the_prompt_and_scales_the_inner_value():
    class Half(Reward):
        name = "half"

        def score(self, completions, prompts, **columns):
            return [0.5] * len(completions)

    r = GroupDistinct(Half())
    assert r.name == "half_distinct"
    # the same completion after two different prompts is two different strings
    assert r(["a", "a", "a"], ["x", "y", "x"], **{GROUP_COLUMN: [0, 0, 0]}) == pytest.approx([0.25, 0.5, 0.25])
    with pytest.raises(ValueError, match="power must be >= 0"):
        GroupDistinct(Half(), power=-1)
    with pytest.raises(ValueError, match="free_copies must be an integer >= 1"):
        GroupDistinct(Half(), free_copies=0)
    with pytest.raises(ValueError, match="must be a dlm.rewards Reward"):
        GroupDistinct(lambda **kw: [1.0])


def test_brackets_distinct_config_logs_the_plain_validity_at_weight_zero():
    cfg = OmegaConf.load(CONF_DIR / "reward" / "brackets_distinct.yaml")
    rewards = as_reward_set(instantiate(cfg))
    assert isinstance(rewards, RewardSet) and isinstance(rewards.rewards["distinct"], GroupDistinct)
    parts = rewards.components(["[]", "[]", "(", "()"], [""] * 4, **{GROUP_COLUMN: [0, 0, 0, 0]})
    assert parts == {"brackets_valid": [1.0, 1.0, 0.0, 1.0], "distinct": [0.5, 0.5, 0.0, 1.0]}
    assert rewards.total(parts) == [0.5, 0.5, 0.0, 1.0]


SEEN: list[dict] = []


class Recording(Reward):
    """Records the columns GRPO passes (the group ids) and pays the completion's length, so rewards vary."""

    name = "recording"

    def score(self, completions, prompts, **columns):
        SEEN.append({k: list(v) for k, v in columns.items()})
        return [float(len(c)) for c in completions]


def test_grpo_passes_each_completions_group(run_cfg, tmp_path):
    from dlm.train import train

    SEEN.clear()
    run = train(run_cfg("method=grpo", "reward._target_=test_rewards_diversity.Recording", "~reward.novel_bonus",
                        "~reward.task", "method.num_generations=3", "method.prompts_per_step=2",
                        "method.completion_length=4", "sampler=ancestral", "trainer.max_steps=2",
                        "samples.num_unconditional=1", "samples.num_prompted=0", "samples.num_infill=0",
                        "trainer.val_check_interval=100"))
    assert SEEN and all(s[GROUP_COLUMN] == [0, 0, 0, 1, 1, 1] for s in SEEN)
    rollouts = [json.loads(line) for line in open(run / "samples.jsonl") if '"rollout"' in line]
    assert [r["group"] for r in rollouts[:6]] == [0, 0, 0, 1, 1, 1]

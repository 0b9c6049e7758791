"""The table of recipes/grpo.md from finished method=grpo run folders: the start's and the end's fresh-sample
validity and novelty (end of fit, scored by the grammar), val/nll_bound, the last logged rl/kl (to the frozen start),
and the rollouts' validity over the first and last 10 steps; the reward, μ and the sampler's steps.

    python benchmarks/grpo_brackets.py <grpo run_dir> [<grpo run_dir> ...]
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf


def summary(run: Path) -> dict:
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    results = json.loads((run / "results.json").read_text())
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("rl/reward_mean")]
    # the rollouts' plain validity: a reward set logs it as a component (reward=brackets_distinct, weight 0)
    key = "rl/reward/brackets_valid_mean" if rows and rows[0].get("rl/reward/brackets_valid_mean") else "rl/reward_mean"
    reward = [float(r[key]) for r in rows]
    start = OmegaConf.load(Path(cfg.method.init_from) / ".hydra" / "config.yaml").method._target_.rsplit(".", 1)[-1]
    node = cfg.method.estimator or {}
    estimator = node.get("_target_", "the family's").rsplit(".", 1)[-1]
    if "num_samples" in node or estimator == "ELBOLogProb":
        estimator += f" K={node.get('num_samples', 2)}"
    kl = [float(r["rl/kl"]) for r in rows if r.get("rl/kl")]
    reward_cfg = cfg.get("reward") or {}
    parts, weights = reward_cfg.get("rewards") or {"": reward_cfg}, reward_cfg.get("weights") or {}
    # the rewards the advantages use (weight 0: logged only)
    reward_name = "+".join(node.get("_target_", "?").rsplit(".", 1)[-1] for name, node in parts.items()
                           if weights.get(name, 1.0))
    sampler = cfg.get("sampler") or {}
    return {"family": start, "reward": reward_name, "estimator": estimator, "mu": cfg.method.num_iterations,
            "sampler steps": sampler.get("steps", "the run's"),
            "G x prompts": f"{cfg.method.num_generations}x{cfg.method.prompts_per_step}", "lr": cfg.optimizer.lr,
            "beta": cfg.method.beta, "steps": results.get("global_step"),
            "valid (rollouts) first 10": sum(reward[:10]) / max(len(reward[:10]), 1),
            "valid (rollouts) last 10": sum(reward[-10:]) / max(len(reward[-10:]), 1),
            "valid_frac": results.get("sample/valid_frac"), "novel_frac": results.get("sample/novel_frac"),
            "unique_frac": results.get("sample/unique_frac"),
            "val/nll_bound": results.get("val/nll_bound"), "rl/kl last": kl[-1] if kl else None,
            "wall s": results.get("wall_time_s")}


def main(paths: list[str]) -> None:
    table = [summary(Path(p)) for p in paths]
    keys = list(table[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for row in table:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])

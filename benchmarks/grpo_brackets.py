"""The table of recipes/grpo.md from finished method=grpo run folders: the start's and the end's fresh-sample
validity and novelty (end of fit, scored by the grammar), val/nll_bound, the last logged rl/kl (to the frozen start),
and the rollouts' reward over the first and last 10 steps.

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
    reward = [float(r["rl/reward_mean"]) for r in rows]
    start = OmegaConf.load(Path(cfg.method.init_from) / ".hydra" / "config.yaml").method._target_.rsplit(".", 1)[-1]
    node = cfg.method.estimator or {}
    estimator = node.get("_target_", "the family's").rsplit(".", 1)[-1]
    if "num_samples" in node or estimator == "ELBOLogProb":
        estimator += f" K={node.get('num_samples', 2)}"
    kl = [float(r["rl/kl"]) for r in rows if r.get("rl/kl")]
    return {"family": start, "estimator": estimator,
            "G x prompts": f"{cfg.method.num_generations}x{cfg.method.prompts_per_step}", "lr": cfg.optimizer.lr,
            "beta": cfg.method.beta, "steps": results.get("global_step"),
            "reward first 10": sum(reward[:10]) / max(len(reward[:10]), 1),
            "reward last 10": sum(reward[-10:]) / max(len(reward[-10:]), 1),
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

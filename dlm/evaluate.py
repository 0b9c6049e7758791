"""Evaluate a run: `python -m dlm.evaluate run=<run folder | .ckpt> [num_mc=8] [sampler=low_confidence] ...`.

Likelihood: the family's `nll_bound` (nats/token; exact NLL for a family with `exact_nll = True`, e.g. AR) over
the validation rows, averaged over `num_mc` Monte-Carlo draws with fixed seeds, with the Monte-Carlo standard
error (spread of the K whole-set estimates / sqrt K) and the data standard error (spread over sequences).
A family without a tractable bound (SUNDAE) raises; the bound is then recorded as null with the reason.

Generation: unconditional / prompted / infill samples through the family's sampler (the run's, or another
composed from conf/sampler), scored by the data's task, unigram entropy of the samples, network calls and
tokens/s, the sampler settings beside the numbers, and optionally the generative perplexity of the samples
under a scorer (an HF causal LM by name or path, or a dlm run).

Task accuracy: `reward=<conf/reward option>` (and `prompts=`; a GRPO run's own where not given) completes every
prompt row at each of `reward_eval.lengths` and scores it (dlm/reward_eval.py, d1's zero-shot protocol):
`eval/reward/<component>@<length>`, the completions in <run>/eval_rewards.jsonl.

Results are merged into <run>/results.json under `eval/...`, appended to <run>/eval.jsonl, written to the
wandb run's summary, and the last stdout line is `results: <path>`.

`model=<conf/model option>` instead of `run=` evaluates a checkpoint without a run folder (dlm.run.load_model:
method= default mdlm, the model's conventions, data= for the likelihood rows); the results go to `out_dir`
(default evals/<method>-<model>/) and no wandb run is touched.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from dlm import checks
from dlm.build import build_sampler
from dlm.config import CONF_DIR, ConfigError, build, exit_on_bad_overrides, register_resolvers
from dlm.errors import user_errors
from dlm.gen_perplexity import generative_perplexity, make_scorer, scorer_problem
from dlm.likelihood import likelihood
from dlm.progress import Bar
from dlm.run import LoadedRun, load_run, plain
from dlm.run_folder import RunFolder

# Imports inside functions: the scorer (transformers), wandb and the data loaders load only when the request
# uses them, so `--help` and a bad request answer fast. The likelihood is dlm/likelihood.py; the generative
# perplexity's scorers dlm/gen_perplexity.py.

register_resolvers()

PREFIX = "eval/"


# ---- generation ---------------------------------------------------------------------------------------------
def request_sampler(cfg: DictConfig, run: LoadedRun):
    """(sampler, its config, its name): the composed one (cfg.sampler) or the run's, with `steps`/`sampler_args`
    on top (dlm.build.build_sampler)."""
    node = cfg.get("sampler")
    if node is None and run.cfg.get("sampler") is None:  # a family without a sampler config: its own default
        return run.module.sampler, {}, type(run.module.sampler).__name__
    base = OmegaConf.to_container(node if node is not None else run.cfg.sampler, resolve=True)
    fields = OmegaConf.to_container(cfg.get("sampler_args") or OmegaConf.create({}), resolve=True)
    sampler = build_sampler(base, cfg.get("steps"), fields)
    base = {**base, **({"steps": int(cfg.steps)} if cfg.get("steps") is not None else {}), **fields}
    name = (HydraChoice.get("sampler") if node is not None else None) or run.choices.get("sampler")
    name = name or str(base.get("_target_", "sampler")).rsplit(".", 1)[-1]
    return sampler, base, name


class HydraChoice:
    @staticmethod
    def get(group: str) -> str | None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        return HydraConfig.get().runtime.choices.get(group)


def generation(run: LoadedRun, sampler, samples: DictConfig, seed: int,
               progress: bool = True) -> tuple[list[dict], dict[str, Any]]:
    from dlm.callbacks.samples import write_samples

    module, dm = run.module, run.datamodule
    previous = module.sampler
    module.sampler = sampler
    try:
        return write_samples(
            module, tokenizer=dm.tokenizer, task=getattr(dm, "task", None),
            length=samples.get("length") or dm.seq_len, num_unconditional=samples.num_unconditional,
            num_prompted=samples.num_prompted, num_infill=samples.num_infill, seed=seed, progress=progress,
        )
    finally:
        module.sampler = previous


# ---- task accuracy ------------------------------------------------------------------------------------------
def reward_task(cfg: DictConfig, run: LoadedRun):
    """(reward, prompt source) when the request gives reward= or prompts= (the other from a GRPO run's own config
    where the request does not give it); None when it gives neither."""
    from dlm.rewards.base import as_reward_set

    if cfg.get("reward") is None and cfg.get("prompts") is None:
        return None
    reward_node = cfg.get("reward") if cfg.get("reward") is not None else run.cfg.get("reward")
    prompts_node = cfg.get("prompts") if cfg.get("prompts") is not None else run.cfg.get("prompts")
    for group, node in (("reward", reward_node), ("prompts", prompts_node)):
        if node is None:
            raise ConfigError([f"task accuracy needs {group}=<conf/{group} option> (the run has none of its own)"])
    return as_reward_set(build(reward_node, "reward")), build(prompts_node, "prompts")


def task_accuracy(cfg: DictConfig, run: LoadedRun, reward, prompts, sampler_cfg: dict, sampler,
                  progress: bool) -> dict[str, Any]:
    from itertools import islice

    from dlm.reward_eval import reward_evaluation

    opts = cfg.reward_eval
    rows = list(islice(prompts.rows(str(opts.split)), opts.num_prompts))
    if not rows:
        raise ConfigError([f"prompts= has no rows in split {opts.split!r}: nothing to evaluate"])
    lengths = [int(v) for v in opts.lengths]
    per_token = opts.get("steps_per_token")

    def sampler_for_length(length: int):
        if per_token is None:
            return sampler
        if not sampler_cfg:
            raise ConfigError([f"reward_eval.steps_per_token needs a sampler config (sampler=<conf/sampler option>); "
                               f"the run's sampler {type(sampler).__name__} has none"])
        return build_sampler(sampler_cfg, max(1, round(per_token * length)))

    with Bar(len(rows) * len(lengths), "task accuracy", enabled=progress) as bar:
        metrics, records = reward_evaluation(run.module, rows, reward, lengths, sampler_for_length=sampler_for_length,
                                             chat=opts.get("chat_prompts"), batch_size=int(opts.batch_size),
                                             seed=int(cfg.seed), progress=bar.advance)
    with open(run.run_dir / "eval_rewards.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return metrics


# ---- writing ------------------------------------------------------------------------------------------------
def merge_results(path: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Replace the `eval/` keys of results.json (a previous evaluation's) by these, keep the rest."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    results = {k: v for k, v in results.items() if not k.startswith(PREFIX)}
    results.update(metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the run's wandb run (dlm.tracking.existing_run_id)."""
    from dlm.tracking import existing_run_id

    return existing_run_id(run_dir)


def update_wandb_summary(run: LoadedRun, metrics: dict[str, Any]) -> str | None:
    """Resume the run's wandb run by id (offline without credentials or without a reachable server, as training
    decides) and write the metrics to its summary. Returns the run id, or None when the run has no wandb run."""
    run_id = wandb_run_id(run.run_dir)
    if run_id is None:
        return None
    import wandb

    from dlm.tracking import INIT_TIMEOUT_S, choose_wandb_mode, offline_note

    node = OmegaConf.select(run.cfg, "logger.wandb") or {}
    project = plain(node).get("project", "dlm") if node else "dlm"
    entity = plain(node).get("entity") if node else None
    mode, reason = choose_wandb_mode("auto")
    if reason:
        print(offline_note(reason, run.run_dir, run_id))
    experiment = wandb.init(
        project=project, entity=entity, id=run_id, resume="allow", dir=str(run.run_dir),
        mode=mode, job_type="eval",
        settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S, silent=True, console="off"),
    )
    experiment.summary.update({k: v for k, v in metrics.items() if v is not None})
    experiment.finish()
    return run_id


def check_request(cfg: DictConfig) -> None:
    """The request's own values, checked before the run is loaded; every problem in one ConfigError."""
    problems = checks.collect(
        checks.run_given(cfg, "a run folder (printed as `run_dir: ...` by python -m dlm.train) or a .ckpt inside "
                              "<run>/checkpoints/"),
        checks.integer(cfg, "num_mc", 1),
        checks.integer(cfg, "max_batches", 1, nullable=True, null_means=": the whole validation split"),
        checks.integer(cfg, "batch_size", 1, nullable=True, null_means=": the data's val_batch_size"),
        checks.integer(cfg, "steps", 1, nullable=True, null_means=": the sampler's own"),
        checks.integer(cfg, "seed", 0, 2**32 - 1),
        checks.integer(cfg, "scorer_batch_size", 1),
        checks.integer(cfg, "samples.num_unconditional", 0),
        checks.integer(cfg, "samples.num_prompted", 0),
        checks.integer(cfg, "samples.num_infill", 0),
        checks.integer(cfg, "samples.length", 1, nullable=True, null_means=": the data's seq_len"),
        checks.number(cfg, "reward_eval.steps_per_token", 0, low_open=True, nullable=True),
        checks.integer(cfg, "reward_eval.num_prompts", 1, nullable=True, null_means=": every row of the split"),
        checks.integer(cfg, "reward_eval.batch_size", 1),
        checks.boolean(cfg, "reward_eval.chat_prompts", nullable=True),
        lengths_problem(cfg),
        checks.boolean(cfg, "likelihood"),
        checks.boolean(cfg, "use_ema"),
        checks.choice(cfg, "wandb", ("auto", "off")),
        checks.torch_device(cfg),
    )
    if cfg.get("scorer"):
        problems += [p for p in [scorer_problem(str(cfg.scorer))] if p]
    if problems:
        raise ConfigError(problems)


def lengths_problem(cfg: DictConfig) -> str | None:
    lengths = OmegaConf.select(cfg, "reward_eval.lengths")
    if lengths is None or (isinstance(lengths, Sequence) and not isinstance(lengths, str) and lengths
                           and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in lengths)):
        return None
    return f"reward_eval.lengths={lengths!r} must be a non-empty list of positive integers (e.g. [128,256,512])"


def load_evaluated(cfg: DictConfig) -> LoadedRun:
    """The run= folder, or for model= the checkpoint from its model config (dlm.run.load_model) with its results
    folder (out_dir, default evals/<method>-<model>) as the run folder the results go to."""
    if cfg.get("model") is None:
        return load_run(cfg.run, ckpt=cfg.ckpt, device=cfg.device, use_ema=bool(cfg.get("use_ema", True)))
    from dlm.run import load_requested_model

    run = load_requested_model(device=cfg.device, setup_data=True)
    run.run_dir = Path(cfg.get("out_dir") or Path("evals") / run.cfg.name).absolute()
    run.run_dir.mkdir(parents=True, exist_ok=True)
    return run


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], Path]:
    check_request(cfg)
    started = time.perf_counter()
    run = load_evaluated(cfg)
    # loaded before anything is written: a scorer that cannot load (a refused checkpoint) leaves no trace
    scorer = make_scorer(cfg.scorer, cfg.device, cfg.num_mc, cfg.seed, cfg.scorer_batch_size) if cfg.get("scorer") else None
    out: dict[str, Any] = {"ckpt": str(run.ckpt_path or run.cfg.model.get("pretrained")), "seed": int(cfg.seed)}
    progress = bool(cfg.get("progress_bar", True))

    if cfg.likelihood:
        loader = run.datamodule.val_dataloader()
        if cfg.get("batch_size"):
            from torch.utils.data import DataLoader

            loader = DataLoader(loader.dataset, batch_size=int(cfg.batch_size), shuffle=False,
                                collate_fn=loader.collate_fn)
        out.update(likelihood(run.module, loader, num_mc=cfg.num_mc, seed=cfg.seed, max_batches=cfg.max_batches,
                              progress=progress))

    sampler, sampler_cfg, sampler_name = request_sampler(cfg, run)
    out["sampler"] = sampler_name
    out.update({f"sampler/{k}": v for k, v in sampler_cfg.items() if not isinstance(v, (dict, list))})
    rows, sample_metrics = generation(run, sampler, cfg.samples, cfg.seed, progress=progress)
    out.update(sample_metrics)  # keys sample/...
    if rows:
        with open(run.run_dir / "eval_samples.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps({**row, "sampler": sampler_name, "steps": sampler_cfg.get("steps")}) + "\n")
    if scorer is not None:
        texts = [r["text"] for r in rows if r["kind"] == "unconditional"]
        out.update(generative_perplexity(texts, scorer))
    task = reward_task(cfg, run)
    if task is not None:
        out.update(task_accuracy(cfg, run, *task, sampler_cfg, sampler, progress))
    out["time_s"] = round(time.perf_counter() - started, 2)

    metrics = {PREFIX + k: v for k, v in out.items()}
    path = Path(cfg.output) if cfg.get("output") else RunFolder(run.run_dir).results
    merge_results(path, metrics)
    with open(run.run_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if cfg.get("wandb", "auto") == "auto" and run.ckpt_path is not None:  # model=: no run, so no wandb run
        try:
            run_id = update_wandb_summary(run, metrics)
            if run_id:
                print(f"wandb: eval metrics written to the summary of run {run_id}")
        except Exception as err:  # noqa: BLE001 - tracking never loses a finished evaluation
            print(f"wandb: could not update the run summary ({type(err).__name__}: {err})", file=sys.stderr)
    return metrics, path


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    lines = []
    nll = metrics.get(PREFIX + "nll_bound")
    if nll is not None:
        k = metrics[PREFIX + "nll_bound_num_mc"]
        kind = "NLL (exact)" if metrics[PREFIX + "nll_bound_exact"] else "NLL bound"
        lines.append(f"{kind}: {nll:.4f} ± {metrics[PREFIX + 'nll_bound_stderr']:.4f} nats/token (MC stderr, K={k}; "
                     f"data stderr {metrics[PREFIX + 'nll_bound_stderr_data']:.4f}), "
                     f"PPL bound {metrics[PREFIX + 'ppl_bound']:.3f}, {metrics[PREFIX + 'nll_bound_tokens']} tokens")
    elif PREFIX + "nll_bound_error" in metrics:
        lines.append(f"NLL bound: none ({metrics[PREFIX + 'nll_bound_error']})")
    samples = {k.removeprefix(PREFIX): v for k, v in metrics.items() if k.startswith(PREFIX + "sample/")}
    if samples:
        lines.append("samples: " + ", ".join(f"{k}={v:.4g}" for k, v in samples.items()))
    if metrics.get(PREFIX + "gen_ppl") is not None:
        lines.append(f"gen PPL {metrics[PREFIX + 'gen_ppl']:.3f} under {metrics[PREFIX + 'gen_ppl_scorer']}")
    accuracy = {}
    for key, value in metrics.items():
        name = key.removeprefix(PREFIX + "reward/")
        if name != key and "@" in name and not name.split("@")[0].endswith(("_stderr", "network_calls", "seconds")):
            accuracy[name] = value
    if accuracy:
        lines.append("task reward (mean per length): " + ", ".join(f"{k}={v:.4g}" for k, v in accuracy.items()))
    settings = {k.removeprefix(PREFIX + "sampler/"): v for k, v in metrics.items() if k.startswith(PREFIX + "sampler/")}
    lines.append(f"sampler {metrics.get(PREFIX + 'sampler')}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return lines


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def hydra_main(cfg: DictConfig) -> None:
    with user_errors():
        metrics, path = evaluate(cfg)
    for line in summary_lines(metrics):
        print(line)
    print(f"results: {path}")


def main() -> None:
    exit_on_bad_overrides(sys.argv[1:], "evaluate")  # e.g. sampler=nosuch: one message
    hydra_main()


if __name__ == "__main__":
    main()

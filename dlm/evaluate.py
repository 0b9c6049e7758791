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
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from dlm import checks
from dlm.build import build_sampler
from dlm.config import CONF_DIR, ConfigError, build, exit_on_bad_overrides, register_resolvers
from dlm.errors import UserError, user_errors
from dlm.progress import Bar
from dlm.run import LoadedRun, load_run, plain
from dlm.run_folder import RunFolder

# Imports inside functions: the scorer (transformers), wandb and the data loaders load only when the request
# uses them, so `--help` and a bad request answer fast.

register_resolvers()

PREFIX = "eval/"
MC_SEED_STRIDE = 1000


# ---- likelihood ---------------------------------------------------------------------------------------------
@torch.no_grad()
def likelihood(module, loader, num_mc: int = 8, seed: int = 0, max_batches: int | None = None,
               progress: bool = True) -> dict[str, Any]:
    """The per-token NLL bound over `loader`, averaged over num_mc Monte-Carlo draws.

    Draw k evaluates every batch b with `torch.Generator().manual_seed(seed + 1000 * k + b)`: fixed, so two
    evaluations of one checkpoint agree exactly, and independent across draws, so their spread gives the
    Monte-Carlo standard error. Families with `exact_nll = True` are evaluated once (K = 1, stderr 0).
    Returns plain numbers; `nll_bound` is None with `error` set when the family has no bound. ``progress``: a bar
    over the draws' batches (dlm.progress: on a terminal only).
    """
    if int(num_mc) < 1 or (max_batches is not None and int(max_batches) < 1):
        raise ValueError(f"num_mc={num_mc} and max_batches={max_batches} must be >= 1 (max_batches: or None, all)")
    exact = module.exact_nll
    draws = 1 if exact else int(num_mc)
    try:
        batches = len(loader)
    except TypeError:  # an iterable without a length: a bar without a total
        batches = None
    if batches is not None and max_batches is not None:
        batches = min(batches, max(int(max_batches), 0))
    with Bar(draws * batches if batches is not None else None, "likelihood", enabled=progress) as bar:
        return _likelihood(module, loader, exact, draws, seed, max_batches, bar)


def _likelihood(module, loader, exact: bool, draws: int, seed: int, max_batches: int | None, bar) -> dict[str, Any]:
    device = module.compute_device
    totals: list[float] = []  # per draw: summed NLL over all counted tokens
    per_seq: torch.Tensor | None = None  # summed over draws, per sequence
    seq_tokens: list[torch.Tensor] = []
    num_tokens = 0
    for k in range(draws):
        total = 0.0
        seq_sums = []
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            batch = {key: v.to(device) for key, v in batch.items()}
            generator = torch.Generator(device=device).manual_seed(seed + MC_SEED_STRIDE * k + b)
            torch.manual_seed(seed + MC_SEED_STRIDE * k + b)  # for a family that draws from the global RNG
            try:
                nll = module.nll_bound(batch, generator=generator)
            except Exception as err:  # noqa: BLE001 - a family without a bound says so by raising
                if k == 0 and b == 0:
                    return {"nll_bound": None, "ppl_bound": None, "nll_bound_error": f"{type(err).__name__}: {err}",
                            "nll_bound_exact": exact}
                raise
            nll = nll.float() * batch["loss_mask"].float()
            seq_sums.append(nll.sum(1).cpu())
            total += float(nll.sum())
            if k == 0:
                seq_tokens.append(batch["loss_mask"].sum(1).cpu())
                num_tokens += int(batch["loss_mask"].sum())
            bar.advance()
        totals.append(total)
        sums = torch.cat(seq_sums)
        per_seq = sums if per_seq is None else per_seq + sums
    if num_tokens == 0:
        raise ValueError("no validation tokens to evaluate (empty validation split or max_batches=0)")
    estimates = torch.tensor(totals, dtype=torch.float64) / num_tokens
    nll = float(estimates.mean())
    mc_stderr = float(estimates.std(unbiased=True) / math.sqrt(draws)) if draws > 1 else 0.0
    # Data standard error: per-sequence NLL per token (averaged over draws), ratio estimator's linearisation.
    tokens = torch.cat(seq_tokens).double()
    seq_nll = per_seq.double() / draws
    resid = seq_nll - nll * tokens
    n = tokens.numel()
    data_stderr = float(resid.std(unbiased=True) * math.sqrt(n) / tokens.sum()) if n > 1 else 0.0
    return {
        "nll_bound": nll,
        "ppl_bound": math.exp(nll),
        "nll_bound_stderr": mc_stderr,
        "nll_bound_stderr_data": data_stderr,
        "nll_bound_num_mc": draws,
        "nll_bound_exact": exact,
        "nll_bound_tokens": num_tokens,
        "nll_bound_sequences": n,
    }


# ---- generative perplexity ------------------------------------------------------------------------------------
class HFScorer:
    """Exact NLL of texts under a Hugging Face causal LM (hub name or local folder)."""

    exact = True

    def __init__(self, name_or_path: str, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = str(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.name)
        self.model = AutoModelForCausalLM.from_pretrained(self.name).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_len = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", 1024)

    @torch.no_grad()
    def nll(self, texts: list[str]) -> tuple[float, int]:
        """(summed NLL in nats, number of scored tokens). Each text is scored after a BOS (or EOS when the
        tokenizer has no BOS, as GPT-2 does) and including a closing EOS, so every token of it counts."""
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        docs = []
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if tok.eos_token_id is not None:
                ids = ids + [tok.eos_token_id]
            if start is not None:
                ids = [start] + ids
            docs.append(ids[: self.max_len])
        total, count = 0.0, 0
        for i in range(0, len(docs), self.batch_size):
            chunk = [d for d in docs[i : i + self.batch_size] if len(d) > 1]
            if not chunk:
                continue
            width = max(len(d) for d in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, d in enumerate(chunk):
                ids[j, : len(d)] = torch.tensor(d)
                mask[j, : len(d)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target, counted = ids[:, 1:], mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            total += float(nll[counted].sum())
            count += int(counted.sum())
        return total, count


class RunScorer:
    """NLL of texts under a dlm run: exact for a family with `exact_nll` (AR), else its bound (K draws)."""

    def __init__(self, run: LoadedRun, num_mc: int = 8, seed: int = 0, batch_size: int = 16):
        self.run = run
        self.name = str(run.run_dir)
        self.exact = run.module.exact_nll
        self.num_mc = 1 if self.exact else num_mc
        self.seed = seed
        self.batch_size = batch_size

    @torch.no_grad()
    def nll(self, texts: list[str]) -> tuple[float, int]:
        """Texts become rows the way the run's data made them (one document per row, EOS fill)."""
        from dlm.data.packing import pad_each

        tok, dm = self.run.datamodule.tokenizer, self.run.datamodule
        docs = [tok.encode(t) for t in texts]
        rows = pad_each(docs, dm.seq_len, tok.eos_token_id)
        ids = torch.from_numpy(rows["input_ids"])
        counted = torch.from_numpy(rows["loss_mask"])
        # Score each document and its first EOS; the remaining fill is the data's convention, not the text.
        lengths = torch.tensor([min(len(d) + 1, dm.seq_len) for d in docs])
        counted &= torch.arange(dm.seq_len)[None, :] < lengths[:, None]
        batches = [{"input_ids": ids[i : i + self.batch_size], "loss_mask": counted[i : i + self.batch_size]}
                   for i in range(0, len(docs), self.batch_size)]
        out = likelihood(self.run.module, batches, num_mc=self.num_mc, seed=self.seed)
        if out["nll_bound"] is None:
            raise ValueError(f"scorer {self.name} cannot score texts: {out['nll_bound_error']}")
        return out["nll_bound"] * out["nll_bound_tokens"], out["nll_bound_tokens"]


def scorer_problem(spec: str) -> str | None:
    """Why the scorer ``spec`` cannot be loaded here (no such folder; a hub model while offline), or None. Checked
    before the evaluation starts, not after it."""
    from dlm.data.hub import looks_like_path, tokenizer_problem

    path = Path(spec).expanduser()
    if RunFolder(path).is_run() or path.suffix == ".ckpt":
        return None
    if looks_like_path(str(spec)) and not path.exists():
        return f"scorer={spec}: no such folder; give a dlm run folder, a local HF causal LM folder, or a hub id such as gpt2"
    if tokenizer_problem(str(spec)):  # a hub id, offline, not cached (the tokenizer's check answers for the model)
        return (f"scorer={spec} is a model on the Hugging Face Hub and this machine is offline (HF_HUB_OFFLINE=1) with "
                f"no copy in the local HF cache: point scorer at a local HF causal LM folder or a dlm run folder")
    return None


def make_scorer(spec: str, device: str, num_mc: int, seed: int, batch_size: int):
    path = Path(spec).expanduser()
    if RunFolder(path).is_run() or path.suffix == ".ckpt":
        return RunScorer(load_run(path, device=device), num_mc=num_mc, seed=seed, batch_size=batch_size)
    problem = scorer_problem(spec)
    if problem:
        raise UserError(problem)
    try:
        return HFScorer(spec, device=device, batch_size=batch_size)
    except OSError as err:  # transformers' answer to a folder or id without a causal LM
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"scorer={spec}: could not load an HF causal LM ({first}); give a dlm run folder, a local "
                        f"HF causal LM folder, or a hub id such as gpt2") from err


def generative_perplexity(texts: list[str], scorer) -> dict[str, Any]:
    texts = [t for t in texts if t]
    if not texts:
        return {"gen_nll": None, "gen_ppl": None, "gen_ppl_scorer": scorer.name, "gen_ppl_tokens": 0,
                "gen_ppl_exact": bool(scorer.exact), "gen_ppl_error": "every unconditional sample was empty"}
    total, count = scorer.nll(texts)
    nll = total / count if count else float("nan")
    return {"gen_nll": nll, "gen_ppl": math.exp(nll) if count else None, "gen_ppl_scorer": scorer.name,
            "gen_ppl_tokens": count, "gen_ppl_exact": bool(scorer.exact)}


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

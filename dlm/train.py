"""Train a diffusion language model: `python -m dlm.train [group=option ...] [key=value ...]`.

Hydra composes conf/train.yaml; everything is built from config with `_target_`. The last stdout line is
`run_dir: <path>`; the run folder holds .hydra/, metrics.csv, results.json, samples.jsonl, checkpoints/
and wandb/.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dlm.config import (
    CONF_DIR,
    ConfigError,
    build,
    check_config,
    preflight,
    register_resolvers,
    resolve_ckpt_path,
    running_hydra_config,
)
from dlm.errors import EXIT_USER_ERROR, UserError

# torch and Lightning are imported where a run starts, so that --cfg, --help and bad overrides answer fast.
register_resolvers()


def build_datamodule(cfg: DictConfig):
    """The datamodule of cfg.data; a bad path or value becomes a ConfigError naming it (no traceback)."""
    return build(cfg.data, "data", FileNotFoundError)


def build_module(cfg: DictConfig, datamodule, backbone=None, defer_to_zero3: bool = False):
    """The LightningModule of cfg.method around a backbone built for the datamodule's tokenizer.

    ``defer_to_zero3`` (the training CLI): when cfg.trainer is DeepSpeed ZeRO-3 and cfg.model loads pretrained HF
    weights, the backbone is a meta-device placeholder that ``configure_model`` replaces inside the strategy's
    ``deepspeed.zero.Init`` (dlm.deepspeed_utils.load_backbone_into_partitions)."""
    tokenizer = datamodule.tokenizer
    deferred = None
    if backbone is None:
        from dlm.deepspeed_utils import (
            load_backbone_into_partitions,
            loads_pretrained_weights,
            placeholder_backbone,
            zero3_strategy,
        )

        if defer_to_zero3 and loads_pretrained_weights(cfg.model) and zero3_strategy(cfg.get("trainer")) is not None:
            # ZeRO-3: a meta placeholder now, the checkpoint loaded into partitions in configure_model (inside
            # deepspeed.zero.Init), so no rank ever holds the whole model on the host
            backbone = placeholder_backbone(cfg.model, tokenizer.vocab_size)
            deferred = functools.partial(load_backbone_into_partitions, cfg.model, tokenizer.vocab_size,
                                         compile_mode=cfg.get("compile"))  # called with the live strategy
        else:
            backbone = build(cfg.model, "model", vocab_size=tokenizer.vocab_size)
    max_len = getattr(backbone, "max_seq_len", None)
    if max_len is not None and datamodule.seq_len > max_len:
        raise ConfigError(
            [f"data.seq_len={datamodule.seq_len} exceeds the model's maximum sequence length {max_len}: "
             f"lower data.seq_len or raise model.max_seq_len"]
        )
    parts = {
        "backbone": backbone,
        "tokenizer": tokenizer,
        "schedule": build(cfg.schedule, "schedule"),
        "sampler": build(cfg.sampler, "sampler"),
        "optimizer": build(cfg.optimizer, "optimizer"),
        "lr_scheduler": build(cfg.lr_scheduler, "lr_scheduler") if cfg.get("lr_scheduler") else None,
    }
    module = build(cfg.method, "method", **parts)
    if deferred is not None:
        module.defer_backbone(deferred)
    return module


def build_loggers(cfg: DictConfig) -> list:
    return [build(node, "logger") for node in (cfg.get("logger") or {}).values() if node is not None]


def build_callbacks(cfg: DictConfig) -> list:
    return [build(node, "callbacks") for node in (cfg.get("callbacks") or {}).values() if node is not None]


def log_config(loggers: list, cfg: DictConfig) -> None:
    hc = running_hydra_config()
    choices = dict(hc.runtime.choices) if hc is not None else {}
    params = OmegaConf.to_container(cfg, resolve=True)
    params["choices"] = {k: v for k, v in choices.items() if not k.startswith("hydra")}
    for logger in loggers:
        logger.log_hyperparams(params)


def final_results(trainer, callbacks: list, started: float, status: str) -> dict:
    results = {
        "status": status,
        "global_step": trainer.global_step,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    for key, value in trainer.callback_metrics.items():
        results[key] = float(value)
    for callback in callbacks:
        results.update(getattr(callback, "metrics", {}) or {})
        if hasattr(callback, "tokens_seen"):
            results["train/tokens_seen"] = callback.tokens_seen
    return results


def export_model(module, run_dir: Path) -> None:
    """A reusable export in <run_dir>/hf where the model allows one: the family's own (AR: a causal LM), else
    for an HF backbone the consolidated checkpoint as an HF folder (A2D runs; DeepSpeed ZeRO folders too)."""
    from dlm.models.hf import HFCausalLM

    if module.global_rank != 0:
        return
    try:
        if hasattr(module, "export_hf"):
            if (run_dir / "checkpoints" / "last.ckpt").is_dir():  # DeepSpeed: ZeRO-3 partitions the live weights,
                from dlm.run import load_run  # so export a CPU copy loaded from the consolidated checkpoint

                module = load_run(run_dir, setup_data=False).module
            module.export_hf(run_dir / "hf")
        elif isinstance(module.backbone, HFCausalLM) and (run_dir / ".hydra" / "config.yaml").is_file():
            from dlm.deepspeed_utils import consolidate_run

            consolidate_run(run_dir)
    except (ValueError, TypeError, NotImplementedError) as err:  # no export format for this model: say so
        print(f"export: skipped ({err})")


def finish_loggers(loggers: list, results: dict) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank > 0:  # other ranks hold Lightning's dummy experiments (summary is a no-op function)
        return
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        summary = getattr(experiment, "summary", None)
        if summary is not None:  # wandb: final metrics in the run summary, then close the run
            summary.update(results)
            experiment.finish()


def train(cfg: DictConfig) -> Path:
    import lightning as L

    from dlm.compile import compile_backbone
    from dlm.deepspeed_utils import zero3_strategy
    from dlm.methods.base import NonFiniteLossError
    from dlm.plan import build_plan

    started = time.perf_counter()
    run_dir = Path(cfg.paths.run_dir)
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)

    if cfg.dry_run:
        plan = build_plan(cfg, vocab_size=datamodule.tokenizer.vocab_size)
        print(f"plan for {cfg.name} (method {cfg.method._target_}, model {cfg.model._target_}):")
        for line in plan.lines():
            print("  " + line)
        print(f"  outputs: {run_dir} (checkpoints/, metrics.csv, results.json, samples.jsonl, wandb/)")
        return run_dir

    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    try:
        datamodule.setup("fit")
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError([f"data: {err}"]) from err
    module = build_module(cfg, datamodule, defer_to_zero3=True)
    module.static_kv_cache = cfg.get("static_kv_cache")
    if not module.backbone_deferred:  # a deferred (ZeRO-3) backbone is compiled where it is built
        compile_backbone(module.backbone, cfg.get("compile"))  # in place: checkpoint keys unchanged (dlm/compile.py)
    if cfg.get("compile") and zero3_strategy(cfg.get("trainer")) is not None:
        # measured on 2 CPU ranks (tests/test_zero3_cpu.py): the same losses, but ZeRO-3's per-module gather hooks
        # split the graph and exhaust Dynamo's recompile limit, so most of the model runs eagerly
        print("warning: compile with DeepSpeed ZeRO-3: correct, but its per-module parameter hooks split the compiled "
              "graph (expect little speed-up); ZeRO-2 compiles cleanly", file=sys.stderr)
    loggers = build_loggers(cfg)
    callbacks = build_callbacks(cfg)
    log_config(loggers, cfg)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    trainer = build(cfg.trainer, "trainer", MisconfigurationException, TypeError, logger=loggers or False, callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    status = "completed"
    if module.nonfinite_stop:
        status = "stopped: non-finite loss"
    elif trainer.interrupted:
        status = "interrupted"
    else:
        if trainer.callback_metrics.get("val/loss") is None or module.last_val_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
    if not module.nonfinite_stop:
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
        export_model(module, run_dir)
    results = final_results(trainer, callbacks, started, status)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    finish_loggers(loggers, results)
    if module.nonfinite_stop:
        stop = module.nonfinite_stop
        raise NonFiniteLossError(
            f"training stopped at step {stop['step']}: loss was {stop['loss']}; last finite state: {stop['checkpoint']}"
        )
    return run_dir


def in_multirun() -> bool:
    from hydra.types import RunMode

    hc = running_hydra_config()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def record_failure(run_dir: Path, err: BaseException) -> None:
    """A failed sweep job leaves results.json saying why, so the sweep's table shows it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    results = run_dir / "results.json"
    previous = json.loads(results.read_text()) if results.is_file() else {}
    previous["status"] = f"failed: {type(err).__name__}: " + " ".join(str(err).split())
    results.write_text(json.dumps(previous, indent=2) + "\n")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    from dlm.methods.base import NonFiniteLossError

    run_dir = Path(cfg.paths.run_dir)
    try:
        run_dir = train(cfg)
    except Exception as err:
        # In a sweep one failing job is reported and the others go on; a single run exits non-zero.
        if in_multirun():
            record_failure(run_dir, err)
            print(f"error: job {HydraConfig.get().job.num} failed: {err}", file=sys.stderr)
            print(f"run_dir: {run_dir}")
            return float("inf") if cfg.get("optimized_metric") else None
        if isinstance(err, (UserError, NonFiniteLossError)):
            print(f"error: {err}", file=sys.stderr)
            if isinstance(err, NonFiniteLossError):
                print(f"run_dir: {run_dir}")
            sys.exit(EXIT_USER_ERROR if isinstance(err, UserError) else 1)
        raise
    print(f"run_dir: {run_dir}")
    return optimized_value(cfg, run_dir)


def optimized_value(cfg: DictConfig, run_dir: Path) -> float | None:
    """The value a hyper-parameter sweeper optimises (optimized_metric), read from the job's results.json."""
    metric = cfg.get("optimized_metric")
    if not metric or cfg.dry_run:
        return None
    results = json.loads((run_dir / "results.json").read_text())
    if metric not in results:
        raise ConfigError([f"optimized_metric={metric} is not among the run's results: {', '.join(sorted(results))}"])
    return float(results[metric])


def main() -> None:
    """Check the overrides first, so that every bad one is reported at once with the valid choices."""
    multirun = any(a in ("-m", "--multirun") for a in sys.argv[1:])
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    if not multirun and not any("," in o.split("=", 1)[1] and "[" not in o for o in overrides):
        problems = preflight(overrides)
        if problems:
            print("error: invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
            sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()

"""Train a diffusion language model: `python -m dlm.train [group=option ...] [key=value ...]`.

Hydra composes conf/train.yaml; everything is built from config with `_target_`. The last stdout line is
`run_dir: <path>`; the run folder holds .hydra/, metrics.csv, results.json, samples.jsonl, checkpoints/
and wandb/.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dlm import safe_load
from dlm.build import build_callbacks, build_datamodule, build_loggers, build_module
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
from dlm.errors import EXIT_USER_ERROR, UserError, user_errors
from dlm.run_folder import (
    RunFolder,
    append_resume_record,
    drop_metrics_after,
    forget_claims,
    release_run_dir,
    write_hydra_record,
)

# torch and Lightning are imported where a run starts, so that --cfg, --help and bad overrides answer fast.
register_resolvers()


class Terminated(RuntimeError):
    """The run got SIGTERM: it stopped at a step boundary and saved last.ckpt (exit status 143 = 128 + SIGTERM)."""

    exit_code = 143


def log_config(loggers: list, cfg: DictConfig) -> None:
    hc = running_hydra_config()
    choices = dict(hc.runtime.choices) if hc is not None else {}
    params = OmegaConf.to_container(cfg, resolve=True)
    params["choices"] = {k: v for k, v in choices.items() if not k.startswith("hydra")}
    for logger in loggers:
        logger.log_hyperparams(params)


def final_results(trainer, callbacks: list, started: float, status: str) -> dict:
    """results.json: the status, the final metrics, and the wall time of this segment and (summed over the earlier
    segments of a resumed run, dlm/callbacks/continuity.py) of the whole run."""
    from dlm.callbacks.continuity import RunContinuity

    segment = time.perf_counter() - started
    before = sum(c.before for c in callbacks if isinstance(c, RunContinuity))
    results = {
        "status": status,
        "global_step": trainer.global_step,
        "wall_time_s": round(before + segment, 2),
        "segment_wall_time_s": round(segment, 2),
    }
    for key, value in trainer.callback_metrics.items():
        results[key] = float(value)
    for callback in callbacks:
        results.update(getattr(callback, "metrics", {}) or {})
        if hasattr(callback, "tokens_seen"):
            results["train/tokens_seen"] = callback.tokens_seen
    return results


def export_model(module, run_dir: Path) -> str:
    """A reusable export in <run_dir>/hf where the model allows one: the family's own (AR: a causal LM), else
    for an HF backbone the consolidated checkpoint as an HF folder (A2D runs; DeepSpeed ZeRO folders too). Returns
    what was written, for the end-of-run line."""
    from dlm.models.hf import HFCausalLM

    if module.global_rank != 0:
        return ""
    try:
        if hasattr(module, "export_hf"):
            if RunFolder(run_dir).last_ckpt.is_dir():  # DeepSpeed: ZeRO-3 partitions the live weights,
                from dlm.run import load_run  # so export a CPU copy loaded from the consolidated checkpoint

                module = load_run(run_dir, setup_data=False).module
            from dlm.models.lora_export import export_adapted

            if not export_adapted(module.backbone, run_dir / "hf"):  # LoRA: merged in place, or the adapter folder
                module.export_hf(run_dir / "hf")
        elif isinstance(module.backbone, HFCausalLM) and RunFolder(run_dir).is_run():
            from dlm.parallel.export import consolidate_run

            consolidate_run(run_dir)
        else:
            return "(none: this family writes no export)"
    except (ValueError, TypeError, NotImplementedError) as err:  # no export format for this model: say so
        print(f"export: skipped ({err})")
        return "(none)"
    return f"-> {run_dir / 'hf'}"


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


def record_run(cfg: DictConfig, run_dir: Path, module, ckpt_path: str | None) -> None:
    """What the run used, written once its checks passed: .hydra/ (under Hydra), and on a resume the checkpoint's
    fit to the model (checked first), a line in resumes.jsonl, and metrics.csv without the rows past the
    checkpoint's step (they are logged again)."""
    from dlm.resume import check_checkpoint_fits

    resumed_step = None
    if ckpt_path is not None:
        resumed_step = check_checkpoint_fits(module, Path(ckpt_path), run_dir)
    hc = running_hydra_config()
    if hc is not None:
        write_hydra_record(run_dir, cfg, hc)
    if ckpt_path is not None:
        overrides = list(hc.overrides.task) if hc is not None else []
        append_resume_record(run_dir, str(ckpt_path), resumed_step, overrides)
        if resumed_step is not None:
            dropped = drop_metrics_after(run_dir, resumed_step)
            if dropped:
                print(f"resume: dropped {dropped} metrics.csv rows logged after step {resumed_step} (logged again)")


def print_plan(cfg: DictConfig, run_dir: Path) -> None:
    """dry_run=true: the plan (dlm/plan.py) from the tokenizer and a meta-device backbone; no datamodule, module or
    trainer is built, so no Lightning is imported."""
    from dlm.plan import build_plan, data_lines, plan_vocab

    tokenizer = build(cfg.data.tokenizer, "data.tokenizer", FileNotFoundError)
    vocab_size, tokenizer_line = plan_vocab(cfg, tokenizer)
    plan = build_plan(cfg, vocab_size=vocab_size)
    print(f"plan for {cfg.name} (method {cfg.method._target_}, model {cfg.model._target_}):")
    for line in [*data_lines(cfg), tokenizer_line, *plan.lines()]:
        print("  " + line)
    print(f"  outputs: {run_dir} (checkpoints/, metrics.csv, results.json, samples.jsonl, wandb/)")
    release_run_dir(run_dir)  # a plan leaves no empty run folder behind


def prepare_module(cfg: DictConfig, run_dir: Path, datamodule, ckpt_path: str | None):
    """The family module for the fitted data, recorded in the run folder once every check passed, with the KV-cache
    switch and the compile mode applied."""
    from dlm.compile import compile_backbone
    from dlm.parallel.deepspeed import zero3_strategy

    backbone = None
    if cfg.get("init_from"):  # a trained run's weights (a resume's checkpoint then loads over them)
        from dlm.init_from import init_backbone
        from dlm.run import load_run

        backbone = init_backbone(cfg, datamodule.tokenizer, load_run)
    module = build_module(cfg, datamodule, backbone=backbone, defer_to_zero3=True)
    record_run(cfg, run_dir, module, ckpt_path)  # after every check: a refused run writes nothing
    module.static_kv_cache = cfg.get("static_kv_cache")
    if not module.backbone_deferred:  # a deferred (ZeRO-3) backbone is compiled where it is built
        compile_backbone(module.backbone, cfg.get("compile"))  # in place: checkpoint keys unchanged (dlm/compile.py)
    if cfg.get("compile") and zero3_strategy(cfg.get("trainer")) is not None:
        # measured on 2 CPU ranks (tests/test_zero3_cpu.py): the same losses, but ZeRO-3's per-module gather hooks
        # split the graph and exhaust Dynamo's recompile limit, so most of the model runs eagerly
        print("warning: compile with DeepSpeed ZeRO-3: correct, but its per-module parameter hooks split the compiled "
              "graph (expect little speed-up); ZeRO-2 compiles cleanly", file=sys.stderr)
    return module


def fit(trainer, module, datamodule, ckpt_path: str | None, vetted) -> bool:
    """trainer.fit; True when it stopped on SIGTERM (at a batch boundary)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        with vetted.allowing():  # Lightning's own load: weights_only, under the same allowlist
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=vetted.weights_only)
    except SIGTERMException:  # Lightning's SIGTERM handler stops fit at a batch boundary with a SystemExit(0)
        pass
    return trainer.received_sigterm


def run_status(trainer, module, datamodule, terminated: bool, validate: bool = True) -> str:
    """results.json's status; a completed run is validated at its last step first (when it was not already and
    ``validate``: end_of_run.validate), in one timed line (dlm/end_of_run.py)."""
    from dlm.end_of_run import stage

    if module.nonfinite_stop:
        return f"stopped: non-finite ({module.nonfinite_stop['reason']})"
    if terminated:
        return "interrupted: SIGTERM"
    if trainer.interrupted:
        return "interrupted"
    if trainer.callback_metrics.get("val/loss") is None or module.last_val_step != trainer.global_step:
        with stage("validation", show=trainer.is_global_zero) as s:
            if not validate:
                last = module.last_val_step
                s.skipped = "end_of_run.validate=false; " + (f"the last validation was at step {last}" if last >= 0
                                                             else "the run never validated")
            else:
                trainer.validate(module, datamodule=datamodule, verbose=False)
                loss = trainer.callback_metrics.get("val/loss")
                s.detail = f"at step {trainer.global_step}" + (f", val/loss {float(loss):.4g}" if loss is not None else "")
    return "completed"


def train(cfg: DictConfig) -> Path:
    started = time.perf_counter()
    from dlm.conventions import apply_conventions  # here: it imports the models' declarations (torch)

    run_dir = Path(cfg.paths.run_dir)
    if cfg.get("init_from"):  # the run's model config, before its conventions apply (dlm/init_from.py)
        from dlm.init_from import adopt_run_model
        from dlm.run import load_config

        for note in adopt_run_model(cfg, load_config):
            print(f"init_from: {note}")
    for note in apply_conventions(cfg):  # the model's tokenizer, shift and sampler (dlm/conventions.py)
        print(f"model conventions: {note}")
    check_config(cfg)
    if cfg.dry_run:
        print_plan(cfg, run_dir)
        return run_dir

    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from dlm import end_of_run, lightning_fast_paths
    from dlm.callbacks.continuity import RunContinuity
    from dlm.console import quiet_lightning_logging
    from dlm.methods.base import NonFiniteLossError
    from dlm.threads import apply_threads

    quiet_lightning_logging()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    apply_threads(cfg)  # torch intra-op threads: config key > OMP_NUM_THREADS > the free cores (dlm/threads.py)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    vetted = safe_load.check(ckpt_path)  # a hostile or corrupt checkpoint is refused before anything is built
    try:
        datamodule.setup("fit")
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError([f"data: {err}"]) from err
    module = prepare_module(cfg, run_dir, datamodule, ckpt_path)
    loggers = build_loggers(cfg)
    callbacks = build_callbacks(cfg)
    for callback in callbacks:  # the run's clock starts with train(), model loading included
        if isinstance(callback, RunContinuity):
            callback.started = started
    log_config(loggers, cfg)
    trainer = build(cfg.trainer, "trainer", MisconfigurationException, TypeError, logger=loggers or False, callbacks=callbacks)
    lightning_fast_paths.apply(trainer)  # Lightning's per-step costs that buy nothing here
    terminated = fit(trainer, module, datamodule, ckpt_path, vetted)
    if not module.nonfinite_stop:  # before the last validation: under ZeRO-3 trainer.validate rebuilds the DeepSpeed
        # engine for inference (no optimizer), which cannot save a checkpoint
        with end_of_run.stage("checkpoint", show=trainer.is_global_zero) as s:
            trainer.save_checkpoint(RunFolder(run_dir).last_ckpt, weights_only=False)  # resumable: optimizer, loops
            s.detail = f"-> {RunFolder(run_dir).last_ckpt}"
    status = run_status(trainer, module, datamodule, terminated, validate=end_of_run.setting(cfg, "validate"))
    if not module.nonfinite_stop and not terminated:
        with end_of_run.stage("export", show=trainer.is_global_zero) as s:
            if not end_of_run.setting(cfg, "export"):
                s.skipped = "end_of_run.export=false"
            else:
                s.detail = export_model(module, run_dir)
    results = final_results(trainer, callbacks, started, status)
    RunFolder(run_dir).results.write_text(json.dumps(results, indent=2) + "\n")
    finish_loggers(loggers, results)
    if module.nonfinite_stop:
        raise NonFiniteLossError(module.nonfinite_stop["message"])
    if terminated:
        raise Terminated(f"stopped by SIGTERM at step {trainer.global_step}; checkpoint saved: {run_dir}/checkpoints/"
                         f"last.ckpt; resume with ckpt_path=last (same name=) or ckpt_path={run_dir}/checkpoints/last.ckpt")
    return run_dir


def in_multirun() -> bool:
    from hydra.types import RunMode

    hc = running_hydra_config()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def record_failure(run_dir: Path, err: BaseException) -> None:
    """A failed sweep job leaves results.json saying why, so the sweep's table shows it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    results = RunFolder(run_dir).results
    previous = json.loads(results.read_text()) if results.is_file() else {}
    previous["status"] = f"failed: {type(err).__name__}: " + " ".join(str(err).split())
    results.write_text(json.dumps(previous, indent=2) + "\n")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    run_dir = Path(cfg.paths.run_dir)
    try:
        run_dir = train(cfg)
    except Exception as err:
        # In a sweep one failing job is reported and the others go on; a single run exits non-zero.
        if in_multirun():
            hc = running_hydra_config()
            if not RunFolder(run_dir).is_run():  # the sweep's table lists the failed job too
                write_hydra_record(run_dir, cfg, hc)
            record_failure(run_dir, err)
            print(f"error: job {HydraConfig.get().job.num} failed: {err}", file=sys.stderr)
            print(f"run_dir: {run_dir}")
            if isinstance(err, Terminated):  # the sweep was told to stop, not just this job
                sys.exit(err.exit_code)
            return float("inf") if cfg.get("optimized_metric") else None
        if isinstance(err, UserError):
            release_run_dir(run_dir)  # refused before training: no empty run folder is left
        from dlm.methods.base import NonFiniteLossError  # here: a plan (dry_run) imports no Lightning

        if isinstance(err, (UserError, NonFiniteLossError, Terminated)):
            print(f"error: {err}", file=sys.stderr)
            if not isinstance(err, UserError):
                print(f"run_dir: {run_dir}")
            sys.exit(EXIT_USER_ERROR if isinstance(err, UserError) else getattr(err, "exit_code", 1))
        raise
    if launched_rank() == 0:  # a multi-process run's other ranks run this too: one last line, not interleaved ones
        print(f"run_dir: {run_dir}", flush=True)
    return optimized_value(cfg, run_dir)


def launched_rank() -> int:
    """This process's rank as its launcher set it (torchrun/SLURM: RANK; Lightning's own subprocess launcher:
    LOCAL_RANK in the processes it started; the process that started them has neither: 0)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def optimized_value(cfg: DictConfig, run_dir: Path) -> float | None:
    """The value a hyper-parameter sweeper optimises (optimized_metric), read from the job's results.json."""
    metric = cfg.get("optimized_metric")
    if not metric or cfg.dry_run:
        return None
    results = json.loads(RunFolder(run_dir).results.read_text())
    if metric not in results:
        raise ConfigError([f"optimized_metric={metric} is not among the run's results: {', '.join(sorted(results))}"])
    return float(results[metric])


def main() -> None:
    """Check the overrides first, so that every bad one is reported at once with the valid choices; a resume
    (``ckpt_path=``) is resolved to its run and that run's own overrides before Hydra starts (dlm.resume)."""
    from dlm import cli_help, sweep
    from dlm.resume import override_key, resolve_resume

    multirun = any(a in ("-m", "--multirun") for a in sys.argv[1:])
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    if not multirun and not any("," in o.split("=", 1)[1] and "[" not in o for o in overrides):
        problems = preflight(overrides)
        if problems:
            print("error: invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
            sys.exit(2)
        if any(override_key(o) == "ckpt_path" for o in overrides):
            with user_errors():
                resume = resolve_resume(overrides)
                if resume is not None:  # vetted (dlm/safe_load.py) before Hydra starts the job
                    safe_load.check(resume.checkpoint)
            if resume is not None:
                flags = [a for a in sys.argv[1:] if a not in overrides]
                sys.argv[1:] = flags + resume.overrides
                print(f"resume: {resume.checkpoint} with overrides {' '.join(resume.overrides)}")
    if cli_help.wants_help(sys.argv[1:]):  # Hydra's text without Hydra's slow group listing (dlm/cli_help.py)
        text = cli_help.help_text(sys.argv[1:])
        if text is not None:
            print(text)
            return
    try:
        hydra_main()
    finally:
        forget_claims()
    if sweep.failed_jobs():
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Which run a ``ckpt_path=`` command resumes, and with which overrides: decided before Hydra starts the job, so
that a refused resume writes nothing into the run it named.

A resumed run keeps the overrides it was started with (its ``.hydra/overrides.yaml``): the command line's are
merged over them, key by key, so ``python -m dlm.train ckpt_path=last trainer.max_steps=4000`` continues the same
data, model and method with more steps. ``ckpt_path=last`` picks the newest run of the name whose model and data,
composed that way, are the ones it was trained with (a command that names ``data=arithmetic`` skips newer runs of
the name that trained on brackets), or says why none fits. ``ckpt_path=<file>`` resumes that checkpoint, refused
with the differing keys when the command composes another model or data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dlm.config import ConfigError, compose_train
from dlm.config_values import to_plain
from dlm.run_folder import CHECKPOINTS, LAST_CKPT, RunFolder
from dlm.safe_load import load_checkpoint

# Data keys that say how the data is read, not what it is: they may change on resume.
_DATA_RUNTIME_KEYS = ("cache_dir", "num_workers", "batch_size")


@dataclass
class Resume:
    checkpoint: Path
    run_dir: Path | None  # None: a checkpoint outside a run folder
    overrides: list[str]  # the effective overrides: the run's own, the command line's merged over them


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(saved: list[str], given: list[str]) -> list[str]:
    """``saved`` with every key that ``given`` sets replaced, then ``given``; ``ckpt_path`` is never inherited."""
    keys = {override_key(o) for o in given}
    return [o for o in saved if override_key(o) not in keys and override_key(o) != "ckpt_path"] + list(given)


def saved_overrides(run_dir: Path) -> list[str]:
    path = RunFolder(run_dir).overrides
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def _differences(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{prefix}.{key}")
        return out
    return [] if a == b else [f"{prefix}: {b!r} in the run, {a!r} now"]


def fit_problems(composed: DictConfig, trained: DictConfig) -> list[str]:
    """How the model and data that ``composed`` builds differ from those the run was ``trained`` with."""
    model_now, model_then = to_plain(composed.model), to_plain(trained.model)
    if isinstance(model_then, dict) and "lora" not in model_then and isinstance(model_now, dict) \
            and not (model_now.get("lora") or {}).get("r"):
        model_now.pop("lora", None)  # a run recorded before model.lora existed: no adapters, as now
    for model in (model_now, model_then):  # what a checkpoint holds is no difference in the model
        if isinstance(model, dict) and isinstance(model.get("lora"), dict):
            model["lora"].pop("checkpoint", None)
    problems = _differences(model_now, model_then, "model")
    data_now, data_then = to_plain(composed.data), to_plain(trained.data)
    for data in (data_now, data_then):
        for key in _DATA_RUNTIME_KEYS:
            if isinstance(data, dict):
                data.pop(key, None)
    return problems + _differences(data_now, data_then, "data")


def _compose(overrides: list[str]) -> DictConfig:

    cfg = compose_train(overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so that ${hydra:runtime.choices...} (the run name) resolves
    return cfg


def _candidates(ckpt_path: str, composed: DictConfig) -> list[Path]:
    if ckpt_path != "last":
        return [Path(ckpt_path).expanduser()]
    root = Path(composed.paths.output_root, composed.name)
    found = sorted(root.glob(f"*/{CHECKPOINTS}/{LAST_CKPT}"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not found:
        raise ConfigError([f"ckpt_path=last: no run named {composed.name} under {composed.paths.output_root} has "
                           f"{CHECKPOINTS}/{LAST_CKPT}; pass the .ckpt file of a run, or the name= (and "
                           f"paths.output_root) of the run to resume"])
    return found


def resolve_resume(given: list[str]) -> Resume | None:
    """The run a command line with ``ckpt_path=`` resumes (None without one). Raises a ConfigError naming each
    candidate and why it does not fit when none does."""

    ckpt = next((o.split("=", 1)[1] for o in given if override_key(o) == "ckpt_path"), None)
    if ckpt in (None, "", "null"):
        return None
    composed = _compose(given)
    reasons = []
    for checkpoint in _candidates(ckpt, composed):
        if not checkpoint.exists():
            raise ConfigError([f"ckpt_path={ckpt}: no checkpoint at {checkpoint}; pass the .ckpt file of a run, or "
                               f"ckpt_path=last with the same name= (and paths.output_root) as the run to resume"])
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None
        if run_dir is None or not RunFolder(run_dir).is_run():
            return Resume(checkpoint, None, list(given))
        merged = merge_overrides(saved_overrides(run_dir), [o for o in given if override_key(o) != "ckpt_path"])
        merged.append(f"ckpt_path={checkpoint}")
        from dlm.init_from import adopt_run_model
        from dlm.run import load_config  # imports torch: start-up of every dlm.train command line (--cfg job)

        composed_merged = _compose(merged)
        adopt_run_model(composed_merged, load_config, merged)  # a run started with init_from has that run's model config
        problems = fit_problems(composed_merged, load_config(run_dir))
        if not problems:
            return Resume(checkpoint, run_dir, merged)
        reasons.append(f"{run_dir}: " + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""))
    hint = ("drop the overrides that change them, or start a new run without ckpt_path" if ckpt != "last" else
            "name the model and data it was trained with, or start a new run without ckpt_path")
    raise ConfigError([f"ckpt_path={ckpt}: the command builds another model or data than the run was trained with "
                       f"({hint}):"] + reasons)


def check_checkpoint_fits(module, checkpoint: Path, run_dir: Path | None) -> int | None:
    """Refuse, before anything is written, a checkpoint whose tensors do not fit ``module`` (the model this command
    builds): a ConfigError naming the first mismatched tensors and the config the checkpoint came from. Returns the
    checkpoint's global step (None for a DeepSpeed folder, which DeepSpeed itself checks)."""

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        return None
    saved = load_checkpoint(checkpoint, mmap=True)
    state = saved.get("state_dict", {}) if isinstance(saved, dict) else {}
    live = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    from dlm.models.lora_checkpoint import KEY, check_base

    if isinstance(saved, dict) and KEY in saved:  # LoRA adapters only: the base is rebuilt, checked here first
        check_base(module, saved[KEY], f"ckpt_path={checkpoint}")
        have.update({k: live[k] for k in saved[KEY]["tensors"] if k in live})
    problems = [f"{k}: {list(have[k])} in the checkpoint, {list(live[k])} now" for k in live if k in have
                and have[k] != live[k]]
    problems += [f"{k}: missing from the checkpoint" for k in live if k not in have]
    problems += [f"{k}: in the checkpoint, not in this model" for k in have if k not in live]
    if problems:
        origin = ""
        if run_dir is not None and RunFolder(run_dir).hydra.is_file():
            from dlm.run import run_choices  # imports torch: see resolve_resume

            choices = run_choices(run_dir)
            origin = (f"; it comes from {run_dir} (model={choices.get('model')}, method={choices.get('method')}, "
                      f"data={choices.get('data')}: {RunFolder(run_dir).config})")
        raise ConfigError([f"ckpt_path={checkpoint} does not fit the model this command builds ({len(problems)} "
                           f"tensors differ){origin}; resume with the model it was trained with, or start a new run "
                           f"without ckpt_path. First differences:"] + problems[:5])
    return int(saved.get("global_step", 0))

"""Load a finished (or interrupted) run back: its config, data module, LightningModule and weights.

    from dlm.run import load_run
    run = load_run("runs/mdlm-tiny/2025-01-01_12-00-00")          # or .../checkpoints/last.ckpt
    run.module.generate(None, 16, num_samples=4)

A run folder is what `python -m dlm.train` writes: `.hydra/config.yaml` (the composed config, interpolations
kept), `.hydra/hydra.yaml` (Hydra's own config, with `runtime.choices`), `.hydra/overrides.yaml` and
`checkpoints/*.ckpt`. The saved config refers to Hydra at run time (`paths.run_dir: ${hydra:runtime.output_dir}`,
`name: ${hydra:runtime.choices.method}-...`); outside Hydra those references are answered from the saved
hydra.yaml, and `paths.run_dir` is the folder the run is found in now (so a moved run folder still loads).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dlm.build import build_module
from dlm.config import ConfigError, build, migrate_renamed_keys, register_resolvers
from dlm.config_values import to_plain as plain  # noqa: F401  (dlm.run.plain: re-exported)
from dlm.errors import UserError
from dlm.parallel.checkpoint import ema_weights, load_state_dict
from dlm.run_folder import CHECKPOINTS, LAST_CKPT, RunFolder

__all__ = ["LoadedRun", "NotARunError", "find_checkpoint", "load_config", "load_model", "load_run",
           "resolve_run_path", "run_choices", "run_overrides"]

_HYDRA_REF = re.compile(r"\$\{hydra:([^}]+)\}")


class NotARunError(UserError, FileNotFoundError):
    """The path is not a run folder (nor a checkpoint inside one)."""


@dataclass
class LoadedRun:
    module: Any  # the family's DiffusionLM, weights loaded, eval mode
    datamodule: Any  # set up (tokenizer, train/val rows)
    cfg: DictConfig  # the run's config, Hydra references answered, paths.run_dir = run_dir
    run_dir: Path | None  # None: loaded from a model config (load_model), no run folder
    ckpt_path: Path | None = None
    choices: dict[str, str] = field(default_factory=dict)  # group -> option, e.g. {"method": "mdlm", ...}
    overrides: list[str] = field(default_factory=list)


def resolve_run_path(path: str | Path) -> tuple[Path, Path | None]:
    """(run folder, checkpoint file or None) for a run folder or a `.ckpt` inside `<run>/checkpoints/`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise NotARunError(f"{path}: no such file or folder; pass a run folder (printed as `run_dir: ...` by "
                           f"python -m dlm.train) or a .ckpt file inside <run>/checkpoints/")
    ckpt = None
    if path.is_file() or (path.suffix == ".ckpt" and path.parent.name == CHECKPOINTS):  # DeepSpeed: a folder
        if path.suffix != ".ckpt":
            raise NotARunError(f"{path}: not a run folder nor a .ckpt checkpoint")
        ckpt = path.resolve()
        run_dir = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent
    else:
        run_dir = path.resolve()
    if not RunFolder(run_dir).is_run():
        hint = ""
        if (run_dir / "config.json").is_file():
            hint = (" It looks like a Hugging Face model folder: evaluating an HF export directly is not supported "
                    "yet; evaluate the run folder it was exported from.")
        elif any(run_dir.glob("*/.hydra/config.yaml")) or any(run_dir.glob("*/*/.hydra/config.yaml")):
            hint = " It holds runs: pass one of its sub-folders (or use dlm.analysis.load_runs for all of them)."
        raise NotARunError(f"{run_dir} is not a run folder: it has no .hydra/config.yaml.{hint}")
    return run_dir, ckpt


def _hydra_node(run_dir: Path) -> DictConfig | None:
    path = RunFolder(run_dir).hydra
    if not path.is_file():
        return None
    node = OmegaConf.load(path)
    return node.get("hydra") if isinstance(node, DictConfig) else None


def run_choices(run_dir: str | Path) -> dict[str, str]:
    """The group options the run was composed from (method, model, schedule, ...), Hydra's own left out."""
    hydra_node = _hydra_node(Path(run_dir))
    if hydra_node is None:
        return {}
    choices = OmegaConf.to_container(hydra_node.runtime.choices, resolve=False) or {}
    return {str(k): (None if v is None else str(v)) for k, v in choices.items()
            if not str(k).startswith("hydra") and k != "train_schema"}


def run_overrides(run_dir: str | Path) -> list[str]:
    path = RunFolder(run_dir).overrides
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def _answer_hydra_refs(node: Any, hydra_node: DictConfig | None, run_dir: Path) -> Any:
    """Replace `${hydra:key}` in every string by its value in the saved hydra.yaml."""
    if isinstance(node, dict):
        return {k: _answer_hydra_refs(v, hydra_node, run_dir) for k, v in node.items()}
    if isinstance(node, list):
        return [_answer_hydra_refs(v, hydra_node, run_dir) for v in node]
    if not isinstance(node, str) or "${hydra:" not in node:
        return node

    def value(match: re.Match) -> str:
        key = match.group(1).strip()
        if key == "runtime.output_dir":
            return str(run_dir)
        found = OmegaConf.select(hydra_node, key, default=None) if hydra_node is not None else None
        if found is None:
            raise KeyError(
                f"{run_dir}: the saved config refers to ${{hydra:{key}}} but .hydra/hydra.yaml does not answer it"
            )
        return str(found)

    return _HYDRA_REF.sub(value, node)


def load_config(run_dir: str | Path) -> DictConfig:
    """The run's saved config with Hydra's run-time references answered and `paths.run_dir` set to run_dir.
    Other interpolations (`${paths.run_dir}`, `${oc.env:...}`) stay and resolve on access."""

    register_resolvers()
    run_dir, _ = resolve_run_path(run_dir)
    raw = OmegaConf.to_container(OmegaConf.load(RunFolder(run_dir).config), resolve=False)
    for note in migrate_renamed_keys(raw):
        print(f"{run_dir}: {note}", file=sys.stderr)
    cfg = OmegaConf.create(_answer_hydra_refs(raw, _hydra_node(run_dir), run_dir))
    if cfg.get("paths") is not None:
        cfg.paths.run_dir = str(run_dir)
    return cfg


def find_checkpoint(run_dir: Path, ckpt: str | Path | None = "last") -> Path:
    """`last` (checkpoints/last.ckpt), `best` (the best-*.ckpt by validation loss) or a path: a Lightning file or
    a DeepSpeed ZeRO checkpoint folder (named like one)."""
    folder = RunFolder(run_dir).checkpoints
    if ckpt in (None, "last"):
        path = folder / LAST_CKPT
    elif ckpt == "best":
        best = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not best:
            raise NotARunError(f"{run_dir}: no best-*.ckpt in checkpoints/; use ckpt=last or a .ckpt path")
        path = best[-1]
    else:
        path = Path(ckpt)
        if not path.is_absolute() and not path.exists():
            path = folder / path
    if not path.exists():  # a folder that is not a ZeRO checkpoint is said so by dlm.safe_load
        have = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        raise NotARunError(
            f"{run_dir}: no checkpoint {path.name} (checkpoints present: {', '.join(have) or 'none'}); the run may "
            f"have failed before saving one"
        )
    return path


def load_run(path: str | Path, ckpt: str | Path | None = "last", device: str | torch.device = "cpu",
             setup_data: bool = True, use_ema: bool = True) -> LoadedRun:
    """Rebuild a run's data module and LightningModule from its folder and load the checkpoint's weights.

    path: a run folder, or a .ckpt file (then `ckpt` is ignored). ckpt: "last", "best" or a file. The module
    is returned in eval mode on `device`. A run trained with ``callbacks=ema`` gets its EMA weights (what its
    validation measured; dlm/callbacks/ema.py) unless ``use_ema=False``.
    """

    run_dir, ckpt_file = resolve_run_path(path)
    cfg = load_config(run_dir)
    ckpt_file = ckpt_file or find_checkpoint(run_dir, ckpt)
    datamodule = instantiate(cfg.data)
    if setup_data:
        datamodule.setup("validate")
    backbone = None
    if cfg.get("init_from"):  # started from another run: its weights first (a LoRA checkpoint may hold adapters only)
        from dlm.init_from import adopt_run_model, init_backbone

        adopt_run_model(cfg, load_config, overrides=[])  # a no-op where the CLI recorded the adopted model
        backbone = init_backbone(cfg, datamodule.tokenizer, load_run)
    module = build_module(cfg, datamodule, backbone=backbone)
    if Path(ckpt_file).is_dir():  # a DeepSpeed ZeRO folder, consolidated (it always holds the whole module)
        state = load_state_dict(ckpt_file)
    else:  # a Lightning file, read once: a LoRA one may hold the adapters only
        from dlm.models.lora_checkpoint import restore_base
        from dlm.safe_load import load_checkpoint

        saved = load_checkpoint(ckpt_file)
        restore_base(module, saved, str(ckpt_file))  # the rebuilt base, checked against its fingerprint, filled in
        state = saved.get("state_dict", saved)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{ckpt_file} does not match the model the run's config builds: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    shadow = ema_weights(ckpt_file) if use_ema else None
    if shadow:
        params = dict(module.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, value in shadow.items():
                params[name].copy_(value)
    module.to(device).eval()
    return LoadedRun(module=module, datamodule=datamodule, cfg=cfg, run_dir=run_dir, ckpt_path=ckpt_file,
                     choices=run_choices(run_dir), overrides=run_overrides(run_dir))


DEFAULT_METHOD = "mdlm"  # the family a checkpoint is wrapped in when none is named (masked diffusion: the zoo's)


def load_model(model: str, overrides: Sequence[str] = (), method: str | None = None, device: str | torch.device = "cpu",
               setup_data: bool = False) -> LoadedRun:
    """A family built around a model config's checkpoint, without a run folder: what ``model=<name>`` gives the
    generate, evaluate, lm-eval and chat CLIs.

        run = load_model("llada_8b_instruct")                                   # mdlm around LLaDA-8B-Instruct
        run = load_model("qwen3_tiny", ["model.pretrained=/ckpt"], method="bd3lm", device="cuda")

    model: a conf/model option; overrides: train-config overrides on top (``model.pretrained=<folder>``,
    ``data=wikitext103``, ``method.block_size=32``, ``sampler=threshold`` ...); method: a conf/method option
    (None: mdlm). The model's conventions (dlm/conventions.py) are applied as in training: the data's tokenizer is
    the checkpoint's, ``method.shift_logits`` follows it, the default sampler is its recommended one unless
    ``sampler=`` is among the overrides; its mask id is checked against the tokenizer. The weights are the
    checkpoint's (the model config loads them). ``setup_data``: set the data module up for validation (likelihood
    evaluation needs its rows). Returned in eval mode on ``device``, with ``run_dir=None`` and ``ckpt_path=None``.
    """
    from dlm.config import compose_train, preflight
    from dlm.conventions import apply_conventions, model_conventions

    register_resolvers()
    args = [f"model={model}", f"method={method or DEFAULT_METHOD}", *overrides]
    try:
        cfg = compose_train(args, return_hydra_config=True)
    except Exception as err:  # Hydra raises several types for a bad override: name each culprit
        raise ConfigError(preflight(args) or [f"model={model}: {err}"]) from err
    choices = {str(k): v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()}
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.name = f"{choices.get('method')}-{choices.get('model')}"  # what a run of it would be named
        cfg.paths.run_dir = None  # no run folder (the saved configs' ${hydra:runtime.output_dir})
    notes = apply_conventions(cfg, overrides=args, choices=choices)
    for note in notes:
        print(f"model conventions: {note}", file=sys.stderr)  # stdout is the CLIs' answer (texts, results)
    if any(note.startswith("sampler:") for note in notes):
        choices["sampler"] = model_conventions(cfg).sampler  # the sampler's name in the CLIs' reports
    datamodule = build(cfg.data, "data", FileNotFoundError)
    if setup_data:
        try:
            datamodule.setup("validate")
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError([f"data: {err}"]) from err
    module = build_module(cfg, datamodule)
    module.to(device).eval()
    return LoadedRun(module=module, datamodule=datamodule, cfg=cfg, run_dir=None, ckpt_path=None, choices=choices,
                     overrides=list(overrides))


# The train-config groups whose overrides a model= request of a CLI (generate, evaluate) passes on to load_model.
MODEL_REQUEST_GROUPS = ("model", "method", "data")


def load_requested_model(device: str | torch.device = "cpu", setup_data: bool = False) -> LoadedRun:
    """:func:`load_model` for the running CLI's ``model=`` request (dlm.generate, dlm.evaluate): its model and
    method choices, and its ``model.*``, ``method.*`` and ``data`` overrides, read from the Hydra job."""
    from dlm.config import running_hydra_config

    hc = running_hydra_config()
    if hc is None:
        raise ConfigError(["model=: a request outside the command line; from Python call dlm.run.load_model(model, "
                           "overrides, method=...)"])
    choices = hc.runtime.choices
    keys = [(o, o.split("=", 1)[0].lstrip("+~")) for o in hc.overrides.task]
    forwarded = [o for o, key in keys if key.split(".")[0] in MODEL_REQUEST_GROUPS and key not in ("model", "method")]
    return load_model(str(choices["model"]), forwarded, method=choices.get("method"), device=device,
                      setup_data=setup_data)

"""Config plumbing shared by the CLIs: where conf/ lives, the top-level schema, the run-folder resolver, and
checks that turn a bad override into one message listing every problem and the valid options."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dlm.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = (
    "method", "model", "schedule", "optimizer", "lr_scheduler", "trainer", "data", "sampler", "logger",
    "callbacks", "experiment", "paths", "launcher", "hparams_search",
)


class ConfigError(UserError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


# ---- the top-level schema: types checked by Hydra at compose time ----------------------------------------
@dataclass
class SamplesSchema:
    num_unconditional: int = 16
    num_prompted: int = 32
    num_infill: int = 32
    length: int | None = None


@dataclass
class TrainSchema:
    name: str = "run"
    seed: int = 0
    dry_run: bool = False
    ckpt_path: str | None = None
    compile: str | None = None  # a torch.compile mode (dlm.compile.MODES) or None: eager
    static_kv_cache: bool | None = None  # the sampling KV cache: None = static exactly when compiled
    threads: int | None = None  # torch intra-op threads: None = OMP_NUM_THREADS, else dlm.threads' rule
    optimized_metric: str | None = None
    samples: SamplesSchema = field(default_factory=SamplesSchema)
    method: Any = None
    model: Any = None
    schedule: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
    trainer: Any = None
    data: Any = None
    sampler: Any = None
    logger: Any = None
    callbacks: Any = None
    experiment: Any = None
    paths: Any = None
    launcher: Any = None
    hparams_search: Any = None


def register_resolvers() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)
    if not OmegaConf.has_resolver("dlm_run_dir"):
        OmegaConf.register_new_resolver("dlm_run_dir", run_dir_for)
    if not OmegaConf.has_resolver("dlm_sweep_dir"):
        from dlm.sweep import sweep_dir_for

        # cached: a sweep's jobs (Hydra copies the cache into each job's config) all see the one folder
        OmegaConf.register_new_resolver("dlm_sweep_dir", sweep_dir_for, use_cache=True)
    if not OmegaConf.has_resolver("dlm_mkdir"):
        # A folder that must exist before anything runs (sqlite cannot create the folder of its database).
        OmegaConf.register_new_resolver("dlm_mkdir", lambda path: (Path(path).mkdir(parents=True, exist_ok=True), path)[1])


def running_hydra_config():
    """Hydra's config of the job running now, or None outside a Hydra job. (Composing a config with
    return_hydra_config=True also sets Hydra's global config, without a job: then there is no output_dir.)"""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc if OmegaConf.select(hc, "runtime.output_dir", default=None) is not None else None


# ---- run folders and resuming ------------------------------------------------------------------------------
def run_dir_for(output_root: str, name: str, ckpt_path: str | None) -> str:
    """The run folder: when resuming, the folder of the run being resumed (a run keeps one folder however often it
    is restarted); else a new timestamped one, claimed atomically (dlm.run_folder.claim_run_dir: a suffix when a
    run of the same name started in the same second holds it)."""
    from dlm.run_folder import CHECKPOINTS, LAST_CKPT, claim_run_dir

    if ckpt_path == "last":
        candidates = sorted(Path(output_root, name).glob(f"*/{CHECKPOINTS}/{LAST_CKPT}"), key=lambda p: p.stat().st_mtime)
        if candidates:
            return str(candidates[-1].parent.parent)
    elif ckpt_path and Path(ckpt_path).parent.name == CHECKPOINTS:
        return str(Path(ckpt_path).parent.parent)
    return str(claim_run_dir(Path(output_root, name)))


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    if ckpt_path is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.exists():  # a file, or a DeepSpeed ZeRO checkpoint folder
        raise ConfigError(
            [f"ckpt_path={ckpt_path}: no checkpoint at {path}; pass the .ckpt file of a run, or ckpt_path=last "
             f"with the same name= (and paths.output_root) as the run to resume"]
        )
    return str(path)


# ---- semantic checks after composition -----------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    problems = []

    def positive(key: str) -> None:
        value = OmegaConf.select(cfg, key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            problems.append(f"{key}={value} must be a positive integer")

    for key in ("data.batch_size", "trainer.accumulate_grad_batches", "trainer.val_check_interval"):
        positive(key)
    if OmegaConf.select(cfg, "trainer.max_steps") in (None, -1) or cfg.trainer.max_steps <= 0:
        problems.append(
            f"trainer.max_steps={OmegaConf.select(cfg, 'trainer.max_steps')}: training is counted in optimizer "
            "steps (the data loader is infinite); set trainer.max_steps to a positive number"
        )
    seq_len = OmegaConf.select(cfg, "data.seq_len")
    if not isinstance(seq_len, int) or seq_len < 2:
        problems.append(f"data.seq_len={seq_len} must be an integer >= 2")
    for key in ("num_unconditional", "num_prompted", "num_infill"):
        if cfg.samples[key] < 0:
            problems.append(f"samples.{key}={cfg.samples[key]} must be >= 0")
    accelerator = OmegaConf.select(cfg, "trainer.accelerator")
    if accelerator in ("gpu", "cuda") and not cfg.get("dry_run"):
        import torch

        memory = _gpu_memory_problem(cfg)
        if not torch.cuda.is_available():
            problems.append(
                f"trainer.accelerator={accelerator} but this machine has no CUDA GPU: use trainer=cpu here, or "
                f"dry_run=true to see the plan (parameters, memory per GPU per ZeRO stage) without training"
                + (f" ({memory})" if memory else "")
            )
        elif memory:
            problems.append(f"not enough GPU memory: {memory}")
    if problems:
        raise ConfigError(problems)


def _gpu_memory_problem(cfg: DictConfig) -> str | None:
    """The numbers behind a GPU run that cannot fit (dlm.plan.gpu_memory_check); None when it fits or when the
    plan cannot be built here (then the run itself reports what is wrong)."""
    from hydra.utils import instantiate

    from dlm.plan import gpu_memory_check

    try:
        vocab = instantiate(cfg.data.tokenizer).vocab_size if OmegaConf.select(cfg, "data.tokenizer") else None
    except Exception:  # e.g. an HF tokenizer that is not available offline: the model's own vocabulary
        vocab = None
    try:
        return gpu_memory_check(cfg, vocab)
    except Exception:  # noqa: BLE001 - a plan that cannot be built must not hide the real error
        return None


# ---- explaining failed overrides ---------------------------------------------------------------------------
def group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def explain_override(override: str, base_overrides: list[str], error: Exception) -> str:
    """A message for one override that Hydra refused, naming the valid choices or keys."""
    key = override.split("=", 1)[0].lstrip("+~")
    if key in GROUPS:
        return f"{override}: no such option; valid options for {key}: {', '.join(group_options(key))}"
    parent, _, leaf = key.rpartition(".")
    cfg = compose_train(base_overrides)
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if isinstance(node, DictConfig) and leaf not in node:
        valid = sorted(str(k) for k in node.keys())
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
        where = parent or "the top level"
        return f"{override}: unknown key {leaf!r} in {where}{hint}; valid keys: {', '.join(valid)}; add a new key with +{key}=..."
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{override}: {first_line}"


def compose_train(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """conf/train.yaml composed with ``overrides``, outside a Hydra job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=return_hydra_config)


def preflight(overrides: list[str]) -> list[str]:
    """Compose with the command line's overrides; if that fails, try each one alone to name every culprit.
    Returns the problems (empty when the config composes)."""
    plain = [o for o in overrides if not o.startswith(("hydra.", "hydra/", "--", "-"))]
    try:
        compose_train(plain)
        return []
    except Exception:
        pass
    groups_first = sorted(plain, key=lambda o: o.split("=", 1)[0].lstrip("+~") not in GROUPS)
    good, problems = [], []
    for override in groups_first:
        try:
            compose_train(good + [override])
            good.append(override)
        except Exception as err:  # Hydra raises several exception types for bad overrides
            problems.append(explain_override(override, good, err))
    return problems or ["the overrides do not compose together (each composes alone); run with --cfg job to see"]

"""Config plumbing shared by the CLIs: where conf/ lives, the top-level schema, the run-folder resolver, and
checks that turn a bad override into one message listing every problem and the valid options."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dlm.errors import UserError

# Imports inside functions: every CLI imports this module before Hydra runs, so torch, the plan (models) and
# Hydra's compose API load only for the checks that need them (`--cfg job` and `--help` stay fast).

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = (
    "method", "model", "schedule", "optimizer", "lr_scheduler", "trainer", "data", "sampler", "logger",
    "callbacks", "experiment", "paths", "launcher", "hparams_search", "reward", "prompts",
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
class EndOfRunSchema:  # dlm/end_of_run.py
    validate: bool = True
    export: bool = True


@dataclass
class TrainSchema:
    name: str = "run"
    seed: int = 0
    dry_run: bool = False
    ckpt_path: str | None = None
    init_from: str | None = None  # a run folder (or .ckpt) whose weights a new run starts from (dlm/init_from.py)
    init_ckpt: str = "last"  # init_from's checkpoint: last | best | a .ckpt path
    compile: str | None = None  # a torch.compile mode (dlm.compile.MODES) or None: eager
    static_kv_cache: bool | None = None  # the sampling KV cache: None = static exactly when compiled
    threads: int | None = None  # torch intra-op threads: None = OMP_NUM_THREADS, else dlm.threads' rule
    optimized_metric: str | None = None
    samples: SamplesSchema = field(default_factory=SamplesSchema)
    end_of_run: EndOfRunSchema = field(default_factory=EndOfRunSchema)
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
    reward: Any = None  # RL: a dlm.rewards Reward or RewardSet config (conf/reward/)
    prompts: Any = None  # RL: a dlm.rewards PromptSource config (conf/prompts/)


def register_resolvers() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)
    if not OmegaConf.has_resolver("dlm_run_dir"):
        OmegaConf.register_new_resolver("dlm_run_dir", run_dir_for)
    if not OmegaConf.has_resolver("dlm_sweep_dir"):
        from dlm.run_folder import sweep_dir_for

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
    from dlm.run_folder import RunFolder

    path = RunFolder(run_dir).last_ckpt if ckpt_path == "last" else Path(ckpt_path)
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
    max_steps = OmegaConf.select(cfg, "trainer.max_steps")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps <= 0:
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
    problems += _value_problems(cfg)
    from dlm.models.lora import lora_problems  # model.lora: r > 0, known keys, valid quantize/export

    problems += lora_problems(OmegaConf.select(cfg, "model.lora", default=None))
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
    elif accelerator == "cpu" and not cfg.get("dry_run") and not problems:
        memory = _host_memory_problem(cfg)  # before a pretrained download that could never be trained here
        if memory:
            problems.append(memory)
    pretrained = OmegaConf.select(cfg, "model.pretrained", default=None)
    if isinstance(pretrained, str) and pretrained and not cfg.get("dry_run"):  # a dry run plans without weights
        from dlm.data.hub import model_problem

        problems += [p for p in [model_problem(pretrained)] if p]
    if problems:
        raise ConfigError(problems)


# Mandatory values (???) that the run fills in itself; every other one must come from the command line.
FILLED_AT_RUN_TIME = ("model.vocab_size",)
MISSING_HINTS = {"data.source.paths": "a file, folder or glob, or a list of them, e.g. data.source.paths=corpus.txt "
                                      "or data.source.paths='[a.txt,texts/]'",
                 "data.source.data_files": "data.source.data_files=<chat rows: .jsonl, .json or .parquet file(s)>",
                 "data.tokenizer.name_or_path": "data.tokenizer.name_or_path=<the model's tokenizer: an HF name or a "
                                                "local folder; its chat template renders chat data>"}


def _missing_values(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _missing_values(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "???" else []


def _value_problems(cfg: DictConfig) -> list[str]:
    """Types and ranges of the values that are only read once training has started (the optimizer and the
    learning-rate schedule are partials built inside trainer.fit), so a bad one fails before any work."""
    from dlm import checks as c

    missing = [k for k in _missing_values(OmegaConf.to_container(cfg, resolve=False)) if k not in FILLED_AT_RUN_TIME]
    problems = [f"{k} is required: give {MISSING_HINTS.get(k, f'{k}=<value>')}" for k in missing]
    problems += c.collect(
        c.integer(cfg, "seed", 0, 2**32 - 1),  # Lightning replaces an out-of-range seed by 0 with a warning
        c.number(cfg, "optimizer.lr", 0),  # 0 is a deliberate choice (tests/test_zero3_cpu.py trains at lr 0)
        c.number(cfg, "optimizer.weight_decay", 0),
        c.number(cfg, "optimizer.eps", 0, low_open=True),
        c.integer(cfg, "lr_scheduler.warmup_steps", 0),
        c.number(cfg, "lr_scheduler.min_lr_ratio", 0, 1),
        c.number(cfg, "trainer.gradient_clip_val", 0, nullable=True),
        c.boolean(cfg, "data.packing"),
        c.integer(cfg, "samples.length", 1, nullable=True, null_means=": the data's seq_len"),
    )
    betas = OmegaConf.select(cfg, "optimizer.betas")
    if betas is not None and not (
        len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    ):
        problems.append(f"optimizer.betas={list(betas)} must be two numbers in [0, 1), e.g. [0.9, 0.98]")
    return problems


def _plan_vocab(cfg: DictConfig) -> int | None:
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.data.tokenizer).vocab_size if OmegaConf.select(cfg, "data.tokenizer") else None
    except Exception:  # e.g. an HF tokenizer that is not available offline: the model's own vocabulary
        return None


def _host_memory_problem(cfg: DictConfig) -> str | None:
    """A CPU run whose weights + grads + Adam state (fp32: 16 bytes a parameter) exceed this machine's memory,
    with the numbers; None when it fits or when the plan cannot be built here (the run then reports why)."""
    from dlm.plan import build_plan

    try:
        plan = build_plan(cfg, _plan_vocab(cfg))
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except Exception:  # noqa: BLE001 - a plan that cannot be built must not hide the real error
        return None
    params = plan.total_params
    trainable = params if plan.trainable_params is None else plan.trainable_params  # LoRA: the adapters
    need = (params * 4 + trainable * 12) / 1024**3
    if need <= have:
        return None
    return (f"trainer.accelerator=cpu: this model ({params / 1e9:.2f}B parameters) needs {need:,.1f} GiB of host "
            f"memory for fp32 weights+grads+Adam (activations extra) but this machine has {have:,.1f} GiB: choose a "
            f"smaller model (e.g. model=moe_tiny), train on GPUs (trainer=deepspeed), or dry_run=true for the plan")


def _gpu_memory_problem(cfg: DictConfig) -> str | None:
    """The numbers behind a GPU run that cannot fit (dlm.plan.gpu_memory_check); None when it fits or when the
    plan cannot be built here (then the run itself reports what is wrong)."""
    from dlm.plan import gpu_memory_check

    vocab = _plan_vocab(cfg)
    try:
        return gpu_memory_check(cfg, vocab)
    except Exception:  # noqa: BLE001 - a plan that cannot be built must not hide the real error
        return None


# ---- renamed keys: refused with the key that replaced them (never silently accepted) -----------------------
RENAMED_KEYS = {
    "method.kv_cache": "sampler.kv_cache=prefix|none (BD3-LM's cache of finished blocks: conf/sampler/bd3lm.yaml)",
    "sampler.use_cache": "sampler.kv_cache=prefix|none",
    "sampler.prefix_cache": "sampler.kv_cache=prefix",
    "sampler.dual_cache": "sampler.kv_cache=dual",
}


def migrate_renamed_keys(cfg: dict) -> list[str]:
    """A saved run's config (a plain dict) from before the KV-cache keys were renamed, rewritten in place to
    ``sampler.kv_cache``, so that a run folder trained earlier still loads (nothing is lost); one note per key
    rewritten. New configs naming the old keys are refused instead (:func:`renamed_key_problems`)."""
    notes: list[str] = []
    method, sampler = cfg.get("method"), cfg.get("sampler")
    sampler = sampler if isinstance(sampler, dict) else None

    def set_cache(value: str, old: str) -> None:
        if sampler is not None and sampler.get("kv_cache") is None:
            sampler["kv_cache"] = value
        notes.append(f"{old} (saved by an older dlm) read as sampler.kv_cache={value}")

    if isinstance(method, dict) and "kv_cache" in method:
        set_cache("prefix" if method.pop("kv_cache") else "none", "method.kv_cache")
    if sampler is not None:
        if "use_cache" in sampler:
            set_cache("prefix" if sampler.pop("use_cache") else "none", "sampler.use_cache")
        if "prefix_cache" in sampler or "dual_cache" in sampler:
            prefix, dual = sampler.pop("prefix_cache", False), sampler.pop("dual_cache", False)
            set_cache("dual" if dual else "prefix" if prefix else "none", "sampler.prefix_cache/dual_cache")
    return notes


def renamed_key_problems(cfg: Any, prefix: str = "") -> list[str]:
    """One line per renamed key that ``cfg`` (a whole config, or with ``prefix="sampler."`` a sampler's fields)
    still sets."""
    problems = []
    for old, new in RENAMED_KEYS.items():
        if old.startswith(prefix) and OmegaConf.select(OmegaConf.create(cfg), old[len(prefix):], default=None) is not None:
            problems.append(f"{old} was renamed: use {new}")
    return problems


# ---- explaining failed overrides ---------------------------------------------------------------------------
def group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def explain_override(override: str, base_overrides: list[str], error: Exception, config_name: str = "train") -> str:
    """A message for one override that Hydra refused, naming the valid choices or keys."""
    key = override.split("=", 1)[0].lstrip("+~")
    if key in RENAMED_KEYS:
        return f"{override}: {key} was renamed: use {RENAMED_KEYS[key]}"
    if key in GROUPS:
        return f"{override}: no such option; valid options for {key}: {', '.join(group_options(key))}"
    parent, _, leaf = key.rpartition(".")
    cfg = compose_train(base_overrides, config_name=config_name)
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if isinstance(node, DictConfig) and leaf not in node:
        valid = sorted(str(k) for k in node.keys())
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
        where = parent or "the top level"
        return f"{override}: unknown key {leaf!r} in {where}{hint}; valid keys: {', '.join(valid)}; add a new key with +{key}=..."
    # A schema type error ("Error merging override seed=abc") says what was expected in its cause.
    reason = error.__cause__ if error.__cause__ is not None and str(error.__cause__).strip() else error
    first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return f"{override}: {first_line}"


def compose_train(overrides: list[str], return_hydra_config: bool = False, config_name: str = "train") -> DictConfig:
    """conf/<config_name>.yaml (train.yaml by default) composed with ``overrides``, outside a Hydra job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)


def folder_problem(key: str, path: str | os.PathLike) -> str | None:
    """Why the folder ``path`` (config key ``key``) cannot be created or written, or None. Checked before Hydra
    makes the run folder, so an unwritable root is one line instead of a chain of tracebacks."""
    target = Path(path).expanduser().absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "it" if probe == target else f"{probe}"
        return f"{key}={path}: {where} is a file, not a folder; give a folder that exists or can be created"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{key}={path}: {probe} is not writable by this user; give a folder you can write to"
    return None


def _folder_problems(cfg: DictConfig) -> list[str]:
    keys = ["paths.output_root", "paths.cache_dir"]
    if OmegaConf.select(cfg, "data.cache_dir", default=None) != OmegaConf.select(cfg, "paths.cache_dir", default=None):
        keys.append("data.cache_dir")
    problems = []
    for key in keys:
        try:
            path = OmegaConf.select(cfg, key, default=None)
        except Exception:  # noqa: BLE001 - an interpolation answered only inside a Hydra job: checked by then
            continue
        if isinstance(path, str) and path:
            problems.append(folder_problem(key, path))
    return [p for p in problems if p]


def preflight(overrides: list[str], config_name: str = "train") -> list[str]:
    """Compose with the command line's overrides; if that fails, try each one alone to name every culprit.
    Returns the problems (empty when the config composes and, for training, its output folders can be written)."""
    # Hydra's own settings are not composed here, except the search path (a config folder of the user's own)
    plain = [o for o in overrides if not o.startswith(("hydra.", "hydra/", "--", "-")) or o.startswith("hydra.searchpath")]
    try:
        cfg = compose_train(plain, config_name=config_name)
        return _folder_problems(cfg) if config_name == "train" else []
    except Exception:
        pass
    groups_first = sorted(plain, key=lambda o: o.split("=", 1)[0].lstrip("+~") not in GROUPS)
    good, problems = [], []
    for override in groups_first:
        try:
            compose_train(good + [override], config_name=config_name)
            good.append(override)
        except Exception as err:  # Hydra raises several exception types for bad overrides
            problems.append(explain_override(override, good, err, config_name))
    return problems or ["the overrides do not compose together (each composes alone); run with --cfg job to see"]


def exit_on_bad_overrides(args: list[str], config_name: str) -> None:
    """A request CLI's start (generate, evaluate, chat): the command line's overrides that Hydra would refuse, all
    in one message on stderr, exit 2 (e.g. sampler=nosuch names the valid options)."""
    import sys

    from dlm.errors import EXIT_USER_ERROR

    problems = preflight([a for a in args if "=" in a], config_name)
    if problems:
        print("error: invalid arguments:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def build(node: Any, key: str, *also: type[BaseException], **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``, where a constructor that refuses its arguments (a ValueError, a bad
    keyword, a class that does not exist, or one of ``also``) becomes a ConfigError naming the config key;
    anything else propagates with its traceback (a bug)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, *also)) or (isinstance(cause, TypeError) and "argument" in str(cause)):
            raise ConfigError([f"{key}: {cause}"]) from err
        if isinstance(cause, (ImportError, AttributeError)) or "Error locating target" in str(err):
            first = str(err).strip().splitlines()[0].split(", set env var HYDRA_FULL_ERROR")[0]
            raise ConfigError([f"{key}: {first} (check {key}._target_)"]) from err
        raise

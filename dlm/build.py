"""Building a run from its config: the datamodule, the family's LightningModule around its backbone, the
callbacks and the loggers. Shared by the training CLI and :func:`dlm.run.load_run` (which rebuilds a finished run),
so that no library code imports a CLI. Everything is built from config with ``_target_`` (dlm.config.build: a
constructor that refuses its arguments is one message naming the config key)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from dlm.config import ConfigError, build, compose_train, group_options, renamed_key_problems


def build_datamodule(cfg: DictConfig):
    """The datamodule of cfg.data; a bad path or value becomes a ConfigError naming it (no traceback)."""
    return build(cfg.data, "data", FileNotFoundError)


def build_module(cfg: DictConfig, datamodule, backbone=None, defer_to_zero3: bool = False):
    """The LightningModule of cfg.method around a backbone built for the datamodule's tokenizer.

    ``defer_to_zero3`` (the training CLI): when cfg.trainer is DeepSpeed ZeRO-3 and cfg.model loads pretrained HF
    weights, the backbone is a meta-device placeholder that ``configure_model`` replaces inside the strategy's
    sharded context (dlm.parallel.deepspeed.build_in_partitions)."""
    renamed = renamed_key_problems(cfg)
    if renamed:  # e.g. a run folder saved before the rename
        raise ConfigError(renamed)
    tokenizer = datamodule.tokenizer
    from dlm.conventions import check_mask_token, model_conventions

    check_mask_token(model_conventions(cfg), tokenizer)  # the checkpoint's mask id, before any weights load
    deferred = None
    if backbone is None:
        from dlm.parallel.deepspeed import (  # lazily: Lightning's strategies are a slow import
            build_in_partitions,
            loads_pretrained_weights,
            placeholder_backbone,
            zero3_strategy,
        )

        if defer_to_zero3 and loads_pretrained_weights(cfg.model) and zero3_strategy(cfg.get("trainer")) is not None:
            # ZeRO-3: a meta placeholder now, the checkpoint loaded into partitions in configure_model (inside
            # deepspeed.zero.Init), so no rank ever holds the whole model on the host
            backbone = placeholder_backbone(cfg.model, tokenizer.vocab_size)
            deferred = functools.partial(build_in_partitions, cfg.model, tokenizer.vocab_size,
                                         compile_mode=cfg.get("compile"))
        else:
            from dlm.models.lora import instantiate_backbone  # model.lora's adapters, where configured

            backbone = instantiate_backbone(cfg.model, instantiate=lambda node, **kw: build(node, "model", **kw),
                                            vocab_size=tokenizer.vocab_size, seed=cfg.get("seed"))
    max_len = getattr(backbone, "max_seq_len", None)
    if max_len is not None and datamodule.seq_len > max_len:
        raise ConfigError(
            [f"data.seq_len={datamodule.seq_len} exceeds the model's maximum sequence length {max_len}: "
             f"lower data.seq_len or raise model.max_seq_len"]
        )

    family = get_class(cfg.method._target_)
    parts = {
        "backbone": backbone,
        "tokenizer": tokenizer,
        # a family without a conf/sampler/<method>.yaml uses its own default_sampler()
        "sampler": build(cfg.sampler, "sampler") if cfg.get("sampler") is not None else None,
        "optimizer": build(cfg.optimizer, "optimizer"),
        "lr_scheduler": build(cfg.lr_scheduler, "lr_scheduler") if cfg.get("lr_scheduler") else None,
    }
    if family.uses_schedule:
        parts["schedule"] = build(cfg.schedule, "schedule")
    if family.uses_reward:  # RL: the reward= and prompts= groups
        missing = [g for g in ("reward", "prompts") if cfg.get(g) is None]
        if missing:
            raise ConfigError([f"{g}=null: method={cfg.method._target_.rpartition('.')[2].lower()} needs a {g} "
                               f"(e.g. reward=brackets prompts=brackets; options in conf/{g}/)" for g in missing])
        parts["reward"] = build(cfg.reward, "reward")
        parts["prompts"] = build(cfg.prompts, "prompts")
    module = build(family_arguments(cfg.method), "method", **parts)
    if deferred is not None:
        module.defer_backbone(deferred)
    return module


def family_arguments(method_cfg: DictConfig) -> DictConfig:
    """cfg.method less ``training_layout``: the plan's declaration (dlm.flops.TrainingLayout), not a constructor
    argument. A shallow copy, so interpolations still resolve against the whole config."""
    node = copy.copy(method_cfg)
    with open_dict(node):
        node.pop("training_layout", None)
    return node


def build_loggers(cfg: DictConfig) -> list:
    return [build(node, "logger") for node in (cfg.get("logger") or {}).values() if node is not None]


def build_callbacks(cfg: DictConfig) -> list:
    """The callbacks of ``cfg.callbacks``; an entry whose target builds None (a disabled one) is left out."""
    built = [build(node, "callbacks") for node in (cfg.get("callbacks") or {}).values() if node is not None]
    return [callback for callback in built if callback is not None]


def sampler_config(name: str) -> dict[str, Any]:
    """``conf/sampler/<name>.yaml`` as Hydra composes it (its defaults list merged), as a plain dict."""
    options = group_options("sampler")
    if name not in options:
        raise ConfigError([f"sampler={name}: no such option; valid options for sampler: {', '.join(options)}"])
    return OmegaConf.to_container(compose_train([f"sampler={name}"]).sampler, resolve=True)


def build_sampler(base: Mapping[str, Any], steps: int | None = None, fields: Mapping[str, Any] | None = None,
                  key: str = "sampler"):
    """The sampler of config ``base`` with ``steps`` and ``fields`` over it (the generate, evaluate and lm-eval
    requests' shorthands); a constructor that refuses its arguments is one message naming ``key``."""
    cfg = dict(base)
    renamed = renamed_key_problems({**cfg, **(fields or {})}, prefix="sampler.")
    if renamed:
        raise ConfigError(renamed)
    if steps is not None:
        cfg["steps"] = int(steps)
    cfg.update(fields or {})
    return build(OmegaConf.create(cfg), key)

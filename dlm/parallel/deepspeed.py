"""DeepSpeed: dlm's strategy, ZeRO-3 leaf modules for MoE blocks, and pretrained weights loaded straight into
ZeRO-3 partitions. Only :mod:`dlm.parallel` imports ``deepspeed``; models and families know nothing of it.

:class:`DeepSpeedStrategy` (``conf/trainer/deepspeed*.yaml``) is Lightning's with two duties that would otherwise
fall on every family: before ``deepspeed.initialize`` it flags MoE blocks as ZeRO-3 leaf modules (routing picks
different experts every step, so ZeRO-3's recorded prefetch order breaks unless the whole block is fetched at
once), and its sharded context (``model_sharded_context``, where Lightning runs ``configure_model``) holds a live
``transformers`` ``HfDeepSpeedConfig`` under ZeRO-3, so a plain ``from_pretrained`` there loads straight into the
partitions.

Loading pretrained weights under ZeRO-3 (the training CLI): with this strategy at stage 3 and an ``HFCausalLM``
whose ``pretrained`` weights load, the module is built around a placeholder backbone on the meta device (the
checkpoint's geometry, no weights) and ``DiffusionLM.configure_model`` builds the real one
(:func:`build_in_partitions`). Host memory: rank 0 reads the checkpoint (safetensors, memory-mapped), the other ranks
only its keys and shapes, and every rank keeps its own partition plus one module's gathered parameters at a time,
instead of ranks x model size in the load dtype (moe30b in bf16: ~61 GB per rank). Every other path (no DeepSpeed,
ZeRO-1/2, models from a config, native backbones) builds the backbone before ``trainer.fit``. Verified on CPU, 1 and
2 ranks: tests/test_zero3_cpu.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from torch import nn

from dlm.compile import compile_backbone
from dlm.parallel.params import is_partitioned


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy, plus: MoE blocks are ZeRO-3 leaf modules, and ``configure_model`` runs with a
    live ``HfDeepSpeedConfig`` under ZeRO-3 (pretrained HF weights load into the partitions)."""

    @contextlib.contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        with super().model_sharded_context():
            if zero_stage(self) != 3:
                yield
                return
            from transformers.integrations.deepspeed import (  # lazily: transformers only for a ZeRO-3 sharded build
                HfDeepSpeedConfig,
                unset_hf_deepspeed_config,
            )

            ds_config = HfDeepSpeedConfig(self.config)  # transformers keeps only a weak reference: hold it
            try:
                yield
            finally:  # later model builds in the process (consolidation on the meta device) are ordinary
                unset_hf_deepspeed_config()
                del ds_config

    def setup_environment(self) -> None:
        from dlm.parallel.extension_locks import warn_stale_locks

        warn_stale_locks()  # before DeepSpeed builds its CPU ops: a stale lock would hang this start silently
        super().setup_environment()

    def setup(self, trainer) -> None:
        if zero_stage(self) == 3:  # before deepspeed.initialize, which records the module order
            register_moe_leaf_modules(trainer.lightning_module)
        super().setup(trainer)


def moe_block_classes(model: nn.Module) -> list[type]:
    """Classes of the sparse-MoE blocks in ``model``: modules with a child named ``experts`` (Qwen3-MoE's
    ``Qwen3MoeSparseMoeBlock``, Mixtral's, the native MoE layer). Routing picks different experts every step,
    so ZeRO-3's recorded prefetch order breaks unless the whole block is fetched at once (a leaf)."""
    classes: dict[str, type] = {}
    for module in model.modules():
        if "experts" in dict(module.named_children()):
            classes[type(module).__qualname__] = type(module)
    return list(classes.values())


def register_moe_leaf_modules(model: nn.Module) -> list[nn.Module]:
    """Flag every MoE block as a ZeRO-3 leaf (``deepspeed.utils.set_z3_leaf_modules``); call before
    ``deepspeed.initialize``. Returns the flagged modules (empty for a dense model)."""
    classes = moe_block_classes(model)
    if not classes:
        return []
    from deepspeed.utils import set_z3_leaf_modules  # lazily: DeepSpeed only when a ZeRO-3 run has MoE blocks

    return set_z3_leaf_modules(model, classes)


def zero_stage(strategy: Any) -> int | None:
    """The ZeRO stage of a Lightning DeepSpeedStrategy (from its DeepSpeed config), None if it has none."""
    config = getattr(strategy, "config", None) or {}
    stage = config.get("zero_optimization", {}).get("stage")
    return None if stage is None else int(stage)


def zero3_strategy(trainer_cfg: Any) -> Any | None:
    """The trainer config's strategy when it is dlm's :class:`DeepSpeedStrategy` (subclasses too) at ZeRO stage 3
    (instantiated on its own to read its stage; the Trainer builds its own), else None. Lightning's own class (or a
    registry name such as ``deepspeed_stage_3``) holds no HF DeepSpeed config in its sharded context, so pretrained
    weights cannot load into its partitions: such a run builds its backbone before fit, as under ZeRO-1/2."""

    spec = trainer_cfg.get("strategy") if trainer_cfg is not None else None
    if hasattr(spec, "get") and spec.get("_target_") and issubclass(get_class(spec["_target_"]), DeepSpeedStrategy):
        strategy = instantiate(spec)
    else:
        strategy = spec if isinstance(spec, DeepSpeedStrategy) else None
    return strategy if strategy is not None and zero_stage(strategy) == 3 else None


def loads_pretrained_weights(model_cfg: Any) -> bool:
    """Whether a model config builds an HFCausalLM (subclasses too) from a checkpoint's weights."""

    from dlm.models.hf import HFCausalLM  # lazily: start-up: transformers

    target = model_cfg.get("_target_")
    return bool(target and issubclass(get_class(target), HFCausalLM) and model_cfg.get("pretrained")
                and model_cfg.get("load_weights", True))


def placeholder_backbone(model_cfg: Any, vocab_size: int | None) -> nn.Module:
    """The backbone of ``model_cfg`` on the meta device: the checkpoint's geometry (``config`` fields over it) and
    no weights, so the module's constructor checks (vocabulary, max_seq_len, lr roles) run before the real
    backbone exists. Same parameter names and shapes as the loaded one."""

    from dlm.models.lora import instantiate_backbone  # with model.lora's adapters: the same parameter names

    with torch.device("meta"):
        backbone = instantiate_backbone(model_cfg, vocab_size=vocab_size, load_weights=False)
    backbone.zero3_placeholder = True
    return backbone


def build_in_partitions(model_cfg: Any, vocab_size: int | None, compile_mode: str | None = None) -> nn.Module:
    """The real backbone of ``model_cfg``, built where ``DiffusionLM.configure_model`` runs: inside
    :class:`DeepSpeedStrategy`'s sharded context, so under ZeRO-3 ``from_pretrained`` (and the embedding growth's
    ``resize_token_embeddings``) loads into the partitions, and elsewhere it is an ordinary build. A partitioned
    build must have left no parameter whole; it prints how much of the model this rank holds. The model's modules
    are imported by then (the placeholder was built from them): a first import of ``torch._dynamo`` inside
    ``zero.Init`` fails (DeepSpeed patches ``Tensor.__new__``)."""
    from dlm.models.lora import instantiate_backbone  # adapters too, partitioned as they are made

    backbone = instantiate_backbone(model_cfg, vocab_size=vocab_size)
    params = list(backbone.parameters())
    if any(is_partitioned(p) for p in params):
        whole = [n for n, p in backbone.named_parameters() if not is_partitioned(p)]
        if whole:
            raise RuntimeError(f"ZeRO-3 loading left {len(whole)} parameters unpartitioned (e.g. {whole[:3]})")
        register_moe_leaf_modules(backbone)
        held, total = sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        print(f"zero3: rank {rank} loaded {model_cfg.pretrained} into ZeRO-3 partitions: "
              f"{held:,} of {total:,} parameter elements held", flush=True)
    return compile_backbone(backbone, compile_mode)

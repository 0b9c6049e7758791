"""The resolved plan of a run, printed by `dry_run=true`: parameters (total and active), tokens per optimizer
step, steps, model FLOPs and GPU-hours, memory per GPU under each ZeRO stage, and where outputs go. Built without
allocating weights: the counts come from the config (dlm.param_count: no torch, no transformers modeling code, LoRA
adapters included), and where that cannot count a model (another class or model type) the backbone is instantiated on
the meta device, so a 30B model is planned on a laptop either way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from dlm.flops import PEAK_BF16_TFLOPS, TrainingLayout, geometry_flops_per_token
from dlm.param_count import HF_DEFAULTS, ParamCount, count_model

# Imports inside functions: torch (devices=auto, a meta build), transformers (a checkpoint's geometry it alone can
# read) and Lightning's strategy registry load only for the plans that need them (`dry_run` start-up, issue #17).

PLAN_MFU = 0.4  # the utilisation the GPU-hours estimate assumes (a well-tuned dense run reaches 40-50%)

# Bytes per parameter in mixed-precision Adam training: bf16 weights (2) and gradients (2), fp32 master
# weights, momentum and variance (12). ZeRO partitions these across the data-parallel GPUs.
_WEIGHT, _GRAD, _OPTIM = 2, 2, 12


def zero_memory_per_gpu(n_params: int, n_gpus: int, trainable: int | None = None) -> dict[str, float]:
    """GiB per GPU for weights + gradients + Adam state (activations excluded) under ZeRO stages 0-3; ``trainable``
    (default all): the parameters that have gradients and optimizer state (LoRA: the adapters)."""
    g, gib = max(1, n_gpus), 1024**3
    t = n_params if trainable is None else trainable
    return {
        "zero0 (ddp)": (n_params * _WEIGHT + t * (_GRAD + _OPTIM)) / gib,
        "zero1": (n_params * _WEIGHT + t * (_GRAD + _OPTIM / g)) / gib,
        "zero2": (n_params * _WEIGHT + t * (_GRAD + _OPTIM) / g) / gib,
        "zero3": (n_params * _WEIGHT + t * (_GRAD + _OPTIM)) / g / gib,
    }


def _cuda_count() -> int:
    import torch  # only where devices=auto asks what this machine has

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolved_devices(trainer_cfg: DictConfig) -> int:
    devices = trainer_cfg.get("devices", 1)
    if devices in ("auto", -1, "-1"):
        if trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") and _cuda_count():
            return _cuda_count()
        return 1
    if isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        return len(devices)
    return int(devices)


@dataclass
class Plan:
    total_params: int
    non_embedding_params: int
    active_params: int
    devices_per_node: int
    num_nodes: int
    batch_size: int
    seq_len: int
    accumulate: int
    max_steps: int
    flops_per_token: float = 0.0  # training model FLOPs per data token (dlm.flops)
    # GPUs per node a devices=auto GPU run would get on a typical node, when this machine has none to count
    auto_gpus_per_node: int | None = None
    trainable_params: int | None = None  # None: all (no adapters)
    lora_line: str = ""  # the LoRA line (dlm.models.lora.plan_line), when the model has adapters

    @property
    def world_size(self) -> int:
        return self.devices_per_node * self.num_nodes

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.accumulate * self.world_size

    def lines(self) -> list[str]:
        lines = [
            f"parameters: {self.total_params:,} total, {self.non_embedding_params:,} non-embedding, "
            f"{self.active_params:,} active per token",
            f"devices: {self.devices_per_node} x {self.num_nodes} node(s) = {self.world_size}",
            f"tokens per optimizer step: {self.tokens_per_step:,} (batch {self.batch_size} x seq_len {self.seq_len}"
            f" x accumulate {self.accumulate} x {self.world_size} device(s))",
            f"steps: {self.max_steps:,} -> {self.tokens_per_step * max(self.max_steps, 0):,} tokens",
            *self._compute_lines(),
            *self._node_lines(),
            *([self.lora_line] if self.lora_line else []),
            "memory per GPU for weights+grads+Adam (bf16 mixed precision, activations excluded):",
        ]
        for gpus in sorted({1, 8, self.world_size, (self.auto_gpus_per_node or 1) * self.num_nodes}):
            mem = zero_memory_per_gpu(self.total_params, gpus, self.trainable_params)
            lines.append(f"  {gpus:>3} GPU(s): " + ", ".join(f"{k} {v:,.1f} GiB" for k, v in mem.items()))
        return lines


    def _node_lines(self) -> list[str]:
        """The same run at devices=auto on nodes of ``auto_gpus_per_node`` GPUs (the plan here counts 1 device)."""
        if not self.auto_gpus_per_node:
            return []
        world = self.auto_gpus_per_node * self.num_nodes
        per_step = self.batch_size * self.seq_len * self.accumulate * world
        total = per_step * max(self.max_steps, 0)
        line = (f"on GPU nodes (devices=auto: {self.auto_gpus_per_node} per node x {self.num_nodes} node(s) = {world}): "
                f"{per_step:,} tokens per step, {total:,} tokens in {self.max_steps:,} steps")
        if self.flops_per_token:
            seconds = self.flops_per_token * total / (PLAN_MFU * PEAK_BF16_TFLOPS["H100"] * 1e12)
            line += f", ~{seconds / 3600:,.1f} H100-hours (~{seconds / 3600 / world:,.1f} h wall)"
        return [line]

    def _compute_lines(self) -> list[str]:
        if not self.flops_per_token:
            return []
        total = self.flops_per_token * self.tokens_per_step * max(self.max_steps, 0)
        seconds = total / (PLAN_MFU * PEAK_BF16_TFLOPS["H100"] * 1e12)
        time = f"{seconds / 3600:,.1f} H100-hours" if seconds >= 360 else f"{seconds:.2g} H100-seconds"
        return [f"model FLOPs: {self.flops_per_token:.3g} per token (6N + 12 L d T over the family's forwards), "
                f"{total:.3g} for the run: ~{time} at {PLAN_MFU:.0%} MFU "
                f"({PEAK_BF16_TFLOPS['H100']:g} TFLOP/s bf16)"]


AUTO_GPUS_PER_NODE = 8  # a typical GPU node (8 x H100/A100), for plans made on a machine without GPUs


def _auto_without_gpus(trainer_cfg: DictConfig) -> bool:
    return (trainer_cfg.get("devices", 1) in ("auto", -1, "-1") and trainer_cfg.get("accelerator") in ("gpu", "cuda")
            and not _cuda_count())


def checkpoint_geometry(pretrained: str) -> dict:
    """A checkpoint's config as a plain dict, without transformers where dlm.param_count can count it: a published
    layout's mapping (dlm.models.zoo), the config.json of a local folder or the hub cache, a known geometry offline
    (dlm.models.hf_geometry.KNOWN_GEOMETRIES); else transformers' own reading (pretrained_geometry)."""
    from dlm.models.hf_geometry import KNOWN_GEOMETRIES, pretrained_geometry
    from dlm.models.zoo.layout import cached_config
    from dlm.models.zoo.registry import published_geometry

    zoo = published_geometry(pretrained)
    if zoo is not None:
        return zoo
    found = cached_config(pretrained)
    if found is not None and found.get("model_type") in HF_DEFAULTS:
        return found
    if found is None and pretrained in KNOWN_GEOMETRIES and not Path(pretrained).is_dir():
        return dict(KNOWN_GEOMETRIES[pretrained])
    return pretrained_geometry(pretrained)


def _model_fields(cfg: DictConfig) -> dict:
    """cfg.model as a plain dict, a checkpoint's geometry (under its ``config`` overrides) in ``config``."""
    fields = OmegaConf.to_container(cfg.model, resolve=True, throw_on_missing=False)
    if fields.get("pretrained"):
        fields["config"] = {**checkpoint_geometry(fields["pretrained"]), **(fields.get("config") or {})}
        fields["pretrained"] = None
    return fields


def _meta_counts(cfg: DictConfig, fields: dict, vocab_size: int | None) -> tuple[ParamCount, str]:
    """(counts, the LoRA line) of the backbone built on the meta device."""
    import torch

    from dlm.flops import backbone_geometry
    from dlm.models import count_active_parameters, count_parameters
    from dlm.models.lora import adapter_spec, instantiate_backbone, plan_line

    model_cfg = cfg.model
    if model_cfg.get("pretrained"):  # the architecture only: from the checkpoint's config, never its weights
        model_cfg = OmegaConf.merge(model_cfg, {"pretrained": None})
        model_cfg.config = fields["config"]
    with torch.device("meta"):
        backbone = instantiate_backbone(model_cfg, vocab_size=vocab_size)
    total = count_parameters(backbone)
    trainable, lora_line = None, ""
    if adapter_spec(backbone) is not None:
        trainable = sum(p.numel() for p in {id(p): p for p in backbone.parameters() if p.requires_grad}.values())
        lora_line = plan_line(backbone, total, trainable, _GRAD + _OPTIM)
    counts = ParamCount(total, count_parameters(backbone, exclude_embeddings=True), count_active_parameters(backbone),
                        *backbone_geometry(backbone), trainable=trainable)
    return counts, lora_line


def _counts(cfg: DictConfig, vocab_size: int | None) -> tuple[ParamCount, str]:
    """(counts, the LoRA line): from the config (dlm.param_count), else from a meta build."""
    fields = _model_fields(cfg)
    counts = count_model(fields, vocab_size)
    if counts is None:
        return _meta_counts(cfg, fields, vocab_size)
    if counts.trainable is None:
        return counts, ""
    from dlm.models.lora import lora_spec, plan_line

    return counts, plan_line(None, counts.total, counts.trainable, _GRAD + _OPTIM, spec=lora_spec(cfg.model.lora))


def build_plan(cfg: DictConfig, vocab_size: int | None) -> Plan:
    counts, lora_line = _counts(cfg, vocab_size)
    return Plan(
        trainable_params=counts.trainable,
        lora_line=lora_line,
        total_params=counts.total,
        non_embedding_params=counts.non_embedding,
        active_params=counts.active,
        devices_per_node=resolved_devices(cfg.trainer),
        auto_gpus_per_node=AUTO_GPUS_PER_NODE if _auto_without_gpus(cfg.trainer) else None,
        num_nodes=int(cfg.trainer.get("num_nodes", 1)),
        batch_size=int(cfg.data.batch_size),
        seq_len=int(cfg.data.seq_len),
        accumulate=int(cfg.trainer.get("accumulate_grad_batches", 1)),
        max_steps=int(cfg.trainer.max_steps),
        # the method config's declaration, not the family class: importing that imports Lightning (issue #17)
        flops_per_token=geometry_flops_per_token(counts.matmul, counts.layers, counts.width, int(cfg.data.seq_len),
                                                 TrainingLayout.of(cfg.method)),
    )


# How the strategy classes that the shipped configs name shard, by their import path, so that a plan classifies
# them without importing Lightning (seconds of start-up; dry_run needs no trainer). Exact class paths, not
# substrings: any other class (a user's subclass, a registry name) is imported and classified by issubclass.
# tests/test_deepspeed_config.py checks each entry against the class it names.
KNOWN_STRATEGY_KINDS = {
    "dlm.parallel.deepspeed.DeepSpeedStrategy": "deepspeed",
    "lightning.pytorch.strategies.DeepSpeedStrategy": "deepspeed",
    "lightning.pytorch.strategies.deepspeed.DeepSpeedStrategy": "deepspeed",
    "lightning.pytorch.strategies.FSDPStrategy": "fsdp",
    "lightning.pytorch.strategies.fsdp.FSDPStrategy": "fsdp",
    "lightning.pytorch.strategies.DDPStrategy": "replicated",
    "lightning.pytorch.strategies.ddp.DDPStrategy": "replicated",
}


def strategy_kind(cls: type) -> str:
    """"deepspeed", "fsdp" or "replicated" (a whole copy per GPU), by the class (subclasses too)."""
    from lightning.pytorch.strategies import (  # only for a class not in the table
        DeepSpeedStrategy,
        FSDPStrategy,
    )

    if issubclass(cls, DeepSpeedStrategy):
        return "deepspeed"
    return "fsdp" if issubclass(cls, FSDPStrategy) else "replicated"


def _strategy_stage(trainer_cfg: DictConfig) -> tuple[str, bool]:
    """(memory column of zero_memory_per_gpu, parameters offloaded to CPU) for the configured strategy, by its
    class (subclasses too): a DeepSpeedStrategy shards by its ZeRO stage, an FSDPStrategy like ZeRO-3, any other
    strategy keeps a whole copy per GPU. A strategy given by registry name ("deepspeed_stage_2") is looked up."""
    spec = trainer_cfg.get("strategy")
    if isinstance(spec, DictConfig) and spec.get("_target_"):
        kind = KNOWN_STRATEGY_KINDS.get(spec._target_) or strategy_kind(get_class(spec._target_))
        kwargs = spec
    elif isinstance(spec, str):
        from lightning.pytorch.strategies import StrategyRegistry

        if spec not in StrategyRegistry:
            return "zero0 (ddp)", False
        entry = StrategyRegistry[spec]
        kind, kwargs = strategy_kind(entry["strategy"]), dict(entry["init_params"])
    else:
        return "zero0 (ddp)", False
    if kind == "deepspeed":
        stage = int(kwargs.get("stage", 2))  # DeepSpeedStrategy's own default stage
        return (f"zero{stage}" if stage else "zero0 (ddp)"), bool(kwargs.get("offload_parameters", False))
    if kind == "fsdp":
        return "zero3", False
    return "zero0 (ddp)", False


def gpu_memory_check(cfg: DictConfig, vocab_size: int | None = None) -> str | None:
    """None when the run's weights + grads + Adam state fit the GPUs it asks for, else a message with the
    numbers: GiB needed per GPU under the configured strategy vs. GiB and GPUs this machine has, and how many
    GPUs of this size ZeRO-3 would need. Activations are not counted (the figure is a lower bound)."""
    import torch

    plan = build_plan(cfg, vocab_size)
    column, offloaded = _strategy_stage(cfg.trainer)
    n_cuda = _cuda_count()
    devices = cfg.trainer.get("devices", 1)
    world = plan.num_nodes * (max(1, n_cuda) if devices in ("auto", -1, "-1") else resolved_devices(cfg.trainer))
    need = zero_memory_per_gpu(plan.total_params, world, plan.trainable_params)[column]
    if offloaded:
        need = 0.0  # parameters and optimizer state live in CPU memory; only activations and buffers on the GPU
    have = torch.cuda.get_device_properties(0).total_memory / 1024**3 if n_cuda else 0.0
    if n_cuda and need <= have:
        return None
    size = f"{plan.total_params / 1e9:.2f}B parameters" if plan.total_params >= 1e8 else f"{plan.total_params:,} parameters"
    msg = (f"this run needs {need:,.1f} GiB per GPU for weights+grads+Adam ({size}, {column} over {world} GPU(s)"
           f"{', parameters offloaded' if offloaded else ''}; activations extra)")
    if not n_cuda:
        per8 = zero_memory_per_gpu(plan.total_params, 8 * plan.num_nodes)["zero3"]
        return msg + f"; ZeRO-3 over {8 * plan.num_nodes} GPUs: {per8:,.1f} GiB each; this machine has no CUDA GPU (0 GiB)"
    per_gpu_zero3 = plan.total_params * (_WEIGHT + _GRAD + _OPTIM) / 1024**3
    gpus = int(-(-per_gpu_zero3 // max(have * 0.8, 1e-9)))
    return (msg + f"; this machine has {n_cuda} GPU(s) of {have:,.1f} GiB. ZeRO-3 needs at least {gpus} such GPUs "
            f"(trainer.num_nodes x trainer.devices), or use trainer=deepspeed_zero3_offload")


def plan_vocab(cfg: DictConfig, tokenizer) -> tuple[int | None, str]:
    """(vocabulary the plan builds the model with, the plan's tokenizer line). A tokenizer that cannot be loaded
    here (a hub tokenizer offline) is planned with the checkpoint's vocabulary (dlm.models.hf_geometry): the
    parameter count is the checkpoint's either way (the embedding only grows for a larger tokenizer)."""
    from dlm.models.capabilities import ModelConventions

    conv = ModelConventions.from_config(OmegaConf.select(cfg, "model.conventions", default=None))
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    whose = " (the model's own: model.conventions.tokenizer)" if conv.tokenizer and name == conv.tokenizer else ""
    try:
        vocab = int(tokenizer.vocab_size)
        mask = f"mask {tokenizer.mask_token!r} id {tokenizer.mask_token_id}"
        return vocab, f"tokenizer: {name}{whose}, vocab {vocab:,}, {mask}"
    except (OSError, ValueError) as err:  # offline: HubUnavailableError / TokenizerError are OSErrors
        pretrained = OmegaConf.select(cfg, "model.pretrained", default=None)
        if not pretrained:
            raise
        vocab = checkpoint_geometry(pretrained).get("vocab_size")
        mask = (f"mask {conv.mask_token!r} id {conv.mask_token_id}" if conv.mask_token_id is not None
                else "its mask token")
        why = "offline" if "offline" in str(err) else type(err).__name__
        return vocab, (f"tokenizer: {name}{whose}, {mask}; not loaded here ({why}): planned with the checkpoint's "
                       f"vocabulary {vocab:,}")


def data_lines(cfg: DictConfig) -> list[str]:
    """What the run trains on: the source (corpus, subset, streaming), seq_len, batch and packing."""
    data = cfg.data
    source = data.get("source") or {}
    target = str(source.get("_target_", "?")).rsplit(".", 1)[-1]
    what = [str(source[k]) for k in ("path", "name") if source.get(k)]
    if source.get("paths"):
        what.append(str(OmegaConf.to_container(source.paths) if OmegaConf.is_config(source.paths) else source.paths))
    extra = []
    if source.get("streaming"):
        extra.append("streamed")
    if source.get("max_train_documents"):
        extra.append(f"first {int(source.max_train_documents):,} documents")
    corpus = f"{target}({', '.join(what)})" if what else target
    return [f"data: {corpus}{' [' + ', '.join(extra) + ']' if extra else ''}; seq_len {data.seq_len}, batch "
            f"{data.batch_size} per device, packing {str(bool(data.get('packing'))).lower()}"]

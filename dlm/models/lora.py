"""LoRA adapters on any backbone, through ``peft`` (``model.lora``); QLoRA: the HF base loaded in 4-bit.

    python -m dlm.train model=qwen3_0p6b model.lora.r=16                  # LoRA
    python -m dlm.train model=qwen3_0p6b model.lora.r=16 model.lora.quantize=4bit trainer=gpu   # QLoRA

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a pretrained weight W and learns a low-rank update:
``y = W x + (alpha / r) B A x`` with A [r, in] random and B [out, r] zero, so training starts at the base model. QLoRA
(Dettmers et al. 2023, arXiv:2305.14314) keeps W in 4-bit NF4 (bitsandbytes) and computes in bf16. The adapter layers
are peft's (``LoraConfig`` + ``inject_adapter_in_model``: in place, no ``PeftModel`` wrapper, so the backbone keeps
its class and its forward; parameter names gain ``.base_layer.`` / ``.lora_A.default.`` / ``.lora_B.default.``).

Where it applies: ``model.lora`` is split off the model config wherever a backbone is built
(:func:`instantiate_backbone`: the run, the plan's meta-device model, the ZeRO-3 placeholder and partitioned build,
the export), so every backbone class takes adapters without a constructor argument. peft wraps the backbone's
``hf_model`` (HF wrappers: adapter folders then load onto ``AutoModelForCausalLM`` with ``PeftModel``) or the
backbone itself (the native Transformer). Default targets: the attention and MLP linear layers (the native
Transformer declares them, ``lora_targets``; for HF models, the Linear/Conv1D layers whose parameters dlm.optim
classes as attention or mlp: routers, fused experts and the output embedding are left alone).
``target_parameters`` adapts nn.Parameters in place (peft >= 0.17's ``ParamWrapper``, one nested per parameter):
transformers 5 fuses a layer's MoE experts into 3-D parameters (``mlp.experts.gate_up_proj`` [E, 2 I, H],
``mlp.experts.down_proj`` [E, H, I]) that no ``target_modules`` entry can name; each expert gets its own rank-r pair
(r * E * (in + out) parameters), without dropout (peft cannot separate it from the weight).

What trains: the adapters, and the modules ``modules_to_save`` names (peft's key: e.g. ``[embed_tokens,lm_head]`` on
HF models, ``[tok_emb,lm_head]`` on the native Transformer), trained in full in place (requires_grad True; no peft
wrapper copy, so a merged export holds their trained values as it is). A tied head and embedding are one tensor:
naming either trains both. Every other parameter of the backbone is frozen (requires_grad False), so it gets no
optimizer group, no gradient and no optimizer state (dlm.optim.param_groups takes trainable parameters only; under
DeepSpeed too). The A2D learning-rate roles (``lr_multipliers``) apply to an adapter by the role of the module it
adapts: its name keeps the module's path (``...self_attn.q_proj.lora_A...`` is attention, ``...mlp.w1.lora_B...`` mlp).
EMA (callbacks=ema) averages trainable parameters, i.e. the adapters.

Checkpoints hold the trainable parameters (the adapters), their optimizer state and a fingerprint of the frozen base
(``model.lora.checkpoint=adapters``, the default; dlm/models/lora_checkpoint.py): a resume and ``dlm.run.load_run``
rebuild the base from ``model.pretrained`` or the run's seed and refuse one that differs. ``model.lora.checkpoint=full``
saves the whole module (a checkpoint that stands alone); under DeepSpeed checkpoints are always full. Measured on
model=small (10.1M parameters, r=16: 0.65M trainable): last.ckpt 7.95 MB adapter-only, 45.7 MB full, 113.4 MB
fully fine-tuned. The end-of-run export merges the adapters into the weights (``model.lora.export=merged``) or writes peft's adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``; ``model.lora.export=adapter``): dlm/models/lora_export.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dlm.errors import UserError

if TYPE_CHECKING:  # torch is imported where adapters are built: checking model.lora (start-up, plans) needs none
    from torch import nn

ADAPTER = "default"  # peft's adapter name: parameter names carry it (lora_A.default.weight)
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "target_parameters", "modules_to_save", "quantize", "export",
             "checkpoint")
QUANTIZE = ("4bit",)
EXPORTS = ("merged", "adapter")
CHECKPOINTS = ("adapters", "full")  # what a checkpoint holds: dlm/models/lora_checkpoint.py
QLORA_HINT = "QLoRA needs a CUDA GPU and bitsandbytes (pip install dlm[qlora])"

class LoraError(UserError):
    """A bad ``model.lora`` setting (one line naming the key and the valid form)."""


@dataclass(frozen=True)
class LoraSpec:
    """``model.lora`` validated. ``alpha`` None means ``r`` (scaling 1); ``target_modules`` None: the backbone's
    attention and MLP linear layers."""

    r: int
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    target_parameters: tuple[str, ...] | None = None  # nn.Parameters adapted in place (fused MoE experts, 3-D)
    modules_to_save: tuple[str, ...] | None = None  # modules trained in full next to the adapters (peft's name)
    quantize: str | None = None
    export: str = "merged"
    checkpoint: str = "adapters"

    @property
    def scaling(self) -> float:
        return (self.r if self.alpha is None else self.alpha) / self.r


def lora_problems(config: Any) -> list[str]:
    """Every problem of a ``model.lora`` node (None, or ``r`` None: LoRA off, no problem)."""
    if config is None:
        return []
    from dlm.config_values import to_plain

    fields = to_plain(config)
    if not isinstance(fields, Mapping):
        return [f"model.lora={fields!r} must be a mapping {{r, alpha, dropout, target_modules, target_parameters, "
                f"modules_to_save, quantize, export, checkpoint}} "
                f"or null (off)"]
    problems = [f"model.lora.{k}: unknown key; valid keys: {', '.join(LORA_KEYS)}" for k in fields if k not in LORA_KEYS]
    r = fields.get("r")
    if r is None:
        return problems
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        problems.append(f"model.lora.r={r} must be a positive integer (the adapters' rank, e.g. 16), or null (off)")
    alpha = fields.get("alpha")
    if alpha is not None and (not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0):
        problems.append(f"model.lora.alpha={alpha} must be a number > 0 (the update is scaled by alpha / r), or null (= r)")
    dropout = fields.get("dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        problems.append(f"model.lora.dropout={dropout} must be a number in [0, 1)")
    targets = fields.get("target_modules")
    if targets is not None and (isinstance(targets, str) and not targets or not isinstance(targets, str) and (
            not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets))):
        problems.append(f"model.lora.target_modules={targets} must be a non-empty list of module names (e.g. "
                        f"[q_proj,v_proj]), or null (the attention and MLP linear layers)")
    params = fields.get("target_parameters")
    if params is not None and (isinstance(params, str) or not isinstance(params, (list, tuple)) or not params
                               or not all(isinstance(t, str) and t for t in params)):
        problems.append(f"model.lora.target_parameters={params} must be a non-empty list of parameter names (e.g. "
                        f"[mlp.experts.gate_up_proj,mlp.experts.down_proj]: fused MoE experts), or null")
    elif params is not None and dropout:
        problems.append("model.lora.target_parameters: peft's LoRA on a parameter cannot apply dropout (its input is "
                        "not separable from the weight); set model.lora.dropout=0")
    saved = fields.get("modules_to_save")
    if saved is not None and (isinstance(saved, str) or not isinstance(saved, (list, tuple)) or not saved
                              or not all(isinstance(t, str) and t for t in saved)):
        problems.append(f"model.lora.modules_to_save={saved} must be a non-empty list of module names trained in full "
                        f"(e.g. [embed_tokens,lm_head]; the native Transformer: [tok_emb,lm_head]), or null")
    if fields.get("quantize") not in (None, *QUANTIZE):
        problems.append(f"model.lora.quantize={fields.get('quantize')}: valid: null (no quantization), 4bit (QLoRA)")
    if fields.get("export", "merged") not in EXPORTS:
        problems.append(f"model.lora.export={fields.get('export')}: valid: merged (the adapters merged into an HF "
                        f"folder), adapter (peft's adapter folder)")
    if fields.get("checkpoint", "adapters") not in CHECKPOINTS:
        problems.append(f"model.lora.checkpoint={fields.get('checkpoint')}: valid: adapters (the trainable parameters "
                        f"and a fingerprint of the frozen base), full (the whole module)")
    return problems


def lora_spec(config: Any) -> LoraSpec | None:
    """``model.lora`` as a :class:`LoraSpec`, None when off (``model.lora`` null or ``model.lora.r`` null); a bad
    value raises :class:`LoraError` listing every problem."""
    problems = lora_problems(config)
    if problems:
        raise LoraError("; ".join(problems))
    if config is None or config.get("r") is None:
        return None
    from dlm.config_values import to_plain

    fields = dict(to_plain(config))
    targets = fields.get("target_modules")
    return LoraSpec(
        r=int(fields["r"]), alpha=None if fields.get("alpha") is None else float(fields["alpha"]),
        dropout=float(fields.get("dropout") or 0.0),
        target_modules=None if targets is None else tuple([targets] if isinstance(targets, str) else targets),
        target_parameters=None if fields.get("target_parameters") is None else tuple(fields["target_parameters"]),
        modules_to_save=None if fields.get("modules_to_save") is None else tuple(fields["modules_to_save"]),
        quantize=fields.get("quantize"), export=fields.get("export") or "merged",
        checkpoint=fields.get("checkpoint") or "adapters",
    )


def split_lora(model_cfg: Any) -> tuple[Any, LoraSpec | None]:
    """(the model config without its ``lora`` key, the spec or None)."""
    from omegaconf import DictConfig, OmegaConf, open_dict

    if isinstance(model_cfg, DictConfig):
        if "lora" not in model_cfg:
            return model_cfg, None
        node = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=False))
        node._set_parent(model_cfg._get_parent())  # interpolations (${...}) resolve against the run's config
        with open_dict(node):
            spec = lora_spec(node.pop("lora"))
        return node, spec
    node = dict(model_cfg)
    return node, lora_spec(node.pop("lora", None))


def quantization_kwargs(spec: LoraSpec | None) -> dict[str, Any]:
    """The backbone's load arguments for ``spec.quantize`` (QLoRA: bitsandbytes NF4, bf16 compute); refuses on a
    machine without a CUDA GPU or without bitsandbytes (before anything is loaded)."""
    if spec is None or spec.quantize is None:
        return {}
    import torch

    if not torch.cuda.is_available():
        raise LoraError(f"model.lora.quantize={spec.quantize}: this machine has no CUDA GPU; {QLORA_HINT}. Drop "
                        f"model.lora.quantize (plain LoRA runs on the CPU)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoraError(f"model.lora.quantize={spec.quantize}: bitsandbytes is not installed; {QLORA_HINT}") from None
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True)}


def instantiate_backbone(model_cfg: Any, *, instantiate: Callable | None = None, seed: int | None = None,
                         **kwargs) -> nn.Module:
    """The backbone of a model config with ``model.lora``'s adapters (if any) added: ``instantiate(node, **kwargs)``
    on the config without its ``lora`` key (default: Hydra's), then :func:`add_adapters`.

    ``seed`` (the run's): with adapter-only checkpoints the frozen base is built from its own seeded RNG (the global
    one untouched), so that a resume or ``load_run`` rebuilds the same weights where any are random (a base from
    init, an embedding grown past the checkpoint's vocabulary)."""
    import torch

    if instantiate is None:
        from hydra.utils import instantiate
    node, spec = split_lora(model_cfg)
    if spec is None:
        return instantiate(node, **kwargs)
    with contextlib.ExitStack() as stack:
        if seed is not None and spec.checkpoint == "adapters":
            stack.enter_context(torch.random.fork_rng(devices=[]))
            torch.manual_seed(int(seed))
        backbone = instantiate(node, **kwargs, **quantization_kwargs(spec if not _on_meta() else None))
        return add_adapters(backbone, spec)


def _on_meta() -> bool:
    import torch

    return torch.empty(0).device.type == "meta"  # a plan's or placeholder's build: nothing loads, nothing to quantize


# ---- adding adapters -------------------------------------------------------------------------------------------
def adapter_root(backbone: nn.Module) -> nn.Module:
    """The module peft wraps: an HF wrapper's transformers model (so that adapter folders fit it), else the
    backbone."""
    from torch import nn

    root = getattr(backbone, "hf_model", None)
    return root if isinstance(root, nn.Module) else backbone


def _linear_types() -> tuple[type, ...]:
    from torch import nn
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed Linear

    return (nn.Linear, Conv1D)


def linear_names(root: nn.Module) -> list[str]:
    """The distinct last names of the Linear (and Conv1D) layers under ``root``: what target_modules can name."""
    return sorted({name.rpartition(".")[2] for name, m in root.named_modules() if name and isinstance(m, _linear_types())})


def default_targets(backbone: nn.Module) -> list[str]:
    """The attention and MLP linear layers: the backbone's ``lora_targets`` where it declares them, else the
    Linear/Conv1D layers whose weight dlm.optim classes as attention or mlp (not routers, experts, embeddings)."""
    declared = getattr(backbone, "lora_targets", None)
    if declared:
        return list(declared)
    from dlm.optim import parameter_role

    root = adapter_root(backbone)
    output = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    names = set()
    for name, module in root.named_modules():
        if name and isinstance(module, _linear_types()) and module is not output:
            if parameter_role(f"{name}.weight", module.weight, module) in ("attention", "mlp"):
                names.add(name.rpartition(".")[2])
    return sorted(names)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of names


def add_adapters(backbone: nn.Module, spec: LoraSpec) -> nn.Module:
    """Add LoRA adapters to ``backbone`` in place and freeze everything else; returns it. The spec is kept as
    ``backbone.lora_spec`` (read by the export and the plan)."""
    from peft import LoraConfig, inject_adapter_in_model

    root = adapter_root(backbone)
    targets = list(spec.target_modules or default_targets(backbone))
    modules = dict(root.named_modules())
    kind = type(backbone).__name__
    valid = ", ".join(linear_names(root)) or "none"
    for target in targets:
        matched = [m for n, m in modules.items() if _matches(n, target)]
        if not matched:
            raise LoraError(f"model.lora.target_modules: {target!r} matches no module of {kind}; its Linear "
                            f"modules: {valid}")
        if not all(isinstance(m, _linear_types()) for m in matched):
            raise LoraError(f"model.lora.target_modules: {target!r} names a {type(matched[0]).__name__}, not a "
                            f"Linear layer, in {kind}; its Linear modules: {valid}")
    from transformers.pytorch_utils import Conv1D

    transposed = [isinstance(m, Conv1D) for n, m in modules.items() if any(_matches(n, t) for t in targets)]
    if any(transposed) and not all(transposed):
        raise LoraError(f"model.lora.target_modules={targets} mixes Linear and Conv1D layers of {kind}; "
                        f"adapt one kind per run")
    params = list(spec.target_parameters or ())
    if params:
        names = [n for n, _ in root.named_parameters()]
        import re

        # one entry per kind of layer: "mlp.experts.gate_up_proj", not one per layer index
        fused = ", ".join(sorted({re.sub(r"^.*?\.\d+\.", "", n) for n, p in root.named_parameters() if p.dim() == 3}))
        fused = fused or "none"
        for target in params:
            if not any(_matches(n, target) for n in names):
                raise LoraError(f"model.lora.target_parameters: {target!r} matches no parameter of {kind}; its 3-D "
                                f"(fused expert) parameters: {fused}")
    config = LoraConfig(r=spec.r, lora_alpha=spec.r if spec.alpha is None else spec.alpha,
                        lora_dropout=spec.dropout, target_modules=targets, fan_in_fan_out=any(transposed),
                        bias="none", **({"target_parameters": params} if params else {}))
    if spec.quantize:
        from peft import prepare_model_for_kbit_training

        # norms and embeddings in float32 for stable training next to the 4-bit weights (peft's QLoRA preparation)
        prepare_model_for_kbit_training(root, use_gradient_checkpointing=False)
    inject_adapter_in_model(config, root, adapter_name=ADAPTER)
    _reset_partitioned_adapters(root)
    for name, param in backbone.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))
    for path in saved_modules(root, spec, kind):  # trained in full, in place (a tied head and embedding: one tensor)
        root.get_submodule(path).requires_grad_(True)
    backbone.lora_spec = spec
    return backbone


def top_level_names(root: nn.Module) -> list[str]:
    """The distinct last names of the modules outside any numbered layer list (``model.embed_tokens``, ``lm_head``,
    ``norm``; not ``layers.3.mlp``): what ``modules_to_save`` usually names."""
    return sorted({name.rpartition(".")[2] for name, _ in root.named_modules()
                   if name and not any(part.isdigit() for part in name.split("."))})


def saved_modules(root: nn.Module, spec: LoraSpec, kind: str = "") -> list[str]:
    """The paths (under ``root``, peft's name rule) of the modules ``spec.modules_to_save`` names; refuses a name that
    matches no module, and one whose module holds adapters (its base weights would train under the adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    paths: list[str] = []
    kind = kind or type(root).__name__
    for target in spec.modules_to_save or ():
        matched = [n for n, _ in root.named_modules() if n and _matches(n, target)]
        if not matched:
            raise LoraError(f"model.lora.modules_to_save: {target!r} matches no module of {kind}; its top-level "
                            f"modules: {', '.join(top_level_names(root)) or 'none'}")
        for path in matched:
            if any(isinstance(m, BaseTunerLayer) for m in root.get_submodule(path).modules()):
                raise LoraError(f"model.lora.modules_to_save: {target!r} ({path}) holds LoRA-adapted layers; train a "
                                f"module in full or adapt it, not both (drop it from one of modules_to_save, "
                                f"target_modules)")
        paths += [p for p in matched if p not in paths]
    return paths


def _reset_partitioned_adapters(root: nn.Module) -> None:
    """Built inside DeepSpeed's ``zero.Init`` (ZeRO-3 loading), the adapters' weights are partitioned as soon as
    they exist, so peft's init (B = 0) wrote into empty placeholders: redo it on the gathered weights (rank 0's
    writes kept). A no-op elsewhere."""
    from peft.tuners.lora import LoraLayer

    from dlm.parallel.params import gathered, is_partitioned

    for module in root.modules():
        if isinstance(module, LoraLayer):
            params = [p for p in module.parameters() if is_partitioned(p)]
            if params:
                with gathered(params, modifier_rank=0):
                    module.reset_lora_parameters(ADAPTER, True)


def is_adapter_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_spec(backbone: nn.Module) -> LoraSpec | None:
    spec = getattr(backbone, "lora_spec", None)
    return spec if isinstance(spec, LoraSpec) else None


def adapter_count(backbone: nn.Module) -> int:
    """Trainable adapter parameters: r * (in + out) per adapted layer."""
    from dlm.parallel.params import numel

    return sum(numel(p) for n, p in backbone.named_parameters() if is_adapter_parameter(n))


def plan_line(backbone: nn.Module | None, total: int, trainable: int, grad_optim_bytes: int,
              spec: LoraSpec | None = None) -> str:
    """The dry run's LoRA line: trainable vs total, and the gradients + optimizer state the frozen base is spared.
    ``spec``: the adapters' (default: the backbone's; a plan counted from the config has no backbone)."""
    spec = spec or adapter_spec(backbone)
    saved = (total - trainable) * grad_optim_bytes / 1024**3
    quant = f", base in {spec.quantize} (NF4)" if spec.quantize else ""
    return (f"LoRA r={spec.r} alpha={spec.r if spec.alpha is None else spec.alpha:g}{quant}: {trainable:,} trainable of "
            f"{total:,} parameters ({100 * trainable / max(total, 1):.3g}%); the frozen base holds no gradients or "
            f"Adam state: {saved:,.1f} GiB saved on one GPU (the adapters' take {trainable * grad_optim_bytes / 1024**3:,.2f} "
            f"GiB)")


# ---- the base without its adapters -----------------------------------------------------------------------------
@contextlib.contextmanager
def adapters_disabled(backbone: nn.Module) -> Iterator[nn.Module]:
    """``backbone`` computing as its base model (every LoRA layer's adapter skipped) for the block, then as before:
    peft's ``PeftModel.disable_adapter`` for the in-place adapters of :func:`add_adapters` (no wrapper to ask). GRPO's
    frozen reference is the base of fresh adapters read this way, instead of a second copy of the model. The
    adapters' ``requires_grad`` is left alone (peft's ``enable_adapters(False)`` would clear it, and DeepSpeed
    records which parameters train when it starts)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in adapter_root(backbone).modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True  # what peft's LoraLayer.forward reads: the base layer's output alone
    try:
        yield backbone
    finally:
        for m, was in zip(layers, before):
            m._disable_adapters = was

"""Merging and exporting LoRA adapters (dlm/models/lora.py adds them): in place on a live backbone
(:func:`merge_adapters`, peft's ``merge``), on a state dict (:func:`merged_state`: a checkpoint's or a ZeRO-3
consolidation's, dlm/parallel/export.py), or as peft's adapter folder (:func:`save_adapter_folder`:
``adapter_config.json`` + ``adapter_model.safetensors``, which ``PeftModel.from_pretrained`` loads onto the base).
A merged export is the plain model: ``W + (alpha / r) B A`` per adapted weight, transposed for Conv1D, and per expert
for the parameter adapters of fused MoE experts (peft's ``ParamWrapper``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from dlm.models.lora import ADAPTER, adapter_root, adapter_spec, is_adapter_parameter, saved_modules

if TYPE_CHECKING:
    from torch import Tensor, nn


def saved_export_paths(backbone: nn.Module) -> list[str]:
    """The modules an adapter folder carries in full (peft's ``modules_to_save``): those named, and every module
    outside them whose own parameter is one of theirs (a tied embedding of a saved head), so that peft, which gives
    each saved module its own copy, loads the trained tensor into both."""
    spec = adapter_spec(backbone)
    if spec is None or not spec.modules_to_save:
        return []
    root = adapter_root(backbone)
    paths = saved_modules(root, spec)
    ids = {id(p) for path in paths for p in root.get_submodule(path).parameters()}
    for name, module in root.named_modules():
        inside = any(name == p or name.startswith(p + ".") for p in paths)
        if name and not inside and any(id(p) in ids for p in module.parameters(recurse=False)):
            paths.append(name)
    return paths


def merge_adapters(backbone: nn.Module) -> nn.Module:
    """Merge every adapter into its base layer (peft's ``merge``: W + scaling B A) and put the plain layer back, in
    place: the backbone is then the model the adapters made, with its original parameter names. Returns it."""
    from peft.tuners.lora import LoraLayer

    root = adapter_root(backbone)
    layers = [(name, m) for name, m in root.named_modules() if isinstance(m, LoraLayer)]
    for _, module in layers:  # every adapter first: a parameter adapter (experts) nests one per parameter
        module.merge(adapter_names=[ADAPTER])
    for name, module in layers:
        if ".base_layer" in f".{name}":  # inside another adapter layer: goes with the outermost one
            continue
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, module.get_base_layer())
    if hasattr(root, "peft_config"):
        del root.peft_config
    backbone.lora_spec = None
    return backbone


def parameter_adapters(backbone: nn.Module, prefix: str = "") -> dict[str, tuple[str, int, bool]]:
    """The parameters adapted through ``target_parameters`` (peft's ParamWrapper, nested one per parameter of a
    module): {the parameter's state-dict key: (its adapter layer's key, number of experts, whether peft swapped
    in/out)}; keys relative to ``backbone`` with ``prefix`` in front."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, module in backbone.named_modules():
        if isinstance(module, ParamWrapper):
            path, inner = name, module
            while isinstance(inner.base_layer, LoraLayer):
                path, inner = f"{path}.base_layer", inner.base_layer
            out[f"{prefix}{path}.base_layer.{module.parameter_name}"] = (
                f"{prefix}{name}", int(module.num_experts), bool(module._did_swap_in_out_features))
    return out


def _parameter_delta(a: Tensor, b: Tensor, experts: int, swapped: bool, ndim: int) -> Tensor:
    """B A of a parameter adapter in the parameter's layout (peft's ParamWrapper.get_delta_weight, float32): A is
    [experts * r, in] and B [out, experts * r], expert e's rank block is rows e*r.. of A and columns e, e+E.. of B."""
    import torch

    a, b = a.float(), b.float()
    if ndim == 2:
        return b @ a
    a = a.reshape(experts, -1, a.shape[-1])  # [E, r, in]
    b = b.reshape(b.shape[0], -1, experts)  # [out, r, E]
    return torch.einsum("ore,eri->eoi" if swapped else "ore,eri->eio", b, a)


def merged_state(state: dict[str, Tensor], scaling: float, fan_in_fan_out: bool,
                 parameters: dict[str, tuple[str, int, bool]] | None = None) -> dict[str, Tensor]:
    """A state dict with adapters (``<m>.base_layer.*``, ``<m>.lora_A.default.weight``, ``<m>.lora_B.default.weight``)
    as the plain model's (``<m>.weight`` = W + scaling B A, transposed for Conv1D), computed in float32.
    ``parameters``: the parameter adapters (:func:`parameter_adapters`), merged into their 3-D expert weights."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if is_adapter_parameter(key):
            continue
        if parameters and key in parameters:
            layer, experts, swapped = parameters[key]
            delta = _parameter_delta(state[f"{layer}.lora_A.{ADAPTER}.weight"], state[f"{layer}.lora_B.{ADAPTER}.weight"],
                                     experts, swapped, value.dim())
            out[key.replace(".base_layer", "")] = (value.float() + scaling * delta).to(value.dtype)
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        module, _, leaf = key.partition(".base_layer.")
        if leaf == "weight":
            a, b = state[f"{module}.lora_A.{ADAPTER}.weight"], state[f"{module}.lora_B.{ADAPTER}.weight"]
            delta = scaling * (b.float() @ a.float())
            value = (value.float() + (delta.T if fan_in_fan_out else delta)).to(value.dtype)
        out[f"{module}.{leaf}"] = value
    return out


def peft_config_of(backbone: nn.Module):
    return adapter_root(backbone).peft_config[ADAPTER]


def save_adapter_folder(backbone: nn.Module, state: dict[str, Tensor], out: str | Path,
                        base: str | None = None, extra: dict | None = None) -> Path:
    """peft's adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, the keys
    ``PeftModel.from_pretrained`` expects) from ``state``: the backbone's state dict (keys relative to the backbone,
    adapters included). ``base``: the base model it adapts (``base_model_name_or_path``)."""
    import copy

    from safetensors.torch import save_file

    root = adapter_root(backbone)
    prefix = "hf_model." if root is not backbone else ""
    tensors = {}
    for key, value in state.items():
        if is_adapter_parameter(key) and key.startswith(prefix):
            name = key[len(prefix):].replace(f".{ADAPTER}.", ".")
            tensors[f"base_model.model.{name}"] = value.detach().cpu().contiguous()
    if not tensors:
        raise ValueError("no adapter weights (lora_A/lora_B) in the state dict")
    saved = saved_export_paths(backbone)
    for path in saved:  # peft's key for a saved module's tensor: its plain name (ModulesToSaveWrapper's load map)
        leaves = {k for k in adapter_root(backbone).get_submodule(path).state_dict()}
        for leaf in leaves:
            # a copy each: a tied head and embedding share storage, which safetensors refuses
            tensors[f"base_model.model.{path}.{leaf}"] = state[f"{prefix}{path}.{leaf}"].detach().cpu().clone()
    config = copy.deepcopy(peft_config_of(backbone))
    config.modules_to_save = saved or None
    config.base_model_name_or_path = base
    config.inference_mode = True
    if prefix:
        config.task_type = "CAUSAL_LM" if type(root).__name__.endswith("ForCausalLM") else config.task_type
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "dlm_export.json").write_text(json.dumps({**(extra or {}), "format": "peft-adapter"}, indent=2) + "\n")
    return out


def export_adapted(backbone: nn.Module, out: str | Path) -> bool:
    """Before a family's own export of a live backbone (AR's ``export_hf``): with ``export=merged`` the adapters
    are merged in place (the run is over) and the family exports as usual (False); with ``export=adapter``, or a
    QLoRA run (its base is 4-bit), peft's adapter folder is written to ``out`` (True: nothing else to export). No
    adapters: False."""
    spec = adapter_spec(backbone)
    if spec is None:
        return False
    if spec.export == "adapter" or spec.quantize:  # a 4-bit base cannot take a merge: the adapters alone
        config = getattr(adapter_root(backbone), "config", None)
        save_adapter_folder(backbone, backbone.state_dict(), out, base=getattr(config, "_name_or_path", None) or None)
        return True
    merge_adapters(backbone)
    return False

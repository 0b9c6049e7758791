"""Parameter groups and learning-rate schedules.

Parameters are sorted into roles (attention, mlp, experts, router, embedding, norm) so that a config can give
each role its own learning-rate multiplier: the A2D recipe (RND1's Simple Continual Pretraining) trains
attention faster than the MLP/expert layers that hold the pretrained model's knowledge. Norms, biases and
embeddings get no weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from dlm.parallel.params import numel as parameter_numel
from dlm.parallel.params import shape as parameter_shape

ROLES = ("attention", "mlp", "experts", "router", "embedding", "norm")
_NO_DECAY_ROLES = {"embedding", "norm"}

# Substrings of a parameter's qualified name that identify its role, checked in order (first match wins).
# They cover the native backbone and the Hugging Face families we convert (Llama, Qwen3, Qwen3-MoE, GPT-2).
_NAME_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("router", ("router", "mlp.gate.", "moe.gate.")),
    ("experts", ("experts",)),
    ("attention", ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")),
)


def parameter_role(name: str, param: nn.Parameter, module: nn.Module | None = None) -> str:
    """The role of one parameter, from its owning module's type and its qualified name."""
    if isinstance(module, nn.Embedding) or "embed" in name or "lm_head" in name or name.startswith("wte"):
        return "embedding"
    ndim = len(parameter_shape(param))  # the whole shape, also of a ZeRO-3 partitioned parameter
    if ndim < 2 or "norm" in name.lower():
        return "norm"  # norm gains and biases
    for role, needles in _NAME_RULES:
        if any(needle in name for needle in needles):
            return role
    return "mlp"


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Map every trainable parameter name to its role."""
    owner = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owner[f"{module_name}.{param_name}" if module_name else param_name] = module
    return {
        name: parameter_role(name, p, owner.get(name))
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, lr_multipliers: Mapping[str, float] | None = None
) -> list[dict]:
    """One optimizer group per role present in `model`, each with its lr and weight decay.

    Tied weights appear once (named_parameters de-duplicates them)."""
    multipliers = dict.fromkeys(ROLES, 1.0)
    for role, mult in (lr_multipliers or {}).items():
        if role not in multipliers:
            raise ValueError(f"unknown parameter role {role!r} in lr_multipliers; valid roles: {', '.join(ROLES)}")
        multipliers[role] = float(mult)
    roles = parameter_roles(model)
    by_role: dict[str, list[nn.Parameter]] = {}
    names = dict(model.named_parameters())
    for name, role in roles.items():
        by_role.setdefault(role, []).append(names[name])
    return [
        {
            "name": role,
            "params": params,
            "lr": lr * multipliers[role],
            "weight_decay": 0.0 if role in _NO_DECAY_ROLES else weight_decay,
        }
        for role, params in by_role.items()
        if multipliers[role] > 0
    ]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio` of each group's lr."""
    if total_steps <= 0:
        raise ValueError(f"warmup_cosine needs total_steps > 0 (set trainer.max_steps), got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def warmup_constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warmup over `warmup_steps`, then constant."""
    del total_steps  # same signature as the other schedules

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return LambdaLR(optimizer, factor)


def merge_lr_multipliers(*layers: Mapping[str, float] | None) -> dict[str, float]:
    """Role -> multiplier from several layers, later ones winning (model defaults, then the method's).

    Unknown roles are refused with the valid ones named."""
    merged: dict[str, float] = {}
    for layer in layers:
        for role, mult in (layer or {}).items():
            if role not in ROLES:
                raise ValueError(f"unknown parameter role {role!r} in lr_multipliers; valid roles: {', '.join(ROLES)}")
            if mult is None or float(mult) < 0:
                raise ValueError(f"lr_multipliers.{role}={mult} must be a number >= 0 (0 freezes the role)")
            merged[role] = float(mult)
    return merged


def freeze_roles(model: nn.Module, lr_multipliers: Mapping[str, float] | None) -> dict[str, int]:
    """Freeze (requires_grad=False) every parameter whose role has multiplier 0; returns {role: n_params frozen}.

    A frozen role gets no optimizer group, no gradient and no optimizer state (under DeepSpeed too, which
    partitions only trainable parameters into its optimizer)."""
    frozen_roles = {role for role, mult in (lr_multipliers or {}).items() if float(mult) == 0.0}
    if not frozen_roles:
        return {}
    names = dict(model.named_parameters())
    counts: dict[str, int] = {}
    for name, role in parameter_roles(model).items():
        if role in frozen_roles:
            names[name].requires_grad_(False)
            counts[role] = counts.get(role, 0) + parameter_numel(names[name])
    return counts


def reapply_hparams(optimizer: torch.optim.Optimizer, configured: list[dict], scheduler=None) -> list[str]:
    """Put the composed config's optimizer settings (one dict per group, as built: lr with its role multiplier,
    weight_decay, betas, ...) back after a resume restored the checkpoint's, which would otherwise win. The
    moments and step counts stay. A new base lr keeps the schedule's position: the group's lr is scaled by the
    same factor as its base, and the scheduler's ``base_lrs`` follow. Returns the changes, ``key[group] old -> new``."""
    groups = optimizer.param_groups
    if len(groups) != len(configured):  # not the same groups: leave the restored state alone
        return []
    base_lrs = getattr(scheduler, "base_lrs", None)
    changes = []
    for i, (group, want) in enumerate(zip(groups, configured)):
        name = group.get("name", i)
        for key, value in want.items():
            if key == "name" or key not in group:
                continue
            if key == "lr":
                old = group.get("initial_lr", group["lr"])
                if old == value:
                    continue
                group["lr"] = group["lr"] * (value / old) if old else value
                if "initial_lr" in group:
                    group["initial_lr"] = value
                if base_lrs is not None and i < len(base_lrs):
                    base_lrs[i] = value
            else:
                old = group[key]
                if _plain(old) == _plain(value):
                    continue
                group[key] = value
            changes.append(f"{key}[{name}] {old} -> {value}")
    if scheduler is not None and hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [group["lr"] for group in groups]
    return changes


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig" else value

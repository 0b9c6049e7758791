"""Sparse mixture-of-experts bookkeeping: parameters active per token."""

from __future__ import annotations

from torch import nn

from dlm.parallel.params import numel


def _top_k_near(parent: nn.Module, root: nn.Module) -> int | None:
    """Experts chosen per token for the experts living under ``parent``: a router's top_k, else the config's."""
    for sub in parent.modules():
        k = getattr(sub, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    for sub in root.modules():
        cfg = getattr(sub, "config", None)
        for name in ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k"):
            k = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(k, int) and k > 0:
                return k
    return None


def count_active_parameters(module: nn.Module) -> int:
    """Parameters used per token (shared/tied ones counted once).

    Routed experts (a submodule named ``experts``: a fused module with ``num_experts`` or a ModuleList of
    experts) count for ``top_k / num_experts`` of their size; everything else (attention, routers, shared
    experts, embeddings) counts fully. For a dense model this equals the total parameter count.
    """
    named = dict(module.named_modules())
    params = {id(p): numel(p) for p in module.parameters()}  # whole sizes, also under ZeRO-3
    active = float(sum(params.values()))
    seen: set[int] = set()
    for name, sub in named.items():
        if name.split(".")[-1] != "experts":
            continue
        n_experts = getattr(sub, "num_experts", None)
        if n_experts is None and isinstance(sub, nn.ModuleList):
            n_experts = len(sub)
        parent = named.get(name.rpartition(".")[0], module)
        top_k = _top_k_near(parent, module)
        if not n_experts or not top_k:
            continue
        size = sum(params[id(p)] for p in sub.parameters() if id(p) not in seen)
        seen.update(id(p) for p in sub.parameters())
        active -= size * (1 - min(top_k, n_experts) / n_experts)
    return round(active)

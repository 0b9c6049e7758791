"""Config values as plain Python: OmegaConf containers become dicts and lists (resolved where they can be), so that
they hash, serialise, compare and pass to libraries that accept only plain types."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(node: Any) -> Any:
    """``node`` with every OmegaConf container (also nested in dicts, lists and tuples) as plain Python, resolved
    when possible; an interpolation that cannot be resolved here is kept as written."""
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra job
            return OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        return {k: to_plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [to_plain(v) for v in node]
    return node

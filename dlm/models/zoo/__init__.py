"""The field's published diffusion LMs in their own checkpoint layouts, on transformers classes (no remote code):
LLaDA-8B (Llama), LLaDA-MoE-7B-A1B (Qwen3-MoE), Dream-v0-7B (Qwen2), RND1-Base (Qwen3-MoE). A file per
architecture; ``layout.py`` is the shared mapping and streaming, ``backbone.py`` the backbone."""

from __future__ import annotations

from dlm.models.zoo.backbone import PublishedDLM
from dlm.models.zoo.dream import DreamLayout
from dlm.models.zoo.layout import LayoutError, PublishedLayout, Target, cached_config
from dlm.models.zoo.llada import LLaDALayout
from dlm.models.zoo.llada_moe import LLaDAMoELayout
from dlm.models.zoo.rnd1 import RND1Layout

# Every layout, for recognising a published folder by its config.json (plans, geometry): not config dispatch.
LAYOUTS: tuple[PublishedLayout, ...] = (LLaDALayout(), LLaDAMoELayout(), DreamLayout(), RND1Layout())


def layout_of(published: dict) -> PublishedLayout | None:
    """The layout whose config.json this is, else None."""
    return next((layout for layout in LAYOUTS if layout.matches(published)), None)


def published_geometry(pretrained: str) -> dict | None:
    """The transformers geometry of a published checkpoint (folder or hub cache; never the network), else None."""
    published = cached_config(pretrained)
    layout = None if published is None else layout_of(published)
    if layout is None:
        return None
    layout.require(published, pretrained)
    return layout.hf_config(published)


__all__ = ["DreamLayout", "LAYOUTS", "LLaDALayout", "LLaDAMoELayout", "LayoutError", "PublishedDLM",
           "PublishedLayout", "RND1Layout", "Target", "layout_of", "published_geometry"]

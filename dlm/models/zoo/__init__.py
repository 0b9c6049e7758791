"""The field's published diffusion LMs in their own checkpoint layouts, on transformers classes (no remote code):
LLaDA-8B (Llama), LLaDA-MoE-7B-A1B (Qwen3-MoE), Dream-v0-7B (Qwen2), RND1-Base (Qwen3-MoE). A file per
architecture; ``layout.py`` is the shared mapping and streaming, ``backbone.py`` the backbone. The names load on
first use, so that reading a folder's layout (``registry``: plans) imports no torch."""

from __future__ import annotations

from dlm.lazy import lazy_attributes

_WHERE = {
    "PublishedDLM": "dlm.models.zoo.backbone",
    "DreamLayout": "dlm.models.zoo.dream",
    "LayoutError": "dlm.models.zoo.layout",
    "PublishedLayout": "dlm.models.zoo.layout",
    "Target": "dlm.models.zoo.layout",
    "LLaDALayout": "dlm.models.zoo.llada",
    "LLaDAMoELayout": "dlm.models.zoo.llada_moe",
    "LAYOUTS": "dlm.models.zoo.registry",
    "layout_of": "dlm.models.zoo.registry",
    "published_geometry": "dlm.models.zoo.registry",
    "RND1Layout": "dlm.models.zoo.rnd1",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)

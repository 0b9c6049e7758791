"""The field's published diffusion LMs in their own checkpoint layouts, on transformers classes (no remote code):
LLaDA-8B (Llama), LLaDA-MoE-7B-A1B (Qwen3-MoE), Dream-v0-7B (Qwen2), RND1-Base (Qwen3-MoE). A file per
architecture; ``layout.py`` is the shared mapping and streaming, ``backbone.py`` the backbone."""

from __future__ import annotations

from dlm.models.zoo.backbone import PublishedDLM
from dlm.models.zoo.dream import DreamLayout
from dlm.models.zoo.layout import LayoutError, PublishedLayout, Target
from dlm.models.zoo.llada import LLaDALayout
from dlm.models.zoo.llada_moe import LLaDAMoELayout
from dlm.models.zoo.registry import LAYOUTS, layout_of, published_geometry
from dlm.models.zoo.rnd1 import RND1Layout

__all__ = ["DreamLayout", "LAYOUTS", "LLaDALayout", "LLaDAMoELayout", "LayoutError", "PublishedDLM",
           "PublishedLayout", "RND1Layout", "Target", "layout_of", "published_geometry"]

"""Recognising a published folder by its config.json (for plans and geometry, dlm/models/hf_geometry.py): the
layouts only, not the backbone, so the geometry lookup stays below dlm.models.hf in the import graph."""

from __future__ import annotations

from dlm.models.zoo.dream import DreamLayout
from dlm.models.zoo.layout import PublishedLayout, cached_config
from dlm.models.zoo.llada import LLaDALayout
from dlm.models.zoo.llada_moe import LLaDAMoELayout
from dlm.models.zoo.rnd1 import RND1Layout

# Every layout, for recognising a published folder by its config.json (a file format, not config dispatch).
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

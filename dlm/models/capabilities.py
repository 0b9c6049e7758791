"""What a backbone can do beyond mapping token ids to logits, declared by the backbone in one place.

Every backbone's ``forward(input_ids, *, doc_ids=None, time=None, attention=None, ...)`` returns logits. What else
it takes is stated by its ``capabilities`` property (a :class:`BackboneCapabilities`), and families, samplers and
the sampling caches read that instead of probing signatures or attributes. A backbone without the property (a small
module written for a test or an experiment) declares nothing beyond the plain call.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["BackboneCapabilities", "capabilities_of"]


@dataclass(frozen=True)
class BackboneCapabilities:
    time_conditioning: bool = False  # its forward uses ``time=[B]`` (the noise level); else time is ignored
    logits_at: bool = False  # its forward takes ``logits_at=`` (bool [B, T]): the head runs on those positions only
    kv_cache: bool = False  # its forward takes ``past_key_values=`` / ``use_cache=`` (a growing KV cache)
    static_cache: bool = False  # ``static_cache(batch_size, capacity, device=...)`` builds a preallocated KV cache


PLAIN = BackboneCapabilities()


def capabilities_of(backbone: nn.Module) -> BackboneCapabilities:
    """The backbone's declared capabilities (nothing beyond the plain call when it declares none)."""
    caps = getattr(backbone, "capabilities", None)
    return caps if isinstance(caps, BackboneCapabilities) else PLAIN

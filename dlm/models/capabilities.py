"""What a backbone can do beyond mapping token ids to logits, declared by the backbone in one place.

Every backbone's ``forward(input_ids, *, doc_ids=None, time=None, attention=None, ...)`` returns logits. What else
it takes is stated by its ``capabilities`` property (a :class:`BackboneCapabilities`), and families, samplers and
the sampling caches read that instead of probing signatures or attributes. A backbone without the property (a small
module written for a test or an experiment) declares nothing beyond the plain call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the conventions are read at start-up, before torch is needed
    from torch import nn

__all__ = ["BackboneCapabilities", "ModelConventions", "capabilities_of", "conventions_of"]


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


@dataclass(frozen=True)
class ModelConventions:
    """What a pretrained checkpoint brings besides its weights: the facts a run must take from the model, not from
    the data or the method (a model config's ``conventions:`` block; see conf/model/*.yaml).

    Every field None means "no convention": the data's tokenizer, the method's ``shift_logits``, the family's
    default sampler. A set field is the model's, and a run that contradicts it is told so (never silently)."""

    tokenizer: str | None = None  # hub id or folder of the checkpoint's tokenizer (usually its own folder)
    mask_token: str | None = None  # the mask token the checkpoint was trained with (e.g. LLaDA "<|mdm_mask|>")
    mask_token_id: int | None = None  # its id in that tokenizer (checked against the tokenizer when both are known)
    shift_logits: bool | None = None  # token i is read from position i-1 (Dream, RND1: continued AR checkpoints)
    sampler: str | None = None  # the conf/sampler option its model card recommends (e.g. low_confidence)
    sampler_fields: dict | None = None  # fields over that option (e.g. {block_length: 32})
    chat_template: bool | None = None  # whether its tokenizer carries a chat template (instruct models)
    # token strings that end an assistant turn besides EOS (LLaDA-Instruct "<|eot_id|>"; dlm/stop_tokens.py)
    stop_tokens: tuple[str, ...] | None = None

    @classmethod
    def from_config(cls, config) -> ModelConventions:
        """From a model config's ``conventions`` mapping (OmegaConf or dict; None = no conventions)."""
        if config is None:
            return cls()
        from dlm.config_values import to_plain

        fields = to_plain(config)
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"model.conventions: unknown field(s) {', '.join(unknown)}; valid: "
                f"{', '.join(cls.__dataclass_fields__)}"
            )
        stops = fields.get("stop_tokens")
        if stops is not None:  # one token or a list of them, kept as a tuple (the dataclass is frozen)
            fields["stop_tokens"] = (stops,) if isinstance(stops, str) else tuple(str(t) for t in stops)
        return cls(**fields)


NO_CONVENTIONS = ModelConventions()


def conventions_of(backbone: nn.Module) -> ModelConventions:
    """The backbone's checkpoint conventions (none when it declares none: a model built from scratch)."""
    conv = getattr(backbone, "conventions", None)
    return conv if isinstance(conv, ModelConventions) else NO_CONVENTIONS

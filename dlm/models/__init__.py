"""Model backbones.

The names load on first use (PEP 562): ``import dlm.models.capabilities`` or ``dlm.models.zoo.registry`` (what a
plan and the CLIs' start-up read) then imports no torch or transformers (issue #17)."""

from dlm.lazy import lazy_attributes

_WHERE = {
    "PATTERNS": "dlm.models.attention",
    "attention_mask": "dlm.models.attention",
    "HFCausalLM": "dlm.models.hf",
    "count_active_parameters": "dlm.models.moe",
    "Transformer": "dlm.models.transformer",
    "count_parameters": "dlm.models.transformer",
    "HFMaskedLM": "dlm.models.hf_masked_lm",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)

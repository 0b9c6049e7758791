"""Model backbones.

The names load on first use (PEP 562): ``import dlm.models.capabilities`` or ``dlm.models.zoo.registry`` (what a
plan and the CLIs' start-up read) then imports no torch or transformers (issue #17)."""

from importlib import import_module

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


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))

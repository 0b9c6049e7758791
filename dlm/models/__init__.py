"""Model backbones."""

from dlm.models.attention import PATTERNS, attention_mask
from dlm.models.hf import HFCausalLM, count_active_parameters
from dlm.models.transformer import Transformer, count_parameters

__all__ = [
    "PATTERNS",
    "HFCausalLM",
    "Transformer",
    "attention_mask",
    "count_active_parameters",
    "count_parameters",
]
from dlm.models.hf_masked_lm import HFMaskedLM  # noqa: E402

__all__ += ["HFMaskedLM"]

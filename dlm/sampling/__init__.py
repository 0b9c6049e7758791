"""Samplers for absorbing-state (mask) diffusion language models."""

from dlm.sampling.ancestral import AncestralSampler
from dlm.sampling.base import Denoiser, Generation, Sampler, filter_logits, sample_categorical
from dlm.sampling.low_confidence import LowConfidenceSampler

__all__ = [
    "AncestralSampler",
    "Denoiser",
    "Generation",
    "LowConfidenceSampler",
    "Sampler",
    "filter_logits",
    "sample_categorical",
]

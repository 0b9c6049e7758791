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
from dlm.sampling.d3pm import D3PMSampler  # noqa: E402
from dlm.sampling.sundae import ArgmaxUnrolledSampler, SundaeSampler  # noqa: E402

__all__ += ["ArgmaxUnrolledSampler", "D3PMSampler", "SundaeSampler"]

from dlm.sampling.autoregressive import ARSampler  # noqa: E402

__all__ += ["ARSampler"]

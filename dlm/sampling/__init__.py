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

from dlm.sampling.confidence import (  # noqa: E402
    ConfidenceSampler,
    EntropySampler,
    MarginSampler,
    OrderedUnmaskingSampler,
    RandomOrderSampler,
)
from dlm.sampling.entropy_bounded import EntropyBoundedSampler  # noqa: E402
from dlm.sampling.remdm import ReMDMSampler  # noqa: E402
from dlm.sampling.threshold import ThresholdSampler  # noqa: E402

__all__ += [
    "ConfidenceSampler",
    "EntropyBoundedSampler",
    "EntropySampler",
    "MarginSampler",
    "OrderedUnmaskingSampler",
    "RandomOrderSampler",
    "ReMDMSampler",
    "ThresholdSampler",
]

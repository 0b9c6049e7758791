"""Samplers: mask-diffusion samplers (fill the masked positions of a partly masked sequence through a
denoiser), SUNDAE's uniform-noise samplers, D3PM's discrete-time reverse process and AR decoding."""

from dlm.sampling.ancestral import AncestralSampler
from dlm.sampling.autoregressive import ARSampler
from dlm.sampling.base import Denoiser, Generation, Sampler, filter_logits, sample_categorical
from dlm.sampling.confidence import (
    ConfidenceSampler,
    EntropySampler,
    MarginSampler,
    OrderedUnmaskingSampler,
    RandomOrderSampler,
)
from dlm.sampling.d3pm import D3PMSampler
from dlm.sampling.entropy_bounded import EntropyBoundedSampler
from dlm.sampling.low_confidence import LowConfidenceSampler
from dlm.sampling.remdm import ReMDMSampler
from dlm.sampling.sundae import ArgmaxUnrolledSampler, SundaeSampler
from dlm.sampling.threshold import ThresholdSampler

__all__ = [
    "ARSampler",
    "AncestralSampler",
    "ArgmaxUnrolledSampler",
    "ConfidenceSampler",
    "D3PMSampler",
    "Denoiser",
    "EntropyBoundedSampler",
    "EntropySampler",
    "Generation",
    "LowConfidenceSampler",
    "MarginSampler",
    "OrderedUnmaskingSampler",
    "RandomOrderSampler",
    "ReMDMSampler",
    "Sampler",
    "SundaeSampler",
    "ThresholdSampler",
    "filter_logits",
    "sample_categorical",
]

"""Samplers: one call, ``sampler.sample(denoiser, x, prior=..., generator=...)``, for the mask-diffusion samplers
(fill the masked positions through a denoiser; :class:`MaskPrior`), D3PM's discrete-time reverse process
(:class:`D3PMPrior`) and SUNDAE's uniform-noise samplers (:class:`UniformPrior`). :class:`ARSampler` is decoding
settings, not a Sampler (see its docstring)."""

from dlm.sampling.ancestral import AncestralSampler
from dlm.sampling.autoregressive import ARSampler
from dlm.sampling.base import (
    Denoiser,
    FunctionDenoiser,
    Generation,
    Sampler,
    filter_logits,
    sample_categorical,
    samplers_for,
    takes,
)
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
from dlm.sampling.prior import D3PMPrior, MaskPrior, Prior, PriorMismatchError, UniformPrior
from dlm.sampling.remdm import ReMDMSampler
from dlm.sampling.sundae import ArgmaxUnrolledSampler, SundaeSampler
from dlm.sampling.threshold import ThresholdSampler

__all__ = [
    "ARSampler",
    "AncestralSampler",
    "ArgmaxUnrolledSampler",
    "ConfidenceSampler",
    "D3PMPrior",
    "D3PMSampler",
    "Denoiser",
    "EntropyBoundedSampler",
    "EntropySampler",
    "FunctionDenoiser",
    "Generation",
    "LowConfidenceSampler",
    "MarginSampler",
    "MaskPrior",
    "OrderedUnmaskingSampler",
    "Prior",
    "PriorMismatchError",
    "RandomOrderSampler",
    "ReMDMSampler",
    "Sampler",
    "SundaeSampler",
    "ThresholdSampler",
    "UniformPrior",
    "filter_logits",
    "sample_categorical",
    "samplers_for",
    "takes",
]

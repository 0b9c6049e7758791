"""What a family hands its sampler besides the denoiser: the *prior*, i.e. the corruption the samplers reverse.

One dataclass per corruption, so every sampler has one call, ``sampler.sample(denoiser, x, prior=..., generator=...)``:

=================  ==========================================================================================
:class:`MaskPrior`     absorbing state (mask) diffusion in continuous time: ``mask_id`` and the ``schedule``
                       (MDLM, BD3-LM, a time-agnostic DiffusionBERT); ``denoiser(x)``
:class:`D3PMPrior`     absorbing D3PM in discrete time with a per-token schedule: ``mask_id``, ``alpha_bar(t)``
                       (ᾱ_t as a ``[V]`` tensor) and ``num_timesteps`` T (DiffusionBERT); ``denoiser(x, t)``
:class:`UniformPrior`  uniform-replacement noise (SUNDAE): the ``free`` positions start as draws from
                       ``noise_ids``; ``mask_id`` is only excluded from the predictions; ``denoiser(x)``
=================  ==========================================================================================

A sampler declares the priors it can reverse in :attr:`~dlm.sampling.base.Sampler.priors`; handed another one it
raises :class:`PriorMismatchError` naming the samplers that can.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from dlm.schedules import MaskSchedule

__all__ = ["D3PMPrior", "MaskPrior", "Prior", "PriorMismatchError", "UniformPrior"]


class PriorMismatchError(ValueError):
    """A sampler was handed a prior it cannot reverse (a ValueError: the configured sampler does not fit the family)."""


@dataclass(frozen=True)
class Prior:
    """Base of the priors: what the corruption is, as the sampler needs it."""


@dataclass(frozen=True)
class MaskPrior(Prior):
    """Absorbing-state diffusion: masked positions (``x == mask_id``) are filled; ``schedule`` is α(t) (samplers
    that do not follow a time grid, e.g. the confidence-ordered ones, ignore it, so it may be None there)."""

    mask_id: int
    schedule: MaskSchedule | None = None


@dataclass(frozen=True)
class D3PMPrior(Prior):
    """Absorbing D3PM in discrete time: ``alpha_bar(t)`` is ᾱ_t per token (``[V]``), t = 0..num_timesteps; the
    denoiser is called as ``denoiser(x, t)`` (time-agnostic models ignore t)."""

    mask_id: int
    alpha_bar: Callable[[int], Tensor]
    num_timesteps: int


@dataclass(frozen=True)
class UniformPrior(Prior):
    """Uniform-replacement noise: the ``free`` positions (bool, shape of x) start as uniform draws from ``noise_ids``
    (1-D ids) and are refined; the others never change. ``mask_id`` (if any) is given zero probability."""

    free: Tensor
    noise_ids: Tensor
    mask_id: int | None = None

"""Masking schedules for absorbing-state (masked) discrete diffusion.

Convention
----------
Time ``t`` runs over ``[0, 1]``. ``alpha(t)`` is the probability that a token is still *clean* (not yet
replaced by the mask token) at time ``t``: it is decreasing with ``alpha(0) ~ 1`` and ``alpha(1) ~ 0``.
The forward process masks each token independently with probability ``1 - alpha(t)``.

The continuous-time negative ELBO of masked diffusion (MDLM, Sahoo et al. 2024; Shi et al. 2024; LLaDA,
Nie et al. 2025) is

    NELBO = E_t E_{x_t} [ w(t) * sum_{i masked} -log p(x0_i | x_t) ],   w(t) = -alpha'(t) / (1 - alpha(t)),

which for the linear schedule reduces to the familiar ``1/t`` weighting.

All schedules are free of ``nn.Module`` state and operate elementwise on floating point tensors of any
shape (python floats are accepted too). Computation happens in the dtype of the input, so pass float64
times where precision matters.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = [
    "MaskSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "PolynomialSchedule",
    "GeometricSchedule",
]


def _as_float_tensor(t: Tensor | float) -> Tensor:
    """Return ``t`` as a floating point tensor (python numbers and integer tensors get the default dtype)."""
    if not isinstance(t, Tensor):
        return torch.tensor(t, dtype=torch.get_default_dtype())
    if not t.is_floating_point():
        return t.to(torch.get_default_dtype())
    return t


class MaskSchedule(ABC):
    """Base class of masking schedules ``alpha(t)`` (probability that a token is clean at time ``t``)."""

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Probability that a token is still clean at time ``t``."""

    @abstractmethod
    def alpha_prime(self, t: Tensor) -> Tensor:
        """Analytic time derivative ``d alpha / dt`` (non-positive)."""

    def mask_prob(self, t: Tensor) -> Tensor:
        """Probability ``1 - alpha(t)`` that a token is masked at time ``t``."""
        return 1 - self.alpha(_as_float_tensor(t))

    def elbo_weight(self, t: Tensor) -> Tensor:
        """Continuous-time NELBO weight ``w(t) = -alpha'(t) / (1 - alpha(t))`` (diverges as t -> 0)."""
        t = _as_float_tensor(t)
        return -self.alpha_prime(t) / self.mask_prob(t)

    def unmask_prob(self, t: Tensor, s: Tensor) -> Tensor:
        """For ``s < t``: probability that a token masked at time ``t`` is clean at time ``s``.

        Equals ``(alpha(s) - alpha(t)) / (1 - alpha(t))``, written as
        ``(mask_prob(t) - mask_prob(s)) / mask_prob(t)`` for precision, clamped to ``[0, 1]``. Where nothing
        is masked at ``t`` (``alpha(t) == 1``) the result is defined as 1.
        """
        t = _as_float_tensor(t)
        s = _as_float_tensor(s)
        mt = self.mask_prob(t)
        ms = self.mask_prob(s)
        safe = torch.where(mt > 0, mt, torch.ones_like(mt))
        p = torch.where(mt > 0, (mt - ms) / safe, torch.ones_like(mt))
        return p.clamp(0.0, 1.0)

    def __call__(self, t: Tensor) -> Tensor:
        return self.alpha(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearSchedule(MaskSchedule):
    """Linear schedule ``alpha(t) = 1 - t`` (MDLM / LLaDA default).

    ``alpha'(t) = -1`` and ``w(t) = 1 / t``.
    """

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - _as_float_tensor(t)

    def alpha_prime(self, t: Tensor) -> Tensor:
        return torch.full_like(_as_float_tensor(t), -1.0)

    def mask_prob(self, t: Tensor) -> Tensor:
        return _as_float_tensor(t).clone()

    def elbo_weight(self, t: Tensor) -> Tensor:
        return 1 / _as_float_tensor(t)


class CosineSchedule(MaskSchedule):
    """Cosine schedule ``alpha(t) = cos(pi t / 2)`` (the MaskGIT cosine masking schedule; used in MD4).

    ``alpha'(t) = -(pi/2) sin(pi t / 2)``, ``1 - alpha(t) = 2 sin^2(pi t / 4)`` and
    ``w(t) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) = (pi/2) / tan(pi t / 4)``.
    """

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * _as_float_tensor(t))

    def alpha_prime(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * _as_float_tensor(t))

    def mask_prob(self, t: Tensor) -> Tensor:
        return 2 * torch.sin(0.25 * math.pi * _as_float_tensor(t)) ** 2

    def elbo_weight(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi / torch.tan(0.25 * math.pi * _as_float_tensor(t))


class PolynomialSchedule(MaskSchedule):
    """Polynomial schedule ``alpha(t) = 1 - t^p`` (MD4's polynomial family; ``p = 1`` is linear).

    ``alpha'(t) = -p t^(p-1)`` and ``w(t) = p / t``.
    """

    def __init__(self, power: float = 2.0):
        power = float(power)
        if not (power > 0 and math.isfinite(power)):
            raise ValueError(f"PolynomialSchedule: power must be a finite number > 0, got {power}")
        self.power = power

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - self.mask_prob(t)

    def alpha_prime(self, t: Tensor) -> Tensor:
        t = _as_float_tensor(t)
        return -self.power * t ** (self.power - 1)

    def mask_prob(self, t: Tensor) -> Tensor:
        return _as_float_tensor(t) ** self.power

    def elbo_weight(self, t: Tensor) -> Tensor:
        return self.power / _as_float_tensor(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(power={self.power:g})"


class GeometricSchedule(MaskSchedule):
    """Geometric (log-linear noise) schedule, as in SEDD / MDLM's "geometric" noise.

    Total noise ``sigma(t) = sigma_min^(1-t) * sigma_max^t``, ``alpha(t) = exp(-sigma(t))``,
    ``sigma'(t) = sigma(t) * log(sigma_max / sigma_min)``, ``alpha'(t) = -sigma'(t) exp(-sigma(t))`` and
    ``w(t) = sigma'(t) / expm1(sigma(t))``. Note ``alpha(0) = exp(-sigma_min)`` and
    ``alpha(1) = exp(-sigma_max)`` are only approximately 1 and 0.
    """

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        sigma_min, sigma_max = float(sigma_min), float(sigma_max)
        if not (math.isfinite(sigma_min) and math.isfinite(sigma_max)):
            raise ValueError(f"GeometricSchedule: sigmas must be finite, got {sigma_min=}, {sigma_max=}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"GeometricSchedule: need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max}"
            )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self._log_min = math.log(sigma_min)
        self._log_ratio = math.log(sigma_max) - math.log(sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        """Total noise ``sigma(t) = sigma_min^(1-t) sigma_max^t``."""
        return torch.exp(self._log_min + self._log_ratio * _as_float_tensor(t))

    def sigma_prime(self, t: Tensor) -> Tensor:
        """``d sigma / dt = sigma(t) * log(sigma_max / sigma_min)``."""
        return self.sigma(t) * self._log_ratio

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-self.sigma(t))

    def alpha_prime(self, t: Tensor) -> Tensor:
        sigma = self.sigma(t)
        return -sigma * self._log_ratio * torch.exp(-sigma)

    def mask_prob(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.sigma(t))

    def elbo_weight(self, t: Tensor) -> Tensor:
        sigma = self.sigma(t)
        return sigma * self._log_ratio / torch.expm1(sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g})"

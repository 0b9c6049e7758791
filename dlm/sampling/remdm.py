"""ReMDM remasking sampler (Wang, Schiff, Sahoo, Kuleshov 2025, "Remasking Discrete Diffusion Models with
Inference-Time Scaling").

MDLM's ancestral sampler never changes a token once it is revealed. ReMDM's reverse process lets a revealed
(generated, not given) token be masked again, so later steps, which see more context, can correct it. On the
grid ``1 = t_0 > ... > t_steps = 0``, at step ``t -> s`` with ``a_t = alpha(t)``, ``a_s = alpha(s)``:

* a generated token that is revealed at ``t`` is remasked with probability ``sigma_t``;
* a masked position is revealed with probability ``(a_s - (1 - sigma_t) a_t) / (1 - a_t)`` and gets a token
  drawn from the (temperature / top-k / top-p filtered) denoiser, in float64 Gumbel-max;

with ``0 <= sigma_t <= sigma_max = min(1, (1 - a_s) / a_t)`` so that the marginals match the forward process.
``sigma_t = 0`` is MDLM ancestral sampling. This class covers the two schedules of the paper in one formula,

    sigma_t = min(eta_cap, eta_rescale * sigma_max)

``eta_rescale = 1`` is ReMDM-cap (``sigma_t = min(eta_cap, sigma_max)``), ``eta_cap = 1`` ReMDM-rescale
(``sigma_t = eta_rescale * sigma_max``). The last step remasks nothing and reveals every remaining mask, so
no mask survives; given tokens (prompt, infill context) are never remasked. ReMDM-conf (confidence-weighted
sigma) and ReMDM-loop (a remasking phase at fixed alpha) are not implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.sampling.base import Denoiser, Generation, Sampler
from dlm.sampling.prior import MaskPrior

__all__ = ["ReMDMSampler"]


class ReMDMSampler(Sampler):
    """ReMDM-cap / ReMDM-rescale remasking on top of ancestral sampling; see the module docstring."""

    def __init__(
        self,
        steps: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        record_trajectory: bool = False,
        eta_cap: float = 0.02,
        eta_rescale: float = 1.0,
        kv_cache: str | None = None,
    ):
        super().__init__(steps, temperature, top_k, top_p, record_trajectory, kv_cache=kv_cache)
        for name, value in (("eta_cap", eta_cap), ("eta_rescale", eta_rescale)):
            if value is None or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        self.eta_cap = float(eta_cap)
        self.eta_rescale = float(eta_rescale)

    def _extra_repr(self) -> str:
        return f"eta_cap={self.eta_cap:g}, eta_rescale={self.eta_rescale:g}"

    def sigma(self, a_t: float, a_s: float) -> float:
        """The remasking probability of a step from alpha ``a_t`` to alpha ``a_s``."""
        sigma_max = 1.0 if a_t <= 0 else min(1.0, max(0.0, (1.0 - a_s) / a_t))
        return min(self.eta_cap, self.eta_rescale * sigma_max)

    @torch.no_grad()
    def _sample(self, denoiser: Denoiser, x: Tensor, prior: MaskPrior, generator: torch.Generator | None) -> Generation:
        mask_id, schedule = prior.mask_id, prior.schedule
        if schedule is None:
            raise ValueError(f"{type(self).__name__} follows the schedule's time grid: MaskPrior.schedule is required")
        x = self._check_input(x, mask_id)
        trajectory = [x.clone()] if self.record_trajectory else None
        free = x == mask_id  # generated positions: the only ones that may be remasked
        if not free.any():
            return Generation(x, 0, trajectory)
        times = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)
        calls = 0
        for i in range(self.steps):
            last = i == self.steps - 1
            masked = x == mask_id
            a_t = float(schedule.alpha(times[i]))
            a_s = float(schedule.alpha(times[i + 1]))
            sigma = 0.0 if last else self.sigma(a_t, a_s)
            if not masked.any() and sigma == 0.0:
                self._record(trajectory, x)
                continue
            logp = self._call(denoiser, x)
            calls += 1
            if last:
                reveal = masked
            else:
                p = 1.0 if a_t >= 1 else (a_s - (1.0 - sigma) * a_t) / (1.0 - a_t)
                u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
                reveal = masked & (u < min(1.0, max(0.0, p)))
            remask = torch.zeros_like(masked)
            if sigma > 0:
                u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
                remask = free & ~masked & (u < sigma)
            if reveal.any():
                lp = self._exclude_mask(logp[reveal], mask_id)
                x[reveal] = self._draw(lp, generator).to(x.dtype)
            x[remask] = mask_id
            self._record(trajectory, x)
        return Generation(x, calls, trajectory)

"""MDLM ancestral sampling for absorbing-state diffusion."""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.sampling.base import Denoiser, Generation, Sampler
from dlm.schedules import MaskSchedule

__all__ = ["AncestralSampler"]


class AncestralSampler(Sampler):
    """Ancestral sampling of the reverse masked-diffusion process (MDLM, Sahoo et al. 2024).

    Time runs on a uniform grid ``1 = t_0 > t_1 > ... > t_steps = 0``. At step ``t -> s`` every position
    that is still masked is revealed independently with probability ``schedule.unmask_prob(t, s)``, and a
    revealed position gets a token drawn from the (temperature / top-k / top-p filtered) denoiser
    distribution. The last step reveals everything that is left, so no mask survives even for schedules
    with ``alpha(0) < 1``. Revealed and given tokens never change.

    Because the denoiser is time-agnostic, a step that reveals nothing leaves ``x`` unchanged and the next
    step can reuse the previous log-probabilities (``cache_unchanged=True``, the default). This changes
    only the number of denoiser calls, never the result for a fixed generator. The run stops early once
    no mask is left.
    """

    def __init__(
        self,
        steps: int = 32,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        record_trajectory: bool = False,
        cache_unchanged: bool = True,
    ):
        super().__init__(steps, temperature, top_k, top_p, record_trajectory)
        self.cache_unchanged = bool(cache_unchanged)

    def _extra_repr(self) -> str:
        return f"cache_unchanged={self.cache_unchanged}"

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        x: Tensor,
        *,
        mask_id: int,
        schedule: MaskSchedule,
        generator: torch.Generator | None = None,
    ) -> Generation:
        x = self._check_input(x, mask_id)
        trajectory = [x.clone()] if self.record_trajectory else None
        calls = 0
        if not (x == mask_id).any():
            return Generation(x, 0, trajectory)

        times = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)
        logp: Tensor | None = None
        changed = True  # whether x changed since logp was computed
        for i in range(self.steps):
            masked = x == mask_id
            if not masked.any():
                break
            if logp is None or changed or not self.cache_unchanged:
                logp = self._call(denoiser, x)
                calls += 1
            if i == self.steps - 1:
                reveal = masked
            else:
                p = float(schedule.unmask_prob(times[i], times[i + 1]))
                u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
                reveal = masked & (u < p)
            changed = bool(reveal.any())
            if changed:
                lp = self._exclude_mask(logp[reveal], mask_id)
                x[reveal] = self._draw(lp, generator).to(x.dtype)
            if trajectory is not None:
                trajectory.append(x.clone())
        return Generation(x, calls, trajectory)

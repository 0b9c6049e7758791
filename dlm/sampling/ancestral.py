"""MDLM ancestral sampling for absorbing-state diffusion."""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.sampling.base import Denoiser, Generation, Sampler, fill_after_eos
from dlm.sampling.prior import MaskPrior

__all__ = ["AncestralSampler"]


class AncestralSampler(Sampler):
    """Ancestral sampling of the reverse masked-diffusion process (MDLM, Sahoo et al. 2024).

    Time runs on a uniform grid ``1 = t_0 > t_1 > ... > t_steps = 0``. At step ``t -> s`` every position
    that is still masked is revealed independently with probability ``schedule.unmask_prob(t, s)``, and a
    revealed position gets a token drawn from the (temperature / top-k / top-p filtered) denoiser
    distribution. The last step reveals everything that is left, so no mask survives even for schedules
    with ``alpha(0) < 1``. Revealed and given tokens never change.

    Which positions a step reveals depends on the schedule only, so it is drawn before the denoiser call: a
    step that reveals nothing in any row makes no call (``cache_unchanged=True``, the default; the denoiser is
    time-agnostic, so the state a later step sees is the same). ``cache_unchanged=False`` calls at every step
    (the reference: the same result for a fixed generator). With ``cap_steps=True`` (the default) the steps
    are capped at the most masked positions of a row: more steps than positions to fill only add calls;
    ``cap_steps=False`` keeps ``steps`` as given (a paper's fixed step count). The run stops early once no
    mask is left.
    """

    def __init__(
        self,
        steps: int = 32,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        record_trajectory: bool = False,
        cache_unchanged: bool = True,
        cap_steps: bool = True,
        kv_cache: str | None = None,
        eos_id: int | None = None,
    ):
        super().__init__(steps, temperature, top_k, top_p, record_trajectory, kv_cache=kv_cache)
        if eos_id is not None and (isinstance(eos_id, bool) or int(eos_id) != eos_id or eos_id < 0):
            raise ValueError(f"eos_id must be a token id >= 0 or None, got {eos_id!r}")
        self.cache_unchanged = bool(cache_unchanged)
        self.cap_steps = bool(cap_steps)
        self.eos_id = None if eos_id is None else int(eos_id)
        # end-of-turn tokens that end a row like EOS when eos_id is set (a family's stop_ids; dlm/stop_tokens.py)
        self.stop_ids: tuple[int, ...] = ()

    def _extra_repr(self) -> str:
        return f"cache_unchanged={self.cache_unchanged}, cap_steps={self.cap_steps}"

    @torch.no_grad()
    def _sample(self, denoiser: Denoiser, x: Tensor, prior: MaskPrior, generator: torch.Generator | None) -> Generation:
        mask_id, schedule = prior.mask_id, prior.schedule
        if schedule is None:
            raise ValueError(f"{type(self).__name__} follows the schedule's time grid: MaskPrior.schedule is required")
        x = self._check_input(x, mask_id)
        trajectory = [x.clone()] if self.record_trajectory else None
        calls = 0
        if not (x == mask_id).any():
            return Generation(x, 0, trajectory)

        steps = self.steps
        if self.cap_steps:
            steps = min(steps, int((x == mask_id).sum(1).max()))
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        for i in range(steps):
            masked = x == mask_id
            if not masked.any():
                break
            if i == steps - 1:
                reveal = masked
            else:
                p = float(schedule.unmask_prob(times[i], times[i + 1]))
                u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
                reveal = masked & (u < p)
            changed = bool(reveal.any())
            # the reveal is drawn first (the denoiser takes no generator: the draws keep their order), so a step
            # that reveals nothing needs no call; the reference calls anyway and discards the result
            if changed or not self.cache_unchanged:
                logp = self._call(denoiser, x)
                calls += 1
            if changed:
                lp = self._exclude_mask(logp[reveal], mask_id)
                x[reveal] = self._draw(lp, generator).to(x.dtype)
                if self.eos_id is not None:
                    x = fill_after_eos(x, reveal, mask_id, self.eos_id, self.stop_ids)
            self._record(trajectory, x)
        return Generation(x, calls, trajectory)

"""SUNDAE samplers (Savinov et al. 2021): iterative refinement from uniform noise, no mask token.

Both samplers take a *denoiser* ``x -> log p(x0 | x)`` (``[B, T, V]``, the mask token at zero probability) and a
:class:`~dlm.sampling.prior.UniformPrior` whose boolean ``free`` tensor says where to sample: positions where ``free`` is False (prompts, the given side of an infill) are never changed;
the free positions start as uniform draws from ``noise_ids`` and are refined.

* :class:`SundaeSampler` — the paper's stochastic sampler: every step draws a proposal for every free position
  from the denoiser at temperature τ (optionally top-k / top-p filtered) and writes it into a random proportion ρ
  of the free positions (each free position independently with probability ρ). It stops as soon as a step changes
  nothing (``stop_when_unchanged``) or after ``steps`` steps. Which positions a step updates does not depend on
  the model, so it is drawn first and proposals are drawn for those positions only; a step that updates no
  position changes nothing and makes no call. With ``cap_steps`` (the default) the steps are capped at the most
  free positions of a row.
* :class:`ArgmaxUnrolledSampler` — the deterministic variant (given the initial noise): the first step writes the
  argmax prediction at every free position; step k of S then re-predicts only the ``n_k = round(N (S - k) / S)``
  least confident free positions of each row (N = free positions of the row, confidence = the model probability
  of the token written there), with the argmax of a fresh prediction on the updated sequence. It stops early when
  a step changes nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.sampling.base import Denoiser, Generation, Sampler
from dlm.sampling.prior import UniformPrior

__all__ = ["ArgmaxUnrolledSampler", "SundaeSampler", "uniform_noise"]


def uniform_noise(shape, noise_ids: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Tokens drawn uniformly from ``noise_ids`` (a 1-D id tensor)."""
    idx = torch.randint(0, noise_ids.numel(), shape, generator=generator, device=noise_ids.device)
    return noise_ids[idx]


def _start(x: Tensor, free: Tensor, noise_ids: Tensor, generator) -> tuple[Tensor, Tensor]:
    x = Sampler._check_input(x, -1)
    free = free.to(device=x.device, dtype=torch.bool)
    if free.shape != x.shape:
        raise ValueError(f"free must have the shape of x {tuple(x.shape)}, got {tuple(free.shape)}")
    noise_ids = noise_ids.to(x.device)
    if noise_ids.dim() != 1 or noise_ids.numel() == 0:
        raise ValueError("noise_ids must be a non-empty 1-D tensor of token ids")
    x = torch.where(free, uniform_noise(x.shape, noise_ids, generator).to(x.dtype), x)
    return x, free


class SundaeSampler(Sampler):
    """Stochastic SUNDAE sampling: temperature τ, update proportion ρ, stop when nothing changes (a
    :class:`~dlm.sampling.prior.UniformPrior`).

    Args:
        steps: maximum number of refinement steps.
        temperature: τ of the proposal distribution (paper: low temperatures, e.g. 0.8); 0 = argmax proposals.
        update_proportion: ρ in (0, 1], the probability that a free position takes its proposal in a step.
        stop_when_unchanged: stop as soon as a step changes no token (in any row).
        cap_steps: take at most as many steps as the most free positions of a row (False: up to ``steps``).
    """

    priors = (UniformPrior,)

    def __init__(
        self,
        steps: int = 50,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        update_proportion: float = 0.3,
        stop_when_unchanged: bool = True,
        record_trajectory: bool = False,
        cap_steps: bool = True,
        kv_cache: str | None = None,
    ):
        super().__init__(steps, temperature, top_k, top_p, record_trajectory, kv_cache=kv_cache)
        if not 0 < update_proportion <= 1:
            raise ValueError(f"update_proportion must be in (0, 1], got {update_proportion!r}")
        self.update_proportion = float(update_proportion)
        self.stop_when_unchanged = bool(stop_when_unchanged)
        self.cap_steps = bool(cap_steps)

    def _extra_repr(self) -> str:
        return (f"update_proportion={self.update_proportion:g}, stop_when_unchanged={self.stop_when_unchanged}, "
                f"cap_steps={self.cap_steps}")

    @torch.no_grad()
    def _sample(self, denoiser: Denoiser, x: Tensor, prior: UniformPrior, generator: torch.Generator | None) -> Generation:
        free, noise_ids, mask_id = prior.free, prior.noise_ids, prior.mask_id
        x, free = _start(x, free, noise_ids, generator)
        trajectory = [x.clone()] if self.record_trajectory else None
        calls = 0
        if not free.any():
            return Generation(x, 0, trajectory)
        steps = min(self.steps, int(free.sum(1).max())) if self.cap_steps else self.steps
        for _ in range(steps):
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
            update = free & (u < self.update_proportion)
            new = x.clone()
            if update.any():  # else the step changes nothing: no call
                logp = self._call(denoiser, x)
                calls += 1
                lp = self._exclude_mask(logp[update], -1 if mask_id is None else mask_id)
                new[update] = self._draw(lp, generator).to(x.dtype)
            changed = bool((new != x).any())
            x = new
            self._record(trajectory, x)
            if self.stop_when_unchanged and not changed:
                break
        return Generation(x, calls, trajectory)


class ArgmaxUnrolledSampler(Sampler):
    """Deterministic argmax-unrolled decoding that re-predicts the least confident tokens (see module docs)."""

    priors = (UniformPrior,)

    def __init__(self, steps: int = 10, record_trajectory: bool = False, kv_cache: str | None = None):
        super().__init__(steps, 0.0, None, None, record_trajectory, kv_cache=kv_cache)

    @torch.no_grad()
    def _sample(self, denoiser: Denoiser, x: Tensor, prior: UniformPrior, generator: torch.Generator | None) -> Generation:
        free, noise_ids, mask_id = prior.free, prior.noise_ids, prior.mask_id
        x, free = _start(x, free, noise_ids, generator)
        trajectory = [x.clone()] if self.record_trajectory else None
        if not free.any():
            return Generation(x, 0, trajectory)
        B, T = x.shape
        n_free = free.sum(dim=1)
        conf = torch.full((B, T), float("inf"), dtype=torch.float64, device=x.device)  # given tokens: never chosen
        calls = 0
        for k in range(self.steps):
            logp = self._call(denoiser, x)
            calls += 1
            lp = self._exclude_mask(logp, -1 if mask_id is None else mask_id)
            best_lp, best = lp.max(dim=-1)
            if k == 0:
                update = free
            else:
                n = torch.round(n_free.double() * (self.steps - k) / self.steps).long()
                n_max = int(n.max())
                if n_max == 0:
                    break
                lowest = conf.topk(n_max, dim=1, largest=False).indices
                take = torch.arange(n_max, device=x.device)[None, :] < n[:, None]
                update = torch.zeros_like(free).scatter_(1, lowest, take) & free
            new = torch.where(update, best.to(x.dtype), x)
            conf = torch.where(update, best_lp.double(), conf)
            changed = bool((new != x).any())
            x = new
            self._record(trajectory, x)
            if k > 0 and not changed:
                break
        return Generation(x, calls, trajectory)

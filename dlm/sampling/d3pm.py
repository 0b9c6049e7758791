"""Ancestral sampling of an absorbing-state D3PM in discrete time with a token-dependent schedule (DiffusionBERT).

The forward process keeps a token whose clean value is ``i`` with probability ``ᾱ_t^i`` at step ``t`` (``t = 0 .. T``,
``ᾱ_0 = 1``, ``ᾱ_T = 0``). The reverse step ``t -> s`` (``s < t``) of the x0-parameterised model is

    p(x_s = j | x_t = mask) = p_θ(x0 = j | x_t) · (ᾱ_s^j − ᾱ_t^j) / (1 − ᾱ_t^j),
    p(x_s = mask | x_t = mask) = Σ_j p_θ(x0 = j | x_t) · (1 − ᾱ_s^j) / (1 − ᾱ_t^j),

which is sampled exactly by drawing ``x0 ~ p_θ`` (temperature / top-k / top-p filtered) and revealing it with
probability ``(ᾱ_s^{x0} − ᾱ_t^{x0}) / (1 − ᾱ_t^{x0})``. Revealed and given tokens never change; the last step
(``s = 0``) reveals everything, so no mask token survives. ``steps < T`` skips along an even grid of the T steps
(the jump posterior above is exact for any ``s < t``).

Network calls: the reveal coin ``u < p(x0)`` is flipped before the call, against the largest reveal probability
over the vocabulary; a position whose coin fails that bound is revealed by no ``x0``, so a step where every
position fails it leaves ``x`` unchanged and makes no call (exact: ``x0`` is drawn, and its own probability checked,
for the other positions). With ``cap_steps`` (the default) the steps are also capped at the most masked positions
of a row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dlm.sampling.base import Generation, Sampler
from dlm.sampling.prior import D3PMPrior

__all__ = ["D3PMSampler", "time_grid"]


def time_grid(num_timesteps: int, steps: int) -> list[int]:
    """Descending integer times ``T = t_0 > t_1 > ... > 0`` with at most ``steps`` transitions."""
    n = min(int(steps), int(num_timesteps))
    grid = torch.linspace(num_timesteps, 0, n + 1, dtype=torch.float64).round().long().tolist()
    out: list[int] = []
    for t in grid:
        if not out or t < out[-1]:
            out.append(int(t))
    if out[-1] != 0:
        out.append(0)
    return out


class D3PMSampler(Sampler):
    """T (or fewer) ancestral steps of the absorbing D3PM with a per-token schedule; top-k and temperature.

    ``sample(denoiser, x, prior=D3PMPrior(mask_id, alpha_bar, num_timesteps=T))``: ``denoiser(x, t)`` returns
    ``log p_θ(x0 | x_t)`` ``[B, L, V]`` at integer time ``t`` (time-agnostic models ignore t), and ``alpha_bar(t)``
    returns ᾱ_t as a ``[V]`` tensor.
    """

    priors = (D3PMPrior,)

    def __init__(
        self,
        steps: int = 128,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        record_trajectory: bool = False,
        cap_steps: bool = True,
        kv_cache: str | None = None,
    ):
        super().__init__(steps, temperature, top_k, top_p, record_trajectory, kv_cache=kv_cache)
        self.cap_steps = bool(cap_steps)

    def _extra_repr(self) -> str:
        return f"cap_steps={self.cap_steps}"

    @torch.no_grad()
    def _sample(self, denoiser: Callable[[Tensor, int], Tensor], x: Tensor, prior: D3PMPrior,
                generator: torch.Generator | None) -> Generation:
        mask_id, alpha_bar, num_timesteps = prior.mask_id, prior.alpha_bar, prior.num_timesteps
        x = self._check_input(x, mask_id)
        trajectory = [x.clone()] if self.record_trajectory else None
        calls = 0
        steps = self.steps
        if self.cap_steps:  # more steps than positions to fill only add calls
            steps = min(steps, max(1, int((x == mask_id).sum(1).max())))
        grid = time_grid(num_timesteps, steps)
        a_s = None  # ᾱ at the previous step's s: this step's t (each ᾱ_t is computed once)
        for t, s in zip(grid[:-1], grid[1:]):
            masked = x == mask_id
            if not masked.any():
                break
            if s == 0:
                p_tok, u, maybe = None, None, torch.ones(int(masked.sum()), dtype=torch.bool, device=x.device)
            else:
                a_t = alpha_bar(t).to(x.device, torch.float64) if a_s is None else a_s
                a_s = alpha_bar(s).to(x.device, torch.float64)
                p_tok = ((a_s - a_t) / (1 - a_t).clamp(min=1e-12)).clamp(0.0, 1.0)  # [V]
                bound = p_tok.clone()
                if 0 <= mask_id < bound.numel():
                    bound[mask_id] = 0.0  # x0 is never the mask
                u = torch.rand(int(masked.sum()), generator=generator, device=x.device, dtype=torch.float64)
                maybe = u < bound.max()  # positions that some x0 would reveal
                if not maybe.any():  # nothing can change: no call (a time-conditioned model is called at the next t)
                    self._record(trajectory, x)
                    continue
            logp = denoiser(x, t)
            if logp.dim() != 3 or logp.shape[:2] != x.shape:
                raise ValueError(f"denoiser must return [B, L, V] log-probabilities, got {tuple(logp.shape)}")
            calls += 1
            at = masked.clone()
            at[masked] = maybe  # x0 is drawn only where it may be revealed
            x0 = self._draw(self._exclude_mask(logp[at], mask_id), generator)
            reveal = maybe.clone()
            if p_tok is not None:
                reveal[maybe] = u[maybe] < p_tok[x0]
            values = x[masked]
            values[reveal] = x0[reveal[maybe]].to(x.dtype)
            x[masked] = values
            self._record(trajectory, x)
        return Generation(x, calls, trajectory)

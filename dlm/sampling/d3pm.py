"""Ancestral sampling of an absorbing-state D3PM in discrete time with a token-dependent schedule (DiffusionBERT).

The forward process keeps a token whose clean value is ``i`` with probability ``ᾱ_t^i`` at step ``t`` (``t = 0 .. T``,
``ᾱ_0 = 1``, ``ᾱ_T = 0``). The reverse step ``t -> s`` (``s < t``) of the x0-parameterised model is

    p(x_s = j | x_t = mask) = p_θ(x0 = j | x_t) · (ᾱ_s^j − ᾱ_t^j) / (1 − ᾱ_t^j),
    p(x_s = mask | x_t = mask) = Σ_j p_θ(x0 = j | x_t) · (1 − ᾱ_s^j) / (1 − ᾱ_t^j),

which is sampled exactly by drawing ``x0 ~ p_θ`` (temperature / top-k / top-p filtered) and revealing it with
probability ``(ᾱ_s^{x0} − ᾱ_t^{x0}) / (1 − ᾱ_t^{x0})``. Revealed and given tokens never change; the last step
(``s = 0``) reveals everything, so no mask token survives. ``steps < T`` skips along an even grid of the T steps
(the jump posterior above is exact for any ``s < t``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dlm.sampling.base import Generation, Sampler

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

    ``sample(denoiser, x, mask_id=..., alpha_bar=..., num_timesteps=T)``: ``denoiser(x, t)`` returns
    ``log p_θ(x0 | x_t)`` ``[B, L, V]`` at integer time ``t`` (time-agnostic models ignore t), and ``alpha_bar(t)``
    returns ᾱ_t as a ``[V]`` tensor.
    """

    def __init__(
        self,
        steps: int = 128,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        record_trajectory: bool = False,
    ):
        super().__init__(steps, temperature, top_k, top_p, record_trajectory)

    @torch.no_grad()
    def sample(
        self,
        denoiser: Callable[[Tensor, int], Tensor],
        x: Tensor,
        *,
        mask_id: int,
        alpha_bar: Callable[[int], Tensor],
        num_timesteps: int,
        generator: torch.Generator | None = None,
    ) -> Generation:
        x = self._check_input(x, mask_id)
        trajectory = [x.clone()] if self.record_trajectory else None
        calls = 0
        grid = time_grid(num_timesteps, self.steps)
        for t, s in zip(grid[:-1], grid[1:]):
            masked = x == mask_id
            if not masked.any():
                break
            logp = denoiser(x, t)
            if logp.dim() != 3 or logp.shape[:2] != x.shape:
                raise ValueError(f"denoiser must return [B, L, V] log-probabilities, got {tuple(logp.shape)}")
            calls += 1
            lp = self._exclude_mask(logp[masked], mask_id)
            x0 = self._draw(lp, generator)
            if s == 0:
                reveal = torch.ones_like(x0, dtype=torch.bool)
            else:
                a_t = alpha_bar(t).to(x.device, torch.float64)[x0]
                a_s = alpha_bar(s).to(x.device, torch.float64)[x0]
                p = ((a_s - a_t) / (1 - a_t).clamp(min=1e-12)).clamp(0.0, 1.0)
                u = torch.rand(p.shape, generator=generator, device=x.device, dtype=torch.float64)
                reveal = u < p
            values = x[masked]
            values[reveal] = x0[reveal].to(x.dtype)
            x[masked] = values
            if trajectory is not None:
                trajectory.append(x.clone())
        return Generation(x, calls, trajectory)

"""How the diffusion times of a batch are drawn (shared by the continuous-time masked families)."""

from __future__ import annotations

import torch
from torch import Tensor

TIME_SAMPLING = ("antithetic", "stratified", "uniform")


def check_time_sampling(time_sampling: str, t_eps: float) -> None:
    if time_sampling not in TIME_SAMPLING:
        raise ValueError(f"method.time_sampling={time_sampling!r}; valid: {', '.join(TIME_SAMPLING)}")
    if not 0.0 <= t_eps < 1.0:
        raise ValueError(f"method.t_eps must be in [0, 1), got {t_eps}")


def sample_times(
    n: int, time_sampling: str, t_eps: float, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """n times on [t_eps, 1]: antithetic (evenly spaced, one random offset) and stratified (one draw per
    stratum) cover [0, 1] evenly, which lowers the variance of the batch's loss; uniform draws i.i.d."""
    kw = {"device": device, "generator": generator}
    if time_sampling == "antithetic":
        u = (torch.rand(1, **kw) + torch.arange(n, device=device) / n) % 1.0
    elif time_sampling == "stratified":
        u = (torch.arange(n, device=device) + torch.rand(n, **kw)) / n
    else:
        u = torch.rand(n, **kw)
    return t_eps + (1.0 - t_eps) * u

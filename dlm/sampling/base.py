"""Shared pieces of the samplers: the :class:`Generation` result, the :class:`Sampler` base class and the
token-drawing helpers (temperature / top-k / top-p filtering and float64 Gumbel-max sampling).

Samplers work for any absorbing-state (mask) diffusion model: they only need a *denoiser*, a callable
mapping a partly masked ``[B, T]`` token tensor to log-probabilities ``log p(x0 | x)`` of shape
``[B, T, V]``. The denoiser is assumed to be time-agnostic (its output depends only on ``x``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.schedules import MaskSchedule

__all__ = [
    "Denoiser",
    "Generation",
    "Sampler",
    "filter_logits",
    "sample_categorical",
]

Denoiser = Callable[[Tensor], Tensor]


@dataclass
class Generation:
    """Result of a sampler run.

    Attributes:
        tokens: ``[B, T]`` long tensor without mask tokens.
        num_network_calls: number of denoiser calls actually made.
        trajectory: when the sampler records it, ``x`` after every step, starting with the input.
    """

    tokens: Tensor
    num_network_calls: int
    trajectory: list[Tensor] | None = None


def cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """A generated document ends at its first EOS."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def filter_logits(
    logp: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Apply temperature, then top-k, then top-p (nucleus) filtering over the last dimension.

    ``logp`` are log-probabilities (unnormalised logits work too). Returns normalised log-probabilities
    (float32, or float64 for float64 input) with filtered-out entries at ``-inf``. ``temperature == 0``
    is the greedy limit: a one-hot distribution on the argmax (top-k / top-p are then irrelevant).
    Top-p keeps the smallest set of most likely tokens whose cumulative probability reaches ``top_p``
    (the most likely token is always kept).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    lp = logp.double() if logp.dtype == torch.float64 else logp.float()
    if temperature == 0:
        idx = lp.argmax(dim=-1, keepdim=True)
        out = torch.full_like(lp, float("-inf"))
        return out.scatter_(-1, idx, 0.0)
    if temperature != 1:
        lp = lp / temperature
    lp = lp.log_softmax(dim=-1)
    vocab = lp.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = lp.topk(top_k, dim=-1).values[..., -1:]
        lp = lp.masked_fill(lp < kth, float("-inf")).log_softmax(dim=-1)
    if top_p is not None and top_p < 1:
        sorted_lp, order = lp.sort(dim=-1, descending=True)
        probs = sorted_lp.exp()
        mass_before = probs.cumsum(dim=-1) - probs
        drop = mass_before >= top_p
        drop[..., 0] = False
        sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
        lp = torch.empty_like(lp).scatter_(-1, order, sorted_lp).log_softmax(dim=-1)
    return lp


def sample_categorical(logp: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one index per row of ``logp`` (``[..., V]``) with the Gumbel-max trick.

    The Gumbel noise and the perturbed scores are computed in float64: float32 / bfloat16 Gumbel noise is
    known to truncate the tail and distort the sampled distribution. ``logp`` may be unnormalised. The
    generator (if any) must live on ``logp``'s device. Returns a long tensor of shape ``logp.shape[:-1]``.
    """
    u = torch.rand(logp.shape, generator=generator, device=logp.device, dtype=torch.float64)
    # u in [0, 1): -log(u) in (0, inf]; u == 0 gives Gumbel -inf, which is never selected.
    gumbel = -torch.log(-torch.log(u))
    return (logp.double() + gumbel).argmax(dim=-1)


class Sampler(ABC):
    """Base class of samplers for absorbing-state diffusion.

    Args:
        steps: number of denoising steps (>= 1).
        temperature: softmax temperature for drawing tokens; 0 means greedy (argmax).
        top_k: keep only the ``top_k`` most likely tokens (None: no top-k filtering).
        top_p: nucleus filtering threshold in (0, 1] (None: no nucleus filtering).
        record_trajectory: keep ``x`` after every step in :attr:`Generation.trajectory`.
    """

    def __init__(
        self,
        steps: int = 32,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        record_trajectory: bool = False,
    ):
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if temperature is None or not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        self.steps = int(steps)
        self.temperature = float(temperature)
        self.top_k = None if top_k is None else int(top_k)
        self.top_p = None if top_p is None else float(top_p)
        self.record_trajectory = bool(record_trajectory)

    @abstractmethod
    def sample(
        self,
        denoiser: Denoiser,
        x: Tensor,
        *,
        mask_id: int,
        schedule: MaskSchedule,
        generator: torch.Generator | None = None,
    ) -> Generation:
        """Fill every position of ``x`` equal to ``mask_id``; other positions are kept verbatim.

        ``denoiser(x)`` must return log-probabilities ``log p(x0 | x)`` of shape ``[B, T, V]`` (float) with
        the mask token already given zero probability (samplers also exclude it defensively).
        """

    # ------------------------------------------------------------------ helpers for subclasses
    @staticmethod
    def _check_input(x: Tensor, mask_id: int) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"x must have shape [B, T], got {tuple(x.shape)}")
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"x must be an integer (token id) tensor, got dtype {x.dtype}")
        return x.clone()

    @staticmethod
    def _call(denoiser: Denoiser, x: Tensor) -> Tensor:
        logp = denoiser(x)
        if logp.dim() != 3 or logp.shape[:2] != x.shape:
            raise ValueError(
                f"denoiser must return log-probabilities of shape [B, T, V] = [{x.shape[0]}, {x.shape[1]}, V], "
                f"got {tuple(logp.shape)}"
            )
        return logp

    @staticmethod
    def _exclude_mask(logp_rows: Tensor, mask_id: int) -> Tensor:
        """Normalised float log-probs of selected rows (``[N, V]``) with the mask token removed."""
        lp = logp_rows.double() if logp_rows.dtype == torch.float64 else logp_rows.float()
        if 0 <= mask_id < lp.shape[-1]:
            lp = lp.clone()
            lp[..., mask_id] = float("-inf")
        return lp.log_softmax(dim=-1)

    def _draw(self, lp: Tensor, generator: torch.Generator | None) -> Tensor:
        """Draw tokens from normalised log-probs ``lp`` (``[N, V]``) with this sampler's settings."""
        if self.temperature == 0:
            return lp.argmax(dim=-1)
        filtered = filter_logits(lp, self.temperature, self.top_k, self.top_p)
        return sample_categorical(filtered, generator)

    def _extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        parts = [f"steps={self.steps}", f"temperature={self.temperature:g}"]
        if self.top_k is not None:
            parts.append(f"top_k={self.top_k}")
        if self.top_p is not None:
            parts.append(f"top_p={self.top_p:g}")
        extra = self._extra_repr()
        if extra:
            parts.append(extra)
        return f"{type(self).__name__}({', '.join(parts)})"

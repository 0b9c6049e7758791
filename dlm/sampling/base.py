"""Shared pieces of the samplers: the :class:`Generation` result, the :class:`Sampler` base class and the
token-drawing helpers (temperature / top-k / top-p filtering and float64 Gumbel-max sampling).

One interface: ``sampler.sample(denoiser, x, prior=..., generator=...)``. The *denoiser* maps a corrupted
``[B, T]`` token tensor to log-probabilities ``log p(x0 | x)`` of shape ``[B, T, V]`` (a plain callable, or a
:class:`Denoiser` when it declares hooks such as the prefix / dual KV cache); the *prior*
(:mod:`dlm.sampling.prior`) says which corruption to reverse. A sampler declares the priors it accepts in
:attr:`Sampler.priors` and refuses any other with a message naming the samplers that take it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from dlm.sampling.prior import MaskPrior, Prior, PriorMismatchError
from dlm.stop_tokens import is_stop

__all__ = [
    "Denoiser",
    "FunctionDenoiser",
    "Generation",
    "KV_CACHES",
    "Sampler",
    "fill_after_eos",
    "filter_logits",
    "sample_categorical",
    "samplers_for",
    "takes",
]


class Denoiser:
    """A denoiser with declared hooks. ``denoiser(x)`` (``denoiser(x, t)`` under a
    :class:`~dlm.sampling.prior.D3PMPrior`) returns ``log p(x0 | x)`` ``[B, T, V]``. A plain callable is a denoiser
    without hooks; a family whose network can do more subclasses this and declares it:

    * :meth:`with_prefix_cache` (``has_prefix_cache``) and :meth:`with_dual_cache` (``has_dual_cache``): Fast-dLLM's
      KV caches, used by :class:`~dlm.sampling.ThresholdSampler` (contract in :mod:`dlm.sampling.threshold`).
    """

    has_prefix_cache: bool = False
    has_dual_cache: bool = False

    def __call__(self, x: Tensor, *args) -> Tensor:
        raise NotImplementedError

    def with_prefix_cache(self, x: Tensor, prefix_len: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} has no prefix KV cache")

    def with_dual_cache(self, x: Tensor, start: int, end: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} has no dual KV cache")


class FunctionDenoiser(Denoiser):
    """A denoiser from functions: ``fn`` is the call, ``prefix_cache`` / ``dual_cache`` (optional) the hooks."""

    def __init__(self, fn: Callable[..., Tensor], prefix_cache: Callable | None = None,
                 dual_cache: Callable | None = None):
        self.fn, self._prefix, self._dual = fn, prefix_cache, dual_cache
        self.has_prefix_cache = prefix_cache is not None
        self.has_dual_cache = dual_cache is not None

    def __call__(self, x: Tensor, *args) -> Tensor:
        return self.fn(x, *args)

    def with_prefix_cache(self, x: Tensor, prefix_len: int):
        if self._prefix is None:
            return super().with_prefix_cache(x, prefix_len)
        return self._prefix(x, prefix_len)

    def with_dual_cache(self, x: Tensor, start: int, end: int):
        if self._dual is None:
            return super().with_dual_cache(x, start, end)
        return self._dual(x, start, end)


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


def cut_at_eos(ids: Sequence[int], eos_id: int | Iterable[int]) -> list[int]:
    """A generated document ends before its first EOS; ``eos_id`` may be several ids (a family's ``stop_ids``: EOS
    and an instruct model's end-of-turn tokens, dlm/stop_tokens.py), and it then ends before the first of them."""
    ids = list(ids)
    if isinstance(eos_id, int):
        return ids[: ids.index(eos_id)] if eos_id in ids else ids
    stops = {int(s) for s in eos_id}
    return next((ids[:i] for i, token in enumerate(ids) if int(token) in stops), ids)


def fill_after_eos(x: Tensor, commit: Tensor, mask_id: int, eos_id: int, stop_ids: Iterable[int] = ()) -> Tensor:
    """``x`` with every mask right of a just-committed EOS (``commit & x == eos_id``, or one of ``stop_ids``: an
    instruct model's end-of-turn tokens) set to EOS: the data convention, a document is EOS-filled after its end, so
    its tail needs no draws (and, where a step would draw only there, no call)."""
    hit = commit & is_stop(x, (eos_id, *stop_ids))
    if not hit.any():
        return x
    after = hit.long().cumsum(dim=1) > 0  # at or right of a newly committed EOS
    return x.masked_fill(after & (x == mask_id), eos_id)


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


# The KV caches a sampling can run (``sampler.kv_cache``); which ones a run takes, the sampler and its family declare.
KV_CACHES = ("none", "prefix", "dual")


def check_kv_cache_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)} or null (the family's default), got {mode!r}")
    return mode


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def takes(sampler, prior: type[Prior]) -> bool:
    """Whether ``sampler`` (any object: a configured sampler may be an :class:`~dlm.sampling.ARSampler`) is a
    :class:`Sampler` that accepts ``prior``; what a family checks when it is built with a sampler."""
    return isinstance(sampler, Sampler) and sampler.accepts(prior)


def samplers_for(prior: type[Prior]) -> list[str]:
    """Names of the (imported, concrete) sampler classes that accept ``prior``."""
    names = {c.__name__ for c in _subclasses(Sampler)
             if not getattr(c, "__abstractmethods__", None) and any(issubclass(prior, p) for p in c.priors)}
    return sorted(names)


class Sampler(ABC):
    """Base class of samplers: ``sample(denoiser, x, prior=..., generator=...)`` for every prior in :attr:`priors`.

    Args:
        steps: number of denoising steps (>= 1).
        temperature: softmax temperature for drawing tokens; 0 means greedy (argmax).
        top_k: keep only the ``top_k`` most likely tokens (None: no top-k filtering).
        top_p: nucleus filtering threshold in (0, 1] (None: no nucleus filtering).
        record_trajectory: keep ``x`` after every step in :attr:`Generation.trajectory`.
        kv_cache: the KV cache of the sampling, one of :data:`KV_CACHES` (the one switch: ``sampler.kv_cache``):
            ``none`` recomputes every position at every call; ``prefix`` caches what comes before the positions
            being decoded; ``dual`` also what comes after them. A mode runs where the sampler implements it
            (:attr:`kv_caches`) or the family does around the sampler (``DiffusionLM.kv_caches``: BD3-LM's exact
            cache of finished blocks); the family refuses any other. None: the family's default (its own exact
            cache where it runs one, AR's and BD3-LM's; else none). Whether the cache is a static (preallocated)
            or a growing one is the CLIs' ``static_kv_cache`` (``DiffusionLM.static_kv_cache``).

    :attr:`on_step` (not a constructor argument: an observer is no part of a run's config) is called with a copy of
    ``x`` after every step when set, e.g. by the chat's live view (dlm/chat.py); observing changes no drawn token.

    A subclass declares :attr:`priors` (default: :class:`~dlm.sampling.prior.MaskPrior`) and :attr:`kv_caches` (the
    caches it implements itself; default none), and implements :meth:`_sample`.
    """

    priors: ClassVar[tuple[type[Prior], ...]] = (MaskPrior,)
    kv_caches: ClassVar[tuple[str, ...]] = ("none",)
    on_step: Callable[[Tensor], None] | None = None  # an observer of x after every step (None: not observed)

    def __init__(
        self,
        steps: int = 32,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        record_trajectory: bool = False,
        kv_cache: str | None = None,
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
        self.kv_cache = check_kv_cache_mode(kv_cache)

    def accepts(self, prior: Prior | type[Prior]) -> bool:
        """Whether this sampler can reverse ``prior`` (an instance or a class)."""
        kind = prior if isinstance(prior, type) else type(prior)
        return any(issubclass(kind, p) for p in self.priors)

    def check_prior(self, prior: Prior) -> None:
        """Raise :class:`~dlm.sampling.prior.PriorMismatchError` unless this sampler accepts ``prior``."""
        if not isinstance(prior, Prior):
            raise TypeError(f"prior must be a dlm.sampling.prior.Prior, got {type(prior).__name__}")
        if not self.accepts(prior):
            takes = ", ".join(p.__name__ for p in self.priors)
            raise PriorMismatchError(
                f"{type(self).__name__} reverses {takes}, not {type(prior).__name__}; samplers that do: "
                f"{', '.join(samplers_for(type(prior))) or 'none'}"
            )

    def sample(
        self, denoiser: Denoiser | Callable[..., Tensor], x: Tensor, *, prior: Prior,
        generator: torch.Generator | None = None,
    ) -> Generation:
        """Reverse ``prior`` from ``x``: under a mask prior fill every position equal to ``mask_id``, under a uniform
        prior refine the free positions; every other position is kept verbatim.

        ``denoiser`` returns log-probabilities ``log p(x0 | x)`` of shape ``[B, T, V]`` (float) with the mask token
        already given zero probability (samplers also exclude it defensively).
        """
        self.check_prior(prior)
        return self._sample(denoiser, x, prior, generator)

    @abstractmethod
    def _sample(self, denoiser, x: Tensor, prior: Prior, generator: torch.Generator | None) -> Generation:
        """The sampler's loop; ``prior`` is one of :attr:`priors`."""

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

    def _record(self, trajectory: list[Tensor] | None, x: Tensor) -> None:
        """After a step: keep ``x`` in the trajectory (when recorded) and show it to :attr:`on_step` (when set)."""
        if trajectory is not None:
            trajectory.append(x.clone())
        if self.on_step is not None:
            self.on_step(x.clone())

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

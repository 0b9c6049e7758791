"""Confidence-ordered unmasking: one shared loop, one scoring rule per subclass.

Every step the denoiser predicts a token for every masked position that may be committed (drawn with
temperature / top-k / top-p through the float64 Gumbel-max of :func:`~dlm.sampling.base.sample_categorical`,
or argmax at ``temperature == 0``). Each prediction gets a *score* (higher = commit first); the
highest-scoring positions are committed and never change again, the rest stay masked. Subclasses differ only
in :meth:`OrderedUnmaskingSampler.score` and, for adaptive samplers, :meth:`OrderedUnmaskingSampler.extra_count`:

=========================  ==========================================================================
``ConfidenceSampler``      probability of the predicted token (LLaDA low-confidence remasking; MaskGIT)
``MarginSampler``          top-1 minus top-2 probability (Dream ``topk_margin``)
``EntropySampler``         negative entropy of the position's distribution (Dream ``entropy``)
``RandomOrderSampler``     a uniform random score: random unmasking order (the MDLM / "origin" order)
=========================  ==========================================================================

(``EntropyBoundedSampler`` and ``ThresholdSampler`` in their own modules reuse the loop with an adaptive
number of commits per step.)

Scores are computed from the model's *unfiltered* distribution (temperature 1, mask token excluded), as in
:class:`~dlm.sampling.low_confidence.LowConfidenceSampler`: at ``temperature == 0`` the filtered
distribution is one-hot and every margin / entropy would tie. Dream computes them after its temperature and
top-p filtering; the two agree at temperature 1 without filtering.

How many per step: ``ceil(remaining / steps_left)`` per row (at least one while a row has masks), i.e. the
even LLaDA split, so a row is complete after its last step; adaptive samplers commit ``max`` of that and
their own count. Steps where no row has anything to commit are skipped without calling the denoiser.

Semi-autoregressive blocks (``block_length``): each row is cut into blocks of ``block_length`` positions from
that row's first masked position; only masks in the current block may be committed and a block is finished
before the next starts. The steps are split evenly over the blocks (earlier blocks get the remainder; every
block gets at least one). This works for any denoiser, hence for any mask-diffusion family (for BD3-LM the
family already runs block by block and calls the sampler per block).

EOS handling (``eos_id``): when given, committing EOS at a position commits EOS at every still-masked
position to its right in the same row (the data convention: a document is EOS-filled after its end), so a
short answer does not spend steps on its tail; so does committing one of ``stop_ids`` (an instruct model's
end-of-turn tokens, set with ``eos_id`` by ``dlm.generate eos_fill=true``). Given tokens are never changed.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from dlm.sampling.base import Denoiser, Generation, Sampler, fill_after_eos
from dlm.sampling.prior import MaskPrior

__all__ = [
    "ConfidenceSampler",
    "EntropySampler",
    "MarginSampler",
    "OrderedUnmaskingSampler",
    "RandomOrderSampler",
    "block_ids",
]

_FLOOR = -1e300  # the score of an eligible position whose score is NaN / -inf: still above ineligible ones


def block_ids(masked: Tensor, block_length: int | None) -> tuple[Tensor, int]:
    """Block index of every position (``[B, T]``, negative before a row's first mask) and the block count.

    Blocks start at each row's first masked position (the ``[prompt | completion]`` layout gives blocks
    aligned to the completion). ``block_length=None``: one block.
    """
    B, T = masked.shape
    if block_length is None:
        return torch.zeros_like(masked, dtype=torch.long), 1
    has_mask = masked.any(dim=1)
    first = torch.where(has_mask, masked.long().argmax(dim=1), torch.zeros_like(has_mask, dtype=torch.long))
    rel = torch.arange(T, device=masked.device)[None, :] - first[:, None]
    ids = torch.div(rel, block_length, rounding_mode="floor")
    return ids, int(ids[masked].max()) + 1 if masked.any() else 1


class OrderedUnmaskingSampler(Sampler):
    """The shared loop of confidence-ordered samplers; see the module docstring.

    Args (beyond :class:`~dlm.sampling.base.Sampler`'s):
        block_length: semi-autoregressive block size (None: the whole sequence is one block).
        eos_id: when given, committing EOS fills the row's masks to its right with EOS.
    """

    def __init__(
        self,
        steps: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        record_trajectory: bool = False,
        block_length: int | None = None,
        eos_id: int | None = None,
        kv_cache: str | None = None,
    ):
        super().__init__(steps, temperature, top_k, top_p, record_trajectory, kv_cache=kv_cache)
        if block_length is not None and (
            isinstance(block_length, bool) or int(block_length) != block_length or block_length < 1
        ):
            raise ValueError(f"block_length must be an integer >= 1 or None, got {block_length!r}")
        if eos_id is not None and (isinstance(eos_id, bool) or int(eos_id) != eos_id or eos_id < 0):
            raise ValueError(f"eos_id must be a token id >= 0 or None, got {eos_id!r}")
        self.block_length = None if block_length is None else int(block_length)
        self.eos_id = None if eos_id is None else int(eos_id)
        # end-of-turn tokens that end a row like EOS when eos_id is set (a family's stop_ids; dlm/stop_tokens.py)
        self.stop_ids: tuple[int, ...] = ()

    # ------------------------------------------------------------------ the rule of a subclass
    @abstractmethod
    def score(self, lp: Tensor, pred: Tensor, generator: torch.Generator | None) -> Tensor:
        """Scores ``[N]`` (float64, higher = commit first) of ``N`` eligible positions, from their normalised
        log-probabilities ``lp`` ``[N, V]`` (mask excluded, unfiltered) and the predicted tokens ``pred``."""

    def extra_count(self, sorted_scores: Tensor, eligible: Tensor) -> Tensor:
        """Adaptive samplers: how many to commit per row (``[B]`` long) given each row's scores sorted in
        descending order (``[B, T]`` float64; ineligible positions are ``-inf`` at the end). The loop commits
        the max of this and the even split. Default: 0 (the even split alone)."""
        return torch.zeros(sorted_scores.shape[0], dtype=torch.long, device=sorted_scores.device)

    def _extra_repr(self) -> str:
        parts = [f"block_length={self.block_length}"]
        if self.eos_id is not None:
            parts.append(f"eos_id={self.eos_id}")
        return ", ".join(parts)

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def _sample(self, denoiser: Denoiser, x: Tensor, prior: MaskPrior, generator: torch.Generator | None) -> Generation:
        """The block loop, shared with the threshold sampler: blocks in order, each with its share of the steps; a
        block's steps are made by the step function :meth:`_open_block` returns (one network call each)."""
        mask_id = prior.mask_id
        x = self._check_input(x, mask_id)
        trajectory = [x.clone()] if self.record_trajectory else None
        calls = 0
        masked = x == mask_id
        if not masked.any():
            return Generation(x, 0, trajectory)

        blocks, num_blocks = block_ids(masked, self.block_length)
        first = int(masked.long().argmax(dim=1)[masked.any(dim=1)].min())  # earliest first mask of any row
        base_steps, extra_steps = divmod(self.steps, num_blocks)
        for j in range(num_blocks):
            block_steps = max(1, base_steps + (1 if j < extra_steps else 0))
            in_block = blocks == j
            step = self._open_block(denoiser, j, first, in_block, mask_id)
            for i in range(block_steps):
                eligible = (x == mask_id) & in_block
                remaining = eligible.sum(dim=1)
                if not remaining.any():
                    break
                x = step(x, i, eligible, remaining, block_steps - i, generator)
                calls += 1
                self._record(trajectory, x)
        return Generation(x, calls, trajectory)

    def _open_block(self, denoiser: Denoiser, j: int, first: int, in_block: Tensor, mask_id: int):
        """The step function of block ``j`` (``first``: the earliest first mask of any row; ``in_block``: its
        positions): ``step(x, i, eligible, remaining, steps_left, generator) -> x`` makes step ``i`` of the block
        with one network call. Here a full forward per step; the threshold sampler's caches override it."""

        def step(x: Tensor, i: int, eligible: Tensor, remaining: Tensor, steps_left: int, generator) -> Tensor:
            return self._step(x, self._call(denoiser, x), eligible, remaining, steps_left, mask_id, generator)

        return step

    def _step(
        self,
        x: Tensor,
        logp: Tensor,
        eligible: Tensor,
        remaining: Tensor,
        steps_left: int,
        mask_id: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Commit the best-scored eligible positions of one step; returns the new ``x``."""
        B, T = x.shape
        lp = self._exclude_mask(logp[eligible], mask_id)  # [N, V]
        pred = self._draw(lp, generator)
        s = self.score(lp, pred, generator).double().nan_to_num(nan=_FLOOR, neginf=_FLOOR)
        scores = torch.full((B, T), float("-inf"), dtype=torch.float64, device=x.device)
        scores[eligible] = s
        order = scores.argsort(dim=1, descending=True, stable=True)
        sorted_scores = scores.gather(1, order)
        even = (remaining + steps_left - 1) // steps_left  # ceil: the LLaDA split, >= 1 while masks remain
        k = torch.minimum(torch.maximum(even, self.extra_count(sorted_scores, eligible)), remaining)
        take = torch.arange(T, device=x.device)[None, :] < k[:, None]
        commit = torch.zeros_like(eligible).scatter_(1, order, take)
        proposal = x.clone()
        proposal[eligible] = pred.to(x.dtype)
        x = torch.where(commit, proposal, x)
        if self.eos_id is not None:
            x = self._fill_after_eos(x, commit, mask_id)
        return x

    def _fill_after_eos(self, x: Tensor, commit: Tensor, mask_id: int) -> Tensor:
        return fill_after_eos(x, commit, mask_id, self.eos_id, self.stop_ids)


class ConfidenceSampler(OrderedUnmaskingSampler):
    """Commit the positions whose predicted token is most probable (LLaDA's low-confidence remasking).
    Same tokens as :class:`~dlm.sampling.low_confidence.LowConfidenceSampler` for the same generator (tested);
    it adds EOS filling and is the base of the threshold sampler."""

    def score(self, lp: Tensor, pred: Tensor, generator: torch.Generator | None) -> Tensor:
        return lp.gather(-1, pred[:, None]).squeeze(-1).double()


class MarginSampler(OrderedUnmaskingSampler):
    """Commit the positions with the largest margin between the two most probable tokens (Dream top-k margin)."""

    def score(self, lp: Tensor, pred: Tensor, generator: torch.Generator | None) -> Tensor:
        top = lp.double().exp().topk(min(2, lp.shape[-1]), dim=-1).values
        return top[:, 0] - (top[:, 1] if top.shape[-1] > 1 else 0.0)


class EntropySampler(OrderedUnmaskingSampler):
    """Commit the positions with the lowest predictive entropy (Dream ``entropy``)."""

    def score(self, lp: Tensor, pred: Tensor, generator: torch.Generator | None) -> Tensor:
        return -entropy(lp)


class RandomOrderSampler(OrderedUnmaskingSampler):
    """Commit positions in a uniformly random order (the ordering of MDLM's ancestral sampler, with the LLaDA
    count per step instead of a binomial one)."""

    def score(self, lp: Tensor, pred: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.rand(lp.shape[0], generator=generator, device=lp.device, dtype=torch.float64)


def entropy(lp: Tensor) -> Tensor:
    """Entropy (nats, float64) of each row of normalised log-probabilities ``lp`` ``[N, V]`` (-inf entries ok)."""
    lp = lp.double()
    return -(lp.exp() * lp.masked_fill(torch.isinf(lp), 0.0)).sum(dim=-1)

"""LLaDA-style low-confidence remasking sampler (optionally semi-autoregressive, block by block)."""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.sampling.base import Denoiser, Generation, Sampler
from dlm.schedules import MaskSchedule

__all__ = ["LowConfidenceSampler"]


class LowConfidenceSampler(Sampler):
    """Low-confidence remasking (LLaDA, Nie et al. 2025; in the spirit of MaskGIT's confidence decoding).

    Every step the denoiser predicts a token for every masked position that may be committed (sampled with
    temperature / top-k / top-p, or argmax at ``temperature == 0``). The confidence of a prediction is
    the model probability of the predicted token (the unfiltered denoiser distribution, mask token
    excluded). The ``k`` most confident positions are committed and never change again; the rest stay
    masked. Per row, the number of masked positions is split evenly over the steps (the first
    ``n % steps`` steps commit one extra token), so a row is complete after the last step; steps with
    nothing left to commit in any row are skipped without calling the denoiser.

    With ``block_length`` the generation is semi-autoregressive: each row is cut into blocks of
    ``block_length`` positions starting at that row's first masked position (the LLaDA layout
    ``[prompt | masked completion]`` gives blocks aligned to the start of the completion). Only masked
    positions in the current block may be committed, a block is completed before the next one starts, and
    the steps are divided evenly over the blocks (earlier blocks get the remainder; if there are more
    blocks than steps, each block still gets one step).

    The ``schedule`` argument of :meth:`sample` is accepted for interface compatibility but not used: the
    commit counts follow the linear (even) split of LLaDA.
    """

    def __init__(
        self,
        steps: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        record_trajectory: bool = False,
        block_length: int | None = None,
    ):
        super().__init__(steps, temperature, top_k, top_p, record_trajectory)
        if block_length is not None and (
            isinstance(block_length, bool) or int(block_length) != block_length or block_length < 1
        ):
            raise ValueError(f"block_length must be an integer >= 1 or None, got {block_length!r}")
        self.block_length = None if block_length is None else int(block_length)

    def _extra_repr(self) -> str:
        return f"block_length={self.block_length}"

    def _block_ids(self, masked: Tensor) -> tuple[Tensor, int]:
        """Block index of every position (``[B, T]``) and the number of blocks."""
        B, T = masked.shape
        if self.block_length is None:
            return torch.zeros_like(masked, dtype=torch.long), 1
        has_mask = masked.any(dim=1)
        first = torch.where(
            has_mask, masked.long().argmax(dim=1), torch.zeros_like(has_mask, dtype=torch.long)
        )
        rel = torch.arange(T, device=masked.device)[None, :] - first[:, None]
        block_id = torch.div(rel, self.block_length, rounding_mode="floor")  # negative before the 1st mask
        num_blocks = int(block_id[masked].max()) + 1
        return block_id, num_blocks

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        x: Tensor,
        *,
        mask_id: int,
        schedule: MaskSchedule | None = None,
        generator: torch.Generator | None = None,
    ) -> Generation:
        x = self._check_input(x, mask_id)
        trajectory = [x.clone()] if self.record_trajectory else None
        calls = 0
        masked = x == mask_id
        if not masked.any():
            return Generation(x, 0, trajectory)

        B, T = x.shape
        block_id, num_blocks = self._block_ids(masked)
        base_steps, extra_steps = divmod(self.steps, num_blocks)
        for j in range(num_blocks):
            block_steps = max(1, base_steps + (1 if j < extra_steps else 0))
            in_block = block_id == j
            n = ((x == mask_id) & in_block).sum(dim=1)  # [B] masks to fill in this block
            if not n.any():
                continue
            for i in range(block_steps):
                eligible = (x == mask_id) & in_block
                remaining = eligible.sum(dim=1)
                if not remaining.any():
                    break
                k = n // block_steps + (i < n % block_steps).long()
                k = torch.minimum(torch.maximum(k, (remaining > 0).long()), remaining)

                logp = self._call(denoiser, x)
                calls += 1
                lp = self._exclude_mask(logp[eligible], mask_id)  # [N, V]
                pred = self._draw(lp, generator)
                conf = lp.gather(-1, pred[:, None]).squeeze(-1).double()
                conf = conf.nan_to_num(nan=-1e300, neginf=-1e300)  # eligible always outranks ineligible

                conf_full = torch.full((B, T), float("-inf"), dtype=torch.float64, device=x.device)
                conf_full[eligible] = conf
                k_max = int(k.max())
                top = conf_full.topk(k_max, dim=1).indices  # [B, k_max]
                take = torch.arange(k_max, device=x.device)[None, :] < k[:, None]
                commit = torch.zeros_like(eligible).scatter_(1, top, take)

                proposal = x.clone()
                proposal[eligible] = pred.to(x.dtype)
                x = torch.where(commit, proposal, x)
                if trajectory is not None:
                    trajectory.append(x.clone())
        return Generation(x, calls, trajectory)

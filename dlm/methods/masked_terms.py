"""What the masked-diffusion families (MDLM, block diffusion) share: the SUBS cross-entropy of the masked
positions, and the loss, bound and validation statistics built from one set of per-token terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_token_nll(logits: Tensor, x0: Tensor, masked: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """Per-position -log p(x0) [B, T] under SUBS (the mask token is never predicted), zero where not masked, and
    whether the argmax is right there. Only the masked positions are scored: SUBS gives the rest zero loss."""
    masked_logits = logits[masked].float()
    masked_logits[:, mask_id] = float("-inf")
    nll = torch.zeros(x0.shape, device=x0.device, dtype=masked_logits.dtype)
    nll[masked] = F.cross_entropy(masked_logits, x0[masked], reduction="none")
    correct = torch.zeros_like(masked)
    correct[masked] = masked_logits.argmax(-1) == x0[masked]
    return nll, correct


class MaskedTermsObjective:
    """Mixin for a DiffusionLM whose `_diffusion_terms(batch, generator)` returns (per-token bound [B, T],
    masked [B, T], correct [B, T]): the training loss, the bound and the validation statistics follow."""

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        bound, masked, correct = self._diffusion_terms(batch, generator)
        tokens = batch["loss_mask"].sum().clamp(min=1)
        return {
            "loss": bound.sum() / tokens,
            "masked_frac": masked.sum() / tokens,
            "masked_acc": correct.sum() / masked.sum().clamp(min=1),
        }

    def nll_bound(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        return self._diffusion_terms(batch, generator)[0]

    def validation_stats(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        bound, masked, correct = self._diffusion_terms(batch, generator)
        tokens = batch["loss_mask"].sum().clamp(min=1)
        # The base logs each key per counted token; rescale so masked_acc reads as accuracy on the masks.
        return {
            "loss": bound.sum(),
            "nll_bound": bound.sum(),
            "masked_acc": correct.sum() / masked.sum().clamp(min=1) * tokens,
        }

"""What the masked-diffusion families (MDLM, block diffusion) share: the SUBS cross-entropy of the masked
positions, the SUBS log-probabilities the samplers read, and the loss, bound and validation statistics built
from one set of per-token terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_token_nll(logits: Tensor, x0: Tensor, masked: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """Per-position -log p(x0) [B, T] under SUBS (the mask token is never predicted), zero where not masked, and
    whether the argmax is right there. Only the masked positions are scored: SUBS gives the rest zero loss.

    ``logits``: every position's [B, T, V], or the masked positions' rows [N, V] already selected (in
    ``x0[masked]``'s order, e.g. ``MDLM.logits(xt, at=masked)``); float32 rows given that way are taken over (their
    mask column is overwritten), sparing a copy of them."""
    masked_logits = (logits[masked] if logits.dim() == 3 else logits).float()
    masked_logits[:, mask_id] = float("-inf")
    nll = torch.zeros(x0.shape, device=x0.device, dtype=masked_logits.dtype)
    nll[masked] = F.cross_entropy(masked_logits, x0[masked], reduction="none")
    correct = torch.zeros_like(masked)
    correct[masked] = masked_logits.argmax(-1) == x0[masked]
    return nll, correct


def masked_token_log_probs(rows: Tensor, x0: Tensor, masked: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """log p(x0_i | x_t) [B, T] under SUBS at the masked positions (zero elsewhere), with gradient, and the entropy
    [B, T] of each masked position's prediction (detached; zero elsewhere). ``rows``: the masked positions' logits
    [N, V] in ``x0[masked]``'s order (or every position's [B, T, V]). What the RL estimators read (dlm/rl)."""
    rows = (rows[masked] if rows.dim() == 3 else rows).float()
    never = torch.zeros(rows.shape[-1], dtype=torch.bool, device=rows.device)
    never[mask_id] = True
    logp_rows = rows.masked_fill(never, float("-inf")).log_softmax(-1)
    logp = torch.zeros(x0.shape, device=x0.device, dtype=logp_rows.dtype)
    logp = logp.masked_scatter(masked, logp_rows.gather(-1, x0[masked][:, None])[:, 0])
    with torch.no_grad():
        p = logp_rows.exp()
        ent_rows = -(p * logp_rows.masked_fill(p == 0, 0.0)).sum(-1)
        entropy = torch.zeros(x0.shape, device=x0.device, dtype=ent_rows.dtype).masked_scatter(masked, ent_rows)
    return logp, entropy


@torch.no_grad()
def subs_log_probs(logits: Tensor, xt: Tensor, mask_id: int, vocab_size: int) -> Tensor:
    """SUBS log p(x0 | x_t) [B, T, V] for sampling: the mask token never predicted, clean tokens copied (one-hot).

    One float32 copy of the logits, then everything in place on it: at a large vocabulary (151,936 for Qwen3,
    B=16 x 320 positions: 3 GB per tensor) every extra full-size temporary costs as much memory traffic as a
    good part of the forward. The copy also keeps the backbone's output untouched (a compiled backbone under
    CUDA graphs reuses it on its next call). No autograd: sampling only.
    """
    logp = logits[..., :vocab_size].to(torch.float32, copy=True)
    logp[..., mask_id] = float("-inf")
    logp -= logp.logsumexp(-1, keepdim=True)
    clean = (xt != mask_id)[..., None]
    logp.masked_fill_(clean, float("-inf"))
    # 0 at the copied token of a clean position; at a masked position the scatter hits mask_id, already -inf
    copied = torch.zeros(clean.shape, dtype=logp.dtype, device=logp.device).masked_fill_(~clean, float("-inf"))
    return logp.scatter_(-1, xt[..., None], copied)


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

    def _subs(self, logits: Tensor, xt: Tensor) -> Tensor:
        """SUBS log p(x0 | x_t) from logits [B, T, V] of the tokens xt [B, T] (sampling; see subs_log_probs)."""
        return subs_log_probs(logits, xt, self.mask_id, self.vocab_size)

    def validation_stats(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        bound, masked, correct = self._diffusion_terms(batch, generator)
        tokens = batch["loss_mask"].sum().clamp(min=1)
        # The base logs each key per counted token; rescale so masked_acc reads as accuracy on the masks.
        return {
            "loss": bound.sum(),
            "nll_bound": bound.sum(),
            "masked_acc": correct.sum() / masked.sum().clamp(min=1) * tokens,
        }

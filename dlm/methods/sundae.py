"""SUNDAE: step-unrolled denoising autoencoders (Savinov et al. 2021).

Corruption (no mask token): per sequence draw a rate ``r ~ U[0, 1]`` and replace each token, independently with
probability ``r``, by a token drawn uniformly from the vocabulary without the mask token.

Unrolled denoising: ``x_1 ~ q(· | x0)``; ``x_{k+1}`` is *sampled* from the model's own prediction on ``x_k`` (a
discrete draw under ``no_grad``: a stop-gradient), and the loss is the mean over the ``unroll_steps`` steps of the
cross-entropy of ``p_θ(· | x_k)`` against ``x0`` at every counted position. So step k's loss back-propagates only
through the prediction made at step k. ``unroll_steps=1`` is plain denoising.

Sampling starts from uniform noise and refines (:mod:`dlm.sampling.sundae`); prompts and the given side of an
infill are held fixed. SUNDAE has no tractable likelihood bound: :meth:`SUNDAE.nll_bound` raises and the family
logs no ``val/nll_bound``; compare it with generative metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlm.methods.base import DiffusionLM, evaluating
from dlm.models.capabilities import capabilities_of
from dlm.sampling import Generation, Sampler, UniformPrior, samplers_for, takes
from dlm.sampling.sundae import uniform_noise

NO_BOUND = (
    "SUNDAE has no tractable likelihood bound (its unrolled denoising loss is not a bound on -log p(x)), so "
    "nll_bound is not defined for method=sundae. Compare it with generative metrics instead: sample/valid_frac, "
    "sample/prompted_acc, sample/infill_acc, sample/unigram_entropy (written to results.json at the end of "
    "training), or the perplexity of its samples under a reference model; val/loss is its training objective."
)


class SUNDAE(DiffusionLM):
    """Args (beyond the base class's):
        unroll_steps: number of denoising steps unrolled in training (paper: 2); 1 = plain denoising.
        unroll_temperature: temperature of the draws that produce x_2, x_3, ... (paper: 1, the model's own
            distribution).
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        unroll_steps: int = 2,
        unroll_temperature: float = 1.0,
        **base_kwargs,
    ):
        super().__init__(backbone, tokenizer, **base_kwargs)
        if isinstance(unroll_steps, bool) or int(unroll_steps) != unroll_steps or unroll_steps < 1:
            raise ValueError(f"method.unroll_steps must be an integer >= 1, got {unroll_steps!r}")
        if not unroll_temperature > 0:
            raise ValueError(f"method.unroll_temperature must be > 0, got {unroll_temperature!r}")
        if capabilities_of(backbone).time_conditioning:
            raise ValueError(
                "method=sundae is time-agnostic (its corruption has no diffusion time), but the model has "
                "time_conditioning=true: set model.time_conditioning=false"
            )
        sampler = base_kwargs.get("sampler")
        if sampler is not None and not takes(sampler, UniformPrior):
            raise ValueError(
                f"method=sundae needs a SUNDAE sampler (sampler=sundae; or any of "
                f"{', '.join(samplers_for(UniformPrior))}), got "
                f"{type(sampler).__name__}: mask-diffusion samplers fill mask tokens, which SUNDAE never sees"
            )
        self.unroll_steps = int(unroll_steps)
        self.unroll_temperature = float(unroll_temperature)
        ids = torch.tensor([i for i in range(self.vocab_size) if i != self.mask_id], dtype=torch.long)
        self.register_buffer("noise_ids", ids, persistent=False)

    # ---- the objective ----------------------------------------------------------------------------------
    def corrupt(self, x0: Tensor, counted: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x_1 ~ q(. | x0): per row a rate r ~ U[0, 1], each counted token replaced by uniform noise w.p. r."""
        r = torch.rand(x0.shape[0], 1, device=x0.device, generator=generator)
        replace = (torch.rand(x0.shape, device=x0.device, generator=generator) < r) & counted
        noise = uniform_noise(x0.shape, self.noise_ids.to(x0.device), generator)
        return torch.where(replace, noise, x0)

    def _logits(self, x: Tensor, kwargs: dict) -> Tensor:
        logits = self.logits(x, **kwargs).float()
        logits[..., self.mask_id] = float("-inf")  # never predicted: SUNDAE has no mask token
        return logits

    def unrolled_terms(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict:
        """Per-token loss (mean over the unroll steps of the CE against x0), the inputs x_1..x_K of the steps,
        and the per-step cross-entropies (for tests and logging)."""
        x0, counted = batch["input_ids"], batch["loss_mask"].bool()
        kwargs = self.backbone_kwargs(batch)
        x = self.corrupt(x0, counted, generator)
        inputs, ces, logits = [], [], None
        for k in range(self.unroll_steps):
            inputs.append(x)
            logits = self._logits(x, kwargs)
            ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none") * counted
            ces.append(ce)
            if k + 1 < self.unroll_steps:
                with torch.no_grad():  # stop-gradient: the next input is a discrete draw from the detached logits
                    g = torch.rand(logits.shape, device=x.device, generator=generator, dtype=torch.float64)
                    scores = logits.detach().double() / self.unroll_temperature - torch.log(-torch.log(g))
                    x = torch.where(counted, scores.argmax(-1), x0)
        per_token = torch.stack(ces).mean(0)
        correct = (logits.argmax(-1) == x0) & counted
        return {"per_token": per_token, "inputs": inputs, "ces": ces, "correct": correct,
                "corrupted": (inputs[0] != x0) & counted}

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        out = self.unrolled_terms(batch, generator)
        tokens = batch["loss_mask"].sum().clamp(min=1)
        stats = {"loss": out["per_token"].sum() / tokens, "acc": out["correct"].sum() / tokens,
                 "corrupted_frac": out["corrupted"].sum() / tokens}
        for k, ce in enumerate(out["ces"]):
            stats[f"ce_step{k + 1}"] = ce.sum().detach() / tokens
        return stats

    def nll_bound(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError(NO_BOUND)

    def validation_stats(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        out = self.unrolled_terms(batch, generator)
        # Summed per-token stats (the base class divides by the counted tokens); no nll_bound for SUNDAE.
        return {"loss": out["per_token"].sum(), "acc": out["correct"].sum().float()}

    # ---- sampling ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, x: Tensor) -> Tensor:
        """log p_θ(x0 | x) over the vocabulary, the mask token at zero probability."""
        return self._logits(x, {}).log_softmax(-1)

    def infill(
        self, tokens: Tensor, fill_mask: Tensor, sampler: Sampler | None = None, generator: torch.Generator | None = None
    ) -> Generation:
        """Refine the positions where fill_mask is True from uniform noise; every other position stays as given."""
        x, free, sampler = self._infill_start(tokens, fill_mask, sampler, sampler_hint="sundae")
        prior = UniformPrior(free=free, noise_ids=self.noise_ids.to(x.device), mask_id=self.mask_id)
        with evaluating(self):
            return sampler.sample(self.denoise, x, prior=prior, generator=generator)

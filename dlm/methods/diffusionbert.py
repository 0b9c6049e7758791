"""DiffusionBERT (He et al. 2022): absorbing-state D3PM in discrete time, x0-parameterised, spindle schedule.

Forward process, T steps (``method.num_steps``): a token whose clean value is ``i`` is still unmasked at step t
with probability ``ᾱ_t^i`` (``ᾱ_0 = 1``, ``ᾱ_T = 0``). With ``schedule=spindle`` (:mod:`dlm.spindle`) ᾱ depends on
the token's frequency in the training data (frequent tokens are masked later); with any per-time schedule
(``schedule=linear``, ``cosine``, ...) every token uses ``ᾱ_t = α(t / T)`` — the plain absorbing D3PM.

Posterior at a masked position of x_t, for s = t − 1 and clean value i, is

    q(x_s = i | x_t, x0 = i) = a_i = (ᾱ_s^i − ᾱ_t^i) / (1 − ᾱ_t^i),   q(x_s = mask | x_t, x0 = i) = 1 − a_i,

and the model's reverse step (x0-parameterisation) mixes it over ``p_θ(x0 | x_t)``:

    p(x_s = j) = p_θ(j) a_j,   p(x_s = mask) = Σ_j p_θ(j) (1 − a_j).

(Unmasked positions are copied, so they carry no loss.) The per-step KL at a masked position is therefore

    KL_t = −a_i log p_θ(i) + (1 − a_i) [log(1 − a_i) − log Σ_j p_θ(j)(1 − a_j)],

which is the cross-entropy ``−log p_θ(i)`` at t = 1 (a_i = 1), and the prior term vanishes because ᾱ_T = 0. The
discrete-time VLB is ``Σ_t E[KL_t] = T · E_{t ~ U{1..T}} E[KL_t]``: :meth:`DiffusionBERT.nll_bound` returns this
one-sample estimate per token. Training minimises ``L_vlb + λ_aux · CE(x0)`` at the masked positions
(``method.aux_weight``, default 0.01, the D3PM hybrid loss).

Time conditioning (``method.time_conditioning``):
  * ``none`` — time-agnostic decoding: the network sees x_t only (the paper's default; works on every backbone).
  * ``token`` — a time token is prepended: the input gets one extra leading position whose input embedding is
    replaced (by a forward hook on the backbone's input embedding) with a learned ``nn.Embedding(T + 1, d)`` row
    for t; its output is dropped. Works on the native transformer and on HF backbones (``get_input_embeddings``);
    it needs ``data.seq_len + 1 <= model.max_seq_len``.
  * ``layerwise`` — the backbone's own layerwise time path (``model.time_conditioning=true`` on the native
    transformer: a time embedding added in every layer), fed ``t / T``.

Training asks the backbone for logits at the masked positions only (``log_probs(..., at=masked)``, through
:meth:`DiffusionLM.logits`): at a large vocabulary the LM head and the [B, L, V] logits are much of a step.

Token frequencies for the spindle schedule are counted from ``trainer.datamodule.train_data`` in :meth:`setup`
(cached next to the tokenised data, :func:`dlm.spindle.token_counts`) and kept in the ``token_counts`` buffer, so
checkpoints carry them; outside a Trainer call :meth:`set_token_counts`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dlm.methods.base import DiffusionLM, evaluating
from dlm.models.capabilities import capabilities_of
from dlm.sampling import D3PMPrior, Generation, MaskPrior, Sampler, takes
from dlm.schedules import LinearSchedule, MaskSchedule
from dlm.spindle import SpindleSchedule, token_counts

TIME_CONDITIONING = ("none", "token", "layerwise")
_BLOCKED = -1e30  # log(1 - a_j) where a_j = 1: finite, so gradients stay finite where the term is multiplied by 0


class DiffusionBERT(DiffusionLM):
    """Args (beyond the base class's):
        schedule: a :class:`dlm.spindle.SpindleSchedule` (token-dependent) or any :class:`MaskSchedule`.
        num_steps: T, the number of discrete diffusion steps.
        time_conditioning: ``none`` | ``token`` | ``layerwise`` (see the module docstring).
        aux_weight: λ_aux of the auxiliary cross-entropy on x0.
    """

    uses_schedule = True

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        schedule: SpindleSchedule | MaskSchedule,
        num_steps: int = 512,
        time_conditioning: str = "none",
        aux_weight: float = 0.01,
        **base_kwargs,
    ):
        super().__init__(backbone, tokenizer, **base_kwargs)
        if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"method.num_steps must be an integer >= 1, got {num_steps!r}")
        if time_conditioning not in TIME_CONDITIONING:
            raise ValueError(
                f"method.time_conditioning={time_conditioning!r}; valid: {', '.join(TIME_CONDITIONING)}"
            )
        if not aux_weight >= 0:
            raise ValueError(f"method.aux_weight must be >= 0, got {aux_weight!r}")
        if not isinstance(schedule, (SpindleSchedule, MaskSchedule)):
            raise ValueError(
                f"method=diffusionbert needs schedule=spindle or a per-time MaskSchedule, got {type(schedule).__name__}"
            )
        backbone_timed = bool(capabilities_of(backbone).time_conditioning)
        if time_conditioning == "layerwise" and not backbone_timed:
            raise ValueError(
                "method.time_conditioning=layerwise needs a backbone with a layerwise time path: set "
                "model.time_conditioning=true (native transformer); HF backbones have none, use "
                "method.time_conditioning=token or none there"
            )
        if time_conditioning != "layerwise" and backbone_timed:
            raise ValueError(
                f"the model has time_conditioning=true but method.time_conditioning={time_conditioning}: set "
                "method.time_conditioning=layerwise, or model.time_conditioning=false"
            )
        sampler = base_kwargs.get("sampler")
        if sampler is not None and not takes(sampler, D3PMPrior) and time_conditioning != "none":
            raise ValueError(
                f"{type(sampler).__name__} is time-agnostic; with method.time_conditioning={time_conditioning} "
                "use sampler=diffusionbert (D3PMSampler)"
            )
        self.schedule = schedule
        self.num_steps = int(num_steps)
        self.time_conditioning = time_conditioning
        self.aux_weight = float(aux_weight)
        # Token counts of the training data (spindle): a buffer, so checkpoints carry them. int64: never cast by
        # precision changes.
        self.register_buffer("token_counts", torch.zeros(self.vocab_size, dtype=torch.long))
        self.time_embedding: nn.Embedding | None = None
        self._pending_time: Tensor | None = None
        if time_conditioning == "token":
            embedding = self._input_embedding()
            self.time_embedding = nn.Embedding(self.num_steps + 1, embedding.embedding_dim)
            nn.init.normal_(self.time_embedding.weight, std=0.02)
            embedding.register_forward_hook(self._insert_time_token)

    # ---- the schedule --------------------------------------------------------------------------------------
    @property
    def uses_spindle(self) -> bool:
        return isinstance(self.schedule, SpindleSchedule)

    def set_token_counts(self, counts) -> None:
        """Token frequencies of the training data for the spindle schedule ([vocab_size] counts)."""
        counts = torch.as_tensor(counts, dtype=torch.long).to(self.token_counts.device)
        if counts.shape != self.token_counts.shape:
            raise ValueError(f"token counts must have shape [{self.vocab_size}], got {list(counts.shape)}")
        self.token_counts.copy_(counts)

    def setup(self, stage: str) -> None:
        """Count the training tokens once (cached with the tokenised data) when the spindle schedule needs them."""
        if not self.uses_spindle:
            return
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is not None and getattr(datamodule, "train_data", None) is not None:
            self.set_token_counts(torch.from_numpy(token_counts(datamodule, self.vocab_size)))

    def _centred(self) -> Tensor:
        if int(self.token_counts.sum()) <= 0:
            raise RuntimeError(
                "schedule=spindle needs the token frequencies of the training data: they are counted in setup() "
                "when training through a Trainer with a datamodule, and restored from checkpoints; otherwise call "
                "set_token_counts(counts) first"
            )
        return SpindleSchedule.centred_log_frequency(self.token_counts)

    def alpha_bar(self, t: Tensor | int) -> Tensor:
        """ᾱ_t for every token: integer steps t (any shape) -> float64 ``[*t.shape, V]``."""
        t = torch.as_tensor(t, device=self.token_counts.device)
        u = t.double() / self.num_steps
        if self.uses_spindle:
            return self.schedule.alpha_bar(u, self._centred())
        a = self.schedule.alpha(u).double().clamp(0.0, 1.0)
        a = torch.where(u <= 0, torch.ones_like(a), torch.where(u >= 1, torch.zeros_like(a), a))
        return a[..., None].expand(*u.shape, self.vocab_size)

    def posterior_reveal_prob(self, t: Tensor) -> Tensor:
        """a_j = q(x_{t-1} = j | x_t = mask, x0 = j) for every token j: float64 ``[*t.shape, V]`` (1 at t = 1)."""
        a_t, a_s = self.alpha_bar(t), self.alpha_bar(t - 1)
        return ((a_s - a_t) / (1 - a_t).clamp(min=1e-12)).clamp(0.0, 1.0)

    # ---- the network ---------------------------------------------------------------------------------------
    def _input_embedding(self) -> nn.Embedding:
        get = getattr(self.backbone, "get_input_embeddings", None)
        embedding = get() if callable(get) else getattr(self.backbone, "tok_emb", None)
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(
                f"method.time_conditioning=token needs the backbone's input embedding (get_input_embeddings() or "
                f"tok_emb), which {type(self.backbone).__name__} does not expose; use time_conditioning=none"
            )
        return embedding

    def _insert_time_token(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        """Forward hook on the input embedding: position 0 becomes the embedding of the pending time step."""
        t = self._pending_time
        if t is None:
            return output
        time_vec = self.time_embedding(t.to(output.device)).to(output.dtype)
        return torch.cat([time_vec[:, None, :], output[:, 1:]], dim=1)

    def log_probs(self, xt: Tensor, t: Tensor, at: Tensor | None = None, **backbone_kwargs) -> Tensor:
        """log p_θ(x0 | x_t, t) ``[B, L, V]`` (float32), the mask token at zero probability.

        ``at`` (bool [B, L]): only those positions' rows, ``[N, V]`` in ``xt[at]``'s order (the same numbers as
        ``log_probs(xt, t)[at]``); the backbone runs its head on those positions only where it can."""
        if self.time_conditioning == "layerwise":
            backbone_kwargs["time"] = t.float() / self.num_steps
        if self.time_conditioning == "token":
            lead = torch.full((xt.shape[0], 1), self.pad_id, dtype=xt.dtype, device=xt.device)
            if "doc_ids" in backbone_kwargs:
                doc = backbone_kwargs["doc_ids"]
                backbone_kwargs["doc_ids"] = torch.cat([doc[:, :1], doc], dim=1)
            if at is not None:  # positions are shifted by the time token, whose output is never scored
                at = torch.cat([torch.zeros_like(at[:, :1]), at], dim=1)
            self._pending_time = t
            try:
                logits = self.logits(torch.cat([lead, xt], dim=1), at=at, **backbone_kwargs)
            finally:
                self._pending_time = None
            if at is None:
                logits = logits[:, 1:]
        else:
            logits = self.logits(xt, at=at, **backbone_kwargs)
        logits = logits.float()
        logits[..., self.mask_id] = float("-inf")
        return logits.log_softmax(-1)

    # ---- the objective -------------------------------------------------------------------------------------
    def sample_steps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n integer steps in 1..T, stratified (each uniform marginally, evenly spread over the batch)."""
        u = (torch.arange(n, device=self.device) + torch.rand(n, device=self.device, generator=generator)) / n
        return (u * self.num_steps).long().clamp(max=self.num_steps - 1) + 1

    def kl_terms(self, logp: Tensor, x0: Tensor, post: Tensor, rows: Tensor | None = None) -> Tensor:
        """KL(q(x_{t-1} | x_t = mask, x0) || p_θ(x_{t-1} | x_t)) per row: logp [N, V], x0 [N], post (a_j) float64
        [S, V], row n's in ``post[rows[n]]`` (``rows=None``: one per row, S = N). float64 [N].

        ``rows`` is best grouped (each sequence's rows consecutive, as the masked rows of a batch are): the
        [S, V] terms are added per run of equal ``rows``."""
        lp_i = logp.gather(-1, x0[:, None]).squeeze(-1)
        a_i = post.gather(-1, x0[:, None]).squeeze(-1) if rows is None else post[rows, x0]
        return self._kl(lp_i, a_i, self._log_mask_prob(logp, post, rows))

    @staticmethod
    def _log_mask_prob(logp: Tensor, post: Tensor, rows: Tensor | None) -> Tensor:
        """log p_θ(x_{t-1} = mask) = logsumexp_j(log p_θ(j) + log(1 − a_j)) per row of logp, in logp's dtype.

        log(1 − a_j) depends on (t, j) only: it is computed once per row of ``post`` (a sequence), and each run of
        logp rows with the same ``rows`` value (a sequence's masked tokens) adds it by broadcasting, so no [N, V]
        float64 tensor and no gathered [N, V] copy exist (the [N, V] logsumexp is the only per-token work, and on a
        CPU the per-sequence pieces are also cache-sized). One host sync for the run lengths."""
        log_stay = torch.where(post < 1, torch.log1p(-post), torch.full_like(post, _BLOCKED)).to(logp.dtype)
        if rows is None:  # one post row per logp row
            return torch.logsumexp(logp + log_stay, dim=-1)
        seqs, counts = torch.unique_consecutive(rows, return_counts=True)
        parts = [torch.logsumexp(part + log_stay[s], dim=-1)
                 for s, part in zip(seqs.tolist(), logp.split(counts.tolist()))]
        return torch.cat(parts) if parts else logp.new_zeros(0)

    @staticmethod
    def _kl(lp_i: Tensor, a_i: Tensor, log_mask_p: Tensor) -> Tensor:
        """KL_t = −a_i log p_θ(i) + (1 − a_i)[log(1 − a_i) − log p_θ(mask)] from per-token scalars, in float64
        (1 − a_i and its log lose digits in float32 when a_i is near 1)."""
        lp_i, a_i, log_mask_p = lp_i.double(), a_i.double(), log_mask_p.double()
        stay = 1 - a_i
        safe_stay = torch.where(stay > 0, stay, torch.ones_like(stay))
        mask_term = torch.where(stay > 0, stay * (torch.log(safe_stay) - log_mask_p), torch.zeros_like(stay))
        return -a_i * lp_i + mask_term

    def _vlb_terms(self, batch: dict[str, Tensor], generator: torch.Generator | None):
        x0, counted = batch["input_ids"], batch["loss_mask"].bool()
        B = x0.shape[0]
        t = self.sample_steps(B, generator)
        keep = self.alpha_bar(t).gather(1, x0)  # [B, L] probability that each token is still clean at t
        u = torch.rand(x0.shape, device=x0.device, generator=generator, dtype=torch.float64)
        masked = (u >= keep) & counted
        xt = torch.where(masked, self.mask_id, x0)
        lp = self.log_probs(xt, t, at=masked, **self.backbone_kwargs(batch))  # [N, V]: the masked rows only
        rows = torch.arange(B, device=x0.device)[:, None].expand_as(x0)[masked]
        post = self.posterior_reveal_prob(t)  # [B, V]: a_j depends on the sequence's t, not on the token
        target = x0[masked]
        lp_i = lp.gather(-1, target[:, None]).squeeze(-1)  # shared by the KL and the auxiliary CE: one gather
        kl = self._kl(lp_i, post[rows, target], self._log_mask_prob(lp, post, rows))
        nll = torch.zeros(x0.shape, device=x0.device, dtype=torch.float64)
        nll[masked] = self.num_steps * kl
        ce = torch.zeros_like(nll)
        ce[masked] = -lp_i.double()
        correct = torch.zeros_like(masked)
        correct[masked] = lp.argmax(-1) == target
        return nll.float(), ce.float(), masked, correct

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        nll, ce, masked, correct = self._vlb_terms(batch, generator)
        tokens = batch["loss_mask"].sum().clamp(min=1)
        return {
            "loss": (nll + self.aux_weight * ce).sum() / tokens,
            "vlb": nll.sum().detach() / tokens,
            "masked_frac": masked.sum() / tokens,
            "masked_acc": correct.sum() / masked.sum().clamp(min=1),
        }

    def nll_bound(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """One-sample estimate of the discrete-time VLB per token (nats): T · KL_t at a random t per sequence."""
        nll, _, _, _ = self._vlb_terms(batch, generator)
        return nll

    def validation_stats(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        nll, ce, masked, correct = self._vlb_terms(batch, generator)
        tokens = batch["loss_mask"].sum().clamp(min=1)
        return {
            "loss": (nll + self.aux_weight * ce).sum(),
            "nll_bound": nll.sum(),
            "masked_acc": correct.sum() / masked.sum().clamp(min=1) * tokens,
        }

    # ---- sampling ------------------------------------------------------------------------------------------
    def infill(
        self, tokens: Tensor, fill_mask: Tensor, sampler: Sampler | None = None, generator: torch.Generator | None = None
    ) -> Generation:
        """Fill the positions where fill_mask is True by reverse diffusion; every other position stays as given.

        With a :class:`D3PMSampler` (the default, ``sampler=diffusionbert``) this is the model's own discrete-time
        reverse process. A mask-diffusion sampler (``sampler=ancestral``, ``low_confidence``) is accepted for the
        time-agnostic model; it then follows its own per-time schedule (the configured one, or linear — the spindle
        schedule's average masking rate — with schedule=spindle).
        """
        extra = 1 if self.time_conditioning == "token" else 0
        x, _, sampler = self._infill_start(tokens, fill_mask, sampler, sampler_hint="diffusionbert", extra_tokens=extra)
        device = x.device

        @torch.no_grad()
        def denoiser(xt: Tensor, t: int = 0) -> Tensor:
            return self.log_probs(xt, torch.full((xt.shape[0],), int(t), dtype=torch.long, device=xt.device))

        # the model's own discrete-time prior where the sampler takes it, else (time-agnostic only) a mask prior
        if sampler.accepts(D3PMPrior):
            prior = D3PMPrior(self.mask_id, lambda t: self.alpha_bar(torch.tensor(t)).to(device), self.num_steps)
        elif self.time_conditioning != "none":
            raise ValueError(f"{type(sampler).__name__} is time-agnostic: use a D3PMSampler (sampler=diffusionbert)")
        else:
            prior = MaskPrior(self.mask_id, self.schedule if isinstance(self.schedule, MaskSchedule) else LinearSchedule())
        with evaluating(self):
            return sampler.sample(denoiser, x, prior=prior, generator=generator)

"""Masked (absorbing-state) diffusion: MDLM (Sahoo et al. 2024) / LLaDA (Nie et al. 2025).

Forward process: each token is independently replaced by the mask token with probability 1 - α(t).
The continuous-time NELBO is

    NELBO = E_{t ~ U[ε, 1]} [ w(t) · Σ_{i masked in x_t} -log p_θ(x0_i | x_t) ],   w(t) = -α'(t) / (1 - α(t)),

an upper bound on -log p(x0). SUBS parameterisation: the network never predicts the mask token, and tokens
that are not masked are copied (they carry no loss), so only masked positions are scored.

Logit shift (``shift_logits=True``; Dream, DiffuLLaMA, RND1): a converted AR model's output at position i was
trained to predict token i+1, so the prediction for token j is read from position j-1 (token 0 keeps its own
position's output, as Dream does). It lives in :meth:`MDLM.logits`, the one place the loss, the bound, the
samplers (through :meth:`MDLM.denoise`) and evaluation read predictions from, so all of them agree.

Prefix / dual KV cache (Fast-dLLM): :meth:`MDLM.infill`'s denoiser, an :class:`MDLMDenoiser`, declares the
``with_prefix_cache(x, prefix_len)`` hook (:meth:`MDLM.prefix_cached_denoise`) when the backbone takes
``past_key_values`` and ``with_dual_cache`` (:meth:`MDLM.dual_cached_denoise`) when it has a static cache; only
``ThresholdSampler(kv_cache="prefix" / "dual")`` uses them (contract and approximation in :mod:`dlm.sampling.threshold`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dlm.methods.base import DiffusionLM, evaluating
from dlm.methods.masked_terms import MaskedTermsObjective, masked_token_log_probs, masked_token_nll
from dlm.methods.time_sampling import check_time_sampling, sample_times
from dlm.models.attention import attention_mask
from dlm.sampling import Denoiser, Generation, MaskPrior, Sampler
from dlm.schedules import MaskSchedule


class MDLM(MaskedTermsObjective, DiffusionLM):
    uses_schedule = True

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        schedule: MaskSchedule,
        time_sampling: str = "antithetic",
        t_eps: float = 1e-3,
        shift_logits: bool = False,
        **base_kwargs,
    ):
        super().__init__(backbone, tokenizer, **base_kwargs)
        check_time_sampling(time_sampling, t_eps)
        self.schedule = schedule
        self.time_sampling = time_sampling
        self.t_eps = t_eps
        self.shift_logits = bool(shift_logits)

    def logits(self, tokens: Tensor, at: Tensor | None = None, **backbone_kwargs) -> Tensor:
        """Predictions per position [B, T, V]; with shift_logits the output of position j-1 scores token j.

        ``at`` (bool [B, T]): only the predictions of those tokens, [N, V] in ``tokens[at]``'s order (see
        :meth:`DiffusionLM.logits`). With shift_logits the backbone is asked for the positions the predictions
        come from (max(j - 1, 0) for each selected j), and a row read twice (tokens 0 and 1 both come from
        position 0) is repeated."""
        if at is not None and self.shift_logits:
            T = tokens.shape[1]
            source = torch.zeros_like(at)  # position j-1 predicts token j; position 0 also predicts token 0
            source[:, :-1] = at[:, 1:]
            source[:, 0] |= at[:, 0]
            rows = super().logits(tokens, at=source, **backbone_kwargs)  # [M, V], M <= N
            # each selected token's row: the rank of its source position among the selected sources
            rank = source.flatten().cumsum(0).view_as(source) - 1
            src_pos = (torch.arange(T, device=tokens.device) - 1).clamp(min=0).expand_as(source)
            index = rank.gather(1, src_pos)[at]
            # every source row is read at least once, in order, so equal counts mean no repeat
            return rows if index.shape[0] == rows.shape[0] else rows[index]
        logits = super().logits(tokens, at=at, **backbone_kwargs)
        if at is None and self.shift_logits and logits.shape[1] > 1:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    # ---- the objective ----------------------------------------------------------------------------------
    def sample_time(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n diffusion times on [t_eps, 1] (see dlm.methods.time_sampling)."""
        return sample_times(n, self.time_sampling, self.t_eps, self.device, generator)

    def _diffusion_terms(self, batch: dict[str, Tensor], generator: torch.Generator | None):
        """One forward pass at a random t per sequence: per-token bound terms and masked-token accuracy."""
        x0, counted = batch["input_ids"], batch["loss_mask"].bool()
        t = self.sample_time(x0.shape[0], generator)
        mask_prob = self.schedule.mask_prob(t)[:, None]
        # Positions outside the loss mask (packing's trailing pad) stay clean: they neither count nor leak.
        masked = (torch.rand(x0.shape, device=x0.device, generator=generator) < mask_prob) & counted
        xt = torch.where(masked, self.mask_id, x0)
        kwargs = self.backbone_kwargs(batch)
        if self._time_conditioned:
            kwargs["time"] = t
        # the head runs on the masked positions only: the rest carry no loss under SUBS
        nll, correct = masked_token_nll(self.logits(xt, at=masked, **kwargs), x0, masked, self.mask_id)
        return self.schedule.elbo_weight(t)[:, None] * nll, masked, correct

    # ---- what the RL estimators read (dlm/rl/estimators.py) ---------------------------------------------------
    def masked_log_probs(self, xt: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        """log p(x0_i | xt) [B, T] at the masked positions of ``xt`` (zero elsewhere), with gradient, and their
        entropies (detached): one forward, the head at the masked positions only. A time-conditioned backbone gets
        the masked fraction as its time (exact for the linear schedule)."""
        masked = xt == self.mask_id
        kwargs = {"time": masked.float().mean(1)} if self._time_conditioned else {}
        return masked_token_log_probs(self.logits(xt, at=masked, **kwargs), x0, masked, self.mask_id)

    def mask_groups(self, T: int, device=None) -> Tensor:
        """Which positions are denoised jointly [T] (one id per group): MDLM, all of them."""
        return torch.zeros(T, dtype=torch.long, device=device)

    @property
    def _time_conditioned(self) -> bool:
        return self.backbone_caps.time_conditioning

    # ---- sampling ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, xt: Tensor, doc_ids: Tensor | None = None, time: Tensor | None = None) -> Tensor:
        """log p(x0 | x_t) under SUBS: the mask token has zero probability, clean tokens are copied."""
        kwargs = {"doc_ids": doc_ids} if doc_ids is not None else {}
        if self._time_conditioned:
            kwargs["time"] = time
        return self._subs(self.logits(xt, **kwargs), xt)

    @property
    def supports_prefix_cache(self) -> bool:
        """Whether the backbone takes a KV cache (``past_key_values``/``use_cache``): native Transformer, HFCausalLM."""
        # a subclass that overrides logits/denoise would be bypassed by the hook's direct backbone calls
        plain = type(self).logits is MDLM.logits and type(self).denoise is MDLM.denoise
        return plain and self.backbone_caps.kv_cache

    @torch.no_grad()
    def prefix_cached_denoise(
        self, xt: Tensor, prefix_len: int, time_fn: Callable[[Tensor], Tensor | None] | None = None
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The prefix-KV-cache hook of :class:`~dlm.sampling.ThresholdSampler` (``kv_cache="prefix"``; the
        contract is in :mod:`dlm.sampling.threshold`). One full forward over ``xt`` [B, T] gives
        ``denoise(xt)`` and the keys/values of ``xt[:, :prefix_len]`` (which must hold no masks); returns that
        log p and ``suffix(z)``: log p [B, T - prefix_len, V] of a later suffix ``z`` computed by a forward over
        ``z`` only, reading the cached prefix. Approximate under bidirectional attention (the cached prefix does
        not see later changes of the suffix), exact when the prefix cannot attend to the suffix.
        ``time_fn(tokens)`` gives a time-conditioned backbone its time from the full tokens or from ``z`` (the
        prefix is clean, so counting masks on either agrees); the cached prefix keeps the refresh's time.
        With ``shift_logits`` the token at ``prefix_len`` is read from position ``prefix_len - 1``, so the
        cache holds one token less and that token is re-run with the suffix."""
        T = xt.shape[1]
        if not 0 < prefix_len < T:
            raise ValueError(f"prefix_len must be in [1, {T - 1}] for {T} tokens, got {prefix_len}")
        if bool((xt[:, :prefix_len] == self.mask_id).any()):
            raise ValueError("the cached prefix must not contain mask tokens")

        def kwargs(tokens: Tensor) -> dict:
            return {"time": time_fn(tokens) if time_fn is not None else None} if self._time_conditioned else {}

        # a static cache when the backbone is compiled (fixed shapes; DiffusionLM.new_kv_cache), else None: it grows
        cache = self.new_kv_cache(xt.shape[0], T)
        logits, cache = self.backbone(xt, past_key_values=cache, use_cache=True, **kwargs(xt))
        logits = logits[..., : self.vocab_size]
        if self.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        cached = prefix_len - 1 if self.shift_logits else prefix_len
        cache.crop(cached - T)  # drop the last T - cached tokens (negative: both the native and HF caches)
        head = xt[:, cached:prefix_len]  # the token before the suffix when shifting, else empty

        def suffix(z: Tensor) -> Tensor:
            out = self.backbone(torch.cat([head, z], dim=1), past_key_values=cache, use_cache=False, **kwargs(z))
            out = out[..., : self.vocab_size]
            return self._subs(out[:, :-1] if self.shift_logits else out, z)

        return self._subs(logits, xt), suffix

    @property
    def supports_dual_cache(self) -> bool:
        """Whether the backbone has a static KV cache (the dual cache writes the block between cached keys)."""
        return self.supports_prefix_cache and self.backbone_caps.static_cache

    @torch.no_grad()
    def dual_cached_denoise(
        self, xt: Tensor, start: int, end: int, time_fn: Callable[[Tensor], Tensor | None] | None = None
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The DualCache hook of :class:`~dlm.sampling.ThresholdSampler` (``kv_cache="dual"``; Fast-dLLM). One full
        forward over ``xt`` [B, T] gives ``denoise(xt)`` and every position's keys/values, kept in a static KV cache
        (:mod:`dlm.models.kv_cache`); returns that log p and ``block(z)``: log p [B, end - start, V] of a later state
        ``z`` of the columns ``start:end``, by a forward over ``z`` alone that attends (under the backbone's own
        pattern) to the cached prefix ``xt[:, :start]`` (no masks) and the cached suffix ``xt[:, end:]`` as this
        refresh saw them. Approximate under bidirectional attention; exact where the block sees neither a changed
        prefix nor the suffix (block-causal backbones with aligned blocks). ``time_fn`` as in
        :meth:`prefix_cached_denoise`, from the full state (the suffix keeps its masks while the block runs).
        With ``shift_logits`` the token at ``start`` is read from position ``start - 1``: that token is re-run
        with the block."""
        B, T = xt.shape
        if not 0 <= start < end <= T:
            raise ValueError(f"the block [start, end) must satisfy 0 <= start < end <= {T}, got [{start}, {end})")
        if bool((xt[:, :start] == self.mask_id).any()):
            raise ValueError("the cached prefix must not contain mask tokens")

        def kwargs(tokens: Tensor) -> dict:
            return {"time": time_fn(tokens) if time_fn is not None else None} if self._time_conditioned else {}

        cache = self.new_kv_cache(B, T, static=True)
        logits, cache = self.backbone(xt, past_key_values=cache, use_cache=True, **kwargs(xt))
        logits = logits[..., : self.vocab_size]
        if self.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        first = start - 1 if self.shift_logits and start > 0 else start  # the first re-run position
        # the block is written over its own slots (the cache's length is set to `first`), between prefix and suffix
        cache.crop(first - T)
        head = xt[:, first:start]
        n = end - first
        pattern = attention_mask(self.backbone.attention, T, block_size=self.backbone.block_size, device=xt.device)
        rows = torch.ones(1, 1, n, T, dtype=torch.bool, device=xt.device) if pattern is None else \
            pattern[..., first:end, :]
        prefix, suffix = xt[:, :start], xt[:, end:]

        def block(z: Tensor) -> Tensor:
            out = self.backbone(torch.cat([head, z], dim=1), attn_mask=rows, past_key_values=cache, use_cache=False,
                                **kwargs(torch.cat([prefix, z, suffix], dim=1)))
            out = out[..., : self.vocab_size]
            if self.shift_logits:
                out = out[:, :-1] if start > 0 else torch.cat([out[:, :1], out[:, :-1]], dim=1)
            return self._subs(out, z)

        return self._subs(logits, xt), block

    def infill(
        self, tokens: Tensor, fill_mask: Tensor, sampler: Sampler | None = None, generator: torch.Generator | None = None
    ) -> Generation:
        """Fill the positions where fill_mask is True, conditioning on every other position (both sides)."""
        x, _, sampler = self._infill_start(tokens, fill_mask, sampler)
        denoiser = MDLMDenoiser(self, initial_masks=(x == self.mask_id).sum(1).clamp(min=1))
        with evaluating(self):
            return sampler.sample(denoiser, x, prior=MaskPrior(self.mask_id, self.schedule), generator=generator)


class MDLMDenoiser(Denoiser):
    """MDLM's denoiser for one infill: :meth:`MDLM.denoise` with the time of a time-conditioned backbone taken from
    the fraction still masked (exact for the linear schedule), and the Fast-dLLM hooks (:meth:`with_prefix_cache`,
    :meth:`with_dual_cache`) declared where the backbone supports them (:attr:`MDLM.supports_prefix_cache`,
    :attr:`MDLM.supports_dual_cache`)."""

    def __init__(self, model: MDLM, initial_masks: Tensor):
        self.model = model
        self.initial_masks = initial_masks
        self.has_prefix_cache = bool(model.supports_prefix_cache)
        self.has_dual_cache = bool(model.supports_dual_cache)

    def _time(self, xt: Tensor) -> Tensor:
        return (xt == self.model.mask_id).sum(1) / self.initial_masks

    def _time_fn(self) -> Callable[[Tensor], Tensor] | None:
        return self._time if self.model._time_conditioned else None

    def __call__(self, xt: Tensor) -> Tensor:
        return self.model.denoise(xt, time=self._time(xt) if self.model._time_conditioned else None)

    def with_prefix_cache(self, xt: Tensor, prefix_len: int):
        if not self.has_prefix_cache:
            return super().with_prefix_cache(xt, prefix_len)
        return self.model.prefix_cached_denoise(xt, prefix_len, time_fn=self._time_fn())

    def with_dual_cache(self, xt: Tensor, start: int, end: int):
        if not self.has_dual_cache:
            return super().with_dual_cache(xt, start, end)
        return self.model.dual_cached_denoise(xt, start, end, time_fn=self._time_fn())

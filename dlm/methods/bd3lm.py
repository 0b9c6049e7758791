"""Block diffusion: BD3-LM (Arriola et al. 2025). Autoregressive over blocks of ``block_size`` L' tokens,
masked diffusion inside a block.

A row of T tokens is cut into blocks of L' consecutive positions counted from the row start (the last one
may be shorter). Block b gets its own diffusion time t_b, its tokens are masked with probability 1 - α(t_b),
and the NELBO is

    Σ_b E_{t_b} [ w(t_b) Σ_{i in b masked} -log p_θ(x_i | x_t^b, x^{<b}) ],   w(t) = -α'(t) / (1 - α(t)),

with the SUBS parameterisation of MDLM (the mask is never predicted, clean tokens carry no loss).

Vectorised training: one forward over [x_t ; x_0] (length 2T, the x_0 copy at the same positions as x_t)
under a three-part mask: x_t attends block-diagonally to x_t (its own block), x_t block b attends to the
clean blocks < b of x_0, and x_0 attends block-causally to x_0. :meth:`BD3LM.loop_logits` computes the same
logits one block at a time (the reference of the tests). The LM head runs only at the positions the masked x_t
tokens are predicted from (under SUBS the rest carry no loss): ``at`` of :meth:`BD3LM.vectorised_logits`.

``shift_logits`` (SDAR / Fast-dLLM v2 style, natural when continuing an AR checkpoint): token i is predicted
from the output at position i - 1, i.e. from the clean stream's last token of the previous block for the
first token of a block (a start token s, default EOS, before the row for token 0) and from the noisy stream
for the rest. Positions are then shifted by one (s at 0, x_i at i + 1), so T + 1 <= max_seq_len.

Reductions (tested): L' = T without shift is MDLM (same loss for the same noise); L' = 1 with shift is the
AR family (identical per-token NLL at t = 1 with the linear schedule, where every token is masked and
w = 1; for any t the bound's expectation over t is that NLL, since E_t[w(t)(1 - α(t))] = 1).

Sampling is semi-autoregressive: block by block, each block denoised by the configured mask sampler
(``self.sampler``, e.g. AncestralSampler / LowConfidenceSampler) with a denoiser that reads an exact KV
cache of the finished clean blocks (``sampler.kv_cache="prefix"``, conf/sampler/bd3lm.yaml's default). A
finished block is appended to the cache by the next block's first denoising call: one forward over [the clean
tokens not yet cached ; the noisy block] under the block-causal mask writes the former's keys and values and
scores the latter (its own keys and values are then cropped off), so a refresh costs no call of its own: a
generation of n blocks makes no more calls than its samplers do. ``kv_cache="none"`` recomputes the whole clean prefix for every
denoiser call (the reference: identical tokens for a fixed generator). Generation stops after the block in
which every row has produced an EOS.

Limits: the backbone must take explicit masks (native Transformer; HFCausalLM with sdpa/eager); the
backbone must not be time-conditioned (the noise level differs per block); ``shift_logits`` does not support
packed rows (doc_ids). Infilling conditions on the blocks before a hole and the given tokens of the hole's
own block; anything after that block is not visible.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dlm.methods.base import DiffusionLM, evaluating
from dlm.methods.masked_terms import MaskedTermsObjective, masked_token_log_probs, masked_token_nll
from dlm.methods.time_sampling import check_time_sampling, sample_times
from dlm.models.capabilities import capabilities_of
from dlm.models.transformer import positions_from_doc_ids
from dlm.sampling import Generation, MaskPrior, Sampler
from dlm.schedules import MaskSchedule
from dlm.stop_tokens import is_stop


class BD3LM(MaskedTermsObjective, DiffusionLM):
    uses_schedule = True
    kv_caches = ("prefix",)  # the exact cache of finished blocks, around any mask sampler
    eos_fills_tail = True  # a row's tokens after its first generated EOS are set to EOS

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        schedule: MaskSchedule,
        block_size: int = 4,
        shift_logits: bool = False,
        start_token_id: int | None = None,
        time_sampling: str = "antithetic",
        t_eps: float = 1e-3,
        **base_kwargs,
    ):
        super().__init__(backbone, tokenizer, **base_kwargs)
        if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
            raise ValueError(f"method.block_size must be an integer >= 1, got {block_size!r}")
        check_time_sampling(time_sampling, t_eps)
        if capabilities_of(backbone).time_conditioning:
            raise ValueError("method=bd3lm needs a backbone without time conditioning (the noise level is per block)")
        self.schedule = schedule
        self.block_size = int(block_size)
        self.shift_logits = bool(shift_logits)
        self.start_id = self.eos_id if start_token_id is None else int(start_token_id)
        self.time_sampling, self.t_eps = time_sampling, t_eps

    # ---- the objective ----------------------------------------------------------------------------------
    def sample_time(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n diffusion times on [t_eps, 1] (the same draws as MDLM.sample_time)."""
        return sample_times(n, self.time_sampling, self.t_eps, self.device, generator)

    def blocks(self, T: int, device=None) -> Tensor:
        return torch.arange(T, device=device) // self.block_size

    def training_mask(self, T: int, doc_ids: Tensor | None = None, device=None) -> Tensor:
        """The three-part boolean mask [1|B, 1, N, N] over [x_t ; (s ;) x_0] (True = may attend)."""
        blk = self.blocks(T, device)
        clean = torch.cat([blk.new_full((1,), -1), blk]) if self.shift_logits else blk  # s: a clean block before all
        q_noisy = torch.cat([torch.ones_like(blk), torch.zeros_like(clean)]).bool()
        b = torch.cat([blk, clean])
        same, before = b[:, None] == b[None, :], b[None, :] < b[:, None]
        qn, kn = q_noisy[:, None], q_noisy[None, :]
        mask = (qn & kn & same) | (qn & ~kn & before) | (~qn & ~kn & (before | same))
        mask = mask[None, None]
        if doc_ids is not None:
            d = torch.cat([doc_ids, doc_ids], dim=1)
            mask = mask & (d[:, :, None] == d[:, None, :])[:, None]
        return mask

    def vectorised_logits(
        self, xt: Tensor, x0: Tensor, doc_ids: Tensor | None = None, at: Tensor | None = None
    ) -> Tensor:
        """Logits [B, T, V] predicting x0 from (x_t block, clean earlier blocks) in one forward pass.

        ``at`` (bool [B, T], e.g. the masked positions): only those tokens' rows, [N, V] in ``x0[at]``'s order;
        the backbone is asked for the positions they are read from only (see :meth:`DiffusionLM.logits`)."""
        B, T = x0.shape
        if self.shift_logits and doc_ids is not None:
            raise ValueError("method.shift_logits=true does not support packed rows (doc_ids); use data.packing=false")
        ar = torch.arange(T, device=x0.device)
        if self.shift_logits:
            ids = torch.cat([xt, torch.full_like(x0[:, :1], self.start_id), x0], dim=1)
            pos = torch.cat([ar + 1, ar[:1] * 0, ar + 1])[None]
            pred = torch.where(ar % self.block_size == 0, T + ar, ar - 1)
        else:
            ids = torch.cat([xt, x0], dim=1)
            pos = (torch.cat([ar, ar])[None] if doc_ids is None else positions_from_doc_ids(doc_ids).repeat(1, 2))
            pred = ar
        mask = self.training_mask(T, doc_ids, x0.device)
        if at is None:
            return self.logits(ids, attn_mask=mask, position_ids=pos)[:, pred]
        source = torch.zeros_like(ids, dtype=torch.bool)
        source[:, pred] = at  # pred is injective: one source position per selected token
        rows = self.logits(ids, at=source, attn_mask=mask, position_ids=pos)  # [N, V], ascending over ids
        if not self.shift_logits:
            return rows  # pred = arange(T): already in x0[at]'s order
        # block starts are read from the clean stream (after all of x_t): each token's row is its source's rank
        rank = source.flatten().cumsum(0).view_as(source) - 1
        return rows[rank[:, pred][at]]

    def loop_logits(self, xt: Tensor, x0: Tensor) -> Tensor:
        """Reference for :meth:`vectorised_logits`: one forward per block over [(s,) clean prefix, x_t block]."""
        T, L = x0.shape[1], self.block_size
        out = []
        for start in range(0, T, L):
            end = min(start + L, T)
            prefix = x0[:, :start]
            if self.shift_logits:
                prefix = torch.cat([torch.full_like(x0[:, :1], self.start_id), prefix], dim=1)
            ids = torch.cat([prefix, xt[:, start:end]], dim=1)
            blk = torch.cat([torch.full((prefix.shape[1] - start,), -1), self.blocks(end)]).to(x0.device)
            mask = (blk[None, :] <= blk[:, None])[None, None]  # block-causal; s in a block of its own
            logits = self.logits(ids, attn_mask=mask, position_ids=torch.arange(ids.shape[1], device=x0.device)[None])
            out.append(logits[:, start : end] if self.shift_logits else logits[:, -(end - start) :])
        return torch.cat(out, dim=1)

    def _diffusion_terms(
        self, batch: dict[str, Tensor], generator: torch.Generator | None, t: Tensor | None = None, loop=False
    ):
        """Per-token bound terms [B, T], the masked positions and masked-token correctness.
        ``t`` [B, n_blocks] fixes the per-block times (tests); ``loop`` uses the per-block reference."""
        x0, counted = batch["input_ids"], batch["loss_mask"].bool()
        B, T = x0.shape
        n_blocks = -(-T // self.block_size)
        if t is None:
            t = self.sample_time(B * n_blocks, generator).view(B, n_blocks)
        t_tok = t[:, self.blocks(T, x0.device)]  # [B, T]
        masked = (torch.rand(x0.shape, device=x0.device, generator=generator) < self.schedule.mask_prob(t_tok))
        masked &= counted
        xt = torch.where(masked, self.mask_id, x0)
        if loop:
            logits = self.loop_logits(xt, x0)
        else:  # the head runs for the masked tokens only: the rest carry no loss under SUBS
            logits = self.vectorised_logits(xt, x0, batch.get("doc_ids"), at=masked)
        nll, correct = masked_token_nll(logits, x0, masked, self.mask_id)
        return self.schedule.elbo_weight(t_tok) * nll, masked, correct

    # ---- what the RL estimators read (dlm/rl/estimators.py) ---------------------------------------------------
    def masked_log_probs(self, xt: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        """log p(x0_i | xt's block, clean earlier blocks of x0) [B, T] at the masked positions of ``xt`` (zero
        elsewhere), with gradient, and their entropies (detached): one vectorised forward over [x_t ; x_0]."""
        masked = xt == self.mask_id
        rows = self.vectorised_logits(xt, x0, at=masked)
        return masked_token_log_probs(rows, x0, masked, self.mask_id)

    def mask_groups(self, T: int, device=None) -> Tensor:
        """Which positions are denoised jointly [T]: the blocks (earlier blocks are clean context)."""
        return self.blocks(T, device)

    # ---- sampling ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _semi_ar(self, x: Tensor, sampler: Sampler, generator, eos_from: int | None) -> Generation:
        """Fill the masks of x [B, N] block by block. eos_from: stop once every row has an EOS at or after it."""
        B, N = x.shape
        L, dev = self.block_size, x.device
        offset = 1 if self.shift_logits else 0
        start = torch.full((B, 1), self.start_id, dtype=torch.long, device=dev)
        calls = 0
        cached = self.kv_cache_of(sampler) == "prefix"
        # a static cache when the backbone is compiled (fixed shapes; DiffusionLM.new_kv_cache), else None: it grows
        cache = self.new_kv_cache(B, N + offset) if cached else None
        # The cache is written lazily: a finished block (and, with shift, the start token) enters it in the first
        # denoising call of the next block that has masks, one forward over [not yet cached clean tokens ; noisy
        # block] under a block-causal mask (the clean rows never see the noisy block), whose noisy KV is then
        # cropped away. That call both refreshes the cache and scores the block: no call of its own per refresh.
        # done_upto: x[:, :done_upto] is in the cache; start: the start token is not yet; first (shift): the logits
        # predicting the current block's first token
        state = {"cache": cache, "done_upto": 0, "start": self.shift_logits, "first": None}

        def prefix_and_block(z: Tensor, b0: int) -> Tensor:
            """Logits [B, len(z), V] for the noisy block z at b0 (shifted: predicting z's tokens), writing the clean
            tokens not yet in the cache (x[:, done_upto:b0], the start token) into it in the same forward."""
            done = state["done_upto"]
            pending = [start] if state["start"] else []
            pending.append(x[:, done:b0])
            n_new = sum(p.shape[1] for p in pending)
            ids = torch.cat([*pending, z], dim=1)
            n = ids.shape[1]
            # block of each new row (-1: the start token); positions after the start token are shifted by offset
            blk = torch.arange(done, b0 + z.shape[1], device=dev) // L
            pos = torch.arange(done, b0 + z.shape[1], device=dev) + offset
            if state["start"]:
                blk = torch.cat([blk.new_full((1,), -1), blk])
                pos = torch.cat([pos.new_zeros(1), pos])
            past = 0 if state["start"] else done + offset  # cached columns: all visible
            own = blk[None, :] <= blk[:, None]
            mask = torch.cat([own.new_ones(n, past), own], dim=1)[None, None]
            keep = n_new > 0
            out = self.backbone(ids, attn_mask=mask, position_ids=pos[None], past_key_values=state["cache"],
                                use_cache=keep)
            if keep:
                logits, state["cache"] = out
                state["cache"].crop(-z.shape[1])  # keep the clean tokens only
                state.update(done_upto=b0, start=False)
                if self.shift_logits:  # the last clean token's output predicts the block's first token; a copy, as a
                    # compiled backbone under CUDA graphs overwrites its output on the next call
                    state["first"] = logits[:, n_new - 1 : n_new].clone()
            else:
                logits = out
            logits = logits[:, n_new:]
            if self.shift_logits:
                logits = torch.cat([state["first"], logits[:, :-1]], dim=1)
            return logits

        for b0 in range(0, N, L):
            b1 = min(b0 + L, N)
            xb = x[:, b0:b1]
            if (xb == self.mask_id).any():
                if cached:
                    def denoiser(z: Tensor, b0=b0) -> Tensor:
                        return self._subs(prefix_and_block(z, b0), z)
                else:
                    def denoiser(z: Tensor, b0=b0) -> Tensor:
                        ctx = torch.cat([start, x[:, :b0]], dim=1) if self.shift_logits else x[:, :b0]
                        ids = torch.cat([ctx, z], dim=1)
                        blk = torch.cat([torch.full((offset,), -1, device=dev), torch.arange(b0, device=dev) // L,
                                         torch.full((z.shape[1],), b0 // L, device=dev)])
                        mask = (blk[None, :] <= blk[:, None])[None, None]
                        logits = self.logits(ids, attn_mask=mask, position_ids=torch.arange(ids.shape[1], device=dev)[None])
                        logits = logits[:, ctx.shape[1] - 1 : -1] if self.shift_logits else logits[:, ctx.shape[1]:]
                        return self._subs(logits, z)
                observe = getattr(sampler, "on_step", None)
                if observe is not None:  # the observer sees whole rows, not just the block being denoised
                    sampler.on_step = lambda z, b0=b0, b1=b1, seen=observe: seen(torch.cat([x[:, :b0], z, x[:, b1:]], dim=1))
                try:
                    gen = sampler.sample(denoiser, xb.clone(), prior=MaskPrior(self.mask_id, self.schedule),
                                         generator=generator)
                finally:
                    if observe is not None:
                        sampler.on_step = observe
                x[:, b0:b1] = gen.tokens
                calls += gen.num_network_calls
            if eos_from is not None:
                hit = is_stop(x[:, max(eos_from, 0) : b1], self.stop_ids).any(1)  # EOS or an end-of-turn token
                if bool(hit.all()) and b1 < N:
                    x[:, b1:] = self.eos_id
                    break
        return Generation(x, calls)

    def _run(self, x: Tensor, sampler, generator, eos_from: int | None) -> Generation:
        sampler = sampler or self.sampler
        if sampler is None:
            raise ValueError("no sampler given and none configured: pass sampler= or set sampler=<name>")
        max_len = getattr(self.backbone, "max_seq_len", None)
        if max_len is not None and x.shape[1] + int(self.shift_logits) > max_len:
            raise ValueError(f"{x.shape[1]} tokens exceed the model's max_seq_len={max_len}")
        with evaluating(self):
            gen = self._semi_ar(x, sampler, generator, eos_from)
        if eos_from is not None:  # variable length: everything after a row's first generated stop token is EOS
            tail = gen.tokens[:, eos_from:]
            stop = is_stop(tail, self.stop_ids).long()
            after = (stop.cumsum(1) - stop) > 0  # the stop token itself kept (an end-of-turn token stays one)
            gen.tokens[:, eos_from:] = tail.masked_fill(after, self.eos_id)
        return gen

    def generate(
        self,
        prompt: Tensor | None,
        length: int,
        sampler: Sampler | None = None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Generation:
        """Continue each prompt row (or `num_samples` empty rows) by `length` tokens, block by block."""
        device = self.compute_device
        if prompt is None:
            prompt = torch.empty(num_samples, 0, dtype=torch.long, device=device)
        prompt = prompt.to(device)
        masks = torch.full((prompt.shape[0], length), self.mask_id, dtype=torch.long, device=device)
        return self._run(torch.cat([prompt, masks], dim=1), sampler, generator, eos_from=prompt.shape[1])

    def infill(
        self, tokens: Tensor, fill_mask: Tensor, sampler: Sampler | None = None, generator: torch.Generator | None = None
    ) -> Generation:
        """Fill fill_mask positions block by block: a hole sees the blocks before it (as given or as filled)
        and the given tokens of its own block, never anything after its block."""
        x, _, sampler = self._infill_start(tokens, fill_mask, sampler)
        return self._run(x, sampler, generator, eos_from=None)

"""The autoregressive baseline (method=ar): a causal LM on the same backbones as the diffusion families.

Attention: the family passes ``attention="causal"`` on every forward call, so any model config works as it
is (the native ``model=tiny`` defaults to bidirectional; it becomes causal here without an override). An HF
backbone converted to take explicit masks gets the causal mask; an unconverted one (flash attention) uses
its own causal kernel.

First-token convention (what makes the number comparable): every row is scored in full. The input is the
row shifted right behind a *start token* (``start_token_id``, default the tokenizer's EOS):

    input   [s,  x_0, x_1, ..., x_{T-2}]      positions 0 .. T-1
    target  [x_0, x_1, x_2, ..., x_{T-1}]

so ``nll_bound(batch)[b, i] = -log p(x_i | s, x_<i)`` and a row's sum is exactly ``-log p(row | s)``: all T
tokens count, as in MDLM's per-token bound over the same ``loss_mask`` (the first token is not dropped, so
the AR number is not flattered by scoring one token fewer). EOS is the natural start: documents in packed
rows follow an EOS, and HF causal LMs are pretrained with EOS as the document separator. With ``doc_ids``
(packed rows) each input position carries its *target's* document id, so the first token of every
document is predicted from the EOS before it alone, exactly like the first token of a row.

The mask token is never predicted (its logit is -inf), as in the diffusion families.

Export: ``export_hf(path)`` writes an HF-format folder for ``HFCausalLM`` backbones (``save_pretrained`` of
the wrapped model with causality restored in its config) and, for the native ``Transformer``, a native folder
(``config.json`` with the constructor arguments, ``attention: causal``, + ``model.safetensors``) that
``Transformer.from_pretrained(path)`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlm.methods.base import DiffusionLM, evaluating
from dlm.sampling import Generation
from dlm.sampling.autoregressive import ARSampler
from dlm.stop_tokens import is_stop

# The export (HF classes, safetensors) is imported where a run is exported: start-up of training and sampling.


class InfillNotSupportedError(NotImplementedError):
    """The family cannot condition on a suffix; use a diffusion family for infilling."""


def decoding_settings(sampler) -> ARSampler:
    """The next-token settings of the configured sampler: an ARSampler or a diffusion Sampler, which both declare
    temperature, top_k, top_p and kv_cache (None: ARSampler's defaults)."""
    if sampler is None:
        return ARSampler()
    return ARSampler(sampler.temperature, sampler.top_k, sampler.top_p, kv_cache=sampler.kv_cache)


class AR(DiffusionLM):
    supports_infill = False
    one_token_per_call = True  # a generation's trajectory is rebuilt from its tokens (dlm.generate)
    kv_caches = ("prefix",)  # decoding through a KV cache of the prefix: one new token per forward
    exact_nll = True  # nll_bound is the exact NLL: evaluation needs one pass, not K Monte-Carlo draws
    eos_fills_tail = True  # a row's tokens after its first generated EOS are set to EOS

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        start_token_id: int | None = None,
        **base_kwargs,
    ):
        super().__init__(backbone, tokenizer, **base_kwargs)
        self.start_id = self.eos_id if start_token_id is None else int(start_token_id)
        if not 0 <= self.start_id < self.vocab_size or self.start_id == self.mask_id:
            raise ValueError(f"method.start_token_id={start_token_id} must be a non-mask token id < {self.vocab_size}")

    # ---- the objective ----------------------------------------------------------------------------------
    def next_token_logits(self, x0: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        """Logits [B, T, V] where row i predicts x0[:, i] from the start token and x0[:, :i]."""
        start = torch.full_like(x0[:, :1], self.start_id)
        inputs = torch.cat([start, x0[:, :-1]], dim=1)
        kwargs = {"doc_ids": doc_ids} if doc_ids is not None else {}  # target's document: see the docstring
        logits = self.logits(inputs, attention="causal", **kwargs).float()
        logits[..., self.mask_id] = float("-inf")
        return logits

    def _terms(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        x0, counted = batch["input_ids"], batch["loss_mask"].bool()
        logits = self.next_token_logits(x0, batch.get("doc_ids"))
        nll = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
        return nll * counted, (logits.argmax(-1) == x0) & counted

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        nll, correct = self._terms(batch)
        tokens = batch["loss_mask"].sum().clamp(min=1)
        return {"loss": nll.sum() / tokens, "acc": correct.sum() / tokens}

    def nll_bound(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Exact per-token NLL [B, T]: -log p(x_i | start, x_<i), zero outside loss_mask."""
        return self._terms(batch)[0]

    def validation_stats(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        nll, correct = self._terms(batch)
        return {"loss": nll.sum(), "nll_bound": nll.sum(), "acc": correct.sum().float()}

    # ---- sampling ----------------------------------------------------------------------------------------
    def _step_logits(self, tokens: Tensor) -> Tensor:
        logits = self.logits(tokens, attention="causal").float()
        logits[..., self.mask_id] = float("-inf")
        return logits

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor | None,
        length: int,
        sampler=None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Generation:
        """Continue each prompt row (or `num_samples` empty rows) by `length` tokens, one at a time.

        Returns [B, P + length] tokens (no start token). A row that emits EOS (or another of ``stop_ids``: an
        end-of-turn token) is finished: its remaining positions are EOS, and decoding stops once every row is finished. With ``sampler.kv_cache=prefix`` (the
        default) each step feeds only the new token through the KV cache (a static one when the backbone is
        compiled: :meth:`DiffusionLM.new_kv_cache`); otherwise the whole prefix is recomputed every step (same
        tokens for the same generator).
        """
        settings = decoding_settings(sampler or self.sampler)
        observe = getattr(sampler or self.sampler, "on_step", None)  # sees the rows after every token, rest masked
        device = self.compute_device
        if prompt is None:
            prompt = torch.empty(num_samples, 0, dtype=torch.long, device=device)
        prompt = prompt.to(device)
        B, P = prompt.shape
        max_len = getattr(self.backbone, "max_seq_len", None)
        if max_len is not None and P + length > max_len:
            raise ValueError(f"prompt + length = {P + length} tokens exceeds the model's max_seq_len={max_len}")
        seq = torch.cat([torch.full((B, 1), self.start_id, dtype=torch.long, device=device), prompt], dim=1)
        out = torch.full((B, length), self.eos_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        calls = 0
        with evaluating(self):
            # static (preallocated, compiled decoding) or None: the backbone grows one (see DiffusionLM.new_kv_cache)
            cached = self.kv_cache_of(settings) == "prefix"
            cache = self.new_kv_cache(B, P + 1 + length) if cached else None
            for i in range(length):
                if cached:
                    new = seq if i == 0 else seq[:, -1:]
                    logits, cache = self.backbone(new, attention="causal", past_key_values=cache, use_cache=True)
                    logits = logits[:, -1, : self.vocab_size].float()
                    logits[:, self.mask_id] = float("-inf")
                else:
                    logits = self._step_logits(seq)[:, -1]
                calls += 1
                token = torch.where(done, self.eos_id, settings.draw(logits, generator))
                out[:, i] = token
                if observe is not None:
                    observe(torch.cat([prompt, out[:, : i + 1], out.new_full((B, length - i - 1), self.mask_id)], 1))
                done |= is_stop(token, self.stop_ids)  # EOS or an end-of-turn token (dlm/stop_tokens.py)
                if bool(done.all()):
                    break
                seq = torch.cat([seq, token[:, None]], dim=1)
        return Generation(torch.cat([prompt, out], dim=1), calls)

    def infill(self, tokens: Tensor, fill_mask: Tensor, sampler=None, generator: torch.Generator | None = None):
        raise InfillNotSupportedError(
            "method=ar cannot infill: an autoregressive model cannot condition on a suffix. Use method=mdlm "
            "(conditions on both sides) or method=bd3lm (conditions on earlier blocks and the hole's block)."
        )

    # ---- export ------------------------------------------------------------------------------------------
    def export_hf(self, path: str | Path) -> Path:
        """Write the model for reuse: an HF folder (HFCausalLM backbones) or a native one (Transformer)."""
        from dlm.models.hf import HFCausalLM
        from dlm.models.transformer import Transformer

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if isinstance(self.backbone, HFCausalLM):
            model = self.backbone.hf_model
            configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
            saved = [(c, c.__dict__.get("is_causal", None)) for c in configs]
            try:  # the export is a causal LM: no trace of the bidirectional conversion in its config
                for c, _ in saved:
                    c.is_causal = True
                model.save_pretrained(path)
            finally:
                for c, value in saved:
                    if value is None:
                        c.__dict__.pop("is_causal", None)
                    else:
                        c.is_causal = value
        elif isinstance(self.backbone, Transformer):
            from safetensors.torch import save_file

            config = {**self.backbone.init_args, "attention": "causal", "architecture": "dlm.models.Transformer"}
            (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
            if self.backbone.lm_head.weight is self.backbone.tok_emb.weight:
                state.pop("lm_head.weight")  # tied: safetensors stores a tensor once
            save_file(state, str(path / "model.safetensors"))
        else:
            raise TypeError(f"export_hf knows HFCausalLM and Transformer backbones, not {type(self.backbone).__name__}")
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(path)
        (path / "dlm_export.json").write_text(
            json.dumps({"method": "ar", "start_token_id": self.start_id, "mask_token_id": self.mask_id}) + "\n"
        )
        return path

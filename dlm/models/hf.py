"""Hugging Face causal LMs as diffusion backbones (the starting point of AR-to-diffusion conversion, A2D).

``HFCausalLM`` wraps any ``AutoModelForCausalLM`` behind the native backbone's call signature
``forward(input_ids, *, doc_ids=None, time=None, attention=None) -> logits [B, T, V]`` (in the model's dtype:
consumers upcast what they score), so every method (masked diffusion, block diffusion, AR) runs on it
unchanged. Like the native backbone it also takes an explicit boolean ``attn_mask`` [B|1, 1, T, S],
``position_ids`` and a KV cache (transformers' own cache objects: ``DynamicCache``, or ``StaticCache`` from
:meth:`HFCausalLM.static_cache` for compiled decoding, see :mod:`dlm.models.kv_cache`) through
``past_key_values=`` / ``use_cache=``.

Conversion to bidirectional attention takes two switches, because transformers reads causality from two
places:

1. every attention module's ``is_causal`` attribute (SDPA and the flash kernels read it when no mask tensor
   is given) and the config's ``is_causal`` flag (``masking_utils.create_causal_mask`` falls back to a
   bidirectional mask when it is False) are set to False;
2. every forward passes an explicit 4D mask [B|1, 1, T, T] built by :func:`dlm.models.attention.attention_mask`
   for the wanted pattern (and document masking). transformers 5.x returns a 4D ``attention_mask`` as-is from
   its mask builders (``_preprocess_mask_arguments`` early-exits on ``ndim == 4``), and the attention functions
   then use it directly: SDPA takes a boolean mask (True = may attend), while the eager kernels *add* the mask
   to the scores, so eager gets a float additive mask (0 = attend, dtype-min = blocked).

One exception: plain bidirectional attention without documents under ``sdpa`` passes no mask at all when the
model builds its masks with transformers' own builders (``HFCausalLM.mask_free_bidirectional``): the builders
then return None and SDPA reads ``is_causal=False``, which keeps its mask-free (flash) kernels.

Only ``sdpa`` and ``eager`` can take an explicit mask; with any other implementation (flash attention, flex, ...)
only the plain causal pattern is allowed and the model is left unconverted.

With ``doc_ids`` position ids restart at each document, so a packed sequence gives the same logits as
running each document on its own (as in the native backbone).
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from dlm.models.attention import PATTERNS, attention_mask, implementation_mask
from dlm.models.capabilities import BackboneCapabilities, ModelConventions
from dlm.models.hf_geometry import (  # noqa: F401
    GPT2_SMALL,
    KNOWN_GEOMETRIES,
    QWEN3_0P6B,
    QWEN3_30B_A3B,
    pretrained_geometry,
)
from dlm.models.hf_loading import _plain_dict, _rows, grow_vocab, load_hf_model  # noqa: F401  (re-exported)
from dlm.models.inputs import check_inputs
from dlm.models.kv_cache import check_static_capacity, is_static_cache, static_cache_mask, widen_mask
from dlm.models.moe import count_active_parameters  # noqa: F401  (re-exported)
from dlm.models.transformer import check_logits_at, positions_from_doc_ids

# transformers submodules imported inside functions: only the wrapper path that runs needs them (from_pretrained,
# caches, masking utilities), and `import dlm.models` stays light for the CLIs' start-up.

MASKABLE_IMPLEMENTATIONS = ("sdpa", "eager")
# Model types whose causal-LM forward is exactly ``lm_head(decoder(...).last_hidden_state)`` (final norm inside the
# decoder; no logit scaling or softcapping), so ``logits_at`` may run the head on the selected hidden states only.
# Other types compute every position's logits and select.
PLAIN_HEAD_MODEL_TYPES = ("qwen3", "qwen3_moe", "llama", "gpt2", "qwen2")


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM, converted to take any attention pattern (bidirectional by default).

    Args:
        pretrained: hub id or local folder for ``AutoModelForCausalLM.from_pretrained``.
        config: ``{"model_type": ..., **fields}``. Alone: a randomly initialised model from
            ``AutoConfig.for_model``. With ``pretrained``: fields overriding the checkpoint's config before the
            weights load (e.g. fewer layers for a debug run).
        vocab_size: tokenizer size. Larger than the embedding: the embedding (and an untied output layer) grows,
            new rows set to the mean of the existing rows. Smaller: the embedding is kept as it is.
        attention: default pattern, one of ``causal``, ``bidirectional``, ``block_causal``.
        block_size: block length for ``block_causal``.
        attn_implementation: transformers attention backend; ``sdpa`` and ``eager`` support every pattern.
        torch_dtype: parameter dtype (``bfloat16``, ``float32``, ``auto``...); None = transformers' default.
        max_seq_len: longest accepted input; default the config's ``max_position_embeddings``/``n_positions``.
        gradient_checkpointing: enable activation checkpointing of the decoder layers.
        trust_remote_code: forwarded to transformers for checkpoints with custom code.
        lr_multipliers: per-role learning-rate multipliers this model asks for (roles of ``dlm.optim.ROLES``;
            0 freezes a role). The method's own ``lr_multipliers`` are merged over them, so a model config such
            as ``model=moe30b`` carries the SCP recipe (attention faster than MLP/experts) to any method.
        router_aux_loss_coef: weight of the MoE load-balancing (Switch) loss added to the training loss;
            None = the checkpoint config's ``router_aux_loss_coef`` (Qwen3-MoE: 0.001), 0 = off. Ignored for
            dense models. Computed in training mode only; see :meth:`pop_aux_loss`.
        load_weights: False builds ``pretrained``'s architecture (``config`` fields over it) with random weights
            and downloads nothing but its config (none for the hub ids in ``KNOWN_GEOMETRIES``).
        conventions: what the checkpoint brings besides its weights (its tokenizer, mask token, logit shift,
            recommended sampler): a :class:`~dlm.models.capabilities.ModelConventions` mapping, read by the run.
        quantization_config: a transformers quantization config for ``from_pretrained`` (QLoRA: passed by
            :mod:`dlm.models.lora` for ``model.lora.quantize=4bit``; not a model-config key).
    """

    time_conditioning = False

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict | None = None,
        vocab_size: int | None = None,
        attention: str = "bidirectional",
        block_size: int | None = None,
        attn_implementation: str = "sdpa",
        torch_dtype: str | None = None,
        max_seq_len: int | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        lr_multipliers: dict[str, float] | None = None,
        router_aux_loss_coef: float | None = None,
        load_weights: bool = True,
        conventions: dict | None = None,
        quantization_config: Any = None,
    ):
        super().__init__()
        self.conventions = ModelConventions.from_config(conventions)
        from transformers import AutoModelForCausalLM

        from dlm.optim import merge_lr_multipliers

        self.lr_multipliers = merge_lr_multipliers(_plain_dict(lr_multipliers) if lr_multipliers else None)

        _check_arguments(attention, block_size, attn_implementation)
        self.hf_model = self._load_model(
            AutoModelForCausalLM, pretrained, config, attn_implementation=attn_implementation,
            torch_dtype=torch_dtype, trust_remote_code=trust_remote_code, load_weights=load_weights,
            quantization_config=quantization_config,
        )
        self.hf_model.train()  # from_pretrained returns eval mode; a backbone starts in train mode like any module
        self.attn_implementation = attn_implementation
        self.attention, self.block_size = attention, block_size
        self.converted = attn_implementation in MASKABLE_IMPLEMENTATIONS
        # transformers >= 5.2x names the cache argument `cache` (past_key_values is deprecated there).
        cache_arg = "cache" in inspect.signature(self.hf_model.forward).parameters
        self._cache_argument = "cache" if cache_arg else "past_key_values"
        if self.converted:
            self._make_non_causal()
        self.mask_free_bidirectional = self._mask_free_bidirectional_ok()

        rows = _rows(self.hf_model.get_input_embeddings().weight)
        if vocab_size is not None and vocab_size > rows:
            grow_vocab(self.hf_model, vocab_size)
        self.vocab_size = _rows(self.hf_model.get_input_embeddings().weight)

        self.max_seq_len = _max_seq_len(self.hf_model.config.get_text_config(), max_seq_len)

        self._setup_router_statistics(router_aux_loss_coef)
        # Attention annealing (DiffuLLaMA): the share of the future each query may see under the bidirectional
        # pattern, 1.0 = fully bidirectional; set by dlm.callbacks.attention_annealing.AttentionAnnealing.
        self.bidirectional_fraction = 1.0

        if gradient_checkpointing:
            if hasattr(self.hf_model, "activation_checkpointing_enable"):
                self.hf_model.activation_checkpointing_enable({"use_reentrant": False})
            else:  # transformers before the rename
                self.hf_model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )

    def _load_model(self, auto_class, pretrained, config, *, attn_implementation: str, torch_dtype,
                    trust_remote_code: bool, load_weights: bool, quantization_config: Any = None) -> nn.Module:
        """The wrapped transformers model (a subclass reads other checkpoint layouts: dlm.models.zoo)."""
        return load_hf_model(
            auto_class, pretrained, config, attn_implementation=attn_implementation, torch_dtype=torch_dtype,
            trust_remote_code=trust_remote_code, owner="HFCausalLM", example_types="qwen3, qwen3_moe, llama, gpt2",
            load_weights=load_weights, quantization_config=quantization_config,
        )

    # ---- MoE router statistics -------------------------------------------------------------------------------
    def _setup_router_statistics(self, router_aux_loss_coef: float | None) -> None:
        """MoE: the router's load-balancing loss and per-layer expert load (collected in training forwards)."""
        text_cfg = self.hf_model.config.get_text_config()
        self.num_experts = int(getattr(text_cfg, "num_experts", 0) or 0)
        self.experts_per_token = int(getattr(text_cfg, "num_experts_per_tok", 0) or 0)
        if router_aux_loss_coef is None:
            router_aux_loss_coef = float(getattr(text_cfg, "router_aux_loss_coef", 0.0) or 0.0)
        self.router_aux_loss_coef = float(router_aux_loss_coef) if self.num_experts and self.experts_per_token else 0.0
        self.moe_layers = [  # decoder-layer index of each sparse block, in the order routers report
            int(m.group(1)) for name, mod in self.hf_model.named_modules()
            if "experts" in dict(mod.named_children()) and (m := re.search(r"layers\.(\d+)\.", name + "."))
        ]
        # Router logits come from a hook on each sparse block's router (its `gate`/`router` child), recording only
        # while a training forward runs: asking the model for output_router_logits instead makes transformers
        # compute its own balance loss from attention_mask, which it reads as a 2D padding mask, so every 4D
        # mask (causal, block_causal, packed documents) crashes there.
        routers = [children.get("gate", children.get("router")) for mod in self.hf_model.modules()
                   if "experts" in (children := dict(mod.named_children()))]
        self._router_recorder = _RouterRecorder()
        self._hooked_routers = bool(routers) and None not in routers  # else: output_router_logits
        if self._hooked_routers:
            for gate in routers:
                gate.register_forward_hook(self._router_recorder)
        self._aux_losses: list[Tensor] = []
        self._expert_load: list[Tensor] = []

    def _collect_router_stats(self, router_logits: tuple[Tensor, ...]) -> None:
        """Switch-Transformer load balancing per forward: E * sum_e f_e * P_e averaged over layers, where f_e is
        the share of top-k assignments routed to expert e and P_e its mean router probability (1.0 = balanced).
        Computed here rather than by transformers, whose helper reads a 2D padding mask and our masks are 4D."""
        E, k = self.num_experts, self.experts_per_token
        losses, loads = [], []
        for layer_logits in router_logits:
            probs = layer_logits.float().softmax(-1).reshape(-1, E)
            chosen = probs.topk(k, dim=-1).indices
            share = torch.zeros(E, device=probs.device).scatter_add_(
                0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device)
            ) / chosen.numel()
            losses.append(E * (share * probs.mean(0)).sum())
            loads.append(share.detach())
        self._aux_losses.append(torch.stack(losses).mean())
        self._expert_load.append(torch.stack(loads))

    def pop_aux_loss(self) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The weighted auxiliary loss of the training forwards since the last call (mean over forwards) and
        stats to log: ``moe/balance_loss`` (unweighted, 1.0 = balanced) and per layer ``moe/max_load/layer_{i}``
        (the busiest expert's share of assignments times num_experts: 1.0 = even, num_experts/top_k = collapsed).
        Clears the buffers. (None, {}) when nothing was collected (dense model, eval, coefficient 0)."""
        if not self._aux_losses:
            return None, {}
        balance = torch.stack(self._aux_losses).mean()
        load = torch.stack(self._expert_load).mean(0)  # [layers, E]
        self._aux_losses, self._expert_load = [], []
        stats = {"moe/balance_loss": balance.detach()}
        names = self.moe_layers if len(self.moe_layers) == len(load) else range(len(load))
        for i, layer in zip(names, load):
            stats[f"moe/max_load/layer_{i}"] = layer.max() * self.num_experts
        return self.router_aux_loss_coef * balance, stats

    def _make_non_causal(self) -> None:
        """Switch off causality everywhere transformers reads it; the explicit mask then decides."""
        for module in self.hf_model.modules():
            if isinstance(getattr(module, "is_causal", None), bool):
                module.is_causal = False
        for cfg in {
            id(c): c for c in (self.hf_model.config, self.hf_model.config.get_text_config())
        }.values():
            cfg.is_causal = False

    def _mask_free_bidirectional_ok(self) -> bool:
        """Whether plain bidirectional attention may skip the mask tensor (SDPA then runs mask-free kernels,
        flash included: ~20% faster fwd+bwd than with an all-True mask on an H200 at T=4096).

        Safe when SDPA reads ``module.is_causal`` (False after conversion) and the model builds its masks with
        transformers' own ``masking_utils`` builders, which honour ``config.is_causal = False``.
        """
        if not self.converted or self.attn_implementation != "sdpa":
            return False
        import sys

        from transformers import masking_utils

        modeling = sys.modules.get(type(self.hf_model).__module__)
        honour_is_causal = {
            getattr(masking_utils, n, None)
            for n in ("create_causal_mask", "create_sliding_window_causal_mask", "create_bidirectional_mask")
        }
        builders = [getattr(modeling, n, None) for n in dir(modeling) if n.startswith("create_")]
        builders = [b for b in builders if callable(b) and b.__module__ == masking_utils.__name__]
        return bool(builders) and all(b in honour_is_causal for b in builders)

    def _mask(self, pattern: str, T: int, doc_ids: Tensor | None, device: torch.device) -> Tensor:
        allowed = attention_mask(pattern, T, doc_ids=doc_ids, block_size=self.block_size, device=device)
        if allowed is None:  # plain bidirectional
            allowed = torch.ones(1, 1, T, T, dtype=torch.bool, device=device)
        return self._as_impl_mask(allowed)

    def _as_impl_mask(self, allowed: Tensor) -> Tensor:
        """A boolean mask (True = may attend) in the form the attention implementation takes."""
        return implementation_mask(allowed, self.attn_implementation, self.hf_model.get_input_embeddings().weight.dtype)

    @property
    def capabilities(self) -> BackboneCapabilities:
        # a static cache is attended to under an explicit mask: the converted (sdpa/eager) attention only
        return BackboneCapabilities(logits_at=True, kv_cache=True, static_cache=self.converted)

    def forward(
        self,
        input_ids: Tensor,
        *,
        doc_ids: Tensor | None = None,
        time: Tensor | None = None,
        attention: str | None = None,
        attn_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        logits_at: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """input_ids [B, T] -> logits [B, T, vocab_size] in the model's dtype (and the cache when use_cache).

        Not upcast here: a float32 copy of every position's full-vocabulary logits is B x T x V x 4 bytes (10 GB
        for 16k tokens at Qwen3's 151,936), plus its gradient. Every consumer upcasts what it scores (the masked
        rows in training, one float32 copy for sampling), and bf16 -> float32 is exact, so the numbers are the same.

        ``time`` is ignored (no time conditioning). ``attn_mask``: bool [B|1, 1, T, S] (True = may attend,
        S = cached + T) replacing the pattern's mask; needs sdpa/eager. ``position_ids`` [B|1, T]: default after
        the cached tokens (or per document). ``past_key_values``: a transformers cache (e.g. ``DynamicCache``)
        of earlier tokens; it is appended to when ``use_cache`` and left as it was otherwise.
        ``logits_at``: bool [B, T]: only those positions' logits, [N, V] in ``input_ids[logits_at]``'s order. For
        the types in ``PLAIN_HEAD_MODEL_TYPES`` the decoder runs alone and the output embedding sees only the N
        selected hidden states; any other model computes every position's logits and selects. Not with a cache.
        """
        B, T = input_ids.shape
        check_logits_at(logits_at, input_ids, past_key_values, use_cache)
        pattern = self.attention if attention is None else attention
        if pattern not in PATTERNS:
            raise ValueError(
                f"unknown attention pattern {pattern!r}; valid patterns are {', '.join(PATTERNS)}"
            )
        static = is_static_cache(past_key_values)
        slots = None
        if static:
            slots, position_ids, attn_mask = self._static_cache_inputs(input_ids, pattern, doc_ids, position_ids,
                                                                       attn_mask, past_key_values)
        past = 0 if past_key_values is None or static else int(past_key_values.get_seq_length())
        check_inputs(input_ids, vocab_size=self.vocab_size, max_seq_len=self.max_seq_len, past=past,
                     position_ids=position_ids, doc_ids=doc_ids, attn_mask=None if static else attn_mask)
        if static:
            mask = self._as_impl_mask(attn_mask.expand(B, 1, T, attn_mask.shape[-1]))
        elif attn_mask is not None or past:
            mask = self._cached_mask(pattern, attn_mask, B, T, past, input_ids.device)
        else:
            mask = self._pattern_mask(pattern, doc_ids, B, T, input_ids.device)
        if position_ids is None:
            if doc_ids is not None:
                position_ids = positions_from_doc_ids(doc_ids)
            elif past:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
        kwargs: dict[str, Any] = {}
        if past_key_values is not None or use_cache:
            if past_key_values is None:
                from transformers import DynamicCache

                past_key_values = DynamicCache(config=self.hf_model.config)
            kwargs[self._cache_argument] = past_key_values
            kwargs["cache_position"] = slots if static else torch.arange(past, past + T, device=input_ids.device)
        logits = self._run_model(input_ids, mask, position_ids, logits_at, kwargs)
        if use_cache:
            return logits, past_key_values
        if past_key_values is not None:  # read-only use: drop the tokens this call appended
            past_key_values.crop(-T)
        return logits

    # ---- the steps of forward ------------------------------------------------------------------------------------
    def _static_cache_inputs(self, input_ids: Tensor, pattern: str, doc_ids, position_ids, attn_mask, cache):
        """(slots, position_ids, attn_mask) for a static cache: fixed shapes (dlm.models.kv_cache), every slot
        attended to under a mask built on the device."""
        if not self.converted:
            raise ValueError(
                f"a static KV cache needs a model that takes an explicit attention mask; "
                f"attn_implementation={self.attn_implementation!r} does not: use sdpa or eager"
            )
        if doc_ids is not None:
            raise ValueError("doc_ids cannot be combined with a KV cache: fold documents into attn_mask")
        B, T = input_ids.shape
        check_static_capacity(cache, B, T)
        capacity = cache.get_max_length()
        # the cache's own length as a device tensor (get_seq_length of a static layer): no host sync
        slots = cache.get_seq_length() + torch.arange(T, device=input_ids.device)
        if position_ids is None:
            position_ids = slots[None]
        if attn_mask is None:
            attn_mask = static_cache_mask(pattern, slots, capacity, self.block_size)
        return slots, position_ids, widen_mask(attn_mask, capacity)

    def _cached_mask(self, pattern: str, attn_mask: Tensor | None, B: int, T: int, past: int, device) -> Tensor | None:
        """The mask of T new queries over past + T keys (a growing cache, or an explicit attn_mask)."""
        if not self.converted and (attn_mask is not None or pattern != "causal"):
            raise ValueError(
                f"attn_implementation={self.attn_implementation!r} cannot take a custom attention mask; "
                "use attn_implementation=sdpa or eager"
            )
        if attn_mask is None and self.converted:  # the pattern's rows for the new queries
            allowed = attention_mask(pattern, past + T, block_size=self.block_size, device=device)
            attn_mask = None if allowed is None else allowed[..., past:, :]
            if attn_mask is None:
                attn_mask = torch.ones(1, 1, T, past + T, dtype=torch.bool, device=device)
        return None if attn_mask is None else self._as_impl_mask(attn_mask.expand(B, 1, T, past + T))

    def _pattern_mask(self, pattern: str, doc_ids: Tensor | None, B: int, T: int, device) -> Tensor | None:
        """The mask of a full (uncached) forward under the pattern; None where the model's own kernel decides."""
        if pattern == "bidirectional" and self.bidirectional_fraction < 1.0:
            if not self.converted:
                raise ValueError("attention annealing needs attn_implementation=sdpa or eager")
            allowed = annealed_mask(T, self.bidirectional_fraction, device)
            if doc_ids is not None:
                allowed = allowed & attention_mask("bidirectional", T, doc_ids=doc_ids)
            return self._as_impl_mask(allowed.expand(B, 1, T, T))
        if pattern == "bidirectional" and doc_ids is None and self.mask_free_bidirectional:
            return None  # module.is_causal and config.is_causal are False: no mask, fastest SDPA kernels
        if self.converted:
            return self._mask(pattern, T, doc_ids, device)
        if pattern == "causal" and doc_ids is None:
            return None  # unconverted model: its own causal kernel
        raise ValueError(
            f"attn_implementation={self.attn_implementation!r} cannot take a custom attention mask, so "
            f"attention={pattern!r}{' with doc_ids' if doc_ids is not None else ''} is not supported; "
            "use attn_implementation=sdpa or eager"
        )

    def _run_model(self, input_ids: Tensor, mask, position_ids, logits_at: Tensor | None, kwargs: dict) -> Tensor:
        """The wrapped model's logits (router statistics recorded in a training forward); with ``logits_at`` only
        those positions', the head run on the selected hidden states where the model type allows it."""
        cached = bool(kwargs)
        router = self.training and self.router_aux_loss_coef > 0 and torch.is_grad_enabled()
        if router and self._hooked_routers:
            self._router_recorder.logits = []
        elif router:
            kwargs["output_router_logits"] = True
        head_at_selected = logits_at is not None and self.hf_model.config.model_type in PLAIN_HEAD_MODEL_TYPES
        # the decoder alone (final norm included) when the head runs on selected positions, else the whole model
        run = self.hf_model.base_model if head_at_selected else self.hf_model
        try:
            out = run(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=cached, **kwargs)
        finally:  # stops before backward, so a checkpointed layer's recomputation records nothing
            recorded, self._router_recorder.logits = self._router_recorder.logits, None
        router_logits = tuple(recorded or ()) or (getattr(out, "router_logits", None) if router else None)
        if router_logits:
            self._collect_router_stats(router_logits)
        if head_at_selected:
            return _head_at(self.hf_model.get_output_embeddings(), out.last_hidden_state, logits_at)
        return out.logits if logits_at is None else _rows_at(out.logits, logits_at)

    def get_input_embeddings(self) -> nn.Embedding:
        """The wrapped model's input embedding (what DiffusionBERT's time token hooks into, as on HFMaskedLM)."""
        return self.hf_model.get_input_embeddings()

    def static_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None):
        """An empty transformers ``StaticCache`` of ``capacity`` tokens for ``batch_size`` rows, allocated now (in
        the parameters' dtype and device by default) so that its buffers are marked as static addresses even when
        the first call that writes it runs compiled (see dlm.models.kv_cache)."""
        from transformers import StaticCache

        if not 0 < capacity <= self.max_seq_len:
            raise ValueError(f"a static KV cache needs 0 < capacity <= max_seq_len={self.max_seq_len}, got {capacity}")
        cfg = self.hf_model.config.get_text_config()
        weight = self.hf_model.get_input_embeddings().weight
        cache = StaticCache(config=self.hf_model.config, max_cache_len=capacity)
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache.early_initialization(batch_size, heads, head_dim, dtype or weight.dtype, device or weight.device)
        return cache


# Eager even in a compiled backbone: the number of selected rows changes every step, so the compiled graph ends
# at the decoder's output (one graph, one shape) and the selection runs after it.
@torch.compiler.disable
def _head_at(head: nn.Module, hidden: Tensor, at: Tensor) -> Tensor:
    return head(hidden[at])


@torch.compiler.disable
def _rows_at(logits: Tensor, at: Tensor) -> Tensor:
    return logits[at]


def _check_arguments(attention: str, block_size: int | None, attn_implementation: str) -> None:
    if attention not in PATTERNS:
        raise ValueError(
            f"unknown attention pattern {attention!r}; valid patterns are {', '.join(PATTERNS)}"
        )
    if attention == "block_causal" and not block_size:
        raise ValueError("attention='block_causal' needs a positive block_size; set model.block_size")
    if attn_implementation not in MASKABLE_IMPLEMENTATIONS and attention != "causal":
        raise ValueError(
            f"attn_implementation={attn_implementation!r} cannot take a custom attention mask, so it only "
            f"supports attention='causal' (got {attention!r}); use attn_implementation=sdpa or eager"
        )


def _max_seq_len(hf_cfg, max_seq_len: int | None) -> int:
    """The longest accepted input: the given one (at most a learned position table), else the config's."""
    limit = getattr(hf_cfg, "max_position_embeddings", None) or getattr(hf_cfg, "n_positions", None)
    if max_seq_len is None:
        if limit is None:
            raise ValueError("the HF config has no max_position_embeddings; set model.max_seq_len")
        max_seq_len = int(limit)
    elif getattr(hf_cfg, "n_positions", None) is not None and max_seq_len > hf_cfg.n_positions:
        raise ValueError(
            f"max_seq_len={max_seq_len} exceeds the learned position table (n_positions={hf_cfg.n_positions})"
        )
    return int(max_seq_len)


class _RouterRecorder:
    """Forward hook on MoE routers: appends each router's logits (its first output) while ``logits`` is a list."""

    def __init__(self) -> None:
        self.logits: list[Tensor] | None = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.logits is not None:
            self.logits.append(output[0] if isinstance(output, tuple) else output)


def annealed_mask(T: int, fraction: float, device=None) -> Tensor:
    """Bool [1, 1, T, T] between causal (fraction 0) and bidirectional (fraction 1): query i may attend to keys
    j <= i + ceil(fraction * (T - 1)). A deterministic widening window, so a resumed run sees the same masks."""
    reach = int(math.ceil(max(0.0, min(1.0, fraction)) * (T - 1)))
    pos = torch.arange(T, device=device)
    return (pos[None, :] <= pos[:, None] + reach)[None, None]

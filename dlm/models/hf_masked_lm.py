"""Hugging Face masked LMs (BERT, RoBERTa, ...) as diffusion backbones: the starting point of DiffusionBERT.

``HFMaskedLM`` wraps any ``AutoModelForMaskedLM`` behind the backbone call signature of :mod:`dlm.models`:
``forward(input_ids, *, doc_ids=None, time=None, attention=None) -> float32 logits [B, T, V]``. Encoders are
bidirectional already, so nothing is converted; ``attention`` only accepts ``bidirectional``.

Packed data (``doc_ids``): attention is restricted to each document with an explicit 4D mask ``[B, 1, T, T]``
(boolean for ``sdpa``, additive float for ``eager``; transformers 5.x uses a 4D mask as given) and position ids
restart at every document. This needs a model whose mask is built by transformers' ``masking_utils`` (BERT,
RoBERTa, ... in transformers 5) and ``attn_implementation`` sdpa or eager; otherwise ``doc_ids`` raises an error.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from dlm.models.attention import attention_mask, implementation_mask
from dlm.models.hf import MASKABLE_IMPLEMENTATIONS
from dlm.models.hf_loading import grow_vocab, load_hf_model
from dlm.models.inputs import check_inputs
from dlm.models.transformer import positions_from_doc_ids

# transformers is imported where the encoder is built or masked: start-up of everything else.

__all__ = ["HFMaskedLM"]


class HFMaskedLM(nn.Module):
    """A Hugging Face masked LM as a bidirectional diffusion backbone.

    Args:
        pretrained: hub id or local folder for ``AutoModelForMaskedLM.from_pretrained`` (e.g. ``bert-base-uncased``).
        config: ``{"model_type": ..., **fields}``. Alone: a randomly initialised model (``AutoConfig.for_model``).
            With ``pretrained``: fields overriding the checkpoint's config before the weights load.
        vocab_size: tokenizer size. Larger than the embedding: it grows (new rows = mean of the old rows, for the
            input embedding, an untied output layer and its bias). Smaller: kept as it is.
        attn_implementation: ``sdpa`` (default) or ``eager`` take document masks; others only plain attention.
        torch_dtype: parameter dtype (``bfloat16``, ``float32``, ``auto``...); None = transformers' default.
        max_seq_len: longest accepted input; default the config's ``max_position_embeddings``.
        gradient_checkpointing: activation checkpointing of the encoder layers.
        trust_remote_code: forwarded to transformers.
    """

    time_conditioning = False
    attention = "bidirectional"

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict | None = None,
        vocab_size: int | None = None,
        attn_implementation: str = "sdpa",
        torch_dtype: str | None = None,
        max_seq_len: int | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        conventions: dict | None = None,
    ):
        super().__init__()
        from dlm.models.capabilities import ModelConventions

        self.conventions = ModelConventions.from_config(conventions)  # what the checkpoint brings (its tokenizer)
        from transformers import AutoModelForMaskedLM

        self.hf_model = load_hf_model(
            AutoModelForMaskedLM, pretrained, config, attn_implementation=attn_implementation,
            torch_dtype=torch_dtype, trust_remote_code=trust_remote_code, owner="HFMaskedLM",
            example_types="bert, roberta, distilbert",
        )
        self.attn_implementation = attn_implementation

        rows = self.hf_model.get_input_embeddings().weight.shape[0]
        if vocab_size is not None and vocab_size > rows:
            grow_vocab(self.hf_model, int(vocab_size))  # the same rule as the causal wrapper
        self.vocab_size = int(self.hf_model.get_input_embeddings().weight.shape[0])

        limit = getattr(self.hf_model.config, "max_position_embeddings", None)
        if max_seq_len is None:
            if limit is None:
                raise ValueError("the HF config has no max_position_embeddings; set model.max_seq_len")
            max_seq_len = int(limit)
        elif limit is not None and max_seq_len > limit and self._has_absolute_positions():
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the learned position table ({limit} positions)")
        self.max_seq_len = int(max_seq_len)
        self.supports_doc_mask = self._supports_4d_mask()

        if gradient_checkpointing:
            self.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _has_absolute_positions(self) -> bool:
        return getattr(self.hf_model.config, "position_embedding_type", "absolute") == "absolute"

    def _supports_4d_mask(self) -> bool:
        """Whether an explicit [B, 1, T, T] mask reaches the attention kernels unchanged: sdpa/eager, and the model
        builds its masks with transformers' masking_utils (which pass a 4D mask through)."""
        if self.attn_implementation not in MASKABLE_IMPLEMENTATIONS:
            return False
        from transformers import masking_utils

        modules = {type(m).__module__ for m in self.hf_model.modules()}
        for name in modules:
            module = sys.modules.get(name)
            builders = [getattr(module, n, None) for n in dir(module) if n.startswith("create_")] if module else []
            if any(callable(b) and getattr(b, "__module__", None) == masking_utils.__name__ for b in builders):
                return True
        return False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.hf_model.get_input_embeddings()

    def _doc_mask(self, doc_ids: Tensor) -> Tensor:
        allowed = attention_mask("bidirectional", doc_ids.shape[1], doc_ids=doc_ids)  # [B, 1, T, T] bool
        return implementation_mask(allowed, self.attn_implementation, self.hf_model.get_input_embeddings().weight.dtype)

    def forward(
        self,
        input_ids: Tensor,
        *,
        doc_ids: Tensor | None = None,
        time: Tensor | None = None,
        attention: str | None = None,
    ) -> Tensor:
        """input_ids [B, T] -> float32 logits [B, T, vocab_size]. ``time`` is ignored (no time conditioning)."""
        B, T = input_ids.shape
        if attention not in (None, "bidirectional"):
            raise ValueError(
                f"HFMaskedLM is a bidirectional encoder; attention={attention!r} is not supported "
                "(use a native transformer or HFCausalLM for causal / block-causal patterns)"
            )
        check_inputs(input_ids, vocab_size=self.vocab_size, max_seq_len=self.max_seq_len, doc_ids=doc_ids)
        mask = position_ids = None
        if doc_ids is not None:
            if not self.supports_doc_mask:
                raise ValueError(
                    f"{type(self.hf_model).__name__} with attn_implementation={self.attn_implementation!r} cannot "
                    "take a per-document attention mask, so packed data (doc_ids) is not supported: use "
                    "data.packing=false, or attn_implementation=sdpa/eager on a model whose masks come from "
                    "transformers' masking_utils"
                )
            mask = self._doc_mask(doc_ids)
            position_ids = positions_from_doc_ids(doc_ids)
        out = self.hf_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)
        return out.logits.float()

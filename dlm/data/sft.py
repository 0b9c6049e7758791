"""The data module for supervised fine-tuning on conversations: each conversation through the tokenizer's chat
template (:func:`dlm.data.chat.sft_ids`), the response tokens as ``loss_mask`` (the one mask every family reads:
only those tokens are corrupted and scored, the prompt stays clean context; dlm.methods.base), rows as
:class:`~dlm.data.datamodule.DLMDataModule` serves them (cache, resumable stream, ``packing``).

``eos_loss`` (one conversation per row, ``packing=false``): True, the LLaDA recipe, counts the EOS fill after the
conversation as response, so the model learns where a reply stops (its length) and the sampler can stop there;
False: the fill is clean context without loss (then training never shows a masked tail after a reply, yet
sampling starts from one: the silent-EOS pitfall, ZHZisZZ/dllm#81). With ``packing=true`` there is no fill; the final row's pad never counts.
``completion_only_loss`` (named as TRL's SFTConfig option): True (the default), only the replies count; False, every
token of the conversation counts (the prompt and role headers too: plain language-model training on the rendered
text, e.g. to pretrain a base on the same template before a response-only SFT). The EOS fill follows ``eos_loss``.
The validation bound is averaged over the counted tokens, i.e. per response token, so SFT runs compare across
families.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dlm.data.cache import cache_key
from dlm.data.chat import chat_template_of, sft_ids
from dlm.data.datamodule import DLMDataModule
from dlm.data.packing import pack_chat, pad_each_chat

__all__ = ["ChatDataModule"]

_FORMAT_VERSION = "dlm-chat-v1"


class ChatDataModule(DLMDataModule):
    """A :class:`DLMDataModule` over a conversation source (``conversations(split)``: dlm.data.chat_sources)."""

    def __init__(self, source: Any, tokenizer: Any, eos_loss: bool = True, completion_only_loss: bool = True,
                 **kwargs: Any):
        if not callable(getattr(source, "conversations", None)):
            raise ValueError(f"data.source={source!r} yields documents, not conversations: ChatDataModule needs a chat "
                             "source (dlm.data.chat_sources: ChatDatasetSource, InstructionsSource)")
        super().__init__(source, tokenizer, **kwargs)
        if not isinstance(eos_loss, bool):
            raise ValueError(f"data.eos_loss must be true or false, got {eos_loss!r}")
        self.eos_loss = eos_loss
        if not isinstance(completion_only_loss, bool):
            raise ValueError(f"data.completion_only_loss must be true or false, got {completion_only_loss!r}")
        self.completion_only_loss = completion_only_loss

    def cache_key(self, split: str) -> str:
        return cache_key(
            format=_FORMAT_VERSION,
            source=self.source.fingerprint(),
            tokenizer=self.tokenizer.fingerprint(),
            template=chat_template_of(self.tokenizer) or "plain",
            seq_len=self.seq_len,
            packing=self.packing,
            eos_loss=self.eos_loss,
            completion_only_loss=self.completion_only_loss,
            split=split,
        )

    def _examples(self, split: str, counter: list[int]) -> Iterator[tuple[list[int], list[bool]]]:
        for messages in self.source.conversations(split):
            counter[0] += 1
            ids, response = sft_ids(self.tokenizer, messages)
            yield ids, response if self.completion_only_loss else [True] * len(ids)

    def _build(self, split: str) -> dict[str, np.ndarray]:
        counter = [0]
        examples = self._examples(split, counter)
        try:
            if self.packing:
                return pack_chat(examples, self.seq_len, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
            return pad_each_chat(examples, self.seq_len, self.tokenizer.eos_token_id, eos_loss=self.eos_loss)
        except ValueError as e:
            if counter[0] == 0:
                raise ValueError(f"corpus is empty: the {split!r} split of {self.source!r} has no conversations with "
                                 "an assistant turn; point data.source at chat data") from e
            raise

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", eos_loss={self.eos_loss}, completion_only_loss={self.completion_only_loss})"

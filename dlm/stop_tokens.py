"""Where a generated reply ends: the tokenizer's EOS, and an instruct model's end-of-turn tokens.

An instruct checkpoint ends an assistant turn with its own token, not always the tokenizer's EOS: LLaDA-8B-Instruct
(and LLaDA-1.5) with ``<|eot_id|>`` (its Llama-3 style chat template), Dream-v0-Instruct with ``<|im_end|>`` (Qwen2.5's
ChatML), LLaDA-MoE-Instruct with ``<|role_end|>`` (as ZHZisZZ/dllm's tokenizer setup names them: ``eot_token``). A model
config declares them as token strings (``model.conventions.stop_tokens``, dlm.models.capabilities.ModelConventions);
:func:`stop_ids` resolves them with the run's tokenizer. Every family keeps the set as ``module.stop_ids`` (EOS first)
and uses it wherever generation decides that a row is finished (AR and BD3-LM: the EOS fill after a row's first stop
token); dlm.conversation cuts a reply before its first stop token, so the reply shown and stored never holds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from dlm.errors import UserError


class StopTokenError(UserError):
    """A ``model.conventions.stop_tokens`` entry that is not one token of the tokenizer."""


def stop_ids(tokenizer, tokens: Iterable[str] | None) -> tuple[int, ...]:
    """(EOS id, then each of ``tokens``' ids, duplicates dropped). A token the tokenizer does not have as a single
    token is refused with the field's name."""
    ids = [int(tokenizer.eos_token_id)]
    for token in tokens or ():
        found = _token_id(tokenizer, str(token))
        if found is None:
            raise StopTokenError(f"model.conventions.stop_tokens: {token!r} is not a token of the tokenizer "
                                 f"({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}); list end-of-turn "
                                 f"tokens by their exact text (e.g. '<|eot_id|>'), or drop the field")
        if found not in ids:
            ids.append(found)
    return tuple(ids)


def _token_id(tokenizer, token: str) -> int | None:
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is not None:  # an HF tokenizer: the vocabulary's id, never the unknown token's
        found = hf.convert_tokens_to_ids(token)
        if isinstance(found, int) and found != hf.unk_token_id:
            return found
        return None
    ids = tokenizer.encode(token)  # character / byte tokenizers: a single-symbol token only
    return int(ids[0]) if len(ids) == 1 else None


def is_stop(tokens: Tensor, stops: Sequence[int]) -> Tensor:
    """A bool tensor: where ``tokens`` is one of ``stops``."""
    if len(stops) == 1:
        return tokens == int(stops[0])
    return torch.isin(tokens, torch.tensor(list(stops), dtype=tokens.dtype, device=tokens.device))

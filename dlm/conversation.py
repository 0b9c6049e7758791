"""One assistant reply to a conversation: what ``python -m dlm.chat`` runs each turn and ``python -m dlm.generate
messages=[...]`` runs once.

The conversation is rendered by :func:`dlm.data.chat.chat_ids` (the tokenizer's chat template, else the plain one)
ending in the generation prompt; the family's ``generate(prompt, length, sampler)`` fills ``max_new_tokens``
positions after it, and the reply is what comes before the first stop token: EOS or the model's end-of-turn token
(``module.stop_ids``, from ``model.conventions.stop_tokens``: LLaDA-Instruct's ``<|eot_id|>``, Dream's ``<|im_end|>``;
dlm/stop_tokens.py), which the reply never includes (LLaDA / Dream chat: a fixed-length canvas whose tail the model
fills with EOS). An observer (``on_step``) sees the reply's positions after every sampler step
(:attr:`dlm.sampling.Sampler.on_step`) for a live view.

:func:`load_chat_model` is the one call that gives (module, tokenizer, sampler config) from a run folder
(:func:`dlm.run.load_run`); :func:`chat_model_of` wraps a module loaded any other way (its checkpoint's sampler
convention as the sampler config).
"""

from __future__ import annotations

import copy
import inspect
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlm.data.chat import ChatError, chat_ids, check_messages
from dlm.errors import UserError
from dlm.sampling.base import cut_at_eos

__all__ = ["ChatModel", "ConversationTooLong", "Reply", "chat_model_of", "chat_sampler", "fit_history", "generate_reply",
           "load_chat_model", "parse_messages", "render_partial", "reply_stops"]

MESSAGES_FORM = """messages='[{"role": "user", "content": "..."}]'"""


class ConversationTooLong(UserError):
    """The newest message and the reply's positions do not fit in the model's maximum sequence length."""


@dataclass
class ChatModel:
    """What a chat talks to: the family module (eval mode, weights loaded), its tokenizer, and the sampler config it
    was trained with (None: the family's own default sampler object, ``module.sampler``)."""

    module: Any
    tokenizer: Any
    sampler_cfg: dict | None
    source: Path  # where it came from (a run folder)

    @property
    def max_len(self) -> int | None:
        return getattr(self.module.backbone, "max_seq_len", None)


def load_chat_model(run: str | Path, ckpt: str = "last", device: str = "cpu", use_ema: bool = True) -> ChatModel:
    """The module, tokenizer and sampler config of a run folder (or a .ckpt inside one), in one call."""
    from dlm.run import load_run, plain

    loaded = load_run(run, ckpt=ckpt, device=device, setup_data=False, use_ema=use_ema)
    return ChatModel(loaded.module, loaded.datamodule.tokenizer, plain(loaded.cfg.get("sampler")), loaded.run_dir)


def chat_model_of(module, tokenizer, source: str | Path, sampler_cfg: dict | None = None) -> ChatModel:
    """A ChatModel around a module built elsewhere (e.g. straight from a model config, no run folder): the sampler
    config given, else the checkpoint's own convention (``conventions.sampler`` with ``sampler_fields`` over it,
    dlm.models.capabilities), else None (the module's sampler as it is)."""
    if sampler_cfg is None:
        from dlm.build import sampler_config
        from dlm.models.capabilities import conventions_of

        conv = conventions_of(module.backbone)
        if conv.sampler is not None:
            sampler_cfg = {**sampler_config(conv.sampler), **(conv.sampler_fields or {})}
    return ChatModel(module, tokenizer, sampler_cfg, Path(source))


def chat_sampler(model: ChatModel, steps: int | None = None, temperature: float | None = None,
                 block_length: int | None = None):
    """The model's sampler with the chat's settings over it (None keeps the sampler's own value); a value the
    sampler refuses is a :class:`~dlm.config.ConfigError` naming it."""
    from hydra.utils import get_class

    from dlm.build import build_sampler
    from dlm.config import ConfigError

    fields = {k: v for k, v in (("temperature", temperature), ("block_length", block_length)) if v is not None}
    if model.sampler_cfg is None:  # a family default object: nothing to rebuild it from
        if steps is not None or fields:
            raise ConfigError([f"this run configures no sampler ({model.module.sampler!r} is the family's own): "
                               f"steps / temperature / block_length cannot be set"])
        return copy.copy(model.module.sampler)
    if block_length is not None:
        cls = get_class(model.sampler_cfg["_target_"])
        if "block_length" not in inspect.signature(cls).parameters:
            raise ConfigError([f"block_length={block_length}: the run's sampler {cls.__name__} has no block length "
                               f"(the confidence samplers, threshold and entropy_bounded have one); leave it null"])
    return build_sampler(model.sampler_cfg, steps, fields)


def parse_messages(value: Any, where: str = "messages") -> list[dict[str, str]]:
    """A conversation from the command line (JSON text) or a config (a list); a :class:`ChatError` otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ChatError(f"{where}: not JSON ({err.msg} at character {err.pos}); write {MESSAGES_FORM}") from None
    elif not isinstance(value, (list, tuple, Mapping)):
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (ListConfig, DictConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    messages = check_messages(value, where)
    if not messages:
        raise ChatError(f"{where}: the conversation is empty; write {MESSAGES_FORM}")
    return messages


def fit_history(tokenizer, messages: list[dict[str, str]], budget: int | None) -> list[dict[str, str]]:
    """The newest turns whose rendering fits ``budget`` tokens (system messages kept); earlier turns are dropped
    oldest first. Raises :class:`ConversationTooLong` when even the newest message does not fit."""
    if budget is None:
        return messages
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    while turns:
        kept = system + turns
        if len(chat_ids(tokenizer, kept, add_generation_prompt=True)) <= budget:
            return kept
        turns = turns[1:]
    raise ConversationTooLong(f"the message does not fit in the model's context: it leaves no room for the reply "
                              f"within {budget} prompt tokens; write a shorter one or lower max_new_tokens")


def reply_stops(model: ChatModel) -> tuple[int, ...]:
    """The tokens that end a reply: the module's ``stop_ids`` (EOS first, then the model's end-of-turn tokens)."""
    return tuple(getattr(model.module, "stop_ids", None) or (int(model.tokenizer.eos_token_id),))


def render_partial(tokenizer, ids: list[int], mask_id: int, eos_id: int | Sequence[int],
                   placeholder: str = "·") -> str:
    """Text of a partly denoised reply: masked positions as ``placeholder``, runs of known tokens decoded together
    (subword tokenizers join pieces within a run), everything from the first stop token on cut (``eos_id``: the
    EOS id, or every stop id)."""
    ids = cut_at_eos(ids, eos_id)
    out, run = [], []
    for i in ids:
        if i == mask_id:
            if run:
                out.append(tokenizer.decode(run))
                run = []
            out.append(placeholder)
        else:
            run.append(i)
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)


@dataclass
class Reply:
    text: str
    ids: list[int]  # the reply's tokens, before its stop token
    network_calls: int
    seconds: float  # generation time, the observer's own time left out
    positions: int  # positions generated (max_new_tokens)
    stopped: bool  # a stop token (EOS or end of turn) ended the reply (False: it ran to max_new_tokens)

    @property
    def tokens(self) -> int:
        """The reply's tokens, its stop token counted: what tokens/s is reported over."""
        return len(self.ids) + int(self.stopped)


def generate_reply(model: ChatModel, messages: list[dict[str, str]], sampler, max_new_tokens: int,
                   generator: torch.Generator | None = None,
                   on_step: Callable[[Tensor], None] | None = None) -> Reply:
    """The assistant's next reply to ``messages`` (rendered with the generation prompt): ``max_new_tokens``
    positions generated, cut before the first stop token (:func:`reply_stops`). ``on_step`` sees the reply's positions (``[T]`` ids, masked ones
    as the mask id) after every sampler step."""
    module, tok = model.module, model.tokenizer
    ids = chat_ids(tok, messages, add_generation_prompt=True)
    P, stops = len(ids), reply_stops(model)
    prompt = torch.tensor([ids], dtype=torch.long)
    sampler = sampler if sampler is not None else module.sampler
    observed = [0.0]
    if not hasattr(sampler, "on_step"):  # a sampler object without the hook: nothing to observe, the reply as usual
        on_step = None
    if on_step is not None:

        def observe(x: Tensor) -> None:
            started = time.perf_counter()
            on_step(x[0, P:].cpu())
            observed[0] += time.perf_counter() - started

        sampler.on_step = observe
    started = time.perf_counter()
    try:
        gen = module.generate(prompt, int(max_new_tokens), sampler=sampler, generator=generator)
    finally:
        if on_step is not None:
            sampler.on_step = None
    seconds = time.perf_counter() - started - observed[0]
    tail = gen.tokens[0, P:].tolist()
    reply_ids = cut_at_eos(tail, stops)
    return Reply(tok.decode(reply_ids), reply_ids, int(gen.num_network_calls), seconds, int(max_new_tokens),
                 len(reply_ids) < len(tail))

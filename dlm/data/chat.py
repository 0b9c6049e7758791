"""Chat conversations as token ids: the tokenizer's own chat template (``apply_chat_template``) when it has one, else a
plain built-in template that any tokenizer can encode.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``. The plain template writes each
turn as ``"<role>: <content>\\n"`` and ends every assistant turn with the tokenizer's EOS id (not text: a character
tokenizer has no spelling for it), so that a model trained on it learns where a reply stops; the generation prompt
is ``"assistant: "``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dlm.errors import UserError

ROLES = ("system", "user", "assistant")
PLAIN_GENERATION_PROMPT = "assistant: "


class ChatError(UserError, ValueError):
    """A conversation that is not a list of {role, content} messages with known roles."""


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """The conversation as plain dicts; a clear error naming ``where`` when it is malformed."""
    if isinstance(messages, Mapping) or not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ChatError(f"{where}: expected a list of {{role, content}} messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatError(f"{where}[{i}]: expected {{role: ..., content: ...}}, got {m!r}")
        if m["role"] not in ROLES:
            raise ChatError(f"{where}[{i}].role={m['role']!r}: must be one of {', '.join(ROLES)}")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    return out


def chat_template_of(tokenizer) -> str | None:
    """The tokenizer's own chat template (a jinja string), or None when it has none (then the plain one is used)."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    return getattr(hf, "chat_template", None) if hf is not None else None


def prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """A prompt's token ids: one user message under the tokenizer's chat template when ``chat`` (an instruct model's
    convention; d1 and dlm.generate send prompts so), else the plain text; an empty prompt is no message."""
    if chat and text:
        return chat_ids(tokenizer, [{"role": "user", "content": text}])
    return tokenizer.encode(text)


def chat_ids(tokenizer, messages, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template (or the plain one); with
    ``add_generation_prompt`` they end where the assistant's next reply begins."""
    messages = check_messages(messages)
    if chat_template_of(tokenizer) is not None:
        ids = tokenizer.hf_tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
        if isinstance(ids, Mapping):  # transformers versions differ in what tokenize=True returns
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    ids: list[int] = []
    for m in messages:
        ids += tokenizer.encode(f"{m['role']}: ") + tokenizer.encode(m["content"])
        if m["role"] == "assistant":
            ids.append(int(tokenizer.eos_token_id))
        ids += tokenizer.encode("\n")
    if add_generation_prompt:
        ids += tokenizer.encode(PLAIN_GENERATION_PROMPT)
    return ids


class TemplateError(ChatError):
    """A chat template whose rendering of a conversation's first turns is not a prefix of the whole conversation's:
    the reply spans of SFT cannot be read off it."""


def sft_ids(tokenizer, messages) -> tuple[list[int], list[bool]]:
    """A conversation encoded for supervised fine-tuning: its token ids (exactly ``chat_ids(tokenizer, messages,
    add_generation_prompt=False)``) and a per-token response mask, True on every assistant reply, False on
    everything else (system, user turns and the template's own role headers: the context).

    Reply ``i``'s span runs from the end of the rendering of ``messages[:i]`` with the generation prompt to the end
    of the rendering of ``messages[:i+1]``: so it holds the reply and whatever the template closes a turn with (the
    end-of-turn token, the plain template's EOS), which the model must learn to emit. Multi-turn: every assistant
    turn is supervised, earlier turns are context (TRL's ``assistant_only_loss``, LLaDA's SFT guideline, which
    conditions on the prompt and noises the response only). A template whose partial renderings are not prefixes
    of the full one (some "thinking" templates drop earlier turns' reasoning) is refused: its spans are undefined.
    """
    messages = check_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError("messages: a conversation for SFT needs at least one assistant turn (the supervised reply)")
    ids = chat_ids(tokenizer, messages, add_generation_prompt=False)
    response = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = chat_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else \
            _generation_prompt(tokenizer)
        upto = chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if ids[: len(upto)] != upto or upto[: len(head)] != head:
            raise TemplateError(
                f"the chat template of {tokenizer!r} renders turn {i} differently inside the whole conversation: "
                "its reply span is undefined; use a template whose renderings of earlier turns are prefixes "
                "(or a tokenizer without one: the plain template)"
            )
        for j in range(len(head), len(upto)):
            response[j] = True
    return ids, response


def _generation_prompt(tokenizer) -> list[int]:
    """What precedes a reply that opens the conversation: the generation prompt of an empty history."""
    if chat_template_of(tokenizer) is None:
        return tokenizer.encode(PLAIN_GENERATION_PROMPT)
    return chat_ids(tokenizer, [], add_generation_prompt=True)

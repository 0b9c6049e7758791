"""Conversation sources for supervised fine-tuning. Each has ``conversations(split) -> Iterable[list[message]]``
(split: 'train' or 'val'; a message is ``{"role", "content"}``), ``fingerprint() -> str`` (cache keys) and ``task``
(the InstructionsTask of the embedded data, None otherwise): the conversation counterpart of dlm.data.sources.

:class:`ChatDatasetSource` reads local JSONL/JSON/Parquet files and Hugging Face datasets by name through one
loader (``datasets.load_dataset``), and maps a row to a conversation in one of two ways:

* ``messages_field`` (default ``messages``): a list of ``{role, content}`` (Tulu 3, UltraChat 200k, OpenHermes
  after ``role_key``/``content_key``/``role_map``, e.g. ShareGPT's ``from``/``value`` with ``{human: user, gpt:
  assistant}``);
* ``prompt`` and ``response``: Python format strings over the row's fields (``"{question}"`` and
  ``"{deepseek_thinking_trajectory}\\n\\nAnswer: {deepseek_attempt}"`` for s1K-1.1), one user turn and one reply;
  ``system`` prepends a system turn.

Nothing is read at construction (configs instantiate offline); rows are loaded on the first ``conversations()``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

from dlm.config_values import to_plain
from dlm.data.arithmetic import _split_name
from dlm.data.chat import ChatError, check_messages
from dlm.data.hub import dataset_problem
from dlm.data.instructions import InstructionsTask
from dlm.data.sources import _local_file_stats

__all__ = ["ChatDatasetSource", "InstructionsSource"]

# local files by extension: the datasets builder that reads them
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class InstructionsSource:
    """The embedded instruction task (see :mod:`dlm.data.instructions`); ``.task`` is the InstructionsTask."""

    def __init__(self, **task_kwargs):
        self.task = InstructionsTask(**task_kwargs)

    def conversations(self, split: str) -> list[list[dict[str, str]]]:
        return self.task.conversations(split)

    def fingerprint(self) -> str:
        return self.task.fingerprint()

    def __repr__(self) -> str:
        return f"InstructionsSource({self.task!r})"


class ChatDatasetSource:
    """Conversations from local files (``data_files``, path null: the builder follows the extension) or an HF
    dataset (``path``). ``val_split`` null: the first ``max_val_conversations`` of ``split`` are held out and
    training starts after them (as :class:`dlm.data.sources.HFDatasetSource`)."""

    task = None

    def __init__(
        self,
        path: str | None = None,
        data_files: Any = None,
        name: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        messages_field: str = "messages",
        role_key: str = "role",
        content_key: str = "content",
        role_map: Mapping[str, str] | None = None,
        prompt: str | None = None,
        response: str | None = None,
        system: str | None = None,
        streaming: bool = False,
        max_train_conversations: int | None = None,
        max_val_conversations: int = 256,
        **load_kwargs: Any,
    ):
        self.data_files = to_plain(data_files)
        if path is None:
            path = self._builder(self.data_files)
        if (prompt is None) != (response is None):
            raise ChatError("ChatDatasetSource: give both `prompt` and `response` (format strings over a row's "
                            "fields, e.g. prompt='{question}' response='{answer}'), or neither (messages_field)")
        if int(max_val_conversations) < 1:
            raise ValueError(f"ChatDatasetSource: max_val_conversations must be >= 1, got {max_val_conversations}")
        self.path, self.name, self.split, self.val_split = path, name, split, val_split
        self.messages_field, self.role_key, self.content_key = messages_field, role_key, content_key
        self.role_map = dict(to_plain(role_map) or {})
        self.prompt, self.response, self.system = prompt, response, system
        self.streaming = bool(streaming)
        self.max_train = None if max_train_conversations is None else int(max_train_conversations)
        self.max_val = int(max_val_conversations)
        self.load_kwargs = to_plain(load_kwargs)

    @staticmethod
    def _builder(data_files: Any) -> str:
        files = [data_files] if isinstance(data_files, str) else \
            [f for v in (data_files.values() if isinstance(data_files, dict) else data_files or [])
             for f in ([v] if isinstance(v, str) else v)]
        exts = {os.path.splitext(str(f))[1].lower() for f in files}
        if not files or len(exts) != 1 or next(iter(exts)) not in _BUILDERS:
            raise ChatError(f"data.source.data_files={data_files!r}: give .jsonl, .json or .parquet files (one kind), "
                            "or a dataset name as data.source.path")
        return _BUILDERS[exts.pop()]

    def hub_problem(self) -> str | None:
        """Why this dataset cannot be loaded here (offline, not cached), or None; local files never have one."""
        return None if self.path in _BUILDERS.values() else dataset_problem(self.path)

    def _rows(self, split: str) -> Iterator[Mapping[str, Any]]:
        import datasets  # lazily: start-up: HF datasets is a slow import, needed by this source only

        kwargs = dict(self.load_kwargs)
        if self.data_files is not None:
            kwargs["data_files"] = self.data_files
        try:
            ds = datasets.load_dataset(self.path, self.name, split=split, streaming=self.streaming, **kwargs)
        except Exception as e:
            if hasattr(e, "add_note"):
                e.add_note(f"ChatDatasetSource: load_dataset({self.path!r}, name={self.name!r}, split={split!r}) "
                           "failed; check data.source.path/data_files/split (offline: the dataset must be cached)")
            raise
        yield from ds

    def to_messages(self, row: Mapping[str, Any], where: str) -> list[dict[str, str]]:
        """A row as a conversation, by ``prompt``/``response`` or ``messages_field`` (see the module docstring)."""
        if self.prompt is not None:
            try:
                msgs = [{"role": "user", "content": self.prompt.format(**row)},
                        {"role": "assistant", "content": self.response.format(**row)}]
            except KeyError as e:
                raise ChatError(f"{where}: data.source.prompt/response name the field {e.args[0]!r}, which the row "
                                f"does not have; its fields: {sorted(row)}") from None
        else:
            if self.messages_field not in row:
                raise ChatError(f"{where}: no field {self.messages_field!r} (data.source.messages_field); the row's "
                                f"fields: {sorted(row)}; or map fields with data.source.prompt/response")
            msgs = []
            for m in row[self.messages_field] or []:
                if not isinstance(m, Mapping) or self.role_key not in m or self.content_key not in m:
                    raise ChatError(f"{where}: a message {m!r} lacks {self.role_key!r}/{self.content_key!r} "
                                    "(data.source.role_key/content_key)")
                msgs.append({"role": self.role_map.get(m[self.role_key], m[self.role_key]),
                             "content": m[self.content_key]})
        if self.system is not None and not (msgs and msgs[0]["role"] == "system"):
            msgs.insert(0, {"role": "system", "content": self.system})
        return check_messages(msgs, where=where)

    def _conversations(self, split: str) -> Iterator[list[dict[str, str]]]:
        for i, row in enumerate(self._rows(split)):
            msgs = self.to_messages(row, where=f"{self.path} {split}[{i}]")
            if any(m["role"] == "assistant" for m in msgs):  # nothing to supervise otherwise
                yield msgs

    def conversations(self, split: str) -> Iterable[list[dict[str, str]]]:
        if _split_name(split) == "val":
            return list(islice(self._conversations(self.split if self.val_split is None else self.val_split),
                               self.max_val))
        it = self._conversations(self.split)
        if self.val_split is None:
            it = islice(it, self.max_val, None)
        return it if self.max_train is None else islice(it, self.max_train)

    def fingerprint(self) -> str:
        blob = json.dumps({k: v for k, v in vars(self).items()} | {"local": _local_file_stats(self.data_files)},
                          sort_keys=True, default=str)
        return "chat_dataset:" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"ChatDatasetSource({self.path!r}, data_files={self.data_files!r}, split={self.split!r})"

"""Turn tokenised documents into fixed-length rows.

Both functions return a dict of numpy arrays with ``N`` rows of ``seq_len`` tokens plus a 0-d int64
``num_truncated`` entry (documents cut short; always 0 for ``pack``).

``pack`` (packing=True): documents are concatenated, each followed by EOS, and cut into rows of exactly
``seq_len``.  ``doc_ids`` numbers documents inside each row starting from 0; a document cut across a row
boundary continues in the next row as that row's doc 0.  The final partial row is filled with ``pad_id``;
those positions have ``loss_mask=False`` and get their own doc id (last doc id + 1) so document-masked
attention keeps them apart from real text.

``pad_each`` (packing=False, LLaDA style): one document per row, ``doc + [eos]`` followed by EOS fill.
``loss_mask`` is True everywhere -- on the document, its first EOS and the EOS fill -- so the model learns
where documents end (i.e. their length).  Documents longer than ``seq_len - 1`` are truncated to
``seq_len - 1`` tokens (the row still ends with EOS) and counted in ``num_truncated``.  There is no
``doc_ids`` key (and no padding: it takes no ``pad_id``).

Chat (SFT) rows take ``(ids, response_mask)`` pairs (:func:`dlm.data.chat.sft_ids`) and set ``loss_mask`` to the
response tokens only, so the prompt stays clean context in every family (see dlm.methods.base):

``pad_each_chat``: one conversation per row, EOS fill; ``eos_loss=True`` (LLaDA) also counts the fill, so the model
learns where a reply stops; ``eos_loss=False``: the fill is clean context with no loss.  ``pack_chat``: conversations
concatenated (the template closes each turn itself: no separator added), ``doc_ids`` as in ``pack``, the final
row's pad carries no loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["pack", "pack_chat", "pad_each", "pad_each_chat"]


def _check(seq_len: int, eos_id: int, pad_id: int = 0) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(
            f"seq_len must be an int >= 2 (room for at least one token and EOS), got {seq_len!r}"
        )
    for name, v in (("eos_id", eos_id), ("pad_id", pad_id)):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")


def pack(
    token_docs: Iterable[Sequence[int]], seq_len: int, eos_id: int, pad_id: int
) -> dict[str, np.ndarray]:
    _check(seq_len, eos_id, pad_id)
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    eos = np.array([eos_id], dtype=np.int64)
    for doc in token_docs:
        a = np.asarray(doc, dtype=np.int64).reshape(-1)
        chunks.append(a)
        chunks.append(eos)
        lengths.append(a.size + 1)
    if not lengths:
        raise ValueError("pack: no documents to pack (the corpus/split is empty)")
    flat = np.concatenate(chunks)
    doc_index = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    total = flat.size
    n_rows = -(-total // seq_len)
    padded = n_rows * seq_len
    input_ids = np.full(padded, pad_id, dtype=np.int64)
    input_ids[:total] = flat
    loss_mask = np.zeros(padded, dtype=bool)
    loss_mask[:total] = True
    doc_g = np.empty(padded, dtype=np.int64)
    doc_g[:total] = doc_index
    doc_g[total:] = len(lengths)  # pad positions: one extra "document"
    doc_g = doc_g.reshape(n_rows, seq_len)
    doc_ids = (doc_g - doc_g[:, :1]).astype(np.int32)
    return {
        "input_ids": input_ids.reshape(n_rows, seq_len),
        "doc_ids": doc_ids,
        "loss_mask": loss_mask.reshape(n_rows, seq_len),
        "num_truncated": np.array(0, dtype=np.int64),
    }


def pad_each(token_docs: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> dict[str, np.ndarray]:
    _check(seq_len, eos_id)
    rows: list[np.ndarray] = []
    truncated = 0
    keep = seq_len - 1
    for doc in token_docs:
        a = np.asarray(doc, dtype=np.int64).reshape(-1)
        if a.size > keep:
            truncated += 1
            a = a[:keep]
        row = np.full(seq_len, eos_id, dtype=np.int64)
        row[: a.size] = a
        rows.append(row)
    if not rows:
        raise ValueError("pad_each: no documents (the corpus/split is empty)")
    input_ids = np.stack(rows)
    return {
        "input_ids": input_ids,
        "loss_mask": np.ones_like(input_ids, dtype=bool),
        "num_truncated": np.array(truncated, dtype=np.int64),
    }


def pad_each_chat(
    examples: Iterable[tuple[Sequence[int], Sequence[bool]]], seq_len: int, eos_id: int, eos_loss: bool = True
) -> dict[str, np.ndarray]:
    _check(seq_len, eos_id, 0)
    ids_rows: list[np.ndarray] = []
    mask_rows: list[np.ndarray] = []
    truncated = 0
    keep = seq_len - 1  # as pad_each: a row always ends with at least one EOS
    for ids, response in examples:
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        r = np.asarray(response, dtype=bool).reshape(-1)
        if a.size != r.size:
            raise ValueError(f"pad_each_chat: {a.size} ids but {r.size} response-mask entries")
        if a.size > keep:
            truncated += 1
            a, r = a[:keep], r[:keep]
        row = np.full(seq_len, eos_id, dtype=np.int64)
        row[: a.size] = a
        mask = np.full(seq_len, bool(eos_loss))
        mask[: a.size] = r
        ids_rows.append(row)
        mask_rows.append(mask)
    if not ids_rows:
        raise ValueError("pad_each_chat: no conversations (the corpus/split is empty)")
    return {
        "input_ids": np.stack(ids_rows),
        "loss_mask": np.stack(mask_rows),
        "num_truncated": np.array(truncated, dtype=np.int64),
    }


def pack_chat(
    examples: Iterable[tuple[Sequence[int], Sequence[bool]]], seq_len: int, eos_id: int, pad_id: int
) -> dict[str, np.ndarray]:
    _check(seq_len, eos_id, pad_id)
    ids_parts: list[np.ndarray] = []
    mask_parts: list[np.ndarray] = []
    lengths: list[int] = []
    for ids, response in examples:
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        r = np.asarray(response, dtype=bool).reshape(-1)
        if a.size != r.size:
            raise ValueError(f"pack_chat: {a.size} ids but {r.size} response-mask entries")
        ids_parts.append(a)
        mask_parts.append(r)
        lengths.append(a.size)
    if not lengths:
        raise ValueError("pack_chat: no conversations to pack (the corpus/split is empty)")
    total = sum(lengths)
    n_rows = -(-total // seq_len)
    padded = n_rows * seq_len
    input_ids = np.full(padded, pad_id, dtype=np.int64)
    input_ids[:total] = np.concatenate(ids_parts)
    loss_mask = np.zeros(padded, dtype=bool)
    loss_mask[:total] = np.concatenate(mask_parts)
    doc_g = np.full(padded, len(lengths), dtype=np.int64)  # pad positions: one extra "document"
    doc_g[:total] = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    doc_g = doc_g.reshape(n_rows, seq_len)
    return {
        "input_ids": input_ids.reshape(n_rows, seq_len),
        "doc_ids": (doc_g - doc_g[:, :1]).astype(np.int32),
        "loss_mask": loss_mask.reshape(n_rows, seq_len),
        "num_truncated": np.array(0, dtype=np.int64),
    }

"""LightningDataModule for diffusion LM training, with a resumable, infinite train stream.

Batches are dicts of tensors:

* ``input_ids``  LongTensor [B, T]
* ``loss_mask``  BoolTensor [B, T]
* ``doc_ids``    LongTensor [B, T] -- only when ``packing=True`` (use document-masked attention then)

Train order: ``ResumableRandomSampler`` defines a global, infinite sample stream in which the k-th sample
is row ``perm(seed, epoch=k // num_rows)[k % num_rows]``.  ``train_dataloader()`` starts the stream at
``trainer.global_step * batch_size * accumulate_grad_batches * world_size`` when a trainer is attached, so
a run resumed from a checkpoint at step ``s`` sees exactly the batches an uninterrupted run would have seen.
With several ranks, rank ``r`` takes global samples ``start + r, start + r + world_size, ...``.

The train loader wraps an ``IterableDataset`` that yields whole batches (so Lightning does not replace the
sampler with a DistributedSampler, and one fancy-index gathers a batch).  It never ends: train with
``max_steps`` and an integer ``val_check_interval`` (steps).  The val loader is finite and in fixed order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from torch.utils.data._utils.collate import default_collate

from dlm.data.cache import cache_key, load_or_build
from dlm.data.hub import HubUnavailableError
from dlm.data.packing import pack, pad_each
from dlm.data.tokenizers import check_special_ids
from dlm.errors import UserError

# Lightning's rank-zero warning is imported where it is used: the data module's readers run without it.

__all__ = ["DLMDataModule", "ResumableRandomSampler"]

_FORMAT_VERSION = "dlm-data-v1"
_ENCODE_CHUNK = 1024


class ResumableRandomSampler(Sampler[int]):
    """Infinite sampler: the k-th index is ``perm(seed, k // num_rows)[k % num_rows]``, starting at ``start``.

    ``rank``/``world_size`` stride the global stream (rank r yields global samples
    ``start + r + world_size * i``).  Started at ``k`` it yields exactly the stream from 0 after skipping k.
    """

    def __init__(self, num_rows: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1):
        if int(num_rows) < 1:
            raise ValueError(f"ResumableRandomSampler needs num_rows >= 1, got {num_rows}")
        if int(start) < 0:
            raise ValueError(f"ResumableRandomSampler: start must be >= 0, got {start}")
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"ResumableRandomSampler: need 0 <= rank < world_size, got {rank}, {world_size}")
        self.num_rows = int(num_rows)
        self.seed = int(seed)
        self.start = int(start)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._perms: dict[int, np.ndarray] = {}

    def perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            if len(self._perms) >= 4:
                self._perms.clear()
            p = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_rows)
            self._perms[epoch] = p
        return p

    def index_at(self, k: int) -> int:
        """Row index of global sample ``k``."""
        return int(self.perm(k // self.num_rows)[k % self.num_rows])

    def indices(self, i0: int, n: int) -> np.ndarray:
        """Rows for this rank's local samples ``i0 .. i0+n-1`` (vectorised)."""
        pos = self.start + self.rank + self.world_size * np.arange(i0, i0 + n, dtype=np.int64)
        epochs = pos // self.num_rows
        offs = pos % self.num_rows
        out = np.empty(n, dtype=np.int64)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self.perm(e)[offs[sel]]
        return out

    def __iter__(self) -> Iterator[int]:
        i = 0
        chunk = 1024
        while True:
            yield from self.indices(i, chunk).tolist()
            i += chunk


def _batch(arrays: dict[str, np.ndarray], idx: Any) -> dict[str, torch.Tensor]:
    out = {
        "input_ids": torch.from_numpy(np.ascontiguousarray(arrays["input_ids"][idx], dtype=np.int64)),
        "loss_mask": torch.from_numpy(np.ascontiguousarray(arrays["loss_mask"][idx], dtype=bool)),
    }
    if "doc_ids" in arrays:
        out["doc_ids"] = torch.from_numpy(np.ascontiguousarray(arrays["doc_ids"][idx], dtype=np.int64))
    return out


def _collate(data: Any) -> Any:
    """Batches from ``__getitems__`` / the train stream are already dicts of tensors."""
    if isinstance(data, dict):
        return data
    return default_collate(data)


class _Rows(Dataset):
    """Map-style dataset over row arrays; ``__getitems__`` gathers a whole batch at once."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return int(self.arrays["input_ids"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return _batch(self.arrays, int(i))

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return _batch(self.arrays, np.asarray(indices, dtype=np.int64))


class _TrainStream(IterableDataset):
    """Infinite stream of batches in ``sampler`` order; dataloader workers take batches round-robin,
    which the DataLoader re-interleaves in order, so the order does not depend on ``num_workers``."""

    def __init__(self, arrays: dict[str, np.ndarray], sampler: ResumableRandomSampler, batch_size: int):
        self.arrays = arrays
        self.sampler = sampler
        self.batch_size = int(batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        j = wid
        while True:
            idx = self.sampler.indices(j * self.batch_size, self.batch_size)
            yield _batch(self.arrays, idx)
            j += nw


class DLMDataModule(L.LightningDataModule):
    """Tokenises a source (through an on-disk cache) into fixed-length rows and serves batches.

    ``packing=False``: one document per row, EOS-filled, loss on everything (see ``dlm.data.packing``).
    ``packing=True``: documents concatenated with EOS separators, ``doc_ids`` provided.
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Any,
        seq_len: int = 32,
        batch_size: int = 64,
        packing: bool = False,
        num_workers: int = 0,
        cache_dir: str | None = ".cache/dlm/data",
        seed: int = 0,
        val_batch_size: int | None = None,
    ):
        super().__init__()
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(
                f"seq_len must be an int >= 2 (each row needs at least one token and an EOS), got {seq_len!r}"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if val_batch_size is not None and (not isinstance(val_batch_size, int) or val_batch_size < 1):
            raise ValueError(
                f"val_batch_size must be an int >= 1 or None (= batch_size), got {val_batch_size!r}"
            )
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.packing = bool(packing)
        self.num_workers = int(num_workers)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.seed = int(seed)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else self.batch_size
        self.task = getattr(source, "task", None)
        self.train_data: dict[str, np.ndarray] | None = None
        self.val_data: dict[str, np.ndarray] | None = None
        self.num_truncated: dict[str, int] = {}
        self.train_sampler: ResumableRandomSampler | None = None

    # -- building -----------------------------------------------------------------------------------------
    def cache_key(self, split: str) -> str:
        return cache_key(
            format=_FORMAT_VERSION,
            source=self.source.fingerprint(),
            tokenizer=self.tokenizer.fingerprint(),
            seq_len=self.seq_len,
            packing=self.packing,
            split=split,
        )

    def _token_docs(self, split: str, counter: list[int]) -> Iterator[np.ndarray]:
        tok = self.tokenizer
        buf: list[str] = []
        for doc in self.source.documents(split):
            buf.append(doc)
            if len(buf) >= _ENCODE_CHUNK:
                for ids in tok.encode_batch(buf) if hasattr(tok, "encode_batch") else map(tok.encode, buf):
                    counter[0] += 1
                    yield np.asarray(ids, dtype=np.int64)
                buf = []
        if buf:
            for ids in tok.encode_batch(buf) if hasattr(tok, "encode_batch") else map(tok.encode, buf):
                counter[0] += 1
                yield np.asarray(ids, dtype=np.int64)

    def _build(self, split: str) -> dict[str, np.ndarray]:
        counter = [0]
        docs = self._token_docs(split, counter)
        eos = self.tokenizer.eos_token_id
        try:  # only packing pads (the last row); pad_each fills with EOS
            arrays = (pack(docs, self.seq_len, eos, self.tokenizer.pad_token_id) if self.packing
                      else pad_each(docs, self.seq_len, eos))
        except ValueError as e:
            if counter[0] == 0 and not isinstance(e, UserError):  # the source's own message says more
                raise ValueError(
                    f"corpus is empty: the {split!r} split of {self.source!r} has no documents. "
                    "Point the source at non-empty data (for TextFilesSource give >= 2 documents and "
                    "val_fraction > 0 so both splits get some; for HFDatasetSource check split/val_split)."
                ) from e
            raise
        return arrays

    def _check_available(self) -> None:
        """Offline, a hub dataset or tokenizer with no local copy is one clear line before any loader tries (the
        dataset is not needed when its tokenised rows are already in cache_dir)."""
        tok = getattr(self.tokenizer, "hub_problem", lambda: None)()
        src = getattr(self.source, "hub_problem", lambda: None)()
        if src and not tok and self.cache_dir is not None and all(
            os.path.isfile(os.path.join(self.cache_dir, f"{self.cache_key(s)}.npz")) for s in ("train", "val")
        ):
            src = None
        if src and tok:
            raise HubUnavailableError(src + "; the tokenizer " + tok.split(" is a ", 1)[0] + " is not cached either: "
                                      "point it at a local tokenizer folder")
        if src or tok:
            raise HubUnavailableError(src or tok)

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None and self.val_data is not None:
            return
        self._check_available()
        check_special_ids(self.tokenizer)
        loaded = {}
        for split in ("train", "val"):
            loaded[split] = load_or_build(
                self.cache_dir, self.cache_key(split), lambda s=split: self._build(s)
            )
        self.num_truncated = {s: int(a.pop("num_truncated", np.array(0))) for s, a in loaded.items()}
        n_train = int(loaded["train"]["input_ids"].shape[0])
        if n_train < self.batch_size:
            raise ValueError(
                f"only {n_train} training rows (seq_len={self.seq_len}, packing={self.packing}) but "
                f"batch_size={self.batch_size}: lower batch_size to <= {n_train}, lower seq_len, "
                "or use more training data"
            )
        if sum(self.num_truncated.values()):
            from lightning.pytorch.utilities import (
                rank_zero_warn,  # lazily: start-up: the data module is used without a trainer too
            )

            rank_zero_warn(
                f"{self.num_truncated['train']} train and {self.num_truncated['val']} val documents are longer "
                f"than seq_len - 1 = {self.seq_len - 1} tokens and were truncated (packing=False keeps one "
                "document per row); raise seq_len or set packing=true to keep them whole"
            )
        self.train_data, self.val_data = loaded["train"], loaded["val"]

    def _require_setup(self) -> None:
        if self.train_data is None or self.val_data is None:
            raise RuntimeError("DLMDataModule: call setup() before using the data")

    @property
    def num_train_rows(self) -> int:
        self._require_setup()
        return int(self.train_data["input_ids"].shape[0])

    @property
    def num_val_rows(self) -> int:
        self._require_setup()
        return int(self.val_data["input_ids"].shape[0])

    # -- loaders ------------------------------------------------------------------------------------------
    def _resume_position(self) -> tuple[int, int, int]:
        """(start sample, rank, world_size) from the attached trainer (0, 0, 1 without one)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0, 1
        world = int(getattr(trainer, "world_size", 1) or 1)
        rank = int(getattr(trainer, "global_rank", 0) or 0)
        accum = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        step = int(getattr(trainer, "global_step", 0) or 0)
        return step * self.batch_size * accum * world, rank, world

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        start, rank, world = self._resume_position()
        self.train_sampler = ResumableRandomSampler(
            self.num_train_rows, seed=self.seed, start=start, rank=rank, world_size=world
        )
        return DataLoader(
            _TrainStream(self.train_data, self.train_sampler, self.batch_size),
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return DataLoader(
            _Rows(self.val_data),
            batch_size=self.val_batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=self.num_workers,
            collate_fn=_collate,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def __repr__(self) -> str:
        return (
            f"DLMDataModule(source={self.source!r}, tokenizer={self.tokenizer!r}, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, packing={self.packing})"
        )

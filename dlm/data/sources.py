"""Document sources.  Each has ``documents(split) -> Iterable[str]`` (split: 'train' or 'val'),
``fingerprint() -> str`` (used in cache keys) and a ``task`` attribute (the ArithmeticTask for the
embedded data, None otherwise).

Nothing heavy happens at construction: files are read and HF datasets are loaded on the first
``documents()`` call, so configs can be instantiated offline.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import numpy as np

from dlm.config_values import to_plain
from dlm.data.arithmetic import ArithmeticTask, _split_name
from dlm.data.brackets import BracketsTask
from dlm.data.hub import dataset_problem
from dlm.errors import UserError

__all__ = ["ArithmeticSource", "BracketsSource", "DataFileError", "HFDatasetSource", "TextFilesSource"]


class DataFileError(UserError):
    """A data file that cannot be read as text: unreadable, binary, or not in the configured encoding."""


class ArithmeticSource:
    """The embedded addition task (see :mod:`dlm.data.arithmetic`); ``.task`` is the ArithmeticTask."""

    def __init__(
        self, n_digits: int = 2, num_train: int = 20000, num_val: int = 512, seed: int = 0, fixed_width: bool = False
    ):
        self.task = ArithmeticTask(
            n_digits=n_digits, num_train=num_train, num_val=num_val, seed=seed, fixed_width=fixed_width
        )

    def documents(self, split: str) -> list[str]:
        return self.task.documents(split)

    def fingerprint(self) -> str:
        return self.task.fingerprint()

    def __repr__(self) -> str:
        return f"ArithmeticSource({self.task!r})"


class BracketsSource:
    """The embedded grammar task (see :mod:`dlm.data.brackets`); ``.task`` is the BracketsTask."""

    def __init__(self, **task_kwargs):
        self.task = BracketsTask(**task_kwargs)

    def documents(self, split: str) -> list[str]:
        return self.task.documents(split)

    def fingerprint(self) -> str:
        return self.task.fingerprint()

    def __repr__(self) -> str:
        return f"BracketsSource({self.task!r})"


_GLOB_CHARS = re.compile(r"[*?\[]")
_SPLIT_ON = ("blank_line", "line", "file")


class TextFilesSource:
    """Local text files (paths, directories or globs) split into documents.

    * ``split_on="blank_line"``: documents are paragraphs separated by one or more blank lines;
      ``"line"``: every non-empty line; ``"file"``: every file.  Documents are stripped; empty ones dropped.
    * A directory means every regular file below it (recursively, sorted).
    * The train/val split is a seeded permutation of the document list: ``round(val_fraction * n)``
      documents (at least 1 when ``val_fraction > 0`` and there are >= 2 documents) go to val.
    * Paths are checked at construction (FileNotFoundError naming the path and the cwd); files are read on
      the first ``documents()`` call (ValueError "corpus is empty: ..." if no non-empty document).
    """

    task = None

    def __init__(
        self,
        paths: str | list[str],
        val_fraction: float = 0.05,
        split_on: str = "blank_line",
        seed: int = 0,
        encoding: str = "utf-8",
    ):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise ValueError("TextFilesSource: `paths` is empty; give at least one file, directory or glob")
        if split_on not in _SPLIT_ON:
            raise ValueError(f"TextFilesSource: split_on={split_on!r} is not one of {_SPLIT_ON}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"TextFilesSource: val_fraction must be in [0, 1), got {val_fraction}")
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"TextFilesSource: encoding={encoding!r} is not a Python codec; use e.g. utf-8 or "
                             "latin-1") from None
        self.paths = paths
        self.val_fraction = float(val_fraction)
        self.split_on = split_on
        self.seed = int(seed)
        self.encoding = encoding
        self.files = self._resolve(paths)
        self._splits: dict[str, list[str]] | None = None

    @staticmethod
    def _resolve(paths: list[str]) -> list[str]:
        files: list[str] = []
        for p in paths:
            ep = os.path.expanduser(p)
            if _GLOB_CHARS.search(ep):
                matches = sorted(m for m in glob.glob(ep, recursive=True) if os.path.isfile(m))
                if not matches:
                    raise FileNotFoundError(
                        f"TextFilesSource: glob {p!r} matched no files (cwd: {os.getcwd()}); "
                        "check the pattern, or use an absolute path"
                    )
                files.extend(matches)
            elif os.path.isdir(ep):
                found = sorted(
                    os.path.join(root, f) for root, _, fs in os.walk(ep) for f in fs if not f.startswith(".")
                )
                if not found:
                    raise FileNotFoundError(
                        f"TextFilesSource: directory {p!r} contains no files (cwd: {os.getcwd()})"
                    )
                files.extend(found)
            elif os.path.isfile(ep):
                files.append(ep)
            elif os.path.exists(ep):
                raise FileNotFoundError(
                    f"TextFilesSource: path {p!r} is neither a regular file nor a folder (a device, pipe or socket); "
                    "give text files, folders of them, or a glob"
                )
            else:
                raise FileNotFoundError(
                    f"TextFilesSource: path {p!r} does not exist (cwd: {os.getcwd()}); "
                    "give an existing file, directory or glob (relative paths resolve against the cwd)"
                )
        return [os.path.abspath(f) for f in dict.fromkeys(files)]

    def _text(self, f: str) -> str:
        """The file's text. Refused, not repaired: a file that is binary or not in ``encoding`` would otherwise be
        decoded with replacement characters and trained on, silently (a count in a warning is lost in the log)."""
        try:
            with open(f, "rb") as fh:
                raw = fh.read()
        except OSError as e:
            raise DataFileError(f"data.source.paths: cannot read {f} ({e.strerror or e}); make it readable or "
                                "leave it out of data.source.paths") from None
        if b"\0" in raw and "16" not in self.encoding and "32" not in self.encoding:
            raise DataFileError(
                f"data.source.paths: {f} looks binary ({raw.count(0)} NUL bytes), not text; leave it out of "
                "data.source.paths (e.g. a glob such as dir/**/*.txt)"
            )
        try:
            text = raw.decode(self.encoding)
        except UnicodeDecodeError as e:
            raise DataFileError(
                f"data.source.paths: {f} is not valid {self.encoding} text (byte {e.start} is "
                f"{raw[e.start:e.start + 1]!r}); convert it (iconv -f <its codec> -t utf-8), set "
                "+data.source.encoding=<its codec> (e.g. latin-1), or leave it out of data.source.paths"
            ) from None
        return text.replace("\r\n", "\n").replace("\r", "\n")  # as text-mode reading did

    def _read(self) -> list[str]:
        docs: list[str] = []
        for f in self.files:
            text = self._text(f)
            if self.split_on == "file":
                parts = [text]
            elif self.split_on == "line":
                parts = text.splitlines()
            else:
                parts = re.split(r"\n[ \t\r\f\v]*\n", text)
            docs.extend(d.strip() for d in parts if d.strip())
        return docs

    def _load(self) -> dict[str, list[str]]:
        if self._splits is None:
            docs = self._read()
            if not docs:
                raise DataFileError(
                    f"corpus is empty: no non-empty documents in {len(self.files)} file(s) "
                    f"{self.files[:3]}{'...' if len(self.files) > 3 else ''} with split_on={self.split_on!r}; "
                    "point `paths` at files containing text"
                )
            n = len(docs)
            n_val = 0
            if self.val_fraction > 0 and n >= 2:
                n_val = min(n - 1, max(1, round(self.val_fraction * n)))
            perm = np.random.default_rng([self.seed, 31337]).permutation(n)
            val_idx = set(perm[:n_val].tolist())
            self._splits = {
                "train": [d for i, d in enumerate(docs) if i not in val_idx],
                "val": [d for i, d in enumerate(docs) if i in val_idx],
            }
        return self._splits

    def documents(self, split: str) -> list[str]:
        return self._load()[_split_name(split)]

    def fingerprint(self) -> str:
        stats = []
        for f in self.files:
            st = os.stat(f)
            stats.append([f, st.st_size, st.st_mtime_ns])
        blob = json.dumps(
            {"files": stats, "split_on": self.split_on, "val_fraction": self.val_fraction, "seed": self.seed}
        )
        return "text_files:" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"TextFilesSource({self.paths!r}, files={len(self.files)}, split_on={self.split_on!r})"


class HFDatasetSource:
    """A Hugging Face dataset, loaded lazily with ``datasets.load_dataset`` on the first ``documents()``.

    ``documents('train')`` yields up to ``max_train_documents`` (None: all) non-empty texts of ``split``;
    ``documents('val')`` yields up to ``max_val_documents`` texts of ``val_split``.  When ``val_split`` is
    None the first ``max_val_documents`` documents of ``split`` are held out as validation and training
    starts after them.  ``streaming=True`` iterates without downloading the whole dataset.
    """

    task = None

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        val_split: str | None = "validation",
        text_field: str = "text",
        streaming: bool = True,
        data_files: Any = None,
        max_train_documents: int | None = None,
        max_val_documents: int = 1000,
        **load_kwargs: Any,
    ):
        if max_val_documents is None or int(max_val_documents) < 1:
            raise ValueError(f"HFDatasetSource: max_val_documents must be >= 1, got {max_val_documents!r}")
        if max_train_documents is not None and int(max_train_documents) < 1:
            raise ValueError(
                f"HFDatasetSource: max_train_documents must be >= 1 or None (all), got {max_train_documents!r}"
            )
        self.path = path
        self.name = name
        self.split = split
        self.val_split = val_split
        self.text_field = text_field
        self.streaming = bool(streaming)
        self.data_files = to_plain(data_files)
        self.max_train_documents = None if max_train_documents is None else int(max_train_documents)
        self.max_val_documents = int(max_val_documents)
        self.load_kwargs = to_plain(load_kwargs)

    def hub_problem(self) -> str | None:
        """Why this dataset cannot be loaded here (offline, not in the local caches), or None when it may be."""
        return dataset_problem(self.path)

    def _load_split(self, split: str) -> Any:
        import datasets  # lazily: start-up: HF datasets is a slow import, needed by Hub sources only

        kwargs: dict[str, Any] = dict(self.load_kwargs)
        if self.data_files is not None:
            kwargs["data_files"] = self.data_files
        try:
            return datasets.load_dataset(
                self.path, self.name, split=split, streaming=self.streaming, **kwargs
            )
        except Exception as e:
            if hasattr(e, "add_note"):
                e.add_note(
                    f"HFDatasetSource: load_dataset({self.path!r}, name={self.name!r}, split={split!r}, "
                    f"streaming={self.streaming}) failed; check the dataset path/name/split, that data_files "
                    "exist, and (offline) that the dataset is in the local HF cache"
                )
            raise

    def _texts(self, split: str) -> Iterator[str]:
        ds = self._load_split(split)
        field = self.text_field
        cols = getattr(ds, "column_names", None)
        if cols is not None and field not in cols:
            raise ValueError(
                f"HFDatasetSource: text_field {field!r} is not a column of {self.path!r} split {split!r}; "
                f"available columns: {list(cols)}"
            )
        for row in ds:
            if field not in row:
                raise ValueError(
                    f"HFDatasetSource: text_field {field!r} is not a column of {self.path!r} split {split!r}; "
                    f"available columns: {list(row.keys())}"
                )
            t = row[field]
            if isinstance(t, str) and t.strip():
                yield t

    def documents(self, split: str) -> Iterable[str]:
        s = _split_name(split)
        if s == "val":
            src = self.split if self.val_split is None else self.val_split
            return list(islice(self._texts(src), self.max_val_documents))
        it = self._texts(self.split)
        if self.val_split is None:
            it = islice(it, self.max_val_documents, None)
        if self.max_train_documents is not None:
            it = islice(it, self.max_train_documents)
        return it

    def fingerprint(self) -> str:
        blob = json.dumps(
            {
                "path": self.path,
                "name": self.name,
                "split": self.split,
                "val_split": self.val_split,
                "text_field": self.text_field,
                "data_files": self.data_files,
                "local_files": _local_file_stats(self.data_files),
                "max_train_documents": self.max_train_documents,
                "max_val_documents": self.max_val_documents,
                "load_kwargs": self.load_kwargs,
            },
            sort_keys=True,
            default=str,
        )
        return "hf_dataset:" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"HFDatasetSource({self.path!r}, name={self.name!r}, split={self.split!r}, val_split={self.val_split!r})"


def _local_file_stats(data_files: Any) -> list[Any]:
    out: list[Any] = []

    def visit(v: Any) -> None:
        if isinstance(v, str):
            for f in sorted(glob.glob(v)) if _GLOB_CHARS.search(v) else [v]:
                if os.path.isfile(f):
                    st = os.stat(f)
                    out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        elif isinstance(v, dict):
            for k in sorted(v):
                visit(v[k])
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)

    visit(data_files)
    return out

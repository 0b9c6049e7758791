"""Prompt rows from a dataset on the Hugging Face Hub (or a local JSONL/parquet file: the same code path).

``HubPrompts(path="openai/gsm8k", name="main", prompt_field="question", columns={"answer": "answer"})`` reads
``datasets.load_dataset(path, name, split=...)`` lazily, on the first ``rows()``. ``template`` turns a dataset row
into the prompt (``str.format`` over the row's fields: ``"{question}"``, or d1's question followed by its format
instruction); ``columns`` maps each reward column to the dataset field it comes from. A local copy:
``path=json data_files={train: a.jsonl, val: b.jsonl}`` (or ``path=parquet``). Offline without a cached copy, the
error says how to point at a local one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from dlm.rewards.errors import RewardError
from dlm.rewards.splits import split_name

# d1's reasoning-format instruction (its REASONING_SYSTEM_PROMPT, in our own words), appended by the templates.
REASONING_FORMAT = (
    "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
)


class HubPrompts:
    """See the module docstring. ``splits`` maps ``train`` / ``val`` to the dataset's split names; ``max_rows``
    caps each split (first rows, in the dataset's order, after an optional ``shuffle_seed`` shuffle)."""

    def __init__(self, path: str, name: str | None = None, prompt_field: str | None = None, template: str | None = None,
                 columns: Mapping[str, str] | None = None, splits: Mapping[str, str] | None = None,
                 data_files: Any = None, max_rows: int | None = None, shuffle_seed: int | None = None,
                 revision: str | None = None):
        if (prompt_field is None) == (template is None):
            raise RewardError("prompts: give exactly one of prompt_field (a dataset field) or template ('{field} ...')")
        self.path, self.name, self.prompt_field, self.template = path, name, prompt_field, template
        self.columns = dict(columns or {})
        self.splits = {"train": "train", "val": "test", **dict(splits or {})}
        self.data_files = dict(data_files) if isinstance(data_files, Mapping) else data_files
        self.max_rows, self.shuffle_seed, self.revision = max_rows, shuffle_seed, revision
        self._loaded: dict[str, Any] = {}  # split -> dataset: load once, iterate every epoch

    def _load(self, split: str):
        import datasets  # lazy: building a config never imports or downloads anything

        try:
            data = datasets.load_dataset(self.path, self.name, split=split, data_files=self.data_files,
                                         revision=self.revision)
        except (ConnectionError, FileNotFoundError, OSError) as err:
            raise RewardError(
                f"prompts: cannot load dataset {self.path!r} (split {split!r}): {err}. Offline, point at a local "
                f"copy: prompts.path=json +prompts.data_files.{{train,val}}=<file.jsonl> (or path=parquet)"
            ) from None
        except ValueError as err:  # e.g. an unknown split name
            raise RewardError(f"prompts: dataset {self.path!r}: {err}") from None
        if self.shuffle_seed is not None:
            data = data.shuffle(seed=int(self.shuffle_seed))
        if self.max_rows is not None:
            data = data.select(range(min(int(self.max_rows), len(data))))
        return data

    def rows(self, split: str) -> Iterator[dict[str, Any]]:
        split = split_name(split)
        if split not in self._loaded:
            self._loaded[split] = self._load(self.splits[split])
        data = self._loaded[split]
        fields = set(data.column_names)
        wanted = set(self.columns.values()) | ({self.prompt_field} if self.prompt_field else set())
        missing = sorted(wanted - fields)
        if missing:
            raise RewardError(f"prompts: dataset {self.path!r} has no field(s) {missing}; its fields: {sorted(fields)}")
        for row in data:
            if self.template is not None:
                try:
                    prompt = self.template.format(**row)
                except KeyError as err:
                    raise RewardError(f"prompts.template names {err} but the dataset fields are {sorted(fields)}") from None
            else:
                prompt = str(row[self.prompt_field])
            yield {"prompt": prompt, **{col: row[field] for col, field in self.columns.items()}}

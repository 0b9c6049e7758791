"""Data for diffusion LMs: tokenizers, sources (embedded arithmetic task, local text, HF datasets),
packing, a tokenised-data cache and the Lightning DataModule."""

from dlm.lazy import lazy_attributes

# Every name loads on first use (PEP 562): a tokenizer import (a plan, dry_run) pays for no numpy, datasets or
# Lightning (the DataModule), issue #17.
_WHERE = {name: f"dlm.data.{module}" for name, module in {
    "ArithmeticTask": "arithmetic",
    "cache_key": "cache", "load_or_build": "cache",
    "pack": "packing", "pad_each": "packing",
    "ArithmeticSource": "sources", "HFDatasetSource": "sources", "TextFilesSource": "sources",
    "ByteTokenizer": "tokenizers", "CharTokenizer": "tokenizers", "HFTokenizer": "tokenizers",
    "check_special_ids": "tokenizers",
    "DLMDataModule": "datamodule", "ResumableRandomSampler": "datamodule",
}.items()}


__all__ = [
    "ArithmeticSource",
    "ArithmeticTask",
    "ByteTokenizer",
    "CharTokenizer",
    "DLMDataModule",
    "HFDatasetSource",
    "HFTokenizer",
    "ResumableRandomSampler",
    "TextFilesSource",
    "cache_key",
    "check_special_ids",
    "load_or_build",
    "pack",
    "pad_each",
]

__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)

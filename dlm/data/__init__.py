"""Data for diffusion LMs: tokenizers, sources (embedded arithmetic task, local text, HF datasets),
packing, a tokenised-data cache and the Lightning DataModule."""

from importlib import import_module

# Every name loads on first use (PEP 562): a tokenizer import (a plan, dry_run) pays for no numpy, datasets or
# Lightning (the DataModule), issue #17.
_WHERE = {
    "ArithmeticTask": "arithmetic",
    "cache_key": "cache", "load_or_build": "cache",
    "pack": "packing", "pad_each": "packing",
    "ArithmeticSource": "sources", "HFDatasetSource": "sources", "TextFilesSource": "sources",
    "ByteTokenizer": "tokenizers", "CharTokenizer": "tokenizers", "HFTokenizer": "tokenizers",
    "check_special_ids": "tokenizers",
    "DLMDataModule": "datamodule", "ResumableRandomSampler": "datamodule",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'dlm.data' has no attribute {name!r}")
    value = getattr(import_module(f"dlm.data.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


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

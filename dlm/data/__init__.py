"""Data for diffusion LMs: tokenizers, sources (embedded arithmetic task, local text, HF datasets),
packing, a tokenised-data cache and the Lightning DataModule."""

from dlm.data.arithmetic import ArithmeticTask
from dlm.data.cache import cache_key, load_or_build
from dlm.data.packing import pack, pad_each
from dlm.data.sources import ArithmeticSource, HFDatasetSource, TextFilesSource
from dlm.data.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, check_special_ids


def __getattr__(name: str):
    # lazily: the DataModule is a Lightning class, and a plan (dry_run) or a tokenizer import needs no Lightning
    if name in ("DLMDataModule", "ResumableRandomSampler"):
        from dlm.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'dlm.data' has no attribute {name!r}")


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

"""Tokenizers with the small interface the rest of ``dlm`` relies on.

Every tokenizer exposes

* ``vocab_size`` -- number of embedding rows needed (special tokens included),
* ``mask_token_id``, ``eos_token_id``, ``pad_token_id`` (ints) and ``bos_token_id`` (int or None),
* ``mask_token`` -- the string used to render the mask token when special tokens are not skipped,
* ``encode(text) -> list[int]`` -- no special tokens are added,
* ``encode_batch(texts) -> list[list[int]]`` -- same, for many texts (faster for HF tokenizers),
* ``decode(ids, skip_special_tokens=True) -> str`` -- accepts a list, a numpy array or a 1-D tensor,
* ``decode_until_eos(ids) -> str`` -- cut at the first EOS, then decode without specials
  (what you want for model samples: a pad_each-trained model fills the tail with EOS),
* ``fingerprint() -> str`` -- stable identifier of the vocabulary (used in data-cache keys).

``check_special_ids(tok)`` validates the special ids and raises a ValueError that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from dlm.data.hub import HubUnavailableError, looks_like_path, tokenizer_problem
from dlm.errors import UserError

# transformers is imported by HFTokenizer only: the character and byte tokenizers need none of it.

__all__ = [
    "BaseTokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "TokenizerError",
    "check_special_ids",
]

# Files one of which a saved HF tokenizer folder holds (fast, slow BPE/WordPiece, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


class TokenizerError(UserError, OSError):
    """A tokenizer that cannot be loaded from what the config names."""


def _to_id_list(ids: Any) -> list[int]:
    """Accept a list/tuple of ints, a numpy array or a (0-/1-D) torch tensor."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    out = list(ids)
    if out and isinstance(out[0], list):
        raise ValueError(
            f"decode expects a 1-D sequence of token ids, got a nested sequence of length {len(out)}; "
            "decode each row separately"
        )
    return [int(i) for i in out]


def check_special_ids(tok: Any) -> None:
    """Raise ValueError if the tokenizer's special token ids are unusable for masked diffusion."""
    name = type(tok).__name__
    v = getattr(tok, "vocab_size", None)
    if not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name}.vocab_size must be a positive int, got {v!r}")
    for attr in ("mask_token_id", "eos_token_id", "pad_token_id"):
        i = getattr(tok, attr, None)
        if not isinstance(i, int) or isinstance(i, bool):
            raise ValueError(f"{name}.{attr} must be an int, got {i!r}")
        if not 0 <= i < v:
            raise ValueError(
                f"{name}.{attr}={i} is outside [0, vocab_size={v}): every special id must index a row of "
                "the embedding table (add the token to the vocabulary or raise vocab_size)"
            )
    bos = getattr(tok, "bos_token_id", None)
    if bos is not None and not 0 <= bos < v:
        raise ValueError(f"{name}.bos_token_id={bos} is outside [0, vocab_size={v}); use None or a valid id")
    m = tok.mask_token_id
    if m == tok.pad_token_id:
        raise ValueError(
            f"{name}.mask_token_id={m} equals pad_token_id: the mask token must be a dedicated id "
            "distinct from pad and eos"
        )
    if m == tok.eos_token_id:
        raise ValueError(
            f"{name}.mask_token_id={m} equals eos_token_id: the mask token must be a dedicated id "
            "distinct from pad and eos"
        )
    if bos is not None and m == bos:
        raise ValueError(f"{name}.mask_token_id={m} equals bos_token_id: use a dedicated mask token")


class BaseTokenizer(ABC):
    """Shared helpers; subclasses set the special ids and implement ``encode``/``decode``."""

    vocab_size: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    bos_token_id: int | None = None
    mask_token: str = "<mask>"

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def fingerprint(self) -> str: ...

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_until_eos(self, ids: Any) -> str:
        ids = _to_id_list(ids)
        if self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        return self.decode(ids, skip_special_tokens=True)

    @property
    def special_ids(self) -> set[int]:
        s = {self.mask_token_id, self.eos_token_id, self.pad_token_id}
        if self.bos_token_id is not None:
            s.add(self.bos_token_id)
        return s

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, mask={self.mask_token_id}, "
            f"eos={self.eos_token_id}, pad={self.pad_token_id}, bos={self.bos_token_id})"
        )


class CharTokenizer(BaseTokenizer):
    """One id per character of ``alphabet`` (deduplicated, order kept), then ``<pad>``, ``<eos>``, ``<mask>``.

    ``decode(..., skip_special_tokens=False)`` renders mask as ``"_"`` (or ``"<mask>"`` if ``"_"`` is in the
    alphabet), pad as ``"<pad>"`` and eos as ``"<eos>"``.
    """

    def __init__(self, alphabet: str):
        if not isinstance(alphabet, str) or not alphabet:
            raise ValueError(f"CharTokenizer needs a non-empty alphabet string, got {alphabet!r}")
        chars = list(dict.fromkeys(alphabet))
        self.alphabet = "".join(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}
        self._itos = dict(enumerate(chars))
        n = len(chars)
        self.pad_token_id = n
        self.eos_token_id = n + 1
        self.mask_token_id = n + 2
        self.bos_token_id = None
        self.vocab_size = n + 3
        self.mask_token = "_" if "_" not in self._stoi else "<mask>"
        self._special_str = {
            self.pad_token_id: "<pad>",
            self.eos_token_id: "<eos>",
            self.mask_token_id: self.mask_token,
        }

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            bad = next(c for c in text if c not in stoi)
            raise ValueError(
                f"CharTokenizer: character {bad!r} is not in the alphabet {self.alphabet!r}; "
                "add it to the tokenizer's alphabet or clean the text"
            ) from None

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        out = []
        for i in _to_id_list(ids):
            if i in self._itos:
                out.append(self._itos[i])
            elif i in self._special_str:
                if not skip_special_tokens:
                    out.append(self._special_str[i])
            else:
                raise ValueError(f"CharTokenizer: id {i} is outside [0, vocab_size={self.vocab_size})")
        return "".join(out)

    def fingerprint(self) -> str:
        return "char:" + json.dumps(self.alphabet, ensure_ascii=True)


class ByteTokenizer(BaseTokenizer):
    """UTF-8 bytes 0..255, then pad=256, eos=257, mask=258, bos=259 (vocab_size 260).

    Decoding uses ``errors="replace"``; with ``skip_special_tokens=False`` specials render as
    ``<pad>``, ``<eos>``, ``<mask>``, ``<bos>``.
    """

    def __init__(self) -> None:
        self.pad_token_id = 256
        self.eos_token_id = 257
        self.mask_token_id = 258
        self.bos_token_id = 259
        self.vocab_size = 260
        self.mask_token = "<mask>"
        self._special_str = {256: "<pad>", 257: "<eos>", 258: "<mask>", 259: "<bos>"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        buf = bytearray()
        for i in _to_id_list(ids):
            if 0 <= i < 256:
                buf.append(i)
            elif i in self._special_str:
                if not skip_special_tokens:
                    parts.append(buf.decode("utf-8", errors="replace"))
                    buf = bytearray()
                    parts.append(self._special_str[i])
            else:
                raise ValueError(f"ByteTokenizer: id {i} is outside [0, vocab_size={self.vocab_size})")
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def fingerprint(self) -> str:
        return "bytes-utf8:v1"


class HFTokenizer(BaseTokenizer):
    """Wrap ``transformers.AutoTokenizer.from_pretrained(name_or_path)`` (hub id or local folder).

    Loading is *lazy*: nothing is read (and the network is not touched) until an attribute or method that
    needs the tokenizer is used, so configs naming hub tokenizers can be instantiated offline.

    Special tokens: mask = the tokenizer's own mask token if it has one, else ``mask_token`` (added as a
    special token if absent from the vocabulary), else ``"<|mask|>"`` is added.  eos = the tokenizer's eos,
    else ``"<|endoftext|>"`` is added.  pad = the tokenizer's pad, else eos.  ``vocab_size = len(tokenizer)``.
    """

    DEFAULT_MASK = "<|mask|>"
    DEFAULT_EOS = "<|endoftext|>"

    def __init__(self, name_or_path: str, mask_token: str | None = None, **from_pretrained_kwargs: Any):
        self.name_or_path = str(name_or_path)
        self._requested_mask = mask_token
        self._kwargs = from_pretrained_kwargs
        self._tok: Any = None

    # -- lazy loading -------------------------------------------------------------------------------------
    @property
    def hf_tokenizer(self) -> Any:
        if self._tok is None:
            self._load()
        return self._tok

    def hub_problem(self) -> str | None:
        """Why this tokenizer cannot be loaded here (offline, not in the local caches), or None when it may be."""
        return tokenizer_problem(self.name_or_path)

    def _load(self) -> None:
        path = os.path.expanduser(self.name_or_path)
        if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            raise TokenizerError(
                f"data.tokenizer.name_or_path={self.name_or_path}: the folder has no tokenizer files (one of "
                f"{', '.join(TOKENIZER_FILES[:4])}, ...); point it at a folder written by a tokenizer's "
                "save_pretrained, or at a hub id"
            )
        if looks_like_path(self.name_or_path) and not os.path.exists(path):
            raise TokenizerError(
                f"data.tokenizer.name_or_path={self.name_or_path}: could not load tokenizer: no such folder (cwd: "
                f"{os.getcwd()}); pass a local folder with a saved tokenizer (save_pretrained), or a hub id"
            )
        problem = self.hub_problem()
        if problem:
            raise HubUnavailableError(problem)
        # lazily, after the checks: transformers is a slow import (torch with it), and a tokenizer that cannot load
        # here (a plan offline) needs none of it
        from transformers import AutoTokenizer

        try:
            # trust_remote_code=False said out loud: a folder whose config.json has an auto_map (a published DLM's)
            # would otherwise make transformers ask on stdin whether to run the folder's code
            tok = AutoTokenizer.from_pretrained(self.name_or_path, **{"trust_remote_code": False, **self._kwargs})
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TokenizerError(
                f"data.tokenizer.name_or_path={self.name_or_path}: could not load tokenizer "
                f"({type(e).__name__}: {first}); pass a local folder with a saved tokenizer, or a hub id that is "
                "cached locally or reachable"
            ) from e
        added: dict[str, Any] = {}
        if tok.eos_token is None:
            added["eos_token"] = self.DEFAULT_EOS
        if tok.mask_token is None:
            added["mask_token"] = self._requested_mask or self.DEFAULT_MASK
        if added:
            tok.add_special_tokens(added)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        # we cut documents into blocks ourselves; silence "sequence longer than model_max_length" warnings
        tok.model_max_length = int(1e30)
        self._tok = tok

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return len(self.hf_tokenizer)

    @property
    def mask_token_id(self) -> int:  # type: ignore[override]
        return int(self.hf_tokenizer.mask_token_id)

    @property
    def eos_token_id(self) -> int:  # type: ignore[override]
        return int(self.hf_tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:  # type: ignore[override]
        return int(self.hf_tokenizer.pad_token_id)

    @property
    def bos_token_id(self) -> int | None:  # type: ignore[override]
        b = self.hf_tokenizer.bos_token_id
        return None if b is None else int(b)

    @property
    def mask_token(self) -> str:  # type: ignore[override]
        return str(self.hf_tokenizer.mask_token)

    # -- encode / decode ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.hf_tokenizer.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        texts = list(texts)
        if not texts:
            return []
        enc = self.hf_tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
        return [list(x) for x in enc["input_ids"]]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return self.hf_tokenizer.decode(_to_id_list(ids), skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        tok = self.hf_tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:  # fast tokenizer: the full pipeline (normaliser, pre-tokeniser, model)
            blob = backend.to_str()
        else:
            blob = json.dumps(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=True)
        h = hashlib.sha256(blob.encode()).hexdigest()[:16]
        cls = type(tok).__name__
        return (
            f"hf:{cls}:{h}:v={self.vocab_size}:mask={self.mask_token_id}:eos={self.eos_token_id}:"
            f"pad={self.pad_token_id}"
        )

    def __repr__(self) -> str:
        if self._tok is None:
            return f"HFTokenizer({self.name_or_path!r}, not loaded)"
        return f"HFTokenizer({self.name_or_path!r}, " + super().__repr__().split("(", 1)[1]

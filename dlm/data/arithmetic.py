"""The embedded default task: multi-digit addition, generated deterministically (no download).

Documents are canonical addition equations ``"<a>+<b>=<a+b>"``, e.g. ``"47+8=55"``, ``"0+13=13"``,
``"99+99=198"``.  Operands are uniform over ``0 .. 10**n_digits - 1`` (so they have 1..n_digits digits),
written without leading zeros.  Only addition is used (no subtraction), so the alphabet is
``"0123456789+="``.  The longest document for ``n_digits=2`` is ``"99+99=198"`` (9 characters).

Why it suits diffusion LMs: correctness is checkable exactly, and *infilling* an operand digit
(``"4?+8=55"``) needs the context to the right of the hole (the sum), so bidirectional context matters.

Splits: the set of all ``(a, b)`` problems is partitioned deterministically per ``seed``; ``num_val``
distinct problems form the validation split and the training documents are drawn only from the rest,
so train and val are disjoint as sets of equations.  When the problem space is small (``n_digits <= 3``)
training documents cycle through reshuffled passes over the remaining problems (``num_train`` may exceed
the number of distinct problems: 100*100 - 512 = 9488 for 2 digits, so the default 20000 is ~2 passes).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

__all__ = ["ArithmeticTask"]

_EQ = re.compile(r"^(0|[1-9][0-9]*)\+(0|[1-9][0-9]*)=(0|[1-9][0-9]*)$")
_ENUMERATE_LIMIT = 2_000_000  # enumerate all problems when there are at most this many
_VERSION = "arith-add-v1"


def _split_name(split: str) -> str:
    s = str(split).lower()
    if s in ("train", "training"):
        return "train"
    if s in ("val", "valid", "validation", "test", "eval"):
        return "val"
    raise ValueError(f"unknown split {split!r}: use 'train' or 'val' (aliases: 'validation', 'test')")


class ArithmeticTask:
    """Addition equations with operands of 1..``n_digits`` digits; see the module docstring."""

    alphabet = "0123456789+="

    def __init__(
        self, n_digits: int = 2, num_train: int = 20000, num_val: int = 512, seed: int = 0, fixed_width: bool = False
    ):
        if not isinstance(n_digits, int) or not 1 <= n_digits <= 18:
            raise ValueError(f"n_digits must be an int in [1, 18], got {n_digits!r}")
        if num_train < 1 or num_val < 1:
            raise ValueError(
                f"num_train and num_val must be >= 1, got num_train={num_train}, num_val={num_val}"
            )
        self.n_digits = int(n_digits)
        self.num_train = int(num_train)
        self.num_val = int(num_val)
        self.seed = int(seed)
        # fixed_width: operands zero-padded to n_digits and the sum to n_digits + 1 ("07+45=052"), so every digit
        # sits at a fixed position: a much easier task for a small model than variable-width numbers.
        self.fixed_width = bool(fixed_width)
        self._fixed = re.compile(rf"^(\d{{{self.n_digits}}})\+(\d{{{self.n_digits}}})=(\d{{{self.n_digits + 1}}})$")
        self._hi = 10**self.n_digits  # operands in [0, hi)
        self._total = self._hi * self._hi
        if self.num_val >= self._total:
            raise ValueError(
                f"num_val={num_val} leaves no training problems: there are only {self._total} distinct "
                f"{n_digits}-digit addition problems; lower num_val or raise n_digits"
            )
        self._pairs: dict[str, np.ndarray] = {}

    # -- generation ---------------------------------------------------------------------------------------
    def _generate(self) -> None:
        rng = np.random.default_rng([self.seed, 7919])
        if self._total <= _ENUMERATE_LIMIT:
            order = rng.permutation(self._total)
            val = order[: self.num_val]
            pool = order[self.num_val :]
            chunks, n = [], 0
            while n < self.num_train:
                chunks.append(pool[rng.permutation(len(pool))])
                n += len(pool)
            train = np.concatenate(chunks)[: self.num_train]
        else:  # huge space: sample; val distinct, train rejects val problems
            val_set: set[int] = set()
            val_list: list[int] = []
            while len(val_list) < self.num_val:
                for c in rng.integers(0, self._total, size=self.num_val).tolist():
                    if c not in val_set and len(val_list) < self.num_val:
                        val_set.add(c)
                        val_list.append(c)
            train_list: list[int] = []
            while len(train_list) < self.num_train:
                for c in rng.integers(0, self._total, size=self.num_train).tolist():
                    if c not in val_set and len(train_list) < self.num_train:
                        train_list.append(c)
            val = np.array(val_list, dtype=np.int64)
            train = np.array(train_list, dtype=np.int64)
        self._pairs = {
            "train": np.stack([train // self._hi, train % self._hi], axis=1),
            "val": np.stack([val // self._hi, val % self._hi], axis=1),
        }

    def _split_pairs(self, split: str) -> np.ndarray:
        if not self._pairs:
            self._generate()
        return self._pairs[_split_name(split)]

    def format(self, a: int, b: int) -> str:
        if self.fixed_width:
            n = self.n_digits
            return f"{a:0{n}d}+{b:0{n}d}={a + b:0{n + 1}d}"
        return f"{a}+{b}={a + b}"

    def documents(self, split: str) -> list[str]:
        """Equations of ``split`` ('train' or 'val'); deterministic per (seed, split)."""
        return [self.format(int(a), int(b)) for a, b in self._split_pairs(split)]

    @property
    def max_doc_len(self) -> int:
        """Length in characters of the longest possible document (e.g. 9 for n_digits=2)."""
        m = self._hi - 1
        return len(self.format(m, m))

    # -- checking -----------------------------------------------------------------------------------------
    def parse(self, text: str) -> tuple[int, int, int] | None:
        """``(a, b, c)`` if ``text`` is a well-formed equation ``a+b=c`` (canonical numbers, or zero-padded to
        the fixed widths when fixed_width), else None."""
        m = (self._fixed if self.fixed_width else _EQ).match(text.strip())
        if m is None:
            return None
        return int(m.group(1)), int(m.group(2)), int(m.group(3))

    def is_wellformed(self, text: str) -> bool:
        return self.parse(text) is not None

    def is_valid(self, text: str) -> bool:
        """Well-formed (``a+b=c``, digits only, no leading zeros) and arithmetically correct.

        Surrounding whitespace is ignored; anything else (trailing garbage, extra signs) makes it invalid.
        Operands longer than ``n_digits`` are accepted if the sum is right.
        """
        p = self.parse(text)
        return p is not None and p[0] + p[1] == p[2]

    def score_samples(self, texts: list[str]) -> dict[str, float]:
        """``valid_frac`` (correct equations), ``wellformed_frac`` (parse, maybe wrong), ``unique_frac``.

        Pass decoded text cut at the first EOS (``tokenizer.decode_until_eos``).  Empty input gives zeros.
        """
        n = len(texts)
        if n == 0:
            return {"valid_frac": 0.0, "wellformed_frac": 0.0, "unique_frac": 0.0}
        parsed = [self.parse(t) for t in texts]
        wf = sum(p is not None for p in parsed)
        ok = sum(p is not None and p[0] + p[1] == p[2] for p in parsed)
        uniq = len({t.strip() for t in texts})
        return {"valid_frac": ok / n, "wellformed_frac": wf / n, "unique_frac": uniq / n}

    # -- evaluation items ---------------------------------------------------------------------------------
    def _val_choice(self, n: int, seed: int) -> np.ndarray:
        pairs = self._split_pairs("val")
        rng = np.random.default_rng([int(seed), 104729])
        if n <= len(pairs):
            idx = rng.choice(len(pairs), size=n, replace=False)
        else:
            idx = rng.integers(0, len(pairs), size=n)
        return pairs[idx]

    def prompts(self, n: int, seed: int = 0) -> list[str]:
        """``n`` left contexts like ``"47+8="`` from val problems; check with ``is_valid(prompt + completion)``."""
        return [self.format(int(a), int(b)).split("=")[0] + "=" for a, b in self._val_choice(n, seed)]

    def infill_items(self, n: int, seed: int = 0) -> list[tuple[str, list[int]]]:
        """``n`` (correct val equation, [character position to hide]) pairs.

        The hidden character is one digit of one operand, picked at random; it is determined by the digits
        to its right (the other operand and the sum), so left-to-right context alone cannot recover it.
        A fill is correct iff ``is_valid(filled)``.
        """
        rng = np.random.default_rng([int(seed), 1299709])
        items: list[tuple[str, list[int]]] = []
        for a, b in self._val_choice(n, seed):
            text = self.format(int(a), int(b))
            plus = text.index("+")
            eq = text.index("=")
            positions = list(range(0, plus)) + list(range(plus + 1, eq))
            items.append((text, [int(positions[int(rng.integers(len(positions)))])]))
        return items

    def fingerprint(self) -> str:
        return (
            f"{_VERSION}:n_digits={self.n_digits}:num_train={self.num_train}:num_val={self.num_val}:"
            f"seed={self.seed}" + (":fixed_width" if self.fixed_width else "")
        )

    def __repr__(self) -> str:
        return (
            f"ArithmeticTask(n_digits={self.n_digits}, num_train={self.num_train}, num_val={self.num_val}, "
            f"seed={self.seed}, fixed_width={self.fixed_width})"
        )

    def __getstate__(self) -> dict[str, Any]:  # do not ship generated arrays to dataloader workers
        d = dict(self.__dict__)
        d["_pairs"] = {}
        return d

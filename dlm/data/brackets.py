"""An embedded grammar task: balanced brackets of two kinds (the Dyck-2 language), generated deterministically.

Documents are well-nested strings such as ``"([]())[]"``. Validity is exactly checkable (a stack), the
language has real entropy (so unconditional samples can be scored: the fraction that are grammatical), and
bidirectional context matters: the kind of a hidden opening bracket is fixed by its closing partner to the
right. The same interface as :class:`dlm.data.arithmetic.ArithmeticTask`: documents, is_valid, score_samples,
prompts (left contexts that some completion makes valid) and infill_items (a valid document and the positions
to hide, with exactly one correct fill each).
"""

from __future__ import annotations

import numpy as np

__all__ = ["BracketsTask"]

_PAIRS = {")": "(", "]": "["}
_OPENERS = "(["
_VERSION = "dyck2-v1"


def _random_dyck(rng: np.random.Generator, n_pairs: int, max_depth: int) -> str:
    """A uniformly shaped random well-nested string of n_pairs bracket pairs, depth at most max_depth."""
    out, stack = [], []
    opened = 0
    while opened < n_pairs or stack:
        can_open = opened < n_pairs and len(stack) < max_depth
        if can_open and (not stack or rng.random() < 0.5):
            bracket = _OPENERS[int(rng.integers(2))]
            stack.append(bracket)
            out.append(bracket)
            opened += 1
        else:
            out.append(")" if stack.pop() == "(" else "]")
    return "".join(out)


class BracketsTask:
    """Dyck-2 strings of min_pairs..max_pairs pairs, nesting depth <= max_depth; train/val disjoint as sets."""

    alphabet = "()[]"

    def __init__(
        self, min_pairs: int = 2, max_pairs: int = 6, max_depth: int = 4, num_train: int = 20000, num_val: int = 512,
        seed: int = 0,
    ):
        if not 1 <= min_pairs <= max_pairs:
            raise ValueError(f"need 1 <= min_pairs <= max_pairs, got min_pairs={min_pairs}, max_pairs={max_pairs}")
        if max_depth < 1 or num_train < 1 or num_val < 1:
            raise ValueError("max_depth, num_train and num_val must be >= 1")
        self.min_pairs, self.max_pairs, self.max_depth = int(min_pairs), int(max_pairs), int(max_depth)
        self.num_train, self.num_val, self.seed = int(num_train), int(num_val), int(seed)
        self._docs: dict[str, list[str]] = {}

    @property
    def max_doc_len(self) -> int:
        return 2 * self.max_pairs

    def _generate(self) -> None:
        rng = np.random.default_rng([self.seed, 4241])
        val: list[str] = []
        seen: set[str] = set()
        attempts = 0
        while len(val) < self.num_val:  # distinct validation strings
            attempts += 1
            if attempts > 100 * self.num_val:
                raise ValueError("too few distinct bracket strings for num_val: raise max_pairs or lower num_val")
            doc = _random_dyck(rng, int(rng.integers(self.min_pairs, self.max_pairs + 1)), self.max_depth)
            if doc not in seen:
                seen.add(doc)
                val.append(doc)
        train: list[str] = []
        while len(train) < self.num_train:  # may repeat, never a validation string
            doc = _random_dyck(rng, int(rng.integers(self.min_pairs, self.max_pairs + 1)), self.max_depth)
            if doc not in seen:
                train.append(doc)
        self._docs = {"train": train, "val": val}

    def documents(self, split: str) -> list[str]:
        name = {"train": "train", "val": "val", "validation": "val", "test": "val"}.get(str(split).lower())
        if name is None:
            raise ValueError(f"unknown split {split!r}: use 'train' or 'val'")
        if not self._docs:
            self._generate()
        return list(self._docs[name])

    @staticmethod
    def is_valid(text: str) -> bool:
        """Non-empty, only brackets, every closer matching the latest open bracket, nothing left open."""
        text = text.strip()
        stack: list[str] = []
        for char in text:
            if char in _OPENERS:
                stack.append(char)
            elif char in _PAIRS:
                if not stack or stack.pop() != _PAIRS[char]:
                    return False
            else:
                return False
        return bool(text) and not stack

    def score_samples(self, texts: list[str]) -> dict[str, float]:
        """valid_frac (grammatical), novel_frac (grammatical and not a training string), unique_frac."""
        n = len(texts)
        if n == 0:
            return {"valid_frac": 0.0, "novel_frac": 0.0, "unique_frac": 0.0}
        train = set(self.documents("train"))
        valid = [self.is_valid(t) for t in texts]
        return {
            "valid_frac": sum(valid) / n,
            "novel_frac": sum(v and t.strip() not in train for t, v in zip(texts, valid)) / n,
            "unique_frac": len({t.strip() for t in texts}) / n,
        }

    def _val_choice(self, n: int, seed: int) -> list[str]:
        docs = self.documents("val")
        rng = np.random.default_rng([int(seed), 7717])
        return [docs[i] for i in rng.choice(len(docs), size=n, replace=n > len(docs))]

    def prompts(self, n: int, seed: int = 0) -> list[str]:
        """The first half of validation strings: a valid completion always exists (close what is open)."""
        return [doc[: len(doc) // 2] for doc in self._val_choice(n, seed)]

    def infill_items(self, n: int, seed: int = 0) -> list[tuple[str, list[int]]]:
        """A validation string with one opening bracket hidden: only its partner's kind, to the right, fits."""
        rng = np.random.default_rng([int(seed), 9391])
        items = []
        for doc in self._val_choice(n, seed):
            openers = [i for i, char in enumerate(doc) if char in _OPENERS]
            items.append((doc, [int(openers[int(rng.integers(len(openers)))])]))
        return items

    def fingerprint(self) -> str:
        return (
            f"{_VERSION}:pairs={self.min_pairs}-{self.max_pairs}:depth={self.max_depth}:num_train={self.num_train}:"
            f"num_val={self.num_val}:seed={self.seed}"
        )

    def __repr__(self) -> str:
        return (
            f"BracketsTask(min_pairs={self.min_pairs}, max_pairs={self.max_pairs}, max_depth={self.max_depth}, "
            f"num_train={self.num_train}, num_val={self.num_val}, seed={self.seed})"
        )

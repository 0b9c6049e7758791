"""The embedded instruction task: short instructions and their one correct reply, as chat conversations, generated
deterministically (no download), so that supervised fine-tuning is measurable on a CPU in minutes.

Three kinds of instruction (each reply is exactly determined by the prompt, so accuracy is exact match):

    "close: (([{"   ->  "}]))"     the closing brackets of an open prefix, innermost first
    "reverse: abc"  ->  "cba"
    "add: 47+8"     ->  "55"

Each example is a conversation ``[{"role": "user", "content": <instruction>}, {"role": "assistant", "content":
<reply>}]`` that goes through the same SFT path as any chat data (:func:`dlm.data.chat.sft_ids`; the character
tokenizer has no chat template, so the plain one: ``"user: <instruction>\\n" "assistant: " <reply> <eos> "\\n"``).

Splits: every kind's instruction space is enumerated and split by a seeded permutation; ``num_val`` held-out
instructions (an equal share per kind) never occur in training, so response accuracy is measured on unseen prompts.

Scoring (the interface of :class:`dlm.data.arithmetic.ArithmeticTask`, read by dlm.callbacks.samples and
``python -m dlm.evaluate``): ``prompts`` are held-out instructions rendered up to the generation prompt, and
``is_valid(prompt + completion)`` is whether the reply is exactly right, so ``sample/prompted_acc`` is the response
accuracy on held-out prompts; ``infill_items`` hide the reply of a held-out conversation (its length given), scored
the same way (``sample/infill_acc``).
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np

from dlm.data.arithmetic import _split_name
from dlm.data.chat import PLAIN_GENERATION_PROMPT

__all__ = ["InstructionsTask"]

KINDS = ("close", "reverse", "add")
_CLOSER = {"(": ")", "[": "]", "{": "}"}
_VERSION = "instructions-v1"
_SPACE_LIMIT = 1_000_000  # instruction spaces are enumerated: keep them small
_CONVERSATION = re.compile(r"^user: (close|reverse|add): ([^\n]*)\nassistant: ([^\n]*)$")


def reply(kind: str, arg: str) -> str:
    """The one correct reply to ``"<kind>: <arg>"``."""
    if kind == "close":
        return "".join(_CLOSER[c] for c in reversed(arg))
    if kind == "reverse":
        return arg[::-1]
    a, b = arg.split("+")
    return str(int(a) + int(b))


class InstructionsTask:
    """Instructions of ``kinds`` (a subset of close, reverse, add); see the module docstring.

    ``max_open``: close prefixes of 1..max_open brackets of ``([{``; ``reverse_letters`` / ``min_reverse`` ..
    ``max_reverse``: the strings to reverse; ``add_digits``: the digits of the two operands (``[2, 1]``: "47+8").
    """

    def __init__(
        self,
        kinds: tuple[str, ...] | list[str] = KINDS,
        num_train: int = 20000,
        num_val: int = 192,
        seed: int = 0,
        max_open: int = 5,
        reverse_letters: str = "abcdef",
        min_reverse: int = 2,
        max_reverse: int = 4,
        add_digits: tuple[int, int] | list[int] = (2, 1),
    ):
        kinds = tuple(str(k) for k in kinds)
        if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise ValueError(f"InstructionsTask: kinds={list(kinds)} must be distinct names from {list(KINDS)}")
        if not 1 <= max_open <= 8:
            raise ValueError(f"InstructionsTask: max_open={max_open} must be in [1, 8]")
        if not reverse_letters or not reverse_letters.isalpha() or not reverse_letters.islower():
            raise ValueError(f"InstructionsTask: reverse_letters={reverse_letters!r} must be lowercase letters")
        if not 1 <= min_reverse <= max_reverse <= 8:
            raise ValueError(f"InstructionsTask: need 1 <= min_reverse <= max_reverse <= 8, got {min_reverse}, "
                             f"{max_reverse}")
        add_digits = tuple(int(d) for d in add_digits)
        if len(add_digits) != 2 or not all(1 <= d <= 3 for d in add_digits):
            raise ValueError(f"InstructionsTask: add_digits={list(add_digits)} must be two digit counts in [1, 3]")
        if num_train < 1 or num_val < len(kinds):
            raise ValueError(f"InstructionsTask: need num_train >= 1 and num_val >= {len(kinds)} (one per kind)")
        self.kinds = kinds
        self.num_train, self.num_val, self.seed = int(num_train), int(num_val), int(seed)
        self.max_open = int(max_open)
        self.reverse_letters = str(reverse_letters)
        self.min_reverse, self.max_reverse = int(min_reverse), int(max_reverse)
        self.add_digits = add_digits
        self._items: dict[str, list[tuple[str, str]]] = {}

    @property
    def alphabet(self) -> str:
        """Every character a rendered conversation holds (the plain template's role names included)."""
        fixed = "user: assistant\n" + "".join(f"{k}: " for k in self.kinds) + "0123456789+([{)]}"
        return "".join(dict.fromkeys(fixed + self.reverse_letters))

    # -- generation ---------------------------------------------------------------------------------------
    def _space(self, kind: str) -> list[str]:
        """Every argument of ``kind``, in a fixed order."""
        if kind == "close":
            return ["".join(p) for n in range(1, self.max_open + 1) for p in itertools.product("([{", repeat=n)]
        if kind == "reverse":
            return ["".join(p) for n in range(self.min_reverse, self.max_reverse + 1)
                    for p in itertools.product(self.reverse_letters, repeat=n)]
        da, db = self.add_digits
        return [f"{a}+{b}" for a in range(10**da) for b in range(10**db)]

    def _generate(self) -> None:
        rng = np.random.default_rng([self.seed, 6007])
        val: list[tuple[str, str]] = []
        pools: list[list[tuple[str, str]]] = []
        share = self.num_val // len(self.kinds)
        for i, kind in enumerate(self.kinds):
            space = self._space(kind)
            if len(space) > _SPACE_LIMIT:
                raise ValueError(f"InstructionsTask: {len(space)} {kind} instructions exceed {_SPACE_LIMIT}; "
                                 "lower max_open, max_reverse or add_digits")
            n_val = share + (1 if i < self.num_val - share * len(self.kinds) else 0)
            if n_val >= len(space):
                raise ValueError(f"InstructionsTask: num_val leaves no {kind} instructions for training (there are "
                                 f"{len(space)}); lower num_val")
            order = rng.permutation(len(space))
            val += [(kind, space[j]) for j in order[:n_val]]
            pools.append([(kind, space[j]) for j in order[n_val:]])
        # training draws a kind uniformly, then cycles through reshuffled passes over that kind's pool
        kinds = rng.integers(0, len(pools), size=self.num_train)
        streams = [self._cycle(pool, rng) for pool in pools]
        self._items = {"train": [next(streams[k]) for k in kinds.tolist()], "val": val}

    @staticmethod
    def _cycle(pool: list[tuple[str, str]], rng: np.random.Generator):
        while True:
            for j in rng.permutation(len(pool)).tolist():
                yield pool[j]

    def items(self, split: str) -> list[tuple[str, str]]:
        """(kind, argument) pairs of ``split``; deterministic per seed."""
        if not self._items:
            self._generate()
        return self._items[_split_name(split)]

    @staticmethod
    def conversation(kind: str, arg: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{kind}: {arg}"}, {"role": "assistant", "content": reply(kind, arg)}]

    def conversations(self, split: str) -> list[list[dict[str, str]]]:
        return [self.conversation(k, a) for k, a in self.items(split)]

    # -- checking -----------------------------------------------------------------------------------------
    @staticmethod
    def render_prompt(kind: str, arg: str) -> str:
        """The plain template's text of the instruction up to the generation prompt (what a reply continues)."""
        return f"user: {kind}: {arg}\n{PLAIN_GENERATION_PROMPT}"

    def parse(self, text: str) -> tuple[str, str, str] | None:
        """(kind, argument, reply) of a rendered conversation ``"user: <kind>: <arg>\\nassistant: <reply>"``."""
        m = _CONVERSATION.match(text)
        if m is None or m.group(1) not in self.kinds:
            return None
        return m.group(1), m.group(2), m.group(3)

    def _correct(self, kind: str, arg: str, answer: str) -> bool:
        try:
            return answer == reply(kind, arg)
        except (KeyError, ValueError):  # a made-up instruction ("close: ab", "add: 4+") has no right answer
            return False

    def is_valid(self, text: str) -> bool:
        """Whether ``text`` is an instruction and exactly its correct reply (the decoded sample, cut at EOS)."""
        p = self.parse(text)
        return p is not None and self._correct(*p)

    def score_samples(self, texts: list[str]) -> dict[str, float]:
        """Unconditional samples: ``valid_frac`` (an instruction with its correct reply), ``wellformed_frac``."""
        if not texts:
            return {"valid_frac": 0.0, "wellformed_frac": 0.0}
        parsed = [self.parse(t) for t in texts]
        return {"valid_frac": sum(p is not None and self._correct(*p) for p in parsed) / len(texts),
                "wellformed_frac": sum(p is not None for p in parsed) / len(texts)}

    def _val_choice(self, n: int, seed: int) -> list[tuple[str, str]]:
        val = self.items("val")
        rng = np.random.default_rng([int(seed), 15485863])
        idx = rng.choice(len(val), size=n, replace=False) if n <= len(val) else rng.integers(0, len(val), size=n)
        return [val[int(i)] for i in idx]

    def prompts(self, n: int, seed: int = 0) -> list[str]:
        """``n`` held-out instructions rendered up to the generation prompt; score with ``is_valid(prompt + reply)``."""
        return [self.render_prompt(k, a) for k, a in self._val_choice(n, seed)]

    def infill_items(self, n: int, seed: int = 0) -> list[tuple[str, list[int]]]:
        """``n`` (held-out conversation text, the character positions of its reply): the reply, its length given."""
        out = []
        for k, a in self._val_choice(n, seed):
            head = self.render_prompt(k, a)
            answer = reply(k, a)
            out.append((head + answer, list(range(len(head), len(head) + len(answer)))))
        return out

    def fingerprint(self) -> str:
        return (f"{_VERSION}:kinds={','.join(self.kinds)}:num_train={self.num_train}:num_val={self.num_val}:"
                f"seed={self.seed}:max_open={self.max_open}:letters={self.reverse_letters}:"
                f"reverse={self.min_reverse}-{self.max_reverse}:add={self.add_digits[0]},{self.add_digits[1]}")

    def __repr__(self) -> str:
        return f"InstructionsTask(kinds={list(self.kinds)}, num_train={self.num_train}, num_val={self.num_val})"

    def __getstate__(self) -> dict[str, Any]:  # do not ship generated items to dataloader workers
        d = dict(self.__dict__)
        d["_items"] = {}
        return d

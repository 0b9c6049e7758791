"""Sudoku: puzzles the package generates (4x4 with 2x2 boxes, d1's task, or 9x9), each with a unique solution, the
checker, and the reward.

Format (d1's ``sudoku_reward_func``, reimplemented): a grid is a string of ``size**2`` digits read row by row, ``0``
for an empty cell; the prompt states the puzzle that way and the completion gives the full grid in
``<answer>...</answer>`` (every digit inside the tag is read, so ``1234 3412 ...`` or one row per line both work).
The reward is d1's: the fraction of the puzzle's empty cells the answer fills correctly (a short answer is padded
with 0s, a long one cut), or with ``exact=true`` 1.0 only for a complete, valid grid that keeps the clues.

Generation: a random solved grid (the base pattern ``(box*(r%box) + r//box + c) % size`` shuffled by digits, rows
within bands, bands, columns within stacks, stacks), then cells emptied in random order, each removal kept only if
the puzzle still has exactly one solution (a bitmask solver counts up to two).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from dlm.rewards.answers import answer_tag
from dlm.rewards.base import Reward
from dlm.rewards.columns import column
from dlm.rewards.splits import disjoint_splits, split_name

__all__ = ["SudokuPrompts", "SudokuReward", "count_solutions", "generate_puzzle", "is_solution"]

PROMPT = (
    "Solve this {size}x{size} Sudoku. The grid is given as {cells} digits read left to right, top to bottom; "
    "0 marks an empty cell. Fill every empty cell with a digit 1-{size} so that each row, each column and each "
    "{box}x{box} box holds every digit once. Give the full solved grid as {cells} digits inside <answer></answer>.\n"
    "Puzzle: {puzzle}\n"
)


def _box(size: int) -> int:
    box = math.isqrt(size)
    if box * box != size or size < 1:
        raise ValueError(f"sudoku size must be a square (4 or 9), got {size}")
    return box


def count_solutions(grid: Sequence[int], size: int, limit: int = 2) -> int:
    """How many completions ``grid`` (``size**2`` ints, 0 = empty) has, counting stops at ``limit``."""
    box, full = _box(size), (1 << size) - 1
    cells = list(grid)
    rows, cols, boxes = [0] * size, [0] * size, [0] * size
    for i, v in enumerate(cells):
        if v:
            r, c = divmod(i, size)
            bit = 1 << (v - 1)
            b = (r // box) * box + c // box
            if rows[r] & bit or cols[c] & bit or boxes[b] & bit:
                return 0  # the clues already clash
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    empty = [i for i, v in enumerate(cells) if not v]

    def solve(found: int) -> int:
        best, best_free = -1, None
        for i in empty:  # the most constrained empty cell first
            if cells[i]:
                continue
            r, c = divmod(i, size)
            free = full & ~(rows[r] | cols[c] | boxes[(r // box) * box + c // box])
            if best_free is None or bin(free).count("1") < bin(best_free).count("1"):
                best, best_free = i, free
                if free == 0:
                    return found
        if best < 0:
            return found + 1
        r, c = divmod(best, size)
        b = (r // box) * box + c // box
        free = best_free
        while free and found < limit:
            bit = free & -free
            free ^= bit
            cells[best] = bit.bit_length()
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            found = solve(found)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            cells[best] = 0
        return found

    return solve(0)


def is_solution(grid: Sequence[int], puzzle: Sequence[int], size: int) -> bool:
    """Every row, column and box a permutation of 1..size, and every clue of ``puzzle`` kept."""
    box = _box(size)
    if len(grid) != size * size or len(puzzle) != size * size:
        return False
    if any(p and g != p for g, p in zip(grid, puzzle)):
        return False
    want = set(range(1, size + 1))
    for k in range(size):
        row = {grid[k * size + c] for c in range(size)}
        col = {grid[r * size + k] for r in range(size)}
        br, bc = (k // box) * box, (k % box) * box
        blk = {grid[(br + r) * size + bc + c] for r in range(box) for c in range(box)}
        if row != want or col != want or blk != want:
            return False
    return True


def _solved_grid(rng: np.random.Generator, size: int) -> list[int]:
    box = _box(size)
    bands = rng.permutation(box)
    rows = [int(b) * box + int(r) for b in bands for r in rng.permutation(box)]
    stacks = rng.permutation(box)
    cols = [int(s) * box + int(c) for s in stacks for c in rng.permutation(box)]
    digits = rng.permutation(size) + 1
    return [int(digits[(box * (r % box) + r // box + c) % size]) for r in rows for c in cols]


def generate_puzzle(rng: np.random.Generator, size: int = 4, num_empty: int = 8) -> tuple[str, str]:
    """``(puzzle, solution)`` strings with exactly one solution and up to ``num_empty`` empty cells (fewer only
    when no further cell can be emptied without a second solution)."""
    solution = _solved_grid(rng, size)
    puzzle = list(solution)
    emptied = 0
    for i in rng.permutation(size * size):
        if emptied >= num_empty:
            break
        keep, puzzle[int(i)] = puzzle[int(i)], 0
        if count_solutions(puzzle, size) == 1:
            emptied += 1
        else:
            puzzle[int(i)] = keep
    return "".join(map(str, puzzle)), "".join(map(str, solution))


def _digits(text: str) -> list[int]:
    return [int(ch) for ch in text if ch in "0123456789"]


class SudokuReward(Reward):
    """Reads the ``puzzle`` and ``solution`` columns; see the module docstring for the score. ``tag=null`` reads the
    whole completion instead of the ``<answer>`` tag (for tiny models that emit only the grid)."""

    name = "sudoku"

    def __init__(self, exact: bool = False, tag: str | None = "answer"):
        self.exact, self.tag = bool(exact), tag

    def _one(self, completion: str, puzzle: str, solution: str) -> float:
        text = completion if self.tag is None else answer_tag(completion, self.tag)
        if text is None:
            return 0.0
        size = math.isqrt(len(puzzle))
        given = _digits(text)
        if not given:
            return 0.0
        if self.exact:
            return float(is_solution(given, _digits(puzzle), size))
        given = (given + [0] * len(puzzle))[: len(puzzle)]
        empty = [i for i, ch in enumerate(puzzle) if ch == "0"]
        if not empty:
            return 0.0
        return sum(given[i] == int(solution[i]) for i in empty) / len(empty)

    def score(self, completions: Sequence[str], prompts: Sequence[str], **columns) -> list[float]:
        n = len(completions)
        puzzles = column(columns, "puzzle", self.name, n)
        solutions = column(columns, "solution", self.name, n)
        return [self._one(c, str(p), str(s)) for c, p, s in zip(completions, puzzles, solutions)]


class SudokuPrompts:
    """``num_train`` / ``num_val`` generated puzzles with ``min_empty..max_empty`` empty cells, deterministic per
    ``seed``; no validation puzzle appears in training. Rows: ``prompt`` (``template`` filled with ``puzzle``,
    ``size``, ``box``, ``cells``), ``puzzle``, ``solution``."""

    def __init__(self, size: int = 4, min_empty: int = 6, max_empty: int = 10, num_train: int = 2000,
                 num_val: int = 200, seed: int = 0, template: str = PROMPT):
        _box(size)
        if not 1 <= min_empty <= max_empty < size * size:
            raise ValueError(f"need 1 <= min_empty <= max_empty < {size * size}, got {min_empty}..{max_empty}")
        self.size, self.min_empty, self.max_empty = int(size), int(min_empty), int(max_empty)
        self.num_train, self.num_val, self.seed, self.template = int(num_train), int(num_val), int(seed), template
        self._rows: dict[str, list[tuple[str, str]]] = {}

    def _generate(self) -> None:
        rng = np.random.default_rng([self.seed, 5113])
        self._rows = disjoint_splits(  # train may repeat a puzzle, never a validation one
            lambda: generate_puzzle(rng, self.size, int(rng.integers(self.min_empty, self.max_empty + 1))),
            lambda item: item[0], self.num_train, self.num_val, 50 * (self.num_val + self.num_train),
            50 * (self.num_train + 1), "too few distinct sudoku puzzles: raise max_empty or lower num_val/num_train")

    def rows(self, split: str) -> Iterator[dict[str, Any]]:
        if not self._rows:
            self._generate()
        box = _box(self.size)
        for puzzle, solution in self._rows[split_name(split)]:
            prompt = self.template.format(puzzle=puzzle, size=self.size, box=box, cells=self.size * self.size)
            yield {"prompt": prompt, "puzzle": puzzle, "solution": solution}

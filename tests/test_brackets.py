"""The embedded grammar task: balanced brackets (Dyck-2)."""

from __future__ import annotations

import pytest

from dlm.data.brackets import BracketsTask


@pytest.mark.parametrize(("text", "valid"), [
    ("()", True), ("([])[]", True), (" [()] ", True), ("", False), ("(]", False), ("(()", False),
    ("())", False), ("([)]", False), ("(a)", False),
])
def test_validity_is_exact(text, valid):
    assert BracketsTask.is_valid(text) is valid


def test_documents_are_valid_deterministic_and_splits_disjoint():
    task = BracketsTask(num_train=500, num_val=50, seed=3)
    train, val = task.documents("train"), task.documents("val")
    assert all(task.is_valid(d) for d in train + val)
    assert train == BracketsTask(num_train=500, num_val=50, seed=3).documents("train")
    assert not set(train) & set(val) and len(set(val)) == 50
    assert all(2 * task.min_pairs <= len(d) <= task.max_doc_len for d in train)


def test_infill_items_have_exactly_one_correct_fill():
    task = BracketsTask(num_train=100, num_val=50)
    for text, (pos,) in task.infill_items(20):
        fills = [text[:pos] + c + text[pos + 1 :] for c in task.alphabet]
        assert sum(task.is_valid(f) for f in fills) == 1, text


def test_prompts_can_be_completed_and_scores_count_grammatical_samples():
    task = BracketsTask(num_train=100, num_val=50)
    for prompt in task.prompts(10):
        open_brackets = []
        for c in prompt:
            open_brackets.append(c) if c in "([" else open_brackets.pop()
        closing = "".join(")" if c == "(" else "]" for c in reversed(open_brackets))  # innermost first
        assert prompt and task.is_valid(prompt + closing)
    scores = task.score_samples(["()", "(]", task.documents("train")[0]])
    assert scores["valid_frac"] == pytest.approx(2 / 3) and scores["novel_frac"] <= scores["valid_frac"]

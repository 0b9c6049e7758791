"""MATH answer matching: the last ``\\boxed{}`` of a completion against the reference's, after light normalisation.

The normalisation follows the spirit of Hendrycks et al.'s ``strip_string`` (used by d1's ``math500_utils`` and
lm-evaluation-harness's ``minerva_math``), reimplemented: spacing, ``\\left``/``\\right``, ``\\!``, ``dfrac``/``tfrac``,
degrees, ``\\$`` and trailing units in ``\\text{}`` are dropped; ``\\frac12`` becomes ``\\frac{1}{2}``, ``a/b``
becomes ``\\frac{a}{b}``, a leading ``x =`` is removed, ``0.5`` and ``.5`` are the same number. Two answers that
both read as numbers (``\\frac{1}{2}`` and ``0.5``, ``1,000`` and ``1000``) are compared by value. This is string
matching, not a computer-algebra check: ``\\sqrt{8}`` and ``2\\sqrt{2}`` stay different.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from dlm.rewards.answers import answer_tag, last_boxed, number_value
from dlm.rewards.base import Reward
from dlm.rewards.columns import column

__all__ = ["MathReward", "normalize_math", "math_equal", "math_prediction", "math_reference"]

_ANSWER_IS = re.compile(r"answer\s+is\s*[:=]?\s*", re.IGNORECASE)


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{b} -> \frac{1}{b}: single-character arguments get braces
    return re.sub(r"\\frac(?!\{)(\w)(?!\{)(\w)", r"\\frac{\1}{\2}", re.sub(r"\\frac(\w)\{", r"\\frac{\1}{", s))


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(?!\{)(\w)", r"\\sqrt{\1}", s)


def normalize_math(answer: str) -> str:
    """A canonical string for a MATH answer (see the module docstring)."""
    s = answer.strip().replace("\n", "").rstrip(".")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", s.rstrip())  # trailing units: 5\text{ cm}
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    if re.match(r"^[a-zA-Z]\s*=", s) and len(s.split("=")[0].strip()) <= 2:  # "x = 5" -> "5"
        s = s.split("=", 1)[1]
    s = s.replace(" ", "")
    s = _fix_sqrt(_fix_fracs(s))
    if re.fullmatch(r"-?\d+/\d+", s):  # a/b -> \frac{a}{b}
        num, den = s.split("/")
        s = f"\\frac{{{num}}}{{{den}}}"
    if s.startswith("."):
        s = "0" + s
    return s


def math_equal(prediction: str | None, reference: str | None) -> bool:
    """Equal after :func:`normalize_math`, or equal in value when both read as numbers."""
    if prediction is None or reference is None:
        return False
    a, b = normalize_math(prediction), normalize_math(reference)
    if not a:
        return False
    if a == b:
        return True
    va, vb = number_value(a), number_value(b)
    return va is not None and va == vb


def math_prediction(completion: str) -> str | None:
    """A completion's answer: its last ``\\boxed{}``, else the ``<answer>`` tag's (boxed inside it or bare), else
    what follows the last "The answer is" up to the end of the sentence."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    tagged = answer_tag(completion)
    if tagged is not None:
        return tagged
    hits = list(_ANSWER_IS.finditer(completion))
    if hits:
        tail = completion[hits[-1].end():].strip()
        return re.split(r"\.\s|\.$|\n", tail, maxsplit=1)[0].strip() or None
    return None


def math_reference(answer: str) -> str:
    """A MATH reference: the last ``\\boxed{}`` of a worked solution, or the text itself (MATH-500's ``answer``)."""
    boxed = last_boxed(answer)
    return boxed if boxed is not None else answer.strip()


class MathReward(Reward):
    """``value`` when the completion's answer (:func:`math_prediction`) matches the reference's
    (:func:`math_reference` of the ``answer`` column) under :func:`math_equal`, else 0.0."""

    name = "math"

    def __init__(self, value: float = 1.0, answer_column: str = "answer"):
        self.value, self.answer_column = float(value), answer_column

    def score(self, completions: Sequence[str], prompts: Sequence[str], **columns) -> list[float]:
        answers = column(columns, self.answer_column, self.name, len(completions))
        return [
            self.value if math_equal(math_prediction(c), math_reference(str(a))) else 0.0
            for c, a in zip(completions, answers)
        ]

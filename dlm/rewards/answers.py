"""Answer extraction shared by the rewards: the ``<answer>`` tag, numbers (GSM8K style) and ``\\boxed{}`` (MATH).

Sources for the conventions (reimplemented, not copied): d1's ``diffu-grpo/reward_func.py`` (the last
``<answer>...</answer>`` holds the answer), lm-evaluation-harness's gsm8k filters (the reference is the number after
``####``; a completion's answer is "The answer is N" or else its last number) and Hendrycks et al.'s MATH
``last_boxed_only_string`` / ``strip_string`` (the last ``\\boxed{...}``, compared after light normalisation).
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "answer_tag",
    "last_boxed",
    "number_value",
    "gsm8k_reference",
    "gsm8k_prediction",
]

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_ANSWER_IS = re.compile(r"answer\s+is\s*[:=]?\s*", re.IGNORECASE)


def answer_tag(text: str, tag: str = "answer") -> str | None:
    """The stripped contents of the last complete ``<tag>...</tag>``, or None when there is none."""
    matches = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return matches[-1].strip() if matches else None


def last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``), braces matched; None if
    there is none or its braces never close."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    head = "\\boxed" if rest.startswith("\\boxed") else "\\fbox"
    rest = rest[len(head):]
    if rest.startswith(" ") and head == "\\boxed":  # "\boxed 5": up to the next space or '$'
        return re.split(r"[\s$]", rest.lstrip(), maxsplit=1)[0] or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        depth += char == "{"
        depth -= char == "}"
        if depth == 0:
            return rest[1:i].strip()
    return None


def number_value(text: str | None) -> Fraction | None:
    """``"1,234.50"`` / ``"$7"`` / ``"-.5"`` / ``"3/4"`` / ``"18."`` as an exact value; None if not a number."""
    if text is None:
        return None
    s = text.strip().replace("$", "").replace(" ", "").rstrip(".")
    if "," in s:  # only thousands separators: "1,234" is a number, "1,2" (a list of two) is not
        if not re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d*)?", s):
            return None
        s = s.replace(",", "")
    s = re.sub(r"\\(?:text|mathrm)\{[^{}]*\}$", "", s)  # a trailing unit: 5\text{ cm}
    s = s.replace("\\%", "").rstrip("%")
    frac = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if frac:
        s = f"{frac.group(1)}/{frac.group(2)}"
    if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/-?\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_reference(answer: str) -> str:
    """A GSM8K reference's final answer: the text after ``####`` (commas removed), or the whole text."""
    final = answer.split("####")[-1] if "####" in answer else answer
    return final.strip().replace(",", "")


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def gsm8k_prediction(completion: str) -> str | None:
    """A completion's final number, from the most explicit marker present: ``\\boxed{}``, then the ``<answer>`` tag,
    then "The answer is", then ``####``; else the last number in the text. None when no number is found."""
    boxed = last_boxed(completion)
    if boxed is not None and _last_number(boxed) is not None:
        return _last_number(boxed)
    tagged = answer_tag(completion)
    if tagged is not None and _last_number(tagged) is not None:
        return _last_number(tagged)
    for marker in (_ANSWER_IS, re.compile("####")):
        hits = list(marker.finditer(completion))
        if hits:
            number = _NUMBER.match(completion, hits[-1].end())
            if number is not None:
                return number.group(0)
    return _last_number(completion)

"""A small, safe parser for the arithmetic expressions of Countdown answers: integers, ``+ - * /`` and parentheses.

Model output is never passed to ``eval``: the text is tokenised and parsed by a recursive-descent grammar
(``expr := term (('+'|'-') term)*``, ``term := factor (('*'|'/') factor)*``, ``factor := INT | '(' expr ')'``),
evaluated exactly in :class:`fractions.Fraction` (so ``6/4*2`` is exactly 3, and division by zero is refused rather
than turned into inf). Unary signs, decimals, exponents, names and any other character are refused: Countdown
answers combine the given numbers with the four binary operations only (d1 / TinyZero's task). Length and nesting
are bounded so that hostile input costs microseconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

__all__ = ["ExpressionError", "evaluate", "numbers_in"]

MAX_CHARS = 256
MAX_DEPTH = 32


class ExpressionError(ValueError):
    """The text is not an expression of the allowed form, or it uses numbers it was not given."""


def _tokens(text: str) -> list[str]:
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"expression longer than {MAX_CHARS} characters")
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
        elif char in "+-*/()":
            out.append(char)
            i += 1
        elif char in "0123456789":  # ASCII digits only: str.isdigit() also accepts '²' and other scripts
            j = i
            while j < len(text) and text[j] in "0123456789":
                j += 1
            out.append(text[i:j])
            i = j
        else:
            raise ExpressionError(f"character {char!r} is not allowed (digits, + - * / and parentheses only)")
    if not out:
        raise ExpressionError("empty expression")
    return out


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.numbers = tokens, 0, []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("expression ends too early")
        self.pos += 1
        return token

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor(depth)
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise ExpressionError("division by zero")
            else:
                value = value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        token = self.take()
        if token == "(":
            if depth >= MAX_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("unbalanced parentheses")
            return value
        if token.isdigit():
            if len(token) > 1 and token[0] == "0":
                raise ExpressionError(f"number {token!r} has a leading zero")
            self.numbers.append(int(token))
            return Fraction(int(token))
        raise ExpressionError(f"expected a number or '(' but found {token!r} (unary signs are not allowed)")


def numbers_in(text: str) -> list[int]:
    """The integers an expression uses, in order (parses it fully: junk raises :class:`ExpressionError`)."""
    parser = _Parser(_tokens(text))
    parser.expr(0)
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r} after a complete expression")
    return parser.numbers


def evaluate(text: str, numbers: Sequence[int] | None = None, use_all: bool = False) -> Fraction:
    """The exact value of ``text``. With ``numbers``, each given number may be used at most once (a multiset:
    ``[3, 3]`` allows two 3s), and with ``use_all`` every one of them exactly once; anything else raises."""
    parser = _Parser(_tokens(text))
    value = parser.expr(0)
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r} after a complete expression")
    if numbers is not None:
        used, given = Counter(parser.numbers), Counter(int(n) for n in numbers)
        extra = used - given
        if extra:
            raise ExpressionError(f"uses {sorted(extra.elements())} beyond the given numbers {sorted(given.elements())}")
        if use_all and used != given:
            raise ExpressionError(f"leaves {sorted((given - used).elements())} unused; every number must be used once")
    return value

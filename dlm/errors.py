"""Bad input, reported as bad input: one line that says what is wrong and what would be right, exit status 2, no
traceback. Every CLI runs its work under :func:`user_errors`; library code raises a :class:`UserError` (or a
subclass: ``ConfigError``, ``NotARunError``, ``GenerateError``, ``UnsafeCheckpointError`` ...) where the input
is at fault, and lets every other exception propagate, since a traceback is the right report of a bug."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """The input is wrong. The message names the field (or file) and the valid form; CLIs print it without a
    traceback and exit with status 2."""


@contextlib.contextmanager
def user_errors(*also: type[BaseException]) -> Iterator[None]:
    """Turn a :class:`UserError` (and the exception types in ``also``) into ``error: <message>`` on stderr and
    ``SystemExit(2)``; anything else propagates unchanged."""
    try:
        yield
    except (UserError, *also) as err:
        message = str(err).strip() or type(err).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None

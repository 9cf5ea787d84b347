"""Reading the keyword/value words of LAMMPS commands (``pair_style ltau``, ``fix ltau``).

One small reader and the value converters, so both styles word their errors alike: every
message names the keyword and what it needs.
"""

from __future__ import annotations

import math

from ltau_lmp.errors import LTAUError


class Words:
    """The words of one command, consumed front to back."""

    def __init__(self, words):
        self.rest = list(words)

    def __bool__(self) -> bool:
        return bool(self.rest)

    def pop(self) -> str:
        """The next word (a keyword); call only while words remain."""
        return self.rest.pop(0)

    def peek(self) -> str | None:
        return self.rest[0] if self.rest else None

    def take(self, keyword: str, what: str) -> str:
        """The next word, the value of ``keyword``; ``what`` says what was expected."""
        if not self.rest:
            raise LTAUError(f"keyword {keyword} needs {what}")
        return self.rest.pop(0)


def number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LTAUError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise LTAUError(f"{what} must be finite, got {text!r}")
    return value


def choice(text: str, what: str, choices) -> str:
    if text not in choices:
        raise LTAUError(f"{what} must be {' or '.join(choices)}, got {text!r}")
    return text


def yes_no(text: str, what: str) -> bool:
    return choice(text, what, ("yes", "no")) == "yes"


def threshold(text: str, what: str) -> float:
    value = number(text, f"{what} threshold")
    if value < 0:
        raise LTAUError(f"{what} threshold must be >= 0, got {value}")
    return value


def positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise LTAUError(f"{what} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise LTAUError(f"{what} must be a positive integer, got {value}")
    return value

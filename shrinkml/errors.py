"""Errors a user can act on.

Every error shrinkml raises for bad input reads as one paragraph: what went wrong, where (file,
field or layer), what was expected, what was found, and how to fix it. The CLI prints the message
without a traceback (unless ``--debug``) and exits with the error's ``exit_code``.

A message never echoes a whole input: ``brief`` renders a value in at most ``VALUE_CHARS``
characters, and ``InputError`` cuts each part and the whole message (``MESSAGE_CHARS``), so no
caller can turn a megabyte of hostile input into a megabyte of error.
"""

from __future__ import annotations

import reprlib

VALUE_CHARS = 80  # one rendered input value
PART_CHARS = 300  # one part of a message (what, where, expected, found, fix)
MESSAGE_CHARS = 600  # the whole paragraph

# reprlib bounds the work as well as the length: it never walks more than a few items or levels,
# so rendering a huge (or alias-shared, exponentially large) structure costs microseconds.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 4, 6
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = VALUE_CHARS, 40, VALUE_CHARS


def clip(text: str, limit: int, *, tail: int | None = None) -> str:
    """``text`` if it fits in ``limit`` characters, else its start and its last ``tail`` characters
    around "..." (the end often says the most: a line number, a closing quote, the fix)."""
    if len(text) <= limit:
        return text
    tail = min(limit // 3 if tail is None else tail, limit - 4)
    return text[: limit - 3 - tail] + "..." + (text[len(text) - tail :] if tail else "")


def brief(value: object, limit: int = VALUE_CHARS) -> str:
    """``repr(value)`` in at most ``limit`` characters, e.g. for an error's ``found``."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001  (any repr may raise, and an int too long to print does; still name it)
        text = f"<{type(value).__name__}>"
    return clip(text, limit)


class ShrinkmlError(Exception):
    """Base class of all errors shrinkml reports to users."""

    exit_code = 2


class InputError(ShrinkmlError):
    """Bad input or environment: a file, a field, a model or data that cannot be used (exit 2)."""

    exit_code = 2

    def __init__(
        self,
        what: str,
        *,
        where: str | None = None,
        expected: str | None = None,
        found: str | None = None,
        fix: str | None = None,
    ) -> None:
        what, where, expected, found, fix = (
            None if part is None else clip(str(part), PART_CHARS) for part in (what, where, expected, found, fix)
        )
        self.what, self.where, self.expected, self.found, self.fix = what, where, expected, found, fix
        text = (f"{where}: {what}" if where else what).rstrip(".") + "."
        if expected is not None and found is not None:
            text += f" Expected {expected}, found {found}."
        elif expected is not None:
            text += f" Expected {expected}."
        elif found is not None:
            text += f" Found {found}."
        fix_text = f" Fix: {fix.rstrip('.')}." if fix else ""
        # cut from the middle, so the reader keeps where it happened and how to fix it
        super().__init__(clip(text + fix_text, MESSAGE_CHARS, tail=min(len(fix_text) + 20, MESSAGE_CHARS // 2)))


class BudgetNotMet(ShrinkmlError):
    """The run finished and the report was written, but the accuracy budget was not met (exit 1)."""

    exit_code = 1

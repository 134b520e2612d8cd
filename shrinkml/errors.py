"""Errors a user can act on.

Every error shrinkml raises for bad input reads as one paragraph: what went wrong, where (file,
field or layer), what was expected, what was found, and how to fix it. The CLI prints the message
without a traceback (unless ``--debug``) and exits with the error's ``exit_code``.
"""

from __future__ import annotations


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
        self.what, self.where, self.expected, self.found, self.fix = what, where, expected, found, fix
        parts = [f"{where}: {what}" if where else what]
        if expected is not None:
            parts.append(f"Expected {expected}")
        if found is not None:
            parts.append(f"found {found}" if expected is not None else f"Found {found}")
        text = parts[0].rstrip(".") + "."
        if expected is not None and found is not None:
            text += f" Expected {expected}, found {found}."
        elif expected is not None:
            text += f" Expected {expected}."
        elif found is not None:
            text += f" Found {found}."
        if fix:
            text += f" Fix: {fix.rstrip('.')}."
        super().__init__(text)


class BudgetNotMet(ShrinkmlError):
    """The run finished and the report was written, but the accuracy budget was not met (exit 1)."""

    exit_code = 1

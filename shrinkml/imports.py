"""Import ``package.module:attribute`` specs given on the command line."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from shrinkml.errors import InputError


def import_object(spec: str, *, what: str) -> Any:
    """Import ``package.module:attr`` (the current directory is importable, as in ``python -m``)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(
            f"{what} spec is malformed",
            where=spec,
            expected="package.module:name",
            fix="write the module path, a colon, then the callable's name",
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(
            f"cannot import module {module_name!r} ({exc})",
            where=spec,
            fix="check the module path and run from the folder that contains the package"
            " (or install it)",
        ) from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise InputError(
            f"module {module_name!r} has no attribute {attr!r}",
            where=spec,
            fix="check the name after the colon",
        ) from None
    if not callable(obj):
        raise InputError(f"{what} is not callable", where=spec, found=type(obj).__name__)
    return obj

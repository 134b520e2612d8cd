"""Quantities as users type them: ``10MB``, ``512KiB``, ``50ms``, ``0.2s``, ``30m``, ``1h``."""

from __future__ import annotations

import re

from shrinkml.errors import InputError

_SIZE = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_TIME_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_DURATION_S = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*"


def _parse(text: str, units: dict[str, float], option: str, example: str) -> float:
    match = re.fullmatch(_NUMBER, str(text).strip().lower())
    if match is None or match.group(2) not in units:
        raise InputError(f"{option} {text!r} is not a quantity shrinkml reads", where=option,
                         expected=f"a number with a unit ({', '.join(u for u in units if u)}), e.g. {example}",
                         found=repr(text), fix=f"pass e.g. {option} {example}")
    value = float(match.group(1)) * units[match.group(2)]
    if value <= 0:
        raise InputError(f"{option} must be positive", where=option, found=repr(text), fix=f"pass e.g. {option} {example}")
    return value


def parse_size(text: str, option: str = "--max-size") -> int:
    """Bytes: ``10MB`` is 10,000,000 bytes, ``10MiB`` 10,485,760; a bare number is bytes."""
    return int(_parse(text, _SIZE, option, "10MB"))


def parse_latency_ms(text: str, option: str = "--max-latency") -> float:
    """Milliseconds: ``50ms``, ``0.05s``, ``500us``."""
    return _parse(text, _TIME_MS, option, "50ms")


def parse_duration_s(text: str, option: str = "--time-budget") -> float:
    """Seconds: ``30m``, ``1.5h``, ``90s``; a bare number is seconds."""
    return _parse(text, _DURATION_S, option, "30m")

"""The one layer selector every technique uses (``keep_float``, ``ignore``): module-name globs.

A pattern is an ``fnmatch`` glob over PyTorch module names (``classifier``, ``encoder.layer.*.output``,
``features.0``). It selects the module it names **and everything inside it**: ``encoder.layer.0``
selects that block's Linears too, the same in PyTorch modules and in ONNX graphs, whose nodes are
named after the module they came from (``shrinkml.runtimes.onnx_names``; an ONNX node's own name
also matches). Every pattern must select something: a pattern that matches no layer is an error
naming the layers there are, never a silent no-op. ``keep_float: auto`` (the quantizers) is the
sensitivity search of ``shrinkml.quant.sensitivity``, choosing on the validation split.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from shrinkml.errors import InputError


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when module ``name`` or a module containing it matches one of the glob ``patterns``.

    >>> matches("encoder.layer.0.attention.query", ["encoder.layer.0"])
    True
    >>> matches("encoder.layer.10.output", ["encoder.layer.1"])
    False
    """
    prefixes = _prefixes(name) if name else [name]
    return any(fnmatch.fnmatchcase(p, pattern) for pattern in patterns for p in prefixes)


def unmatched(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The patterns that select none of ``names``."""
    names = list(names)
    return [p for p in patterns if not any(matches(n, [p]) for n in names)]


def no_match_error(pattern: str, candidates: Sequence[str], *, where: str, what: str = "layers") -> InputError:
    known = sorted(set(candidates))
    return InputError(
        f"no layer matches {pattern!r}",
        where=where,
        expected="a module name or glob such as 'classifier' or 'encoder.layer.*.output' (it selects that module"
        " and everything inside it)",
        found=f"{what} " + (", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "none"),
        fix="use one of the listed layer names",
    )


def select(names: Iterable[str], patterns: Iterable[str], *, where: str, candidates: Sequence[str] | None = None,
           what: str = "layers") -> list[str]:
    """The ``names`` (module names, in their order) that ``patterns`` select; raises ``InputError``
    for a pattern that selects none of them (listing ``candidates``, default ``names``)."""
    names, patterns = list(names), list(patterns)
    for pattern in unmatched(names, patterns):
        raise no_match_error(pattern, names if candidates is None else candidates, where=where, what=what)
    return [n for n in names if matches(n, patterns)]

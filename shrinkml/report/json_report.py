"""The report as JSON: the schema name, the minimum contract every renderer relies on, and a writer
whose output any JSON parser accepts (no ``NaN``/``Infinity``, which Python emits by default).

The contract is checked by hand rather than with pydantic so that every problem is listed at once,
by its dotted key path, in the words a reader of the JSON file uses.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable

from shrinkml.atomic import write_text

# /2: delta.speedup_* became {"value", "ci95", "verdict", "rounds"} (a float in /1),
# compressed.agreement_with_baseline became {"metric", "value", "ci95"}, and "timing" was added.
REPORT_SCHEMA = "shrinkml.report/2"

_SIDES = ("baseline", "compressed")
_DROP_TYPES = ("absolute", "relative")
_BATCH_KEYS = ("batch_1", "batch_n")
# The same words as shrinkml.measure.stats.SPEEDUP_VERDICTS, kept here so validating imports no numpy.
_SPEEDUP_VERDICTS = ("faster", "slower", "no measurable difference")
_AGREEMENT_METRICS = ("top1_agreement", "cosine_similarity")


class _Kind:
    """An expected type: its name for messages and a test. ``None`` is allowed when ``optional``."""

    def __init__(self, name: str, test: Callable[[Any], bool], optional: bool = False) -> None:
        self.base = name
        self.name = f"{name} or None" if optional else name
        self.test = test
        self.optional = optional

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.optional else f"expected {self.name}, got None"
        if self.test(value):
            return None
        if self.base == "float" and _is_real(value) and not math.isfinite(value):
            # NaN passes no JSON parser and would turn into null on disk: catch it where it is made.
            return f"expected finite {self.name}, got {value!r}"
        return f"expected {self.name}, got {type(value).__name__}"


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True as a byte count is always a bug upstream.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return _is_real(value) and math.isfinite(value)


_INT = _Kind("int", _is_int)
_FLOAT = _Kind("float", _is_finite)
_STR = _Kind("str", lambda v: isinstance(v, str))
_BOOL = _Kind("bool", lambda v: isinstance(v, bool))
_DICT = _Kind("dict", lambda v: isinstance(v, dict))
_LIST = _Kind("list", lambda v: isinstance(v, list))


def _optional(kind: _Kind) -> _Kind:
    return _Kind(kind.base, kind.test, optional=True)


class _Checker:
    """Walks the report by dotted paths, collecting one message per problem."""

    def __init__(self, report: Any) -> None:
        self.report = report
        self.problems: list[str] = []
        self._failed: set[str] = set()  # paths already reported, so a missing parent is said once

    def get(self, path: str, expected: str = "a value") -> tuple[bool, Any]:
        node = self.report
        walked: list[str] = []
        keys = path.split(".")
        for depth, key in enumerate(keys):
            walked.append(key)
            here = ".".join(walked)
            if here in self._failed:
                return False, None
            if not isinstance(node, dict):
                self.fail(".".join(walked[:-1]), f"expected dict, got {type(node).__name__}")
                return False, None
            if key not in node:
                wanted = expected if depth == len(keys) - 1 else "dict"
                self.fail(here, f"missing, expected {wanted}")
                return False, None
            node = node[key]
        return True, node

    def check(self, path: str, kind: _Kind) -> Any:
        found, value = self.get(path, kind.name)
        if not found:
            return None
        problem = kind.problem(value)
        if problem:
            self.fail(path, problem)
            return None
        return value

    def check_ci(self, path: str) -> None:
        found, value = self.get(path, "[low, high]")
        if not found:
            return
        bounds_ok = isinstance(value, (list, tuple)) and len(value) == 2
        # A bound may be None where the sample was too small to bootstrap.
        if bounds_ok and all(b is None or _is_finite(b) for b in value):
            return
        self.fail(path, f"expected [low, high] of two floats (or None), got {value!r}")

    def fail(self, path: str, message: str) -> None:
        if path not in self._failed:
            self._failed.add(path)
            self.problems.append(f"{path or '<report>'}: {message}")


def validate_report(report: dict) -> None:
    """Check the minimum contract the renderers rely on; raise ``ValueError`` listing every problem.

    Each problem names its dotted key path, what was expected and what was found, e.g.
    ``baseline.latency_ms.batch_n.p50: expected float, got str``. Keys beyond the contract are
    allowed, so later versions can add fields without breaking older readers.

    >>> validate_report(report)  # doctest: +SKIP
    """
    if not isinstance(report, dict):
        raise ValueError(f"report: expected dict, got {type(report).__name__}")
    c = _Checker(report)
    schema = c.check("schema", _STR)
    if schema is not None and schema != REPORT_SCHEMA:
        c.fail("schema", f"expected {REPORT_SCHEMA!r}, got {schema!r}")
    c.check("created", _STR)
    c.check("task.name", _STR)
    primary = c.check("task.primary_metric", _STR)

    for side in _SIDES:
        c.check(f"{side}.size_bytes", _INT)
        c.check(f"{side}.params", _INT)
        c.check(f"{side}.nonzero_params", _INT)
        c.check(f"{side}.macs", _optional(_INT))
        c.check(f"{side}.peak_memory_bytes", _optional(_INT))
        for stat in ("p50", "p95"):
            c.check(f"{side}.latency_ms.batch_1.{stat}", _FLOAT)
            c.check(f"{side}.latency_ms.batch_n.{stat}", _FLOAT)
        c.check(f"{side}.latency_ms.batch_n.n", _INT)
        metrics = c.check(f"{side}.metrics", _DICT)
        for name in metrics or {}:
            c.check(f"{side}.metrics.{name}", _DICT)
            c.check(f"{side}.metrics.{name}.value", _optional(_FLOAT))
            c.check_ci(f"{side}.metrics.{name}.ci95")
        if metrics is not None and primary is not None and primary not in metrics:
            c.fail(f"{side}.metrics.{primary}",
                    f"missing: task.primary_metric names it; found metrics {sorted(metrics)}")
        side_entry = report.get(side)
        if isinstance(side_entry, dict) and side_entry.get("artifact") is not None:
            # {"file": its name in --out, or None for the user's input model, "description": ...}
            c.check(f"{side}.artifact", _DICT)
            c.check(f"{side}.artifact.file", _optional(_STR))
            c.check(f"{side}.artifact.description", _STR)
    agreement = c.check("compressed.agreement_with_baseline", _optional(_DICT))
    if agreement is not None:
        metric = c.check("compressed.agreement_with_baseline.metric", _STR)
        if metric is not None and metric not in _AGREEMENT_METRICS:
            c.fail("compressed.agreement_with_baseline.metric",
                   f"expected one of {list(_AGREEMENT_METRICS)}, got {metric!r}")
        c.check("compressed.agreement_with_baseline.value", _optional(_FLOAT))
        c.check_ci("compressed.agreement_with_baseline.ci95")

    c.check("delta.size_ratio", _FLOAT)
    for key in _BATCH_KEYS:
        c.check(f"delta.speedup_{key}.value", _FLOAT)
        c.check_ci(f"delta.speedup_{key}.ci95")
        verdict = c.check(f"delta.speedup_{key}.verdict", _STR)
        if verdict is not None and verdict not in _SPEEDUP_VERDICTS:
            c.fail(f"delta.speedup_{key}.verdict", f"expected one of {list(_SPEEDUP_VERDICTS)}, got {verdict!r}")
    c.check("delta.accuracy_drop.value", _optional(_FLOAT))
    c.check_ci("delta.accuracy_drop.ci95")

    c.check("budget.max_drop", _FLOAT)
    drop_type = c.check("budget.drop_type", _STR)
    if drop_type is not None and drop_type not in _DROP_TYPES:
        c.fail("budget.drop_type", f"expected one of {list(_DROP_TYPES)}, got {drop_type!r}")
    c.check("budget.met", _BOOL)
    found, _ = c.get("budget")
    if found and "worst_case_drop" in report["budget"]:
        c.check("budget.worst_case_drop", _optional(_FLOAT))

    c.check("cost", _DICT)
    c.check("recipe", _DICT)
    for optional_section in ("runtime", "data", "export"):
        if optional_section in report:
            c.check(optional_section, _optional(_DICT))
    for optional_list in ("steps", "notes"):
        if optional_list in report:
            c.check(optional_list, _LIST)

    c.check("timing.unstable", _BOOL)
    for key in _BATCH_KEYS:
        c.check(f"timing.{key}.rounds", _INT)
        c.check(f"timing.{key}.cap_hit", _BOOL)
        c.check(f"timing.{key}.unstable", _BOOL)
        c.check(f"timing.{key}.unstable_reasons", _LIST)

    c.check("environment.python", _STR)
    for key in ("torch", "onnxruntime", "cpu"):
        c.check(f"environment.{key}", _optional(_STR))
    c.check("environment.threads", _INT)
    c.check("environment.seed", _optional(_INT))

    if c.problems:
        count = len(c.problems)
        head = f"invalid {REPORT_SCHEMA} report ({count} problem{'s' if count > 1 else ''}):"
        raise ValueError("\n".join([head, *(f"  {p}" for p in c.problems)]))


def to_jsonable(value: Any, path: str = "") -> Any:
    """Return ``value`` as plain JSON types: non-finite floats become ``None``, numpy scalars and
    arrays become Python numbers and lists, tuples become lists, paths become strings.

    >>> to_jsonable({"p50": float("nan"), "ci95": (0.1, 0.2)})
    {'p50': None, 'ci95': [0.1, 0.2]}
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, without importing numpy here
        return to_jsonable(value.tolist(), path)
    raise TypeError(f"{path or '<report>'}: cannot write {type(value).__name__} to JSON")


def dumps_report(report: dict) -> str:
    """Serialise the report as indented JSON in insertion order, with ``NaN``/``inf`` as ``null``.

    >>> json.loads(dumps_report(report))["schema"]  # doctest: +SKIP
    'shrinkml.report/2'
    """
    return json.dumps(to_jsonable(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(report: dict, path: str | os.PathLike) -> Path:
    """Write ``dumps_report(report)`` to ``path`` atomically (no partial file is ever visible).

    Validation is the caller's choice: ``write_reports`` validates first.
    """
    return write_text(path, dumps_report(report))

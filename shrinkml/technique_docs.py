"""What ``shrinkml techniques NAME`` shows: one row per config key (type, default, range,
description) as a Rich table, or the config's JSON schema.

Everything is read from the pydantic config class, so the table cannot drift from what a recipe
accepts. Rich is imported only inside ``render_technique_table``.

>>> from shrinkml.techniques.finetune import FinetuneConfig
>>> row = next(r for r in technique_rows(FinetuneConfig) if r["key"] == "optimizer")
>>> row["type"], row["default"], row["range"]
('one of adam, sgd', 'adam', '')
"""

from __future__ import annotations

import json
import types
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic_core import PydanticUndefined

from shrinkml.recipe import _interval

if TYPE_CHECKING:
    from rich.table import Table

    from shrinkml.techniques.base import StepConfig

COLUMNS = ("key", "type", "default", "range", "description")


def _literal_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _type_text(annotation: Any) -> str:
    """A type as a reader of a YAML recipe thinks of it: ``float``, ``one of l1, l2``, ``list of str``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        values = [_literal_text(a) for a in args]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if origin in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        text = " or ".join(_type_text(a) for a in present)
        return text + " or null" if len(present) < len(args) else text
    if origin in (tuple, list, set, frozenset):
        items = [a for a in args if a is not Ellipsis]
        if len(items) == 1 and (Ellipsis in args or origin is not tuple):
            item = items[0]
            if get_origin(item) is Literal:
                return "list of {" + ", ".join(_literal_text(a) for a in get_args(item)) + "}"
            return f"list of {_type_text(item)}"
        return f"list of {len(items)}: " + ", ".join(_type_text(a) for a in items)
    return getattr(annotation, "__name__", str(annotation))


def _default_text(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, str):
        return value
    return json.dumps(value if not isinstance(value, tuple) else list(value))


def _range_text(config_cls: type[StepConfig], key: str) -> str:
    parts = []
    interval = _interval(config_cls, key)
    if interval:
        parts.append(interval)
    for meta in config_cls.model_fields[key].metadata:
        if isinstance(meta, annotated_types.MinLen) and meta.min_length > 0:
            parts.append(f"at least {meta.min_length} item" + ("s" if meta.min_length > 1 else ""))
        elif isinstance(meta, annotated_types.MaxLen):
            parts.append(f"at most {meta.max_length} items")
    return ", ".join(parts)


def technique_rows(config_cls: type[StepConfig]) -> list[dict[str, str]]:
    """One row per config field, in declaration order: key, type, default, range, description.

    ``range`` is the numeric interval (``[0, 1)``) and/or length limit, empty when there is none;
    ``default`` is written as in YAML/JSON (``true``, ``null``, ``["MatMul", "Gemm"]``).
    """
    return [
        {
            "key": key,
            "type": _type_text(field.annotation),
            "default": _default_text(field),
            "range": _range_text(config_cls, key),
            "description": field.description or "",
        }
        for key, field in config_cls.model_fields.items()
    ]


def render_technique_table(name: str, config_cls: type[StepConfig]) -> Table:
    """The rows of ``technique_rows`` as a Rich table titled with the technique's name and summary."""
    from rich.table import Table
    from rich.text import Text

    summary = (config_cls.__doc__ or "").strip().replace("``", "").splitlines()
    # Text, not markup strings: ranges such as "[1, 10]" and glob patterns must print as written
    table = Table(title=Text(f"{name}: {summary[0]}" if summary else name), title_justify="left")
    for column in COLUMNS:
        table.add_column(column, overflow="fold", ratio=3 if column == "description" else None)
    for row in technique_rows(config_cls):
        table.add_row(*(Text(row[column]) for column in COLUMNS))
    return table


def technique_schema(config_cls: type[StepConfig]) -> dict[str, Any]:
    """The config's JSON schema (pydantic's, validation mode): every key with its type, default,
    bounds and description; ``additionalProperties: false`` because unknown keys are errors."""
    return config_cls.model_json_schema()

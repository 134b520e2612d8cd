"""Every registered technique documents every config key: a one-line description per field, a
readable table row per field (``shrinkml techniques NAME``) and a JSON schema that round-trips.

Adding a field without ``Field(..., description="...")`` fails here."""

from __future__ import annotations

import io
import json
from typing import Literal

import pytest
from pydantic import Field
from pydantic_core import to_jsonable_python
from rich.console import Console

from shrinkml.technique_docs import COLUMNS, render_technique_table, technique_rows, technique_schema
from shrinkml.techniques.base import StepConfig, registry

TECHNIQUES = sorted(registry())
# keys a config needs beyond its defaults to be valid (prune.layers: keep or keep_layers)
REQUIRED_EXTRA = {"prune.layers": {"keep": 2}}


def config_cls(name: str) -> type[StepConfig]:
    return registry()[name].config_cls


def undocumented(cls: type[StepConfig]) -> list[str]:
    """Fields whose description is missing, blank or longer than one line."""
    return [
        key
        for key, field in cls.model_fields.items()
        if not (field.description or "").strip() or "\n" in field.description
    ]


def test_the_check_catches_an_undocumented_field():
    class Sloppy(StepConfig):
        technique: Literal["sloppy"] = Field("sloppy", description="the technique this step runs")
        documented: int = Field(1, description="a documented key")
        forgotten: float = 0.5

    assert undocumented(Sloppy) == ["forgotten"]


@pytest.mark.parametrize("name", TECHNIQUES)
def test_every_field_has_a_one_line_description(name):
    missing = undocumented(config_cls(name))
    assert not missing, f"{name}: add Field(..., description='...') to {', '.join(missing)}"


@pytest.mark.parametrize("name", TECHNIQUES)
def test_rows_render_every_field(name):
    cls = config_cls(name)
    rows = technique_rows(cls)
    assert [row["key"] for row in rows] == list(cls.model_fields)
    for row in rows:
        assert tuple(row) == COLUMNS and all(isinstance(v, str) for v in row.values()), row
        assert row["type"] and "typing" not in row["type"] and "<class" not in row["type"], row
        assert row["default"], row
        assert row["description"] == (cls.model_fields[row["key"]].description or "")
    assert rows[0]["key"] == "technique" and rows[0]["default"] == name

    table = render_technique_table(name, cls)
    assert table.row_count == len(rows) and [c.header for c in table.columns] == list(COLUMNS)
    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    text = console.file.getvalue()
    for row in rows:
        assert row["key"] in text and row["range"] in text


def test_rows_read_types_defaults_and_ranges():
    from shrinkml.techniques.prune_magnitude import PruneMagnitudeConfig
    from shrinkml.techniques.quantize_static import QuantizeStaticConfig

    rows = {row["key"]: row for row in technique_rows(PruneMagnitudeConfig)}
    assert (rows["sparsity"]["type"], rows["sparsity"]["default"], rows["sparsity"]["range"]) == ("float", "0.5", "[0, 1)")
    assert rows["scope"]["type"] == "one of global, layer"
    assert rows["layer_types"]["type"] == "list of {linear, conv}"
    assert rows["layer_types"]["default"] == '["linear", "conv"]'
    assert rows["ignore"]["type"] == "list of str" and rows["ignore"]["default"] == "[]"
    rows = {row["key"]: row for row in technique_rows(QuantizeStaticConfig)}
    assert rows["percentile"]["range"] == "(90, 100]"
    assert rows["keep_float"]["type"] == "auto or list of str"
    assert rows["op_types"]["type"] == "list of str or null" and rows["op_types"]["default"] == "null"
    assert rows["per_channel"]["default"] == "true"


@pytest.mark.parametrize("name", TECHNIQUES)
def test_schema_round_trips(name):
    cls = config_cls(name)
    schema = technique_schema(cls)
    assert json.loads(json.dumps(schema, allow_nan=False)) == schema
    assert schema["additionalProperties"] is False  # unknown keys are errors, and the schema says so
    props = schema["properties"]
    assert list(props) == list(cls.model_fields)
    for key, field in cls.model_fields.items():
        assert props[key].get("description") == field.description
        if not field.is_required():
            assert props[key]["default"] == to_jsonable_python(field.get_default()), key
    # the schema's defaults are a valid config, and it is the config built from defaults
    from_schema = {key: prop["default"] for key, prop in props.items() if "default" in prop}
    extra = REQUIRED_EXTRA.get(name, {})
    config = cls.model_validate({**from_schema, **extra})
    assert config == cls(**extra)
    assert cls.model_validate(json.loads(json.dumps(config.model_dump(mode="json")))) == config

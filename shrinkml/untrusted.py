"""Reading files a user hands over, with every size bounded before it is allocated.

The readers of recipes, text data and weight headers share these rules, so that any bad or hostile
input (a "billion laughs" YAML, a 1 GB line, 200,000 nested ``[``) ends quickly, as one
``InputError`` that says where:

* ``read_bounded``: the file's size is checked against a limit before it is read;
* ``decode_utf8``: text that is not UTF-8 is refused with its byte offset and line;
* ``load_yaml``: safe YAML made strict: no aliases (their expansion is exponential), no duplicate
  keys, bounded nesting and value lengths, and every error names its line and column;
* ``parse_json``: ``json.loads`` whose every failure, deep nesting included, is a ``ValueError``.

>>> load_yaml("steps:\\n  - technique: finetune\\n", where="recipe.yaml")
{'steps': [{'technique': 'finetune'}]}
"""

from __future__ import annotations

import codecs
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import ScalarNode

from shrinkml.errors import InputError, brief

MAX_YAML_DEPTH = 32  # a recipe is steps -> list -> mapping -> list: four levels
MAX_YAML_SCALAR_CHARS = 1000  # no recipe value is longer; bounds int()/sexagesimal parsing (quadratic)


def read_bounded(path: Path, limit: int, *, what: str, fix: str) -> bytes:
    """The bytes of ``path``, refused with ``InputError`` when there are more than ``limit``."""
    size = path.stat().st_size
    if size <= limit:
        with path.open("rb") as f:
            data = f.read(limit + 1)  # +1: a file that grew since stat() is still caught
        size = max(size, len(data))
    if size > limit:
        raise InputError(f"the {what} is too large", where=str(path), expected=f"at most {limit:,} bytes",
                         found=f"{size:,} bytes", fix=fix)
    return data


def decode_utf8(data: bytes, *, where: str) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark is dropped); else ``InputError`` with the
    byte offset and line of the first invalid byte."""
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = skip + exc.start
        line = data.count(b"\n", 0, at) + 1
        raise InputError(
            f"the file is not UTF-8 text ({exc.reason} at byte {at}, line {line})",
            where=where,
            expected="UTF-8 text",
            found=f"the byte(s) {data[at:skip + exc.end]!r}",
            fix="save it as UTF-8",
        ) from None


def parse_json(text: str | bytes) -> Any:
    """``json.loads``, but deep nesting raises ``ValueError`` (like every other malformed input)
    instead of ``RecursionError``: the C parser gives up at the interpreter's recursion limit, so
    the nesting it accepts is bounded by that limit."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"nested more than about {sys.getrecursionlimit()} levels deep") from None


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a recipe may not use; says what to do instead."""

    def __init__(self, problem: str, mark: Any, fix: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.fix = fix


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases, duplicate keys, deep nesting and huge values."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            # An alias shares its anchor's node; nested, n aliases of aliases expand to k**n values
            # ("billion laughs"). A recipe has no use for them, so none is read.
            raise _Refused(f"it uses the YAML alias *{event.anchor}", event.start_mark,
                           "write the values out in full: recipes do not use anchors (&) and aliases (*)")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(f"it nests more than {MAX_YAML_DEPTH} levels deep", event.start_mark,
                               "a recipe is a `steps:` list of flat mappings")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, ScalarNode) and len(node.value) > MAX_YAML_SCALAR_CHARS:
            raise _Refused(f"a value is {len(node.value):,} characters long", node.start_mark,
                           f"shorten it to at most {MAX_YAML_SCALAR_CHARS} characters")
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # e.g. a date 2020-13-45, or an int() limit
            raise _Refused(f"a value cannot be read ({exc})", node.start_mark, "correct the value") from None

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        first_at: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                mark = first_at.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the base class reports it, with its position
                continue
            if mark is not key_node.start_mark:
                raise _Refused(f"the key {brief(key)} appears twice (first at line {mark.line + 1}, column"
                               f" {mark.column + 1})", key_node.start_mark, "keep only one of them")
        return super().construct_mapping(node, deep)


def _position(text: str, index: int) -> str:
    line, line_start = text.count("\n", 0, index) + 1, text.rfind("\n", 0, index) + 1
    return f"line {line}, column {index - line_start + 1}"


def load_yaml(text: str, *, where: str, what: str = "recipe") -> Any:
    """Parse ``text`` with the strict loader; any problem is an ``InputError`` naming ``where``, the
    line and the column."""
    loader = None
    try:
        loader = _StrictLoader(text)  # reads (and checks) the characters at once
        return loader.get_single_data()
    except _Refused as exc:
        mark, message, fix = exc.problem_mark, f"the {what} cannot be used: {exc.problem}", exc.fix
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message, fix = f"the {what} is not valid YAML ({exc.problem or exc.context})", "fix the YAML syntax there"
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, e.g. a control code
        mark, fix = None, "remove the character or write it escaped in a double-quoted string"
        message = f"the {what} is not valid YAML ({exc.reason} #x{exc.character:04x})"
        where = f"{where}, {_position(text, exc.position)}"
    except yaml.YAMLError as exc:
        mark, message, fix = None, f"the {what} is not valid YAML ({exc})", "fix the YAML syntax"
    finally:
        if loader is not None:
            loader.dispose()
    if mark is not None:
        where = f"{where}, line {mark.line + 1}, column {mark.column + 1}"
    raise InputError(message, where=where, fix=fix)

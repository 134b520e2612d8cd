"""Recipes: an ordered list of technique steps, from YAML or Python, validated with field paths.

>>> from shrinkml.recipe import Recipe
>>> recipe = Recipe.from_dict({"steps": [{"technique": "prune.channels", "channel_ratio": 0.5},
...                                      {"technique": "quantize.dynamic"}]})
>>> [step.technique for step in recipe.steps]
['prune.channels', 'quantize.dynamic']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import ValidationError

from shrinkml.core.types import ModelKind
from shrinkml.errors import InputError, brief, clip
from shrinkml.techniques.base import StepConfig, registry
from shrinkml.untrusted import decode_utf8, load_yaml, read_bounded

_BOUND_TYPES = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
# Real recipes are a few kB. Pure-Python PyYAML reads some 50,000 tokens a second, so this bound also
# keeps the worst case (a file of nothing but tiny values) to a few seconds.
MAX_RECIPE_BYTES = 256 * 1024
_PROBLEMS_SHOWN = 3  # validation problems named in one message; the rest are counted


def _interval(config_cls: type[StepConfig], field: str) -> str | None:
    """Render a field's numeric bounds as an interval, e.g. ``[0, 1)``."""
    info = config_cls.model_fields.get(field)
    if info is None:
        return None
    lo = hi = None
    lo_closed = hi_closed = False
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge):
            lo, lo_closed = meta.ge, True
        elif isinstance(meta, annotated_types.Gt):
            lo, lo_closed = meta.gt, False
        elif isinstance(meta, annotated_types.Le):
            hi, hi_closed = meta.le, True
        elif isinstance(meta, annotated_types.Lt):
            hi, hi_closed = meta.lt, False
    if lo is None and hi is None:
        return None
    left = ("[" if lo_closed else "(") + ("-inf" if lo is None else f"{lo:g}")
    right = ("inf" if hi is None else f"{hi:g}") + ("]" if hi_closed else ")")
    return f"{left}, {right}"


def _format_error(where: str, config_cls: type[StepConfig], error: Mapping[str, Any]) -> str:
    loc = ".".join(clip(str(part), 40) for part in error["loc"])  # a key can be any length
    path = f"{where}.{loc}" if loc else where
    kind = error["type"]
    value = brief(error.get("input"))
    if kind == "extra_forbidden":
        known = ", ".join(name for name in config_cls.model_fields if name != "technique")
        return f"{path}: unknown key (known keys: {known or 'none'})"
    if kind in _BOUND_TYPES and error["loc"]:
        interval = _interval(config_cls, str(error["loc"][0]))
        if interval:
            return f"{path}: must be in {interval}, got {value}"
    return f"{path}: {error['msg'][:1].lower()}{error['msg'][1:]}, got {value}"


def parse_step(step: Any, index: int) -> StepConfig:
    """Validate one step (a mapping with ``technique``, or a config object) into its config."""
    where = f"steps[{index}]"
    techniques = registry()
    if isinstance(step, StepConfig):
        if step.technique not in techniques:
            raise InputError(f"unknown technique {step.technique!r}", where=f"{where}.technique")
        return step
    if not isinstance(step, Mapping):
        raise InputError(
            "a step must be a mapping",
            where=where,
            expected="a mapping such as {technique: prune.channels, channel_ratio: 0.5}",
            found=type(step).__name__,
            fix="write each step as a mapping with a 'technique' key",
        )
    name = step.get("technique")
    if not isinstance(name, str) or name not in techniques:
        raise InputError(
            "unknown technique" if name is not None else "missing 'technique'",
            where=f"{where}.technique",
            expected="one of " + ", ".join(sorted(techniques)),
            found=brief(name),
            fix="use one of the registered technique names (`shrinkml techniques` lists them)",
        )
    config_cls = techniques[name].config_cls
    try:
        return config_cls.model_validate(dict(step))
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(_format_error(where, config_cls, err) for err in errors[:_PROBLEMS_SHOWN])
        if len(errors) > _PROBLEMS_SHOWN:
            problems += f" (and {len(errors) - _PROBLEMS_SHOWN} more)"
        raise InputError(
            f"invalid recipe step: {problems}",
            fix=f"correct the value(s); `shrinkml techniques {name}` shows every key and its range",
        ) from None


@dataclass(frozen=True)
class Recipe:
    """An ordered, validated list of technique configs. Immutable; ``to_dict`` gives the resolved
    form (every default filled in) that is saved beside every artifact and loads back identically."""

    steps: tuple[StepConfig, ...]

    @classmethod
    def from_steps(cls, steps: Sequence[StepConfig | Mapping[str, Any]]) -> Recipe:
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
            raise InputError(
                "'steps' must be a list",
                where="steps",
                expected="a list of steps",
                found=type(steps).__name__,
                fix="write `steps:` followed by a YAML list of `- technique: ...` entries",
            )
        if len(steps) == 0:
            raise InputError("the recipe has no steps", where="steps", fix="add at least one step")
        return cls(tuple(parse_step(step, i) for i, step in enumerate(steps)))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "recipe") -> Recipe:
        if not isinstance(data, Mapping):
            raise InputError(
                "a recipe must be a mapping with a 'steps' list",
                where=source,
                found=type(data).__name__,
                fix="start the file with `steps:`",
            )
        extra = sorted(brief(key) for key in data if key != "steps")  # keys of any type sort as text
        if extra:
            raise InputError(
                f"unknown top-level key(s) {', '.join(extra)}",
                where=source,
                expected="only 'steps'",
                fix="remove them or move them into a step",
            )
        if "steps" not in data:
            raise InputError("missing 'steps'", where=source, fix="add a `steps:` list")
        return cls.from_steps(data["steps"])

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Read a recipe file: at most ``MAX_RECIPE_BYTES`` of UTF-8, strict YAML (no aliases, no
        duplicate keys; errors name the line and column), then validated like ``from_dict``."""
        path = Path(path)
        if not path.is_file():
            raise InputError(
                "recipe file not found", where=str(path), fix="check the path given to --recipe"
            )
        data = read_bounded(path, MAX_RECIPE_BYTES, what="recipe",
                            fix="a recipe is a short list of steps; check that --recipe names the right file")
        return cls.from_dict(load_yaml(decode_utf8(data, where=str(path)), where=str(path)), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [step.model_dump(mode="json") for step in self.steps]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def check_model_kind(self, kind: ModelKind) -> None:
        """Fail early when a step cannot take the model as the steps before it leave it."""
        techniques = registry()
        current = kind
        producer = "the input model"
        for i, step in enumerate(self.steps):
            technique = techniques[step.technique]
            pinned = techniques[self.steps[i - 1].technique].runtime if i else None
            if pinned is not None and technique.runtime != pinned:  # steps that run there may follow
                before = self.steps[i - 1].technique
                raise InputError(
                    f"{step.technique} comes after {before}, whose model only {pinned} runs",
                    where=f"steps[{i}]",
                    expected=f"{before} as the last step, or only steps for {pinned} after it",
                    fix=f"move {before} to the end of the recipe",
                )
            if current not in technique.accepts:
                raise InputError(
                    f"{step.technique} needs a PyTorch model, but {producer} is ONNX",
                    where=f"steps[{i}]",
                    expected="steps that work on ONNX (quantize.dynamic) after a model is ONNX",
                    fix="put ONNX quantization last, or give a PyTorch model (factory + safetensors)"
                    " so pruning and fine-tuning can run",
                )
            if technique.produces is not None and technique.produces != current:
                current = technique.produces
                producer = f"steps[{i}] ({step.technique}) output"


def as_recipe(recipe: Recipe | str | Path | Sequence[Any] | Mapping[str, Any]) -> Recipe:
    """Accept a Recipe, a YAML path, a list of steps, or a ``{"steps": [...]}`` mapping."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        return Recipe.from_yaml(recipe)
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    return Recipe.from_steps(recipe)

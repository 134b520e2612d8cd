"""What every technique shares: a frozen config and the explicit registry that maps a technique name
to ``(config class, apply function)``. The model state a step transforms, its context and its result
live in ``shrinkml.core.types`` (re-exported here so existing imports keep working).

A technique is one module: a ``StepConfig`` subclass (hyperparameters only, frozen, unknown keys
rejected) and one ``apply(state, config, ctx) -> StepResult`` function, registered with
``@register("name", ConfigClass)``. Steps transform; they never measure (see ``shrinkml.measure``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shrinkml.core.types import ApplyFn, ModelKind, ModelState, StepContext, StepResult  # noqa: F401


class StepConfig(BaseModel):
    """Base of every technique config: frozen, strict about unknown keys and about types.

    Strict types: ``epochs: true`` or ``epochs: "3"`` is an error, not 1 or 3 (an int still fills
    a float field), and NaN and infinity are refused. YAML and JSON have no tuples, so a list
    given for a tuple field is taken as that tuple.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, strict=True, allow_inf_nan=False
    )

    technique: str = Field(description="the technique this step runs (`shrinkml techniques` lists them)")

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
        return data


@dataclass(frozen=True)
class Technique:
    name: str
    config_cls: type[StepConfig]
    apply: ApplyFn
    accepts: frozenset[str]  # model kinds the step can take
    produces: ModelKind | None  # None: same kind as it took
    # quantizers: (state, config, ctx) -> (float ONNX, quantize(keep_float_nodes) -> ONNX, summary),
    # which lets sensitivity analysis and `shrinkml explain` quantize one layer at a time
    build_quantizer: Callable[..., Any] | None = None
    runtime: str | None = None  # the only runtime that can run the step's output (None: any)
    # where ``shrinkml search`` may place the step (one of STAGES), None: never chosen by a search
    stage: str | None = None
    # (loaded model) -> None when the step can take that model, else why not (search spaces skip it)
    applies: Callable[[Any], str | None] | None = None
    causal_lm: bool = False  # a step for causal LMs (their recipes hold only such steps)

    def search_params(self) -> dict[str, dict[str, Any]]:
        """The hyperparameters a search varies by default: field name -> ``searchable`` range."""
        return {name: dict(field.json_schema_extra["search"])
                for name, field in self.config_cls.model_fields.items()
                if isinstance(field.json_schema_extra, dict) and "search" in field.json_schema_extra}


# The order a searched recipe takes: structural steps, recovery training, a quantizer, then steps
# that finish a quantized model (weight sharing of its embedding tables).
STAGES = ("structure", "recovery", "quantize", "finish")


def searchable(low: float | None = None, high: float | None = None, *, step: float | None = None,
               log: bool = False, choices: tuple | None = None) -> dict[str, Any]:
    """A config field's default range for ``shrinkml search``, as ``Field(json_schema_extra=...)``:
    a numeric ``low``..``high`` (with an optional ``step``, or ``log`` scale), or ``choices``.

    >>> Field(0.5, json_schema_extra=searchable(0.1, 0.8, step=0.1))  # doctest: +SKIP
    """
    if choices is not None:
        return {"search": {"choices": list(choices)}}
    if low is None or high is None or not low < high:
        raise ValueError(f"a searchable range needs low < high, found {low!r}..{high!r}")
    spec: dict[str, Any] = {"low": low, "high": high}
    if step is not None:
        spec["step"] = step
    if log:
        spec["log"] = True
    return {"search": spec}


_REGISTRY: dict[str, Technique] = {}


def register(
    name: str,
    config_cls: type[StepConfig],
    *,
    accepts: tuple[ModelKind, ...] = ("torch",),
    produces: ModelKind | None = None,
    quantizer: Callable[..., Any] | None = None,
    runtime: str | None = None,
    stage: str | None = None,
    applies: Callable[[Any], str | None] | None = None,
    causal_lm: bool = False,
) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``apply`` as the handler of technique ``name`` configured by ``config_cls``.

    ``stage`` (one of ``STAGES``) lets ``shrinkml search`` place the step in a recipe, varying the
    config fields declared ``searchable``; ``applies(loaded)`` says why a model cannot take it.
    ``causal_lm``: a step for causal language models (the only kind their recipes hold).
    """

    default = config_cls.model_fields["technique"].default
    if default != name:
        raise ValueError(f"{config_cls.__name__}.technique defaults to {default!r}, not {name!r}")
    if stage is not None and stage not in STAGES:
        raise ValueError(f"technique {name!r}: stage {stage!r} is not one of {STAGES}")

    def decorator(fn: ApplyFn) -> ApplyFn:
        if name in _REGISTRY:
            raise ValueError(f"technique {name!r} is registered twice")
        _REGISTRY[name] = Technique(name, config_cls, _keeping_inputs(fn), frozenset(accepts), produces, quantizer,
                                    runtime, stage, applies, causal_lm)
        return fn

    return decorator


def _keeping_inputs(fn: ApplyFn) -> ApplyFn:
    """``fn`` whose ONNX result keeps the input spec of the state it took (how a text model's named
    inputs follow from token ids: ``shrinkml.runtimes.feeds``), for steps whose tools drop ONNX
    metadata (NNCF, ORT's pre-processing)."""
    import functools

    @functools.wraps(fn)
    def apply(state: ModelState, config: Any, ctx: StepContext) -> StepResult:
        result = fn(state, config, ctx)
        if result.state.kind == "onnx":
            from shrinkml.runtimes.feeds import onnx_spec, set_onnx_spec, state_spec

            if onnx_spec(result.state.onnx_model) is None:
                set_onnx_spec(result.state.onnx_model, state_spec(state))
        return result

    return apply


def registry() -> dict[str, Technique]:
    """All registered techniques, by name (imports the built-in technique modules)."""

    import shrinkml.techniques  # noqa: F401  (explicit registration happens there)

    return dict(_REGISTRY)


def get_technique(name: str) -> Technique:
    return registry()[name]


def lm_refusal(technique: Technique, loaded: Any) -> str | None:
    """Why ``technique`` cannot be a step for the causal LM ``loaded`` (None: it can)."""
    if not technique.causal_lm:
        return "it is no step for causal language models"
    return technique.applies(loaded) if technique.applies is not None else None

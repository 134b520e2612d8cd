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


_REGISTRY: dict[str, Technique] = {}


def register(
    name: str,
    config_cls: type[StepConfig],
    *,
    accepts: tuple[ModelKind, ...] = ("torch",),
    produces: ModelKind | None = None,
    quantizer: Callable[..., Any] | None = None,
    runtime: str | None = None,
) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``apply`` as the handler of technique ``name`` configured by ``config_cls``."""

    default = config_cls.model_fields["technique"].default
    if default != name:
        raise ValueError(f"{config_cls.__name__}.technique defaults to {default!r}, not {name!r}")

    def decorator(fn: ApplyFn) -> ApplyFn:
        if name in _REGISTRY:
            raise ValueError(f"technique {name!r} is registered twice")
        _REGISTRY[name] = Technique(name, config_cls, _keeping_inputs(fn), frozenset(accepts), produces, quantizer,
                                    runtime)
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

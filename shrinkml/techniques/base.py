"""What every technique shares: a frozen config, the model state it transforms, its context, and
the explicit registry that maps a technique name to ``(config class, apply function)``.

A technique is one module: a ``StepConfig`` subclass (hyperparameters only, frozen, unknown keys
rejected) and one ``apply(state, config, ctx) -> StepResult`` function, registered with
``@register("name", ConfigClass)``. Steps transform; they never measure (see ``shrinkml.measure``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # heavy imports only for type checkers
    import onnx
    import torch

    from shrinkml.budget import Budget
    from shrinkml.data import Splits
    from shrinkml.progress import Progress
    from shrinkml.tasks import Task

ModelKind = Literal["torch", "onnx"]


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


@dataclass
class ModelState:
    """The model as it moves through a recipe.

    ``kind`` says which representation is live: a PyTorch module (``torch_model``) or an ONNX graph
    (``onnx_model``), once a step has turned the model into an ONNX Runtime artifact.
    ``sparse_params`` names parameters whose zeros are part of the result (magnitude pruning), so
    later training steps keep them at zero.
    """

    kind: ModelKind
    torch_model: torch.nn.Module | None = None
    onnx_model: onnx.ModelProto | None = None
    sparse_params: frozenset[str] = frozenset()
    # set by the step that exported PyTorch -> ONNX: max abs difference ONNX Runtime vs PyTorch
    export_max_abs_diff: float | None = None


@dataclass(frozen=True)
class StepContext:
    """The data and settings a step may use. Configs hold hyperparameters; the context holds data."""

    splits: Splits
    task: Task
    teacher: torch.nn.Module | None  # frozen copy of the original model, for distillation
    example_input: Any  # one batch of calibration inputs (numpy), for tracing and export
    seed: int
    threads: int
    progress: Progress
    workdir: Path  # scratch folder for intermediate files; removed after the run
    opset: int = 17
    export_tolerance: float = 1e-4  # max abs difference ONNX Runtime vs PyTorch after export
    budget: Budget | None = None  # the run's accuracy budget, for steps that search to meet it


@dataclass
class StepResult:
    """A step's output: the new state and a JSON-able summary of what it did (for the report)."""

    state: ModelState
    summary: dict[str, Any] = field(default_factory=dict)


ApplyFn = Callable[[ModelState, Any, StepContext], StepResult]


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
        _REGISTRY[name] = Technique(name, config_cls, fn, frozenset(accepts), produces, quantizer, runtime)
        return fn

    return decorator


def registry() -> dict[str, Technique]:
    """All registered techniques, by name (imports the built-in technique modules)."""

    import shrinkml.techniques  # noqa: F401  (explicit registration happens there)

    return dict(_REGISTRY)


def get_technique(name: str) -> Technique:
    return registry()[name]

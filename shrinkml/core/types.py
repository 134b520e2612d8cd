"""The small types every layer shares: the model state a step transforms, the context it runs in,
its result, and the signature of a technique's ``apply``.

This module imports nothing else from shrinkml at runtime (and no torch, ONNX or pydantic), so any
layer can use these types without import cycles or heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:  # heavy imports only for type checkers
    import onnx
    import torch

    from shrinkml.budget import Budget
    from shrinkml.data import Splits
    from shrinkml.progress import Progress
    from shrinkml.tasks import Task

ModelKind = Literal["torch", "onnx"]


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
    # a causal LM's weights as block codes (quantize.gguf): Hugging Face tensor name -> BlockCodes,
    # which the GGUF writer stores as they are (the torch model holds their dequantized values)
    weight_codes: dict[str, Any] | None = None


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
    # called by training steps after each epoch as ``on_epoch(epoch, model)`` (model in eval mode);
    # a search uses it to stop a trial that cannot meet its budget (it raises to stop the step)
    on_epoch: Callable[[int, Any], None] | None = None


@dataclass
class StepResult:
    """A step's output: the new state and a JSON-able summary of what it did (for the report)."""

    state: ModelState
    summary: dict[str, Any] = field(default_factory=dict)


ApplyFn = Callable[[ModelState, Any, StepContext], StepResult]

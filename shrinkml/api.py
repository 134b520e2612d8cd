"""The public verbs: ``compress`` (baseline -> recipe -> measure -> report), ``bench`` and
``explain``; each is one run of a :class:`shrinkml.pipeline.Pipeline`.

>>> import shrinkml
>>> result = shrinkml.compress(  # doctest: +SKIP
...     "mypkg.models:make_net", "recipe.yaml", data="data.npz", weights="net.safetensors",
...     out="shrinkml-out")
>>> result.report["delta"]["size_ratio"], result.budget_met  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shrinkml.budget import Budget
from shrinkml.packaging import run_folder
from shrinkml.pipeline import Pipeline
from shrinkml.progress import Progress
from shrinkml.recipe import Recipe, as_recipe
from shrinkml.settings import RunSettings

__all__ = ["Budget", "CompressResult", "RunSettings", "bench", "compress", "explain"]


@dataclass
class CompressResult:
    """What ``compress`` returns: the compressed model, both measurements and the report."""

    model: Any  # torch.nn.Module, or onnx.ModelProto once quantized to ONNX Runtime
    report: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def baseline(self) -> dict[str, Any]:
        return self.report["baseline"]

    @property
    def compressed(self) -> dict[str, Any]:
        return self.report["compressed"]

    @property
    def budget_met(self) -> bool:
        return bool(self.report["budget"]["met"])


def _output(out, model, weights, data, recipe):
    """The run's output folder (checked against every input), or no folder when ``out`` is None."""
    if out is None:
        return nullcontext()
    return run_folder(out, {"--model": model, "--weights": weights, "--data": data, "--recipe": recipe})


def compress(
    model: Any,
    recipe: Recipe | str | Path | list | dict,
    *,
    data: Any,
    task: str = "classification",
    weights: str | Path | None = None,
    out: str | Path | None = None,
    budget: Budget | None = None,
    settings: RunSettings | None = None,
    progress: Progress | None = None,
) -> CompressResult:
    """Measure ``model``, apply ``recipe``, measure the result the same way, and report.

    ``model``: ``"package.module:factory"`` (with ``weights``), an ``.onnx`` path, a model
    directory, or an ``nn.Module``. ``data``: an ``.npz`` path, ``"builtin:digits"``,
    ``"package.module:function"``, text files, arrays or a ``Dataset``. With ``out``, writes the
    compressed artifact, ``recipe.yaml`` and ``report.{json,md,html}`` there. Budget failures do not
    raise: check ``result.budget_met``.
    """
    with _output(out, model, weights, data, recipe) as folder:  # checked and locked before any work
        recipe = as_recipe(recipe)  # a bad recipe is found before the model is loaded
        pipe = Pipeline.prepare(model, data=data, task=task, weights=weights, settings=settings, progress=progress)
        report, state, files = pipe.run(recipe, folder=folder, budget=budget)
    return CompressResult(
        model=state.torch_model if state.kind == "torch" else state.onnx_model, report=report, files=files
    )


def bench(
    model: Any,
    *,
    data: Any,
    task: str = "classification",
    weights: str | Path | None = None,
    settings: RunSettings | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The baseline assessment alone: size, params, MACs, latency, throughput, memory, metrics."""
    return Pipeline.prepare(model, data=data, task=task, weights=weights, settings=settings, progress=progress).bench()


def explain(
    model: Any,
    recipe: Recipe | str | Path | list | dict,
    *,
    data: Any,
    task: str = "classification",
    weights: str | Path | None = None,
    out: str | Path | None = None,
    settings: RunSettings | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Which layers cost accuracy when quantized: the recipe's last step must be a quantizer.

    Steps before it run as in ``compress``. Then each weight layer is quantized alone (all others
    float) and scored against the float model on the test split: output SQNR in dB and the drop of
    the task's primary metric. With ``out``, writes ``explain.{json,md,html}`` there.
    """
    with _output(out, model, weights, data, recipe) as folder:  # checked and locked before any work
        recipe = as_recipe(recipe)
        pipe = Pipeline.prepare(model, data=data, task=task, weights=weights, settings=settings, progress=progress)
        return pipe.explain(recipe, folder=folder)

"""The public verbs: ``compress`` (baseline -> recipe -> measure -> report) and ``bench``.

>>> import shrinkml
>>> result = shrinkml.compress(  # doctest: +SKIP
...     "mypkg.models:make_net", "recipe.yaml", data="data.npz", weights="net.safetensors",
...     out="shrinkml-out")
>>> result.report["delta"]["size_ratio"], result.budget_met  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shrinkml.budget import Budget
from shrinkml.cost import CostSettings
from shrinkml.data import SplitFractions, Splits, load_data
from shrinkml.errors import InputError
from shrinkml.packaging import run_folder
from shrinkml.runtimes import runtime
from shrinkml.packaging.results import output_files
from shrinkml.progress import SILENT, Progress
from shrinkml.recipe import Recipe, as_recipe
from shrinkml.tasks import Task, get_task

def _default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


class RunSettings(BaseModel):
    """How a run measures: runtime, threads, batch sizes, repeats, seed, splits and cost inputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime: str = Field("onnxruntime", description="where the models are timed: a registered runtime")
    threads: int = Field(default_factory=_default_threads, ge=1)
    batch_n: int = Field(32, ge=2, description="the larger batch size timed besides batch 1")
    warmup: int = Field(3, ge=1)
    repeats: int = Field(20, ge=10, description="minimum interleaved timed rounds per batch size")
    timing_tolerance: float = Field(
        0.05, gt=0, description="add timed rounds until each speedup's 95% CI is within +- this fraction"
    )
    max_timing_s: float = Field(
        20.0, ge=0, description="time cap per batch size for the added rounds (0: exactly `repeats` rounds)"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the splits, bootstrap and training")
    bootstrap_resamples: int = Field(2000, ge=200)
    export_tolerance: float = Field(1e-4, gt=0)
    max_length: int | None = Field(
        None, ge=2, description="token length texts are padded/truncated to (default min(model's max, 128))"
    )
    measure_memory: bool = True
    random_weights: bool = Field(
        False, description="run a factory model given without weights as built (architecture benchmarking)"
    )
    splits: SplitFractions = SplitFractions()

    @field_validator("runtime")
    @classmethod
    def _registered(cls, name: str) -> str:
        from shrinkml.runtimes import runtime_names

        if name not in runtime_names():
            raise ValueError(f"unknown runtime {name!r}; registered: {', '.join(runtime_names())}")
        return name
    cost: CostSettings = CostSettings()


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


def _check_forward(loaded, example: np.ndarray, source: str, threads: int) -> np.ndarray:
    """Run one batch to catch model/data mismatches before any work; return its outputs."""
    try:
        if loaded.kind == "torch":
            from shrinkml.runtimes.torch_eager import TorchRunner

            return TorchRunner(loaded.module.eval(), threads=threads).run(example)
        from shrinkml.runtimes.onnxruntime import OrtRunner

        return OrtRunner(loaded.onnx_model.SerializeToString(), threads=threads).run(example)
    except (TimeoutError, MemoryError):
        raise
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        resized = loaded.resized_summary() if loaded.kind == "torch" else None
        found = (f"examples of shape {tuple(example.shape[1:])} ({example.dtype}), on which the model"
                 f" failed with {type(exc).__name__}: {first_line[:300]}")
        raise InputError(
            "the model cannot run on the data",
            where=f"{loaded.source} on {source}",
            expected="inputs the model accepts",
            found=found + (f"; note: {resized}" if resized else ""),
            fix=("pass the factory these weights were saved from, or " if resized else "")
            + "check that --data matches the model's input (shape per example, channels first)",
        ) from exc


def _prepare(model, data, task_name, weights, settings: RunSettings):
    from shrinkml.models import load_model

    task = get_task(task_name)
    # first: text data is tokenized by the model's tokenizer
    loaded = load_model(model, weights, random_weights=settings.random_weights)
    encoding = None
    if loaded.text is not None:
        from shrinkml.data.text import DEFAULT_MAX_LENGTH, TextEncoding

        limit = loaded.text.max_seq_length or DEFAULT_MAX_LENGTH
        encoding = TextEncoding(loaded.text.tokenizer, min(limit, settings.max_length or DEFAULT_MAX_LENGTH))
    needs_labels = task.needs_labels
    splits = load_data(
        data, seed=settings.seed, fractions=settings.splits, needs_labels=needs_labels, text_encoding=encoding
    )
    task.check_data(splits)
    task.check_model(loaded, splits)
    example = splits.calibration.x[: min(len(splits.calibration), 8)]
    outputs = _check_forward(loaded, example, splits.source, settings.threads)
    task.check_outputs(splits, outputs, loaded.source)
    return task, loaded, splits, example


def _step_context(loaded, splits, task, example, settings, progress, workdir, budget=None):
    """What every step sees: the splits, the task, and a frozen copy of the original model as the
    distillation teacher (steps never change the model they were given)."""
    from shrinkml.techniques.base import StepContext

    teacher = None
    if loaded.kind == "torch":
        teacher = copy.deepcopy(loaded.module).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    return StepContext(
        splits=splits,
        task=task,
        teacher=teacher,
        example_input=example,
        seed=settings.seed,
        threads=settings.threads,
        progress=progress,
        workdir=workdir,
        export_tolerance=settings.export_tolerance,
        budget=budget,
    )


def _initial_state(loaded):
    from shrinkml.techniques.base import ModelState

    if loaded.kind == "torch":
        return ModelState("torch", torch_model=loaded.module)
    return ModelState("onnx", onnx_model=loaded.onnx_model)


def _measure(artifacts, splits: Splits, task: Task, settings: RunSettings, workdir: Path, progress: Progress):
    from shrinkml.measure.assess import assess

    return assess(
        artifacts,
        splits.test,
        task,
        threads=settings.threads,
        batch_n=settings.batch_n,
        warmup=settings.warmup,
        repeats=settings.repeats,
        seed=settings.seed,
        bootstrap_resamples=settings.bootstrap_resamples,
        measure_memory=settings.measure_memory,
        rel_tolerance=settings.timing_tolerance,
        max_time_s=settings.max_timing_s,
        workdir=workdir,
        progress=progress,
    )


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

    ``model``: ``"package.module:factory"`` (with ``weights``), an ``.onnx`` path, or an
    ``nn.Module``. ``data``: an ``.npz`` path, ``"builtin:digits"``, ``"package.module:function"``,
    arrays or a ``Dataset``. With ``out``, writes the compressed artifact, ``recipe.yaml`` and
    ``report.{json,md,html}`` there. Budget failures do not raise: check ``result.budget_met``.
    """
    settings = settings or RunSettings()
    budget = budget or Budget()
    progress = progress or SILENT
    inputs = {"--model": model, "--weights": weights, "--data": data, "--recipe": recipe}
    with run_folder(out, inputs) as folder:  # --out is checked and locked before any work
        report, state, files = _compress_in(folder, model, recipe, data, task, weights, out, budget, settings, progress)
    return CompressResult(
        model=state.torch_model if state.kind == "torch" else state.onnx_model, report=report, files=files
    )


def _compress_in(folder, model, recipe, data, task, weights, out, budget, settings, progress):
    """The body of ``compress``, inside its (locked) output folder."""
    from shrinkml.artifacts import build_artifact
    from shrinkml.environment import environment
    from shrinkml.techniques.base import registry

    recipe = as_recipe(recipe)
    task_obj, loaded, splits, example = _prepare(model, data, task, weights, settings)
    recipe.check_model_kind(loaded.kind)
    techniques = registry()
    measured_on = runtime(settings.runtime)
    for i, step in enumerate(recipe.steps):
        produces = techniques[step.technique].produces
        if produces is not None and produces not in measured_on.accepts:
            raise InputError(
                f"{step.technique} produces an {produces.upper()} model, which {settings.runtime} cannot run",
                where=f"steps[{i}] with --runtime {settings.runtime}",
                fix="use --runtime onnxruntime (the default) or openvino for recipes with ONNX quantization",
            )
        needed = techniques[step.technique].runtime
        if needed is not None and needed != settings.runtime:
            raise InputError(
                f"{step.technique} makes a model only {needed} can run, but the run measures on {settings.runtime}",
                where=f"steps[{i}] with --runtime {settings.runtime}",
                fix=f"run with --runtime {needed}",
            )
    progress.log(f"data {splits.source}: " + ", ".join(f"{k} {v}" for k, v in splits.sizes().items()))

    workdir = folder.workdir
    state = _initial_state(loaded)
    art_kwargs = dict(
        runtime=settings.runtime,
        example=example,
        workdir=workdir,
        threads=settings.threads,
        export_tolerance=settings.export_tolerance,
    )
    progress.log("building the baseline artifact")
    baseline_art = build_artifact(state, "baseline", **art_kwargs)
    ctx = _step_context(loaded, splits, task_obj, example, settings, progress, workdir, budget)
    step_reports = []
    for i, step in enumerate(recipe.steps):
        progress.log(f"step {i + 1}/{len(recipe.steps)}: {step.technique}")
        result = techniques[step.technique].apply(state, step, ctx)
        state = result.state
        step_reports.append({"technique": step.technique, "summary": result.summary})
    progress.log("building the compressed artifact")
    compressed_art = build_artifact(state, "compressed", **art_kwargs)
    base_a, comp_a = _measure([baseline_art, compressed_art], splits, task_obj, settings, workdir, progress)

    from shrinkml.measure.assess import metric_drop
    from shrinkml.report.build import build_report

    primary = task_obj.primary_metric(base_a.outputs.shape)
    drop = metric_drop(
        base_a, comp_a, primary, drop_type=budget.drop_type, seed=settings.seed, resamples=settings.bootstrap_resamples
    )
    report = build_report(
        loaded=loaded, task=task_obj, primary=primary, settings=settings, splits=splits, example=example,
        base=base_a, comp=comp_a, drop=drop, budget=budget, recipe=recipe, steps=step_reports,
        export={
            "tolerance": settings.export_tolerance,
            "baseline_max_abs_diff": baseline_art.export_max_abs_diff,
            "compressed_max_abs_diff": compressed_art.export_max_abs_diff,
            "baseline_encoding": baseline_art.encoding,
            "compressed_encoding": compressed_art.encoding,
        },
        environment=environment(threads=settings.threads, seed=settings.seed),
    )
    files: dict[str, Path] = {}
    if out is not None:
        files = folder.commit(output_files(compressed_art, recipe, report, loaded, state, workdir, progress))
    return report, state, files


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
    from shrinkml.artifacts import build_artifact
    from shrinkml.environment import environment

    settings = settings or RunSettings()
    progress = progress or SILENT
    task_obj, loaded, splits, example = _prepare(model, data, task, weights, settings)
    with run_folder(None, {}) as scratch:
        workdir = scratch.workdir
        art = build_artifact(
            _initial_state(loaded),
            "model",
            runtime=settings.runtime,
            example=example,
            workdir=workdir,
            threads=settings.threads,
            export_tolerance=settings.export_tolerance,
        )
        (assessment,) = _measure([art], splits, task_obj, settings, workdir, progress)
    from shrinkml.report.build import build_bench_report

    return build_bench_report(
        loaded=loaded, task=task_obj, settings=settings, splits=splits, example=example, assessment=assessment,
        export_max_abs_diff=art.export_max_abs_diff, environment=environment(threads=settings.threads, seed=settings.seed),
    )


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
    settings = settings or RunSettings()
    progress = progress or SILENT
    inputs = {"--model": model, "--weights": weights, "--data": data, "--recipe": recipe}
    with run_folder(out, inputs) as folder:  # --out is checked and locked before any work
        return _explain_in(folder, model, recipe, data, task, weights, out, settings, progress)


def _explain_in(folder, model, recipe, data, task, weights, out, settings, progress) -> dict[str, Any]:
    from dataclasses import asdict

    from shrinkml.environment import environment
    from shrinkml.quant.sensitivity import Evaluator, layer_sensitivity, sqnr_db
    from shrinkml.techniques.base import registry

    recipe = as_recipe(recipe)
    techniques = registry()
    last = recipe.steps[-1]
    if techniques[last.technique].build_quantizer is None:
        quantizers = sorted(name for name, t in techniques.items() if t.build_quantizer is not None)
        raise InputError(
            f"explain analyses a quantization step, but the recipe ends with {last.technique}",
            where=f"steps[{len(recipe.steps) - 1}]",
            expected="one of " + ", ".join(quantizers),
            fix="end the recipe with the quantization step to analyse",
        )
    task_obj, loaded, splits, example = _prepare(model, data, task, weights, settings)
    recipe.check_model_kind(loaded.kind)
    state = _initial_state(loaded)
    ctx = _step_context(loaded, splits, task_obj, example, settings, progress, folder.workdir)
    for step in recipe.steps[:-1]:
        state = techniques[step.technique].apply(state, step, ctx).state
    float_model, quantize, _ = techniques[last.technique].build_quantizer(state, last, ctx)
    evaluator = Evaluator(float_model, splits.test, task_obj, settings.threads, settings.seed)
    progress.log("quantizing each layer alone")
    rows = layer_sensitivity(float_model, quantize, evaluator)
    all_outputs = evaluator.outputs(quantize([]))
    value, worst = evaluator.drop(all_outputs)
    layers = sorted((asdict(r) for r in rows), key=lambda r: (-r["metric_drop"], r["output_sqnr_db"]))
    result = {
        "schema": "shrinkml.explain/1",
        "model": {"source": loaded.source, "weights": loaded.weights},
        "task": task_obj.name,
        "metric": evaluator.primary,
        "technique": last.model_dump(mode="json"),
        "data": {"source": splits.source, "evaluated_on": "test", "examples": len(splits.test), "seed": settings.seed},
        "all_quantized": {"drop": value, "drop_ci95_upper": worst, "output_sqnr_db": sqnr_db(evaluator.reference, all_outputs)},
        "layers": layers,
        "environment": environment(threads=settings.threads, seed=settings.seed),
    }
    if out is not None:
        import json

        from shrinkml.report.explain import render_explain_html, render_explain_markdown
        from shrinkml.report.json_report import to_jsonable

        folder.commit({
            "explain.json": json.dumps(to_jsonable(result), indent=2) + "\n",
            "explain.md": render_explain_markdown(result),
            "explain.html": render_explain_html(result),
        })
    return result

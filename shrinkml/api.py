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
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shrinkml.budget import Budget
from shrinkml.cost import CostSettings
from shrinkml.data import SplitFractions, Splits, load_data
from shrinkml.errors import InputError
from shrinkml.progress import SILENT, Progress
from shrinkml.recipe import Recipe, as_recipe
from shrinkml.tasks import Task, get_task

def _default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


class RunSettings(BaseModel):
    """How a run measures: runtime, threads, batch sizes, repeats, seed, splits and cost inputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime: Literal["onnxruntime", "torch"] = "onnxruntime"
    threads: int = Field(default_factory=_default_threads, ge=1)
    batch_n: int = Field(32, ge=2, description="the larger batch size timed besides batch 1")
    warmup: int = Field(3, ge=1)
    repeats: int = Field(20, ge=10)
    seed: int = 0
    bootstrap_resamples: int = Field(2000, ge=200)
    export_tolerance: float = Field(1e-4, gt=0)
    max_length: int | None = Field(
        None, ge=2, description="token length texts are padded/truncated to (default min(model's max, 128))"
    )
    measure_memory: bool = True
    splits: SplitFractions = SplitFractions()
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


def _check_forward(loaded, example: np.ndarray, source: str, threads: int) -> None:
    """Run one batch to catch model/data mismatches before any work."""
    try:
        if loaded.kind == "torch":
            import torch

            with torch.inference_mode():
                loaded.module.eval()(torch.as_tensor(example))
        else:
            from shrinkml.runtimes.onnxruntime import OrtRunner

            OrtRunner(loaded.onnx_model.SerializeToString(), threads=threads).run(example)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise InputError(
            "the model cannot run on the data",
            where=f"{loaded.source} on {source}",
            expected="inputs the model accepts",
            found=f"examples of shape {tuple(example.shape[1:])} ({example.dtype}), on which the model"
            f" failed with {type(exc).__name__}: {first_line[:300]}",
            fix="check that --data matches the model's input (shape per example, channels first)",
        ) from exc


def _prepare(model, data, task_name, weights, settings: RunSettings):
    from shrinkml.models import load_model

    task = get_task(task_name)
    loaded = load_model(model, weights=weights)  # first: text data is tokenized by the model's tokenizer
    encoding = None
    if loaded.text is not None:
        from shrinkml.data.text import DEFAULT_MAX_LENGTH, TextEncoding

        limit = loaded.text.max_seq_length or DEFAULT_MAX_LENGTH
        encoding = TextEncoding(loaded.text.tokenizer, min(limit, settings.max_length or DEFAULT_MAX_LENGTH))
    if task.name == "embedding" and loaded.text is not None and loaded.text.kind != "embedding":
        raise InputError(
            "--task embedding needs an embedding model, but this directory holds a classifier",
            where=loaded.source, fix="use --task classification (labels) or --task fidelity",
        )
    needs_labels = task.name == "classification"
    splits = load_data(
        data, seed=settings.seed, fractions=settings.splits, needs_labels=needs_labels, text_encoding=encoding
    )
    task.check_data(splits)
    example = splits.calibration.x[: min(len(splits.calibration), 8)]
    _check_forward(loaded, example, splits.source, settings.threads)
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
        workdir=workdir,
        progress=progress,
    )


def _stage_outputs(out: Path, files: dict[str, Path | str | bytes]) -> dict[str, Path]:
    """Write every output into a hidden staging folder beside ``out``, then move them in place.

    A failure before the final moves leaves ``out`` untouched (no partial files).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for name, content in files.items():
            target = staging / name
            if isinstance(content, Path) and content.is_dir():  # e.g. a loadable model directory
                shutil.copytree(content, target)
            elif isinstance(content, Path):
                shutil.copyfile(content, target)
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        out.mkdir(exist_ok=True)
        written = {}
        for name in files:
            if (out / name).is_dir():  # a directory from an earlier run: os.replace cannot overwrite it
                shutil.rmtree(out / name)
            os.replace(staging / name, out / name)
            written[name] = out / name
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    from shrinkml.artifacts import build_artifact
    from shrinkml.environment import environment
    from shrinkml.techniques.base import registry

    settings = settings or RunSettings()
    budget = budget or Budget()
    progress = progress or SILENT
    recipe = as_recipe(recipe)
    task_obj, loaded, splits, example = _prepare(model, data, task, weights, settings)
    recipe.check_model_kind(loaded.kind)
    techniques = registry()
    for i, step in enumerate(recipe.steps):
        if settings.runtime == "torch" and techniques[step.technique].produces == "onnx":
            raise InputError(
                f"{step.technique} produces an ONNX Runtime model, which PyTorch cannot run",
                where=f"steps[{i}] with --runtime torch",
                fix="use --runtime onnxruntime (the default) for recipes with ONNX quantization",
            )
        needed = techniques[step.technique].runtime
        if needed is not None and needed != settings.runtime:
            raise InputError(
                f"{step.technique} makes a model only {needed} can run, but the run measures on {settings.runtime}",
                where=f"steps[{i}] with --runtime {settings.runtime}",
                fix=f"run with --runtime {needed}",
            )
    progress.log(f"data {splits.source}: " + ", ".join(f"{k} {v}" for k, v in splits.sizes().items()))

    with tempfile.TemporaryDirectory(prefix="shrinkml-") as tmp:
        workdir = Path(tmp)
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
            files = _write_outputs(Path(out), compressed_art, recipe, report, loaded, state, workdir, progress)
    return CompressResult(
        model=state.torch_model if state.kind == "torch" else state.onnx_model, report=report, files=files
    )


def _text_outputs(
    loaded, state, workdir: Path, progress: Progress, *, runtime: str = "onnxruntime", threads: int = 1,
    tolerance: float = 1e-4,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """For text models: the tokenizer (to feed model.onnx) and, when the final model is still
    PyTorch, a directory sentence-transformers / transformers can load, verified in a subprocess."""
    from shrinkml.models.hf import save_text_model, verify_sentence_transformers
    from shrinkml.models.text import TextEncoder

    info = loaded.text
    tok_dir = workdir / "out-tokenizer"
    info.tokenizer.save_pretrained(str(tok_dir))
    files: dict[str, Path] = {"tokenizer": tok_dir}
    pad = info.tokenizer.pad_token_id if info.tokenizer.pad_token_id is not None else 0
    prefix = "onnx" if runtime == "onnxruntime" else "model"  # model.onnx, or the safetensors file
    manifest: dict[str, Any] = {
        "tokenizer_dir": "tokenizer",
        f"{prefix}_input": f"int64 token ids (batch, sequence) from the tokenizer; positions equal to the pad id"
        f" {pad} are masked (the attention mask is derived inside the model); sequence length is dynamic",
        f"{prefix}_output": "L2-normalized pooled embedding (batch, hidden)" if info.kind == "embedding" and info.normalize
        else ("pooled embedding (batch, hidden)" if info.kind == "embedding" else "logits (batch, classes)"),
        "model_dir": None,
    }
    if state.kind != "torch" or not isinstance(state.torch_model, TextEncoder):
        manifest["model_dir_note"] = "the final model is an ONNX Runtime model: use model.onnx with tokenizer/"
        return files, manifest
    model_dir = workdir / "out-model"
    try:
        save_text_model(state.torch_model, info, model_dir)
    except Exception as exc:  # e.g. modules swapped for ones save_pretrained cannot write
        manifest["model_dir_note"] = f"not written: {type(exc).__name__}: {exc}"
        progress.log(f"could not write a model directory ({type(exc).__name__}); model.onnx is written")
        return files, manifest
    files["model"] = model_dir
    manifest["model_dir"] = "model"
    import torch

    if all(p.dtype == torch.float32 for p in state.torch_model.parameters()):
        from shrinkml.data.texts import generate_texts
        from shrinkml.models.hf import tokenize
        from shrinkml.models.hf_onnx import export_hf_layout

        ids = tokenize(info.tokenizer, generate_texts(4, seed=2), info.max_seq_length or 128)
        try:
            manifest["model_dir_onnx"] = export_hf_layout(
                state.torch_model, info.tokenizer, ids, model_dir / info.transformer_subdir, kind=info.kind,
                pad_token_id=pad, threads=threads, tolerance=tolerance,
            )
        except Exception as exc:  # the directory stays usable from its safetensors
            manifest["model_dir_onnx_note"] = f"onnx/model.onnx not written: {type(exc).__name__}: {exc}"
    else:
        manifest["model_dir_onnx_note"] = "no onnx/model.onnx: the model computes in bfloat16, which ONNX Runtime's CPU provider cannot run"
    import importlib.util

    if info.sentence_transformers and importlib.util.find_spec("sentence_transformers") is None:
        manifest["model_dir_note"] = "not verified: sentence-transformers is not installed (pip install 'shrinkml[text]')"
    elif info.sentence_transformers:
        from shrinkml.data.texts import generate_texts

        progress.log("checking that sentence-transformers loads the written model directory")
        min_cos = verify_sentence_transformers(model_dir, state.torch_model, info, generate_texts(8, seed=1), workdir)
        if min_cos < 0.999:
            raise RuntimeError(
                f"the written sentence-transformers directory disagrees with the compressed model"
                f" (min cosine {min_cos:.5f} < 0.999); this is a bug in shrinkml"
            )
        manifest["model_dir_load"] = "sentence_transformers.SentenceTransformer('model')"
        manifest["model_dir_min_cosine_vs_compressed"] = min_cos
    else:
        manifest["model_dir_load"] = "transformers.AutoModel.from_pretrained('model') (tokenizer in the same folder)"
    return files, manifest


def _has_int8(module) -> bool:
    from shrinkml.techniques.quantize_bf16 import has_int8_modules

    return has_int8_modules(module)


def _write_outputs(
    out: Path, artifact, recipe: Recipe, report: dict, loaded, state=None, workdir: Path | None = None,
    progress: Progress = SILENT,
) -> dict[str, Path]:
    import json

    from shrinkml.report import dumps_report, validate_report
    from shrinkml.report.html import render_html
    from shrinkml.report.markdown import render_markdown

    validate_report(report)
    model_name = "model" + artifact.path.suffix
    manifest = {
        "schema": "shrinkml.artifact/1",
        "model_file": model_name,
        "runtime": artifact.runtime,
        "source_model": loaded.source,
        "recipe_file": "recipe.yaml",
        "load": (
            "onnxruntime.InferenceSession('model.onnx')"
            if artifact.runtime == "onnxruntime"
            else "shrinkml.models.safetensors_io.load_state_dict('model.safetensors') into the factory's"
            " model after fit_module_to_state_dict"
        ),
    }
    if state is not None and state.kind == "torch" and _has_int8(state.torch_model):
        manifest["load"] = (
            "shrinkml.techniques.quantize_bf16.load_int8(original_float32_model, 'model.safetensors')"
            " (INT8 codes; bfloat16 compute)"
        )
    extra: dict[str, Path] = {}
    if getattr(loaded, "text", None) is not None and state is not None and workdir is not None:
        extra, text_manifest = _text_outputs(
            loaded, state, workdir, progress, runtime=artifact.runtime,
            threads=report["runtime"]["threads"], tolerance=report["export"]["tolerance"],
        )
        manifest["text"] = text_manifest
    return _stage_outputs(
        out,
        {
            model_name: artifact.path,
            **extra,
            "recipe.yaml": recipe.to_yaml(),
            "manifest.json": json.dumps(manifest, indent=2) + "\n",
            "report.json": dumps_report(report),
            "report.md": render_markdown(report),
            "report.html": render_html(report),
        },
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
    from shrinkml.artifacts import build_artifact
    from shrinkml.environment import environment

    settings = settings or RunSettings()
    progress = progress or SILENT
    task_obj, loaded, splits, example = _prepare(model, data, task, weights, settings)
    with tempfile.TemporaryDirectory(prefix="shrinkml-") as tmp:
        workdir = Path(tmp)
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
    from dataclasses import asdict

    from shrinkml.environment import environment
    from shrinkml.quant.sensitivity import Evaluator, layer_sensitivity, sqnr_db
    from shrinkml.techniques.base import registry

    settings = settings or RunSettings()
    progress = progress or SILENT
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
    with tempfile.TemporaryDirectory(prefix="shrinkml-") as tmp:
        state = _initial_state(loaded)
        ctx = _step_context(loaded, splits, task_obj, example, settings, progress, Path(tmp))
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

        _stage_outputs(Path(out), {
            "explain.json": json.dumps(to_jsonable(result), indent=2) + "\n",
            "explain.md": render_explain_markdown(result),
            "explain.html": render_explain_html(result),
        })
    return result

"""Prepare once, run any number of recipes: the pipeline behind ``compress``, ``bench`` and ``explain``.

``Pipeline.prepare`` loads the model and the data, makes the splits and checks that model, data and
task fit, once. ``run`` applies a recipe to (a copy of the state of) that model and measures the
baseline and the result together, interleaved, on the test split; steps never change the state they
are given, so one prepared pipeline serves many recipes (a search, a comparison).

>>> pipe = Pipeline.prepare("m.onnx", data="data.npz")  # doctest: +SKIP
>>> for recipe in ("a.yaml", "b.yaml"):  # doctest: +SKIP
...     print(pipe.run(recipe).report["delta"]["size_ratio"])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shrinkml.budget import Budget
from shrinkml.data import Splits, load_data
from shrinkml.errors import InputError
from shrinkml.packaging import run_folder
from shrinkml.packaging.results import output_files
from shrinkml.progress import SILENT, Progress
from shrinkml.recipe import Recipe, as_recipe
from shrinkml.runtimes import runtime, runtime_names
from shrinkml.settings import RunSettings
from shrinkml.tasks import Task, get_task


@dataclass(frozen=True)
class Prepared:
    """A loaded model and its checked, split data."""

    task: Task
    loaded: Any  # shrinkml.models.LoadedModel
    splits: Splits
    example: np.ndarray  # one calibration batch, for tracing and export
    settings: RunSettings
    # a causal LM's run: this process's RSS with its libraries imported, before the model was read
    libraries_rss: int | None = None


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


def _check_causal_lm(loaded, task) -> None:
    """Causal LMs are measured by ``--task perplexity`` only, and that task only measures them."""
    if loaded.lm is not None and not task.causal_lm:
        raise InputError(
            f"this is a causal language model, which --task {task.name} cannot measure",
            where=loaded.source, expected="--task perplexity for a decoder language model",
            found=f"a {loaded.lm.architecture} causal LM", fix="pass --task perplexity",
        )
    task.check_model(loaded, None)


def _close(generator) -> None:
    close = getattr(generator, "close", None)
    if close is not None:
        close()


def _prepare_lm(task, loaded, data, settings: RunSettings, libraries_rss: int | None = None) -> Prepared:
    """Split the text by text, then window it with the model's tokenizer (``shrinkml.data.lm``)."""
    import torch

    from shrinkml.data.lm import DEFAULT_CONTEXT, LMEncoding, lm_splits, read_texts

    rt = runtime(settings.runtime)
    if not hasattr(rt, "lm_generator"):  # before any text is read
        lm_runtimes = [n for n in runtime_names() if hasattr(runtime(n), "lm_generator")]
        raise InputError(f"--runtime {settings.runtime} does not measure causal language models",
                         where=f"--runtime {settings.runtime}", expected=f"one of {', '.join(lm_runtimes)}",
                         fix="pass --runtime llamacpp (the GGUF on llama.cpp) or --runtime torch")
    rt.check_lm(loaded)
    if not isinstance(data, (str, Path)):
        raise InputError("a causal language model is measured on text", where="--data",
                         expected="a .txt file (a text per line), a .jsonl file with 'text' fields, or builtin:prose",
                         found=type(data).__name__, fix="pass held-out text")
    context = min(settings.max_length or DEFAULT_CONTEXT, loaded.lm.context_length)
    splits = lm_splits(read_texts(str(data)), LMEncoding(loaded.lm.tokenizer, context=context), seed=settings.seed,
                       fractions=settings.splits, source=str(data))
    examples = [part.x[:1] for part in (splits.calibration, splits.finetune, splits.validation) if part is not None and len(part)]
    if not examples:
        raise InputError("the text outside the test split is too short for one window", where=str(data),
                         expected=f"at least {context} tokens of calibration text", fix="give more text, or a"
                         " shorter context with --max-length")
    example = examples[0]
    from shrinkml.models.lazy import is_lazy

    if not is_lazy(loaded.module):  # a lazy model's weights are its file's, which the runtime reads
        with torch.inference_mode():
            logits = loaded.module(input_ids=torch.as_tensor(example)).logits.float().numpy()
        task.check_outputs(splits, logits, loaded.source)
    from shrinkml.measure.memory import return_freed_memory

    return_freed_memory()  # what reading the file and the tokenizer's conversion left freed
    return Prepared(task, loaded, splits, example, settings, libraries_rss)


def refuse_lm_output(runtime_name: str) -> None:
    """Refuse, before any step runs, a runtime that cannot measure what a causal LM's compression
    writes (a GGUF file, unless the runtime writes its own artifact: ``write_lm``; search trials write
    the same): measuring something else in its place would report a model nobody deploys."""
    rt = runtime(runtime_name)
    if not getattr(rt, "measures_gguf", True) and not hasattr(rt, "write_lm"):
        raise InputError(
            f"--runtime {runtime_name} does not measure the GGUF files that shrinkml writes for a causal LM",
            where=f"--runtime {runtime_name}", expected="--runtime llamacpp (the files on llama.cpp) or --runtime torch",
            fix="pass --runtime llamacpp or torch")


def refuse_lm_recipe(steps, loaded, runtime_name: str) -> None:
    """Refuse, before any step runs, a causal-LM recipe a step cannot take (``lm_refusal``) or whose
    codes the runtime's artifact cannot hold (its ``check_lm_steps``): compress and search trials."""
    from shrinkml.techniques.base import lm_refusal, registry

    techniques = registry()
    for i, step in enumerate(steps):
        why = lm_refusal(techniques[step.technique], loaded)
        if why:
            raise InputError(f"{step.technique} cannot take this model: {why}", where=f"steps[{i}]",
                             fix="use quantize.gguf for a causal LM (a .gguf file, or a directory it converts)")
    check_steps = getattr(runtime(runtime_name), "check_lm_steps", None)
    if check_steps is not None:
        check_steps(steps)


def _libraries_rss() -> int | None:
    """This process's RSS once the libraries a causal LM's run needs are imported (PyTorch,
    transformers), before any model is read: what the compression's memory is counted above."""
    try:
        import psutil
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:  # the loader says what is missing
        return None
    return int(psutil.Process().memory_info().rss)


def prepare(model, data, task_name, weights, settings: RunSettings) -> Prepared:
    """Load the model and the data, split it, and check that they fit before any work."""
    from shrinkml.models import load_model

    task = get_task(task_name)
    if getattr(runtime(settings.runtime), "causal_lm_only", False) and not task.causal_lm:
        raise InputError(f"--runtime {settings.runtime} measures causal language models only, not --task {task.name}",
                         where=f"--runtime {settings.runtime}", expected="--task perplexity with a causal LM",
                         fix="pass --runtime onnxruntime, openvino or torch for this model")
    if task.causal_lm and hasattr(runtime(settings.runtime), "check_installed"):
        runtime(settings.runtime).check_installed()  # before a directory is converted or a file read
    libraries_rss = _libraries_rss() if task.causal_lm else None
    # first: text data is tokenized by the model's tokenizer
    loaded = load_model(model, weights, random_weights=settings.random_weights,
                        lazy_lm=getattr(runtime(settings.runtime), "lazy_lm", False))
    if loaded.lm is not None or task.causal_lm:
        _check_causal_lm(loaded, task)
        return _prepare_lm(task, loaded, data, settings, libraries_rss)
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
    return Prepared(task, loaded, splits, example, settings)


def _step_context(loaded, splits, task, example, settings, progress, workdir, budget=None, *, teacher: bool = True):
    """What every step sees: the splits, the task, and a frozen copy of the original model as the
    distillation teacher (steps never change the model they were given; ``teacher=False`` when no
    step of the recipe distils, which saves a copy of the model)."""
    from shrinkml.core.types import StepContext

    frozen = None
    if teacher and loaded.kind == "torch":
        frozen = copy.deepcopy(loaded.module).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
    return StepContext(
        splits=splits,
        task=task,
        teacher=frozen,
        example_input=example,
        seed=settings.seed,
        threads=settings.threads,
        progress=progress,
        workdir=workdir,
        export_tolerance=settings.export_tolerance,
        budget=budget,
    )


def _initial_state(loaded):
    from shrinkml.core.types import ModelState

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


def _check_recipe(recipe: Recipe, kind: str, settings: RunSettings) -> None:
    """Refuse, before any work, a recipe whose steps cannot take the model or whose result the
    run's runtime cannot run."""
    from shrinkml.techniques.base import registry

    recipe.check_model_kind(kind)
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


class Pipeline:
    """One prepared model and data set; ``run`` / ``explain`` / ``bench`` work against it."""

    def __init__(self, prepared: Prepared, progress: Progress = SILENT) -> None:
        self.prepared = prepared
        self.progress = progress

    @classmethod
    def prepare(
        cls, model: Any, *, data: Any, task: str = "classification", weights: str | Path | None = None,
        settings: RunSettings | None = None, progress: Progress | None = None,
    ) -> Pipeline:
        progress = progress or SILENT
        prepared = prepare(model, data, task, weights, settings or RunSettings())
        sizes = ", ".join(f"{k} {v}" for k, v in prepared.splits.sizes().items())
        progress.log(f"data {prepared.splits.source}: {sizes}")
        return cls(prepared, progress)

    @property
    def settings(self) -> RunSettings:
        return self.prepared.settings

    def _artifact(self, state, label: str, workdir: Path):
        from shrinkml.artifacts import build_artifact

        s = self.settings
        return build_artifact(state, label, runtime=s.runtime, example=self.prepared.example, workdir=workdir,
                              threads=s.threads, export_tolerance=s.export_tolerance)

    def _apply(self, steps, ctx) -> tuple[Any, list[dict]]:
        from shrinkml.techniques.base import registry

        techniques = registry()
        state, reports = _initial_state(self.prepared.loaded), []
        for i, step in enumerate(steps):
            self.progress.log(f"step {i + 1}/{len(steps)}: {step.technique}")
            result = techniques[step.technique].apply(state, step, ctx)
            state = result.state
            reports.append({"technique": step.technique, "summary": result.summary})
        return state, reports

    def run(self, recipe: Recipe | str | Path | list | dict, *, folder=None, budget: Budget | None = None):
        """Apply ``recipe``, measure baseline and result together, build the report and, when
        ``folder`` is an output folder, commit the outputs into it. Returns ``(report, state, files)``."""
        from shrinkml.environment import environment
        from shrinkml.measure.assess import metric_drop
        from shrinkml.report.build import build_report

        p, s, budget = self.prepared, self.settings, budget or Budget()
        recipe = as_recipe(recipe)
        if p.task.causal_lm:
            return self._run_lm(recipe, folder, budget)
        _check_recipe(recipe, p.loaded.kind, s)
        with (run_folder(None, {}) if folder is None else _given(folder)) as where:
            workdir = where.workdir
            self.progress.log("building the baseline artifact")
            baseline_art = self._artifact(_initial_state(p.loaded), "baseline", workdir)
            ctx = _step_context(p.loaded, p.splits, p.task, p.example, s, self.progress, workdir, budget)
            state, step_reports = self._apply(recipe.steps, ctx)
            self.progress.log("building the compressed artifact")
            compressed_art = self._artifact(state, "compressed", workdir)
            base_a, comp_a = _measure([baseline_art, compressed_art], p.splits, p.task, s, workdir, self.progress)
            primary = p.task.primary_metric(base_a.outputs.shape)
            drop = metric_drop(base_a, comp_a, primary, drop_type=budget.drop_type, seed=s.seed,
                               resamples=s.bootstrap_resamples)
            report = build_report(
                loaded=p.loaded, task=p.task, primary=primary, settings=s, splits=p.splits, example=p.example,
                base=base_a, comp=comp_a, drop=drop, budget=budget, recipe=recipe, steps=step_reports,
                export={
                    "tolerance": s.export_tolerance,
                    "baseline_max_abs_diff": baseline_art.export_max_abs_diff,
                    "compressed_max_abs_diff": compressed_art.export_max_abs_diff,
                    "baseline_encoding": baseline_art.encoding,
                    "compressed_encoding": compressed_art.encoding,
                },
                environment=environment(threads=s.threads, seed=s.seed),
            )
            files: dict[str, Path] = {}
            if folder is not None:
                files = where.commit(output_files(compressed_art, recipe, report, p.loaded, state, workdir, self.progress))
        return report, state, files

    def bench(self) -> dict[str, Any]:
        """The baseline assessment alone (``shrinkml.bench/2``)."""
        from shrinkml.environment import environment
        from shrinkml.report.build import build_bench_report

        p, s = self.prepared, self.settings
        if p.task.causal_lm:
            return self._bench_lm()
        with run_folder(None, {}) as scratch:
            art = self._artifact(_initial_state(p.loaded), "model", scratch.workdir)
            (assessment,) = _measure([art], p.splits, p.task, s, scratch.workdir, self.progress)
        return build_bench_report(
            loaded=p.loaded, task=p.task, settings=s, splits=p.splits, example=p.example, assessment=assessment,
            export_max_abs_diff=art.export_max_abs_diff, environment=environment(threads=s.threads, seed=s.seed),
        )

    def _bench_lm(self) -> dict[str, Any]:
        from shrinkml.environment import environment
        from shrinkml.measure.lm import assess_lm
        from shrinkml.report.build import build_lm_bench_report

        p, s = self.prepared, self.settings
        generator = self._lm_generator(loaded=p.loaded)
        try:
            measurement = assess_lm(p.loaded, p.splits, generator, runtime=s.runtime, repeats=s.repeats, seed=s.seed,
                                    resamples=s.bootstrap_resamples, new_tokens=s.new_tokens, progress=self.progress)
        finally:
            _close(generator)
        return build_lm_bench_report(loaded=p.loaded, task=p.task, settings=s, splits=p.splits,
                                     measurement=measurement, environment=environment(threads=s.threads, seed=s.seed))

    def _lm_generator(self, *, loaded=None, gguf_path=None, folder=None):
        """The runtime's loaded causal LM: the input model, or a written GGUF (or the runtime's own
        folder) read back on its own."""
        p, s = self.prepared, self.settings
        where = {"folder": folder} if folder is not None else {}
        return runtime(s.runtime).lm_generator(loaded=loaded, gguf_path=gguf_path, threads=s.threads,
                                               context=int(p.splits.test.x.shape[1]), new_tokens=s.new_tokens, **where)

    def _refuse_lm(self, verb: str) -> None:
        if self.prepared.task.causal_lm:
            raise InputError(
                f"{verb} does not take causal language models yet", where=self.prepared.loaded.source,
                fix="use shrinkml compress (quantize.gguf) and shrinkml bench for a causal LM",
            )

    def _run_lm(self, recipe: Recipe, folder, budget: Budget):
        """A causal-LM recipe: apply it, write the GGUF, load that file back on its own and measure it
        against the original on the same windows and rounds (``shrinkml.measure.lm``)."""
        from shrinkml.environment import environment
        from shrinkml.measure.lm import artifact_bytes, assess_lm_pair, deployable_bytes
        from shrinkml.packaging.gguf_out import write_lm_gguf
        from shrinkml.report.build import build_lm_report

        p, s = self.prepared, self.settings
        refuse_lm_output(s.runtime)
        refuse_lm_recipe(recipe.steps, p.loaded, s.runtime)
        with (run_folder(None, {}) if folder is None else _given(folder)) as where:
            workdir = where.workdir
            from shrinkml.measure.memory import _PeakSampler

            # no causal-LM step distils: no teacher copy of the model
            ctx = _step_context(p.loaded, p.splits, p.task, p.example, s, self.progress, workdir, budget, teacher=False)
            rt = runtime(s.runtime)
            writes_own = hasattr(rt, "write_lm")  # a runtime whose artifact is not a GGUF file (ORT GenAI's folder)
            with _PeakSampler() as sampler:
                before = sampler.peak
                state, step_reports = self._apply(recipe.steps, ctx)
                if not writes_own:
                    artifact = write_lm_gguf(state, p.loaded, workdir / "model.gguf")
            if writes_own:  # its builder runs in a child process: not in this process's memory figure
                self.progress.log(f"writing the {rt.artifact_format} (its builder, in a child process)")
                artifact = rt.write_lm(state, p.loaded, workdir / rt.artifact_name, threads=s.threads)
            from shrinkml.models.lazy import is_lazy

            fp32 = 4 * sum(t.numel() for t in p.loaded.module.parameters())
            above = None if p.libraries_rss is None else int(sampler.peak) - p.libraries_rss
            memory = {"process_rss_before_bytes": int(before), "process_peak_rss_bytes": int(sampler.peak),
                      "fp32_model_bytes": fp32, "peak_vs_fp32": round(sampler.peak / fp32, 3),
                      "libraries_rss_bytes": p.libraries_rss, "peak_above_libraries_bytes": above,
                      "peak_above_libraries_vs_fp32": None if above is None else round(above / fp32, 3),
                      "model_in_memory": ("lazy: the decoder layers stay in the GGUF file, one read at a time"
                                          if is_lazy(p.loaded.module) else "whole (float32)"),
                      "scope": "this process's peak RSS while the steps ran and model.gguf was written (an ORT"
                               " GenAI folder's builder runs after, in a child process; PyTorch, transformers, the"
                               " tokenizer and the tokenized text loaded); peak_above_libraries: that"
                               " peak less the RSS once PyTorch and transformers were imported, before the model was"
                               " read (a fresh process, as the CLI's, holds nothing else then)"}
            size = artifact_bytes(artifact)
            self.progress.log(f"wrote {size:,} bytes ({artifact.name}); loading it back on its own")
            # what a user deploys, read as a user reads it, on the runtime the report names
            generators = {"baseline": self._lm_generator(loaded=p.loaded),
                          "compressed": (self._lm_generator(folder=artifact) if writes_own
                                         else self._lm_generator(gguf_path=artifact))}
            try:
                figures = assess_lm_pair(generators, p.splits, context_length=p.loaded.lm.context_length,
                                         repeats=s.repeats, seed=s.seed, resamples=s.bootstrap_resamples,
                                         new_tokens=s.new_tokens, progress=self.progress)
            finally:
                for g in generators.values():
                    _close(g)
            sizes = {"baseline": deployable_bytes(p.loaded), "compressed": size}
            described = ({"file": artifact.name, "description": f"the compressed model, a {rt.artifact_format} that"
                          " loads on its own"} if writes_own else None)
            report = build_lm_report(loaded=p.loaded, task=p.task, settings=s, splits=p.splits, figures=figures,
                                     sizes=sizes, budget=budget, recipe=recipe, steps=step_reports,
                                     environment=environment(threads=s.threads, seed=s.seed), memory=memory,
                                     artifact=described)
            files: dict[str, Path] = {}
            if folder is not None:
                import json

                files = where.commit({artifact.name: artifact, "recipe.yaml": recipe.to_yaml(),
                                      "report.json": json.dumps(report, indent=2, allow_nan=False) + "\n"})
        return report, state, files

    def explain(self, recipe: Recipe | str | Path | list | dict, *, folder=None) -> dict[str, Any]:
        """Quantize one weight layer at a time with the recipe's last step (a quantizer) after the
        steps before it, and score each against the float model on the test split."""
        self._refuse_lm("explain")
        from dataclasses import asdict

        from shrinkml.environment import environment
        from shrinkml.quant.sensitivity import Evaluator, layer_sensitivity, sqnr_db
        from shrinkml.techniques.base import registry

        p, s = self.prepared, self.settings
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
        recipe.check_model_kind(p.loaded.kind)
        with (run_folder(None, {}) if folder is None else _given(folder)) as where:
            ctx = _step_context(p.loaded, p.splits, p.task, p.example, s, self.progress, where.workdir)
            state, _ = self._apply(recipe.steps[:-1], ctx)
            float_model, quantize, _ = techniques[last.technique].build_quantizer(state, last, ctx)
            evaluator = Evaluator(float_model, p.splits.test, p.task, s.threads, s.seed)
            self.progress.log("quantizing each layer alone")
            rows = layer_sensitivity(float_model, quantize, evaluator)
            all_outputs = evaluator.outputs(quantize([]))
            value, worst = evaluator.drop(all_outputs)
            layers = sorted((asdict(r) for r in rows), key=lambda r: (-r["metric_drop"], r["output_sqnr_db"]))
            result = {
                "schema": "shrinkml.explain/1",
                "model": {"source": p.loaded.source, "weights": p.loaded.weights},
                "task": p.task.name,
                "metric": evaluator.primary,
                "technique": last.model_dump(mode="json"),
                "data": {"source": p.splits.source, "evaluated_on": "test", "examples": len(p.splits.test),
                         "seed": s.seed},
                "all_quantized": {"drop": value, "drop_ci95_upper": worst,
                                  "output_sqnr_db": sqnr_db(evaluator.reference, all_outputs)},
                "layers": layers,
                "environment": environment(threads=s.threads, seed=s.seed),
            }
            if folder is not None:
                from shrinkml.report.explain import render_explain_files

                where.commit(render_explain_files(result))
        return result


class _given:
    """An output folder the caller already entered (and will leave), usable in a ``with``."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def __enter__(self):
        return self.folder

    def __exit__(self, *exc) -> None:
        return None

"""The ``shrinkml`` command line: thin commands over ``shrinkml.api``.

Exit codes: 0 success, 1 finished but the accuracy budget was not met (report still written),
2 bad input or environment. Errors print one paragraph, no traceback unless ``--debug``.
"""

from __future__ import annotations

import functools
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from shrinkml.errors import InputError, ShrinkmlError

app = typer.Typer(
    name="shrinkml",
    help="Make trained neural networks smaller, faster and cheaper, and prove it with measurements.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


class _StoppedRun(Exception):
    """Carries Ctrl-C / SIGTERM out of a command past Typer, which would turn it into a silent 130."""

    def __init__(self, interrupt: KeyboardInterrupt) -> None:
        super().__init__(str(interrupt))
        self.interrupt = interrupt


def _command(fn):
    """``app.command()`` for a verb whose interruption must be reported by ``main``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise _StoppedRun(exc) from None

    return app.command()(wrapper)


def _runtime_enum() -> type[Enum]:
    from shrinkml.core.registry import RUNTIMES  # names only: no runtime library is imported

    return Enum("RuntimeName", {name: name for name in RUNTIMES.names()}, type=str)


RuntimeName = _runtime_enum()


def _task_enum() -> type[Enum]:
    from shrinkml.core.registry import TASKS

    return Enum("TaskName", {name: name for name in TASKS.names()}, type=str)


TaskName = _task_enum()


class DropType(str, Enum):
    absolute = "absolute"
    relative = "relative"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"shrinkml {version('shrinkml')}")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors (also accepted after the command)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    _state["debug"] = debug


def _settings(**kwargs):
    from pydantic import ValidationError

    from shrinkml.api import RunSettings
    from shrinkml.cost import CostSettings

    cost_keys = ("price_per_hour", "requests_per_month", "storage_price_per_gb_month")
    cost = {k: kwargs.pop(k) for k in cost_keys if kwargs.get(k) is not None}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return RunSettings(cost=CostSettings(**cost), **kwargs)
    except ValidationError as exc:
        raise _option_error(exc) from None


def _option_error(exc) -> InputError:
    """A pydantic error on settings built from options, named by the option the user typed."""
    err = exc.errors()[0]
    loc = [part for part in err["loc"] if part != "cost"]
    option = "--" + str(loc[0] if loc else "value").replace("_", "-")
    return InputError(err["msg"], where=option, found=repr(err.get("input"))[:80], fix=f"pass a valid {option}")


def _budget(max_drop: float, drop_type: str):
    from pydantic import ValidationError

    from shrinkml.api import Budget

    try:
        return Budget(max_drop=max_drop, drop_type=drop_type)
    except ValidationError as exc:
        raise _option_error(exc) from None


def _progress():
    from shrinkml.progress import Progress

    return Progress()  # stderr only, and only when it is a terminal


def _print_result(report: dict, json_out: bool) -> None:
    if json_out:
        from shrinkml.report.json_report import dumps_report

        sys.stdout.write(dumps_report(report))
        return
    from rich.console import Console

    from shrinkml.report.table import summary_table, verdict_text

    console = Console()
    if report.get("schema") == "shrinkml.lm_report/1":
        from shrinkml.report.table import lm_summary_table

        console.print(lm_summary_table(report))
        return
    if report["model"].get("random_weights"):
        console.print("[bold yellow]RANDOM WEIGHTS:[/bold yellow] the model ran untrained (--random-weights);"
                      " the figures describe the architecture, not a trained model.")
    console.print(summary_table(report))
    console.print(verdict_text(report))


def _finish(result, out: Path, json_out: bool) -> None:
    _print_result(result.report, json_out)
    if not json_out:
        top = sorted({Path(name).parts[0] for name in result.files})  # model/onnx/... is inside model/
        typer.echo(f"Wrote {', '.join(top)} to {out}/", err=True)
    if not result.budget_met:
        raise typer.Exit(1)


COMMON = {
    "model": typer.Option(..., help="package.module:factory (imported from the current folder; with --weights), a .onnx file, a transformers / sentence-transformers directory, or a causal LM (transformers directory or .gguf file)."),
    "data": typer.Option(..., help=".npz with x and y (or x_calibration/x_finetune/x_test), package.module:function, builtin:digits; for text models .txt, .jsonl, builtin:texts (generated) or builtin:prose (real sentences from installed packages' descriptions)."),
    "task": typer.Option(TaskName("classification"), help="classification (accuracy against labels), fidelity (label-free closeness to the original), embedding (text embedding models: cosine, worst-5%, top-10 neighbours) or perplexity (causal LMs: perplexity, KL, top-1 agreement)."),
    "weights": typer.Option(None, help="Trained weights (.safetensors) for a factory model; pickles are refused."),
    "runtime": typer.Option(
        RuntimeName("onnxruntime"),
        help="Where the models are timed: onnxruntime (CPU), openvino (CPU; pip install 'shrinkml[openvino]'),"
        " torch (PyTorch eager), llamacpp (causal LMs' GGUF files in llama.cpp; pip install 'shrinkml[llamacpp]')"
        " or onnxruntime-genai (causal LMs as ORT GenAI folders; pip install 'shrinkml[ortgenai]').",
    ),
    "threads": typer.Option(None, help="Threads for inference and training (default: min(cores, 4))."),
    "batch_n": typer.Option(None, "--batch-n", help="The larger batch size timed besides batch 1 (default 32)."),
    "repeats": typer.Option(None, help="Timed runs per model and batch size (>= 10, default 20)."),
    "max_timing_s": typer.Option(
        None, "--max-timing-s",
        help="Seconds per batch size for extra timed rounds while a speedup's 95% CI is wider than"
        " +-5% (default 20; 0: exactly --repeats rounds).",
    ),
    "seed": typer.Option(None, help="Seed for splits, bootstrap and training (default 0)."),
    "json_out": typer.Option(False, "--json", help="Print the report JSON on stdout."),
    "random_weights": typer.Option(
        False, "--random-weights",
        help="Run a factory model given without --weights as built, with random weights (architecture"
        " benchmarking only: the report says so first).",
    ),
    "max_length": typer.Option(
        None, "--max-length", help="Text models: tokens per text, padded/truncated (default min(model max, 128));"
        " causal LMs (--task perplexity): the window context (default 512)."
    ),
    "new_tokens": typer.Option(None, "--new-tokens", help="Causal LMs: tokens per timed greedy generation (default 128)."),
}


@_command
def compress(
    model: str = COMMON["model"],
    data: str = COMMON["data"],
    recipe: Path = typer.Option(..., help="Recipe YAML: an ordered list of steps."),
    out: Path = typer.Option(Path("shrinkml-out"), help="Output folder: new, or one an earlier run wrote (replaced whole when the run succeeds)."),
    weights: Optional[str] = COMMON["weights"],
    task: TaskName = COMMON["task"],
    max_drop: float = typer.Option(0.01, "--max-drop", help="Largest acceptable drop (0.01 = 1 point)."),
    drop_type: DropType = typer.Option(DropType.absolute, "--drop-type", help="absolute: in metric units; relative: a fraction of the baseline's value."),
    runtime: RuntimeName = COMMON["runtime"],
    threads: Optional[int] = COMMON["threads"],
    batch_n: Optional[int] = COMMON["batch_n"],
    repeats: Optional[int] = COMMON["repeats"],
    max_timing_s: Optional[float] = COMMON["max_timing_s"],
    seed: Optional[int] = COMMON["seed"],
    price_per_hour: Optional[float] = typer.Option(None, "--price-per-hour", help="Instance price, USD/hour."),
    requests_per_month: Optional[float] = typer.Option(None, "--requests-per-month", help="Inferences per month, for the monthly cost."),
    storage_price_per_gb_month: Optional[float] = typer.Option(None, "--storage-price-per-gb-month", help="Storage price, USD per GB-month."),
    export_tolerance: Optional[float] = typer.Option(None, "--export-tolerance", help="Max abs diff ONNX vs PyTorch."),
    max_length: Optional[int] = COMMON["max_length"],
    new_tokens: Optional[int] = COMMON["new_tokens"],
    random_weights: bool = COMMON["random_weights"],
    json_out: bool = COMMON["json_out"],
) -> None:
    """Measure a model, compress it with a recipe, measure again, and write the report."""
    from shrinkml.api import compress as run_compress

    budget = _budget(max_drop, drop_type.value)
    settings = _settings(
        runtime=runtime.value, threads=threads, batch_n=batch_n, repeats=repeats, max_timing_s=max_timing_s, seed=seed,
        price_per_hour=price_per_hour, requests_per_month=requests_per_month,
        storage_price_per_gb_month=storage_price_per_gb_month, export_tolerance=export_tolerance,
        max_length=max_length, random_weights=random_weights, new_tokens=new_tokens,
    )
    result = run_compress(
        model, recipe, data=data, task=task.value, weights=weights, out=out,
        budget=budget, settings=settings,
        progress=_progress(),
    )
    _finish(result, out, json_out)


@_command
def bench(
    model: str = COMMON["model"],
    data: str = COMMON["data"],
    weights: Optional[str] = COMMON["weights"],
    task: TaskName = COMMON["task"],
    runtime: RuntimeName = COMMON["runtime"],
    threads: Optional[int] = COMMON["threads"],
    batch_n: Optional[int] = COMMON["batch_n"],
    repeats: Optional[int] = COMMON["repeats"],
    max_timing_s: Optional[float] = COMMON["max_timing_s"],
    seed: Optional[int] = COMMON["seed"],
    max_length: Optional[int] = COMMON["max_length"],
    new_tokens: Optional[int] = COMMON["new_tokens"],
    random_weights: bool = COMMON["random_weights"],
    json_out: bool = COMMON["json_out"],
) -> None:
    """Assess a model alone: size, params, MACs, latency, throughput, memory, accuracy, cost."""
    from shrinkml.api import bench as run_bench

    settings = _settings(
        runtime=runtime.value, threads=threads, batch_n=batch_n, repeats=repeats, max_timing_s=max_timing_s,
        seed=seed, max_length=max_length, random_weights=random_weights, new_tokens=new_tokens,
    )
    result = run_bench(model, data=data, task=task.value, weights=weights, settings=settings, progress=_progress())
    if json_out:
        from shrinkml.report.json_report import dumps_report

        sys.stdout.write(dumps_report(result))
        return
    from rich.console import Console

    from shrinkml.report.table import bench_table

    console = Console()
    for note in result["notes"]:
        console.print(note, markup=False, style="yellow")
    console.print(bench_table(result))


@_command
def demo(
    out: Path = typer.Option(Path("shrinkml-out"), help="Output folder."),
    seed: int = typer.Option(0, help="Seed for the split, training and bootstrap."),
    runtime: RuntimeName = COMMON["runtime"],
    threads: Optional[int] = COMMON["threads"],
    json_out: bool = COMMON["json_out"],
) -> None:
    """Train a small CNN on the bundled digits, compress it, and report (about a minute)."""
    from shrinkml.api import Budget
    from shrinkml.api import compress as run_compress
    from shrinkml.examples.demo import DEMO_RECIPE, build_demo_model, demo_data

    progress = _progress()
    settings = _settings(seed=seed, threads=threads, runtime=runtime.value)
    splits = demo_data(seed)
    progress.log("training the FP32 demo CNN on the fine-tune split of the digits")
    model = build_demo_model(splits, seed=seed, progress=progress)
    result = run_compress(
        model, DEMO_RECIPE, data=splits, out=out, budget=Budget(max_drop=0.01), settings=settings, progress=progress
    )
    _finish(result, out, json_out)


@_command
def explain(
    model: str = COMMON["model"],
    data: str = COMMON["data"],
    recipe: Path = typer.Option(..., help="Recipe YAML whose last step is the quantizer to analyse."),
    out: Optional[Path] = typer.Option(None, help="Folder for explain.{json,md,html}."),
    weights: Optional[str] = COMMON["weights"],
    task: TaskName = COMMON["task"],
    threads: Optional[int] = COMMON["threads"],
    seed: Optional[int] = COMMON["seed"],
    random_weights: bool = COMMON["random_weights"],
    json_out: bool = COMMON["json_out"],
) -> None:
    """Show which layers cost accuracy when quantized (per-layer SQNR and metric drop)."""
    from shrinkml.api import explain as run_explain

    settings = _settings(threads=threads, seed=seed, random_weights=random_weights)
    result = run_explain(model, recipe, data=data, task=task.value, weights=weights, out=out,
                         settings=settings, progress=_progress())
    if json_out:
        from shrinkml.report.json_report import to_jsonable

        sys.stdout.write(json.dumps(to_jsonable(result), indent=2) + "\n")
        return
    from rich.console import Console

    from shrinkml.report.explain import explain_table

    Console().print(explain_table(result))


@_command
def search(
    model: str = COMMON["model"],
    data: str = COMMON["data"],
    out: Path = typer.Option(Path("shrinkml-search"), help="Output folder: the study (study.journal), search.{json,md,html} and best/ (the best recipe's compress result)."),
    weights: Optional[str] = COMMON["weights"],
    task: TaskName = COMMON["task"],
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Largest deployable file, e.g. 10MB (10^6 bytes) or 10MiB."),
    max_latency: Optional[str] = typer.Option(None, "--max-latency", help="Largest p50 latency at --batch on --runtime, e.g. 50ms."),
    min_throughput: Optional[float] = typer.Option(None, "--min-throughput", help="Fewest examples per second at --batch."),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size latency and throughput are measured at."),
    max_drop: float = typer.Option(0.01, "--max-drop", help="Largest acceptable drop of the task metric (0.01 = 1 point), 95% CI worst end."),
    drop_type: DropType = typer.Option(DropType.absolute, "--drop-type", help="absolute: in metric units; relative: a fraction of the baseline's value."),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Stop when the study holds this many trials (all workers together)."),
    time_budget: Optional[str] = typer.Option(None, "--time-budget", help="Start no trial after this long, e.g. 30m or 1h."),
    objectives: Optional[str] = typer.Option(None, "--objectives", help="Comma-separated, of size, latency, throughput, metric (default size,latency,metric; throughput with --min-throughput)."),
    prefer: Optional[str] = typer.Option(None, "--prefer", help="Which objective picks the best of the feasible Pareto front (default: latency with --max-latency, throughput with --min-throughput, else size)."),
    space: Optional[Path] = typer.Option(None, "--space", help="Search-space YAML: exclude, stages, params, prefix (docs/search.md)."),
    sampler: str = typer.Option("tpe", "--sampler", help="Optuna sampler: tpe (multi-objective TPE) or nsga2."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna RDB storage URL shared by workers on many machines, e.g. postgresql://user@host/db (default: a journal file in --out)."),
    study: str = typer.Option("shrinkml-search", "--study", help="Study name in --storage."),
    workers: int = typer.Option(1, "--workers", min=1, max=64, help="Local worker processes running trials in parallel."),
    resume: bool = typer.Option(False, "--resume", help="Continue the search whose study is in --out (after a crash or Ctrl-C)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute shared recipe prefixes in every trial (to measure what the cache saves)."),
    no_pruning: bool = typer.Option(False, "--no-pruning", help="Never stop a trial's training early."),
    runtime: RuntimeName = COMMON["runtime"],
    threads: Optional[int] = COMMON["threads"],
    repeats: Optional[int] = COMMON["repeats"],
    seed: Optional[int] = COMMON["seed"],
    max_length: Optional[int] = COMMON["max_length"],
    json_out: bool = COMMON["json_out"],
) -> None:
    """Find the best recipe under targets: size, latency or throughput, and an accuracy budget."""
    from shrinkml.recipe_search.run import search as run_search
    from shrinkml.recipe_search.units import parse_duration_s, parse_latency_ms, parse_size

    settings = _settings(runtime=runtime.value, threads=threads, repeats=repeats, seed=seed, max_length=max_length)
    result = run_search(
        model, data=data, out=out, task=task.value, weights=weights,
        max_size_bytes=parse_size(max_size) if max_size else None,
        max_latency_ms=parse_latency_ms(max_latency) if max_latency else None,
        min_throughput=min_throughput, batch=batch, budget=_budget(max_drop, drop_type.value),
        objectives=tuple(o.strip() for o in objectives.split(",") if o.strip()) if objectives else (),
        prefer=prefer, trials=trials, time_budget_s=parse_duration_s(time_budget) if time_budget else None,
        space=space, sampler=sampler, storage=storage, study=study, workers=workers, resume=resume,
        cache=not no_cache, pruning=not no_pruning, settings=settings, progress=_progress(),
    )
    if json_out:
        sys.stdout.write(json.dumps(result.report, indent=2) + "\n")
    else:
        from rich.console import Console

        from shrinkml.report.search import search_document

        doc = search_document(result.report)
        console = Console()
        console.print(f"[bold]{doc.verdict.label}:[/bold] {doc.verdict.detail}.", markup=True, highlight=False)
        console.print(doc.headline, markup=False)
        if result.best_recipe:
            from shrinkml.report.search import _recipe_text

            console.print("best recipe: " + _recipe_text(result.best_recipe), markup=False)
        typer.echo(f"Wrote search.md, search.html, search.json{', best/' if result.best_recipe else ''} to {out}/", err=True)
    if not result.met:
        raise typer.Exit(1)


@app.command()
def techniques(
    name: Optional[str] = typer.Argument(None, help="Show one technique's keys."),
    json_out: bool = typer.Option(False, "--json", help="Print the technique's JSON schema instead of the table."),
) -> None:
    """List the registered techniques, or one technique's keys: type, default, range and meaning."""
    from shrinkml.techniques.base import registry

    found = registry()
    if name is None:
        for tech_name, tech in sorted(found.items()):
            doc = (tech.config_cls.__doc__ or "").strip().splitlines()[0]
            typer.echo(f"{tech_name:20s} {doc}")
        return
    if name not in found:
        raise InputError(f"unknown technique {name!r}", expected="one of " + ", ".join(sorted(found)),
                         fix="run `shrinkml techniques` for the list")
    config_cls = found[name].config_cls
    if json_out:
        from shrinkml.technique_docs import technique_schema

        sys.stdout.write(json.dumps(technique_schema(config_cls), indent=2) + "\n")
        return
    from rich.console import Console

    from shrinkml.technique_docs import render_technique_table

    Console().print(render_technique_table(name, config_cls))


def _on_sigterm(signum, frame) -> None:
    from shrinkml.packaging import Terminated

    raise Terminated()


def _interrupted(exc: BaseException) -> int:
    from shrinkml.packaging import Interrupted, Terminated

    if isinstance(exc, Interrupted):  # raised by the output folder, which knows what it holds
        typer.echo(str(exc), err=True)
        return exc.exit_code
    if isinstance(exc, Terminated):
        typer.echo("terminated; nothing was written", err=True)
        return 143
    typer.echo("interrupted; nothing was written", err=True)
    return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, map errors to exit codes, and keep tracebacks for ``--debug``.

    ``--debug`` is taken anywhere on the line (before or after the command). Ctrl-C and SIGTERM
    print one line saying what the output folder holds and exit 130 (143 for SIGTERM).
    """
    import signal

    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        # without standalone mode, a command's exit code is returned instead of raised
        code = app(args=(["--debug"] if debug else []) + args, standalone_mode=False, prog_name="shrinkml")
        if code == 130:  # Typer's answer to a Ctrl-C outside our commands
            return _interrupted(KeyboardInterrupt())
        return code if isinstance(code, int) else 0
    except _StoppedRun as exc:
        return _interrupted(exc.interrupt)
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt) as exc:  # outside a command (e.g. while parsing)
        return _interrupted(exc)
    except typer.TyperException as exc:  # usage errors: unknown option, missing value, ...
        exc.show()
        return 2
    except ShrinkmlError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except Exception as exc:  # a bug in shrinkml or a library: say so, keep the trace for --debug
        if debug:
            raise
        typer.echo(
            f"error: unexpected {type(exc).__name__}: {str(exc)[:300]}. This is probably a bug in shrinkml;"
            " rerun with --debug for the traceback and report it.",
            err=True,
        )
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

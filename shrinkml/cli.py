"""The ``shrinkml`` command line: thin commands over ``shrinkml.api``.

Exit codes: 0 success, 1 finished but the accuracy budget was not met (report still written),
2 bad input or environment. Errors print one paragraph, no traceback unless ``--debug``.
"""

from __future__ import annotations

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


class RuntimeName(str, Enum):
    onnxruntime = "onnxruntime"
    torch = "torch"


class TaskName(str, Enum):
    classification = "classification"
    fidelity = "fidelity"
    embedding = "embedding"


class DropType(str, Enum):
    absolute = "absolute"
    relative = "relative"


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
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
        err = exc.errors()[0]
        option = "--" + str(err["loc"][0]).replace("_", "-")
        raise InputError(err["msg"], where=option, found=repr(err.get("input")), fix=f"pass a valid {option}") from None


def _progress():
    from shrinkml.progress import Progress

    return Progress()  # stderr only, and only when it is a terminal


def _print_result(report: dict, json_out: bool) -> None:
    if json_out:
        from shrinkml.report.json_report import dumps_report

        sys.stdout.write(dumps_report(report))
        return
    from rich.console import Console

    from shrinkml.report.table import summary_table

    console = Console()
    console.print(summary_table(report))
    budget = report["budget"]
    verdict = "[green]met[/green]" if budget["met"] else "[red]NOT met[/red]"
    console.print(
        f"Budget {verdict}: worst-case {budget['metric']} drop {budget['worst_case_drop'] * 100:.2f} points"
        f" (95% CI upper end) vs max {budget['max_drop'] * 100:.2f} ({budget['drop_type']})."
    )


def _finish(result, out: Path, json_out: bool) -> None:
    _print_result(result.report, json_out)
    if not json_out:
        typer.echo(f"Wrote {', '.join(sorted(p.name for p in result.files.values()))} to {out}/", err=True)
    if not result.budget_met:
        raise typer.Exit(1)


COMMON = {
    "runtime": typer.Option(RuntimeName.onnxruntime, help="Where both models are timed."),
    "threads": typer.Option(None, help="Threads for inference and training (default: min(cores, 4))."),
    "batch_n": typer.Option(None, "--batch-n", help="The larger batch size timed besides batch 1 (default 32)."),
    "repeats": typer.Option(None, help="Timed runs per model and batch size (>= 10, default 20)."),
    "seed": typer.Option(None, help="Seed for splits, bootstrap and training (default 0)."),
    "json_out": typer.Option(False, "--json", help="Print the report JSON on stdout."),
    "max_length": typer.Option(
        None, "--max-length", help="Text models: tokens per text, padded/truncated (default min(model max, 128))."
    ),
}


@app.command()
def compress(
    model: str = typer.Option(..., help="package.module:factory (with --weights), a .onnx file, or a transformers / sentence-transformers directory."),
    data: str = typer.Option(..., help=".npz with x and y, package.module:function, builtin:digits; for text models .txt, .jsonl or builtin:texts."),
    recipe: Path = typer.Option(..., help="Recipe YAML: an ordered list of steps."),
    out: Path = typer.Option(Path("shrinkml-out"), help="Output folder."),
    weights: Optional[str] = typer.Option(None, help="Weights (.safetensors) for a factory model."),
    task: TaskName = typer.Option(TaskName.classification, help="classification (labels), fidelity (label-free) or embedding (embedding models: cosine, worst-5%, top-10 neighbours)."),
    max_drop: float = typer.Option(0.01, "--max-drop", help="Largest acceptable drop (0.01 = 1 point)."),
    drop_type: DropType = typer.Option(DropType.absolute, "--drop-type"),
    runtime: RuntimeName = COMMON["runtime"],
    threads: Optional[int] = COMMON["threads"],
    batch_n: Optional[int] = COMMON["batch_n"],
    repeats: Optional[int] = COMMON["repeats"],
    seed: Optional[int] = COMMON["seed"],
    price_per_hour: Optional[float] = typer.Option(None, "--price-per-hour", help="Instance price, USD/hour."),
    requests_per_month: Optional[float] = typer.Option(None, "--requests-per-month"),
    storage_price_per_gb_month: Optional[float] = typer.Option(None, "--storage-price-per-gb-month"),
    export_tolerance: Optional[float] = typer.Option(None, "--export-tolerance", help="Max abs diff ONNX vs PyTorch."),
    max_length: Optional[int] = COMMON["max_length"],
    json_out: bool = COMMON["json_out"],
) -> None:
    """Measure a model, compress it with a recipe, measure again, and write the report."""
    from shrinkml.api import Budget
    from shrinkml.api import compress as run_compress

    if max_drop < 0:
        raise InputError("must be >= 0", where="--max-drop", found=str(max_drop), fix="pass e.g. --max-drop 0.01")
    settings = _settings(
        runtime=runtime.value, threads=threads, batch_n=batch_n, repeats=repeats, seed=seed,
        price_per_hour=price_per_hour, requests_per_month=requests_per_month,
        storage_price_per_gb_month=storage_price_per_gb_month, export_tolerance=export_tolerance,
        max_length=max_length,
    )
    result = run_compress(
        model, recipe, data=data, task=task.value, weights=weights, out=out,
        budget=Budget(max_drop=max_drop, drop_type=drop_type.value), settings=settings,
        progress=_progress(),
    )
    _finish(result, out, json_out)


@app.command()
def bench(
    model: str = typer.Option(..., help="package.module:factory (with --weights) or a .onnx file."),
    data: str = typer.Option(..., help=".npz with x and y, package.module:function, or builtin:digits."),
    weights: Optional[str] = typer.Option(None, help="Weights (.safetensors) for a factory model."),
    task: TaskName = typer.Option(TaskName.classification),
    runtime: RuntimeName = COMMON["runtime"],
    threads: Optional[int] = COMMON["threads"],
    batch_n: Optional[int] = COMMON["batch_n"],
    repeats: Optional[int] = COMMON["repeats"],
    seed: Optional[int] = COMMON["seed"],
    max_length: Optional[int] = COMMON["max_length"],
    json_out: bool = COMMON["json_out"],
) -> None:
    """Assess a model alone: size, params, MACs, latency, throughput, memory, accuracy, cost."""
    from shrinkml.api import bench as run_bench

    settings = _settings(
        runtime=runtime.value, threads=threads, batch_n=batch_n, repeats=repeats, seed=seed, max_length=max_length
    )
    result = run_bench(model, data=data, task=task.value, weights=weights, settings=settings, progress=_progress())
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    m = result["measurement"]
    table = Table(title=f"{result['model']['source']} on {result['runtime']['name']} ({result['runtime']['threads']} threads)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    n = m["latency_ms"]["batch_n"]["n"]
    rows = [
        ("size on disk", f"{m['size_bytes']:,} B"),
        ("params (nonzero)", f"{m['params']:,} ({m['nonzero_params']:,})"),
        ("MACs per example", "n/a" if m["macs"] is None else f"{m['macs']:,}"),
        ("latency batch 1 p50 / p95", f"{m['latency_ms']['batch_1']['p50']:.3f} / {m['latency_ms']['batch_1']['p95']:.3f} ms"),
        (f"latency batch {n} p50 / p95", f"{m['latency_ms']['batch_n']['p50']:.3f} / {m['latency_ms']['batch_n']['p95']:.3f} ms"),
        (f"throughput batch {n}", f"{m['throughput_per_s']['batch_n']:,.0f} /s"),
        ("peak memory", "n/a" if m["peak_memory_bytes"] is None else f"{m['peak_memory_bytes'] / 2**20:.1f} MiB"),
        ("cost per million inferences", f"${result['cost']['cost_per_million_inferences']:.4f}"),
    ]
    for name, metric in m["metrics"].items():
        rows.append((name, f"{metric['value']:.4f} [{metric['ci95'][0]:.4f}, {metric['ci95'][1]:.4f}]"))
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("shrinkml-out"), help="Output folder."),
    seed: int = typer.Option(0, help="Seed for the split, training and bootstrap."),
    threads: Optional[int] = COMMON["threads"],
    json_out: bool = COMMON["json_out"],
) -> None:
    """Train a small CNN on the bundled digits, compress it, and report (about a minute)."""
    from shrinkml.api import Budget
    from shrinkml.api import compress as run_compress
    from shrinkml.examples.demo import DEMO_RECIPE, build_demo_model, demo_data

    progress = _progress()
    settings = _settings(seed=seed, threads=threads)
    splits = demo_data(seed)
    progress.log("training the FP32 demo CNN on the fine-tune split of the digits")
    model = build_demo_model(splits, seed=seed, progress=progress)
    result = run_compress(
        model, DEMO_RECIPE, data=splits, out=out, budget=Budget(max_drop=0.01), settings=settings, progress=progress
    )
    _finish(result, out, json_out)


@app.command()
def explain(
    model: str = typer.Option(..., help="package.module:factory (with --weights) or a .onnx file."),
    data: str = typer.Option(..., help=".npz with x and y, package.module:function, or builtin:digits."),
    recipe: Path = typer.Option(..., help="Recipe YAML whose last step is the quantizer to analyse."),
    out: Optional[Path] = typer.Option(None, help="Folder for explain.{json,md,html}."),
    weights: Optional[str] = typer.Option(None, help="Weights (.safetensors) for a factory model."),
    task: TaskName = typer.Option(TaskName.classification),
    threads: Optional[int] = COMMON["threads"],
    seed: Optional[int] = COMMON["seed"],
    json_out: bool = COMMON["json_out"],
) -> None:
    """Show which layers cost accuracy when quantized (per-layer SQNR and metric drop)."""
    from shrinkml.api import explain as run_explain

    settings = _settings(threads=threads, seed=seed)
    result = run_explain(model, recipe, data=data, task=task.value, weights=weights, out=out,
                         settings=settings, progress=_progress())
    if json_out:
        from shrinkml.report.json_report import to_jsonable

        sys.stdout.write(json.dumps(to_jsonable(result), indent=2) + "\n")
        return
    from rich.console import Console

    from shrinkml.report.explain import explain_table

    Console().print(explain_table(result))


@app.command()
def techniques(name: Optional[str] = typer.Argument(None, help="Show one technique's keys.")) -> None:
    """List the registered techniques, or one technique's keys, defaults and ranges."""
    from shrinkml.techniques.base import registry

    found = registry()
    if name is None:
        for tech_name, tech in sorted(found.items()):
            doc = (tech.config_cls.__doc__ or "").strip().splitlines()[0]
            typer.echo(f"{tech_name:20s} {doc}")
        return
    if name not in found:
        raise InputError(f"unknown technique {name!r}", expected="one of " + ", ".join(sorted(found)))
    schema = found[name].config_cls.model_json_schema()
    typer.echo(json.dumps(schema["properties"], indent=2))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, map errors to exit codes, and keep tracebacks for ``--debug``."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        # without standalone mode, a command's exit code is returned instead of raised
        code = app(args=args, standalone_mode=False, prog_name="shrinkml")
        return code if isinstance(code, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("Aborted; nothing was written to the output folder.", err=True)
        return 2
    except typer.TyperException as exc:  # usage errors: unknown option, missing value, ...
        exc.show()
        return 2
    except ShrinkmlError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("Interrupted; nothing was written to the output folder.", err=True)
        return 2
    except Exception as exc:  # a bug in shrinkml or a library: say so, keep the trace for --debug
        if debug:
            raise
        typer.echo(
            f"error: unexpected {type(exc).__name__}: {exc}. This is probably a bug in shrinkml;"
            " rerun with --debug for the traceback and report it.",
            err=True,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())

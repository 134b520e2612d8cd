"""Assemble the report dicts from measurements: ``compress`` (baseline vs compressed) and ``bench``.

Measurement happens in ``shrinkml.measure``; this module only arranges what was measured into the
``shrinkml.report/1`` and ``shrinkml.bench/1`` records and derives the deltas, notes and costs.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from shrinkml.cost import cost_report, model_cost
from shrinkml.report.json_report import REPORT_SCHEMA

BENCH_SCHEMA = "shrinkml.bench/1"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else float(a) / float(b)


def data_section(splits, seed: int, loaded, example) -> dict[str, Any]:
    section: dict[str, Any] = {"source": splits.source, "seed": seed, "splits": splits.sizes()}
    if getattr(loaded, "text", None) is not None:  # every text is padded / truncated to this many tokens
        section["tokens_per_text"] = int(example.shape[1])
        section["padding"] = "every text padded (and truncated) to tokens_per_text; latency is measured on those"
    return section


def notes(baseline: dict, compressed: dict, steps: list[dict]) -> list[str]:
    # caveats a step states about its own result (e.g. FP16 without native FP16 arithmetic)
    out = [f"{s['technique']}: {s['summary']['note']}" for s in steps if s["summary"].get("note")]
    for key, label in (("batch_1", "batch 1"), ("batch_n", f"batch {compressed['latency_ms']['batch_n']['n']}")):
        b, c = baseline["latency_ms"][key]["p50"], compressed["latency_ms"][key]["p50"]
        if c > b:
            out.append(f"The compressed model is slower than the baseline at {label} on this runtime ({c:.3g} ms vs {b:.3g} ms, median).")
    if compressed["size_bytes"] > baseline["size_bytes"]:
        out.append("The compressed artifact is larger on disk than the baseline.")
    return out


def _model_section(loaded) -> dict[str, Any]:
    return {"source": loaded.source, "weights": loaded.weights, "kind": loaded.kind}


def _runtime_section(settings) -> dict[str, Any]:
    return {"name": settings.runtime, "threads": settings.threads, "batch_n": settings.batch_n}


def build_report(
    *, loaded, task, primary: str, settings, splits, example, base, comp, drop: dict, budget, recipe,
    steps: list[dict], export: dict, environment: dict,
) -> dict[str, Any]:
    """The ``shrinkml.report/1`` dict of one compress run (``base``/``comp``: Assessments)."""
    b, c = base.measurement, comp.measurement
    worst = drop["ci95"][1]
    return {
        "schema": REPORT_SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": _model_section(loaded),
        "task": {"name": task.name, "primary_metric": primary},
        "runtime": _runtime_section(settings),
        "data": data_section(splits, settings.seed, loaded, example),
        "baseline": b,
        "compressed": c,
        "delta": {
            "size_ratio": ratio(b["size_bytes"], c["size_bytes"]),
            "params_ratio": ratio(b["params"], c["params"]),
            "nonzero_params_ratio": ratio(b["nonzero_params"], c["nonzero_params"]),
            "macs_ratio": ratio(b["macs"], c["macs"]),
            "speedup_batch_1": ratio(b["latency_ms"]["batch_1"]["p50"], c["latency_ms"]["batch_1"]["p50"]),
            "speedup_batch_n": ratio(b["latency_ms"]["batch_n"]["p50"], c["latency_ms"]["batch_n"]["p50"]),
            "accuracy_drop": drop,
        },
        "budget": {
            "max_drop": budget.max_drop,
            "drop_type": budget.drop_type,
            "metric": primary,
            "worst_case_drop": worst,
            "met": bool(worst <= budget.max_drop),
        },
        "cost": cost_report(b, c, settings.cost),
        "recipe": recipe.to_dict(),
        "steps": steps,
        "export": export,
        "notes": notes(b, c, steps),
        "environment": environment,
    }


def build_bench_report(*, loaded, task, settings, splits, example, assessment, export_max_abs_diff, environment) -> dict[str, Any]:
    """The ``shrinkml.bench/1`` dict: one model's assessment."""
    measurement = assessment.measurement
    measurement["export_max_abs_diff"] = export_max_abs_diff
    return {
        "schema": BENCH_SCHEMA,
        "model": _model_section(loaded),
        "task": {"name": task.name},
        "runtime": _runtime_section(settings),
        "data": data_section(splits, settings.seed, loaded, example),
        "measurement": measurement,
        "cost": {
            "currency": "USD",
            "assumptions": settings.cost.model_dump(),
            **model_cost(measurement["throughput_per_s"]["batch_n"], measurement["size_bytes"], settings.cost),
        },
        "environment": environment,
    }

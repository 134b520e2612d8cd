"""Report validation, JSON, Markdown, HTML, plots and the console table, on a realistic report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shrinkml.report import REPORT_FILES, write_reports
from shrinkml.report.html import render_html
from shrinkml.report.json_report import REPORT_SCHEMA, dumps_report, validate_report
from shrinkml.report.markdown import render_markdown
from shrinkml.report.plots import accuracy_tradeoff_figures
from shrinkml.report.table import comparison_rows, summary_table

REPO_ROOT = Path(__file__).resolve().parents[2]


def _side(size: int, params: int, p50_1: float, p50_n: float, acc: float, ci: list[float]) -> dict:
    return {
        "artifact": "model.onnx", "size_bytes": size, "params": params, "nonzero_params": params,
        "macs": params * 12,
        "latency_ms": {"batch_1": {"p50": p50_1, "p95": p50_1 * 1.2, "mean": p50_1 * 1.05, "runs": 30},
                       "batch_n": {"n": 32, "p50": p50_n, "p95": p50_n * 1.15, "mean": p50_n * 1.05, "runs": 30}},
        "throughput_per_s": {"batch_1": round(1000 / p50_1, 1), "batch_n": round(32 * 1000 / p50_n, 1)},
        "peak_memory_bytes": 5_123_456,
        "metrics": {"accuracy": {"value": acc, "ci95": ci}},
    }


def make_report() -> dict:
    """A classification run: channel pruning, fine-tuning, dynamic quantization of a small CNN."""
    compressed = _side(45_312, 26_000, 0.15, 0.905, 0.979, [0.966, 0.990])
    compressed["agreement_with_baseline"] = 0.994
    return {
        "schema": REPORT_SCHEMA,
        "created": "2026-11-22T18:00:00Z",
        "task": {"name": "classification", "primary_metric": "accuracy"},
        "runtime": {"name": "onnxruntime", "threads": 2, "batch_n": 32},
        "data": {"source": "builtin:digits", "seed": 0, "splits": {"calibration": 180, "finetune": 1078, "test": 539}},
        "baseline": _side(412_345, 100_234, 0.21, 1.9, 0.981, [0.968, 0.992]),
        "compressed": compressed,
        "delta": {"size_ratio": 9.1, "params_ratio": 3.86, "macs_ratio": 3.86, "speedup_batch_1": 1.4,
                  "speedup_batch_n": 2.1, "accuracy_drop": {"value": 0.002, "ci95": [-0.002, 0.006]}},
        "budget": {"max_drop": 0.01, "drop_type": "absolute", "met": True, "worst_case_drop": 0.006},
        "cost": {
            "currency": "USD",
            "assumptions": {"price_per_hour": 0.085, "requests_per_month": 10_000_000,
                            "storage_price_per_gb_month": 0.023, "throughput_basis": "batch_n"},
            "baseline": {"cost_per_million_inferences": 0.0014, "instance_hours_per_month": 0.16,
                         "compute_per_month": 0.014, "storage_per_month": 0.0000095, "total_per_month": 0.014},
            "compressed": {"cost_per_million_inferences": 0.0007, "instance_hours_per_month": 0.08,
                           "compute_per_month": 0.007, "storage_per_month": 0.000001, "total_per_month": 0.007},
            "savings": {"per_million_inferences": 0.0007, "per_month": 0.007, "percent": 50.0},
        },
        "recipe": {"steps": [{"technique": "prune.channels", "channel_ratio": 0.5, "importance": "l2"},
                             {"technique": "finetune", "epochs": 3, "lr": 0.001},
                             {"technique": "quantize.dynamic", "weight_type": "int8"}]},
        "steps": [{"technique": "prune.channels", "summary": {"channels_before": 96, "channels_after": 48,
                                                              "params_before": 100_234, "params_after": 26_000}},
                  {"technique": "finetune", "summary": {"epochs": 3, "final_loss": 0.0412}},
                  {"technique": "quantize.dynamic", "summary": {"quantized_nodes": 3}}],
        "export": {"baseline_max_abs_diff": 1.2e-6, "compressed_max_abs_diff": 3e-6, "tolerance": 1e-4},
        "notes": ["Latency measured on a shared CI machine; ratios are more stable than absolute times."],
        "environment": {"python": "3.11.7", "torch": "2.14.1", "onnxruntime": "1.32.0", "cpu": "Intel Xeon",
                        "threads": 2, "seed": 0, "platform": "Linux-6.8-x86_64"},
    }


@pytest.fixture
def report() -> dict:
    return make_report()


_DELETE = object()  # a Breakage value meaning "remove the key"


def _set(report: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = report
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value


# --- validation -----------------------------------------------------------------------------------

def test_validate_accepts_realistic_report(report):
    validate_report(report)


@dataclass(frozen=True)
class Breakage:
    path: str
    value: Any
    message: str


BREAKAGES = [
    Breakage("baseline.latency_ms.batch_n.p50", _DELETE, "baseline.latency_ms.batch_n.p50: missing, expected float"),
    Breakage("baseline.latency_ms.batch_n.p50", "1.9", "baseline.latency_ms.batch_n.p50: expected float, got str"),
    Breakage("compressed.latency_ms.batch_1.p95", float("nan"), "compressed.latency_ms.batch_1.p95: expected finite float"),
    Breakage("compressed.size_bytes", True, "compressed.size_bytes: expected int, got bool"),
    Breakage("baseline.macs", 1.5, "baseline.macs: expected int or None, got float"),
    Breakage("schema", "shrinkml.report/0", "schema: expected 'shrinkml.report/1'"),
    Breakage("budget.drop_type", "percent", "budget.drop_type: expected one of ['absolute', 'relative']"),
    Breakage("budget.met", "yes", "budget.met: expected bool, got str"),
    Breakage("delta.accuracy_drop.ci95", [0.1], "delta.accuracy_drop.ci95: expected [low, high]"),
    Breakage("environment", _DELETE, "environment: missing, expected dict"),
    Breakage("task.primary_metric", "f1", "baseline.metrics.f1: missing: task.primary_metric names it"),
]


@pytest.mark.parametrize("case", BREAKAGES, ids=lambda c: f"{c.path}={c.value!r}"[:60])
def test_validate_names_the_key_path(report, case: Breakage):
    _set(report, case.path, case.value)
    with pytest.raises(ValueError) as info:
        validate_report(report)
    assert case.message in str(info.value)


def test_validate_lists_every_problem_once(report):
    del report["baseline"]["latency_ms"]  # its four children must not each be reported again
    report["compressed"]["params"] = "many"
    message = str(pytest.raises(ValueError, validate_report, report).value)
    assert "(2 problems)" in message
    assert "baseline.latency_ms: missing" in message and "compressed.params: expected int" in message


def test_validate_accepts_unknown_and_none_fields(report):
    report["baseline"]["macs"] = None
    report["compressed"]["peak_memory_bytes"] = None
    report["compressed"]["agreement_with_baseline"] = None
    report["compressed"]["metrics"]["accuracy"]["ci95"] = [None, None]
    report["future_field"] = {"anything": 1}
    validate_report(report)


# --- JSON -----------------------------------------------------------------------------------------

def _reject_constant(name: str) -> None:
    raise AssertionError(f"JSON contains {name}")


def test_json_round_trips_without_nan(report):
    report["baseline"]["latency_ms"]["batch_1"]["mean"] = float("nan")  # outside the contract
    report["compressed"]["throughput_per_s"]["batch_n"] = float("inf")
    report["baseline"]["metrics"]["accuracy"]["value"] = np.float32(0.981)
    report["steps"][0]["summary"]["kept"] = np.arange(3)
    text = dumps_report(report)
    loaded = json.loads(text, parse_constant=_reject_constant)
    assert loaded["baseline"]["latency_ms"]["batch_1"]["mean"] is None
    assert loaded["compressed"]["throughput_per_s"]["batch_n"] is None
    assert loaded["baseline"]["metrics"]["accuracy"]["value"] == pytest.approx(0.981, abs=1e-6)
    assert loaded["steps"][0]["summary"]["kept"] == [0, 1, 2]
    assert list(loaded) == list(report)  # insertion order kept
    validate_report(loaded)
    assert dumps_report(loaded) == text


# --- Markdown -------------------------------------------------------------------------------------

def test_markdown_states_the_numbers(report):
    md = render_markdown(report)
    assert "Budget met" in md and "worst-case accuracy drop 0.60 points, allowed 1.00 points" in md
    assert "9.1x smaller" in md
    assert "2.1x faster at batch 32" in md and "1.4x faster at batch 1" in md
    assert "0.20 points (95% CI -0.20 to 0.60 points)" in md
    assert "412 kB (412,345 bytes)" in md and "45.3 kB (45,312 bytes)" in md
    assert "0.981 (95% CI 0.968–0.992)" in md
    assert "0.210 / 0.252 ms" in md  # batch 1 p50 / p95
    assert "$0.0014" in md and "$0.0000095" in md and "(50.0%)" in md
    assert "price_per_hour: 0.085" in md
    assert "### 1. prune.channels" in md and "| channels_after | 48 |" in md
    assert "1.20e-06" in md and "| yes |" in md
    assert "ratios are more stable" in md
    assert '"channel_ratio": 0.5' in md  # the resolved recipe
    assert "n/a" not in md  # everything in this report is known


def test_markdown_says_slower_and_larger(report):
    report["delta"].update(speedup_batch_n=0.8, speedup_batch_1=0.97, size_ratio=0.9)
    md = render_markdown(report)
    assert "0.8x (slower) at batch 32" in md
    assert "0.97x (slower) at batch 1" in md
    assert "0.9x (larger)" in md
    assert "faster at batch 32" not in md and "smaller" not in md


def test_verdict_not_met(report):
    report["budget"].update(met=False, worst_case_drop=0.015)
    md = render_markdown(report)
    assert "**Budget NOT met:** worst-case accuracy drop 1.50 points, allowed 1.00 points" in md
    page = render_html(report)
    assert 'class="verdict not-met"' in page and "Budget NOT met" in page


def test_relative_budget_reads_as_percent_of_baseline(report):
    report["budget"].update(drop_type="relative", max_drop=0.02, worst_case_drop=0.0061)
    assert "worst-case accuracy drop 0.61% of the baseline, allowed 2.00% of the baseline" in render_markdown(report)


def test_markdown_escapes_user_text(report):
    report["notes"] = ["a | b <script>alert(1)</script> *bold*"]
    md = render_markdown(report)
    assert r"a \| b \<script\>alert(1)\</script\> \*bold\*" in md


# --- HTML and plots -------------------------------------------------------------------------------

def test_html_is_self_contained_and_escapes_user_text(report):
    report["notes"].append("<script>alert(1)</script>")
    report["recipe"]["steps"][0]["importance"] = '"><img src=x onerror=alert(1)>'
    page = render_html(report)
    assert page.count("<svg") == 2
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # No external assets: no tag fetches anything (the SVGs' xlink:href point inside the page).
    assert not re.search(r"<[a-zA-Z][^>]*\s(?:src|href)\s*=", page) and "<link" not in page
    assert 'href="http' not in page
    assert 'class="verdict met"' in page and "9.1x smaller" in page
    assert render_html(report) == page  # deterministic: same report, same bytes


@pytest.fixture
def sparse_report(report) -> dict:
    """What a run with unknown figures looks like: nothing measured that could not be."""
    for side in ("baseline", "compressed"):
        report[side]["macs"] = None
        report[side]["peak_memory_bytes"] = None
        del report[side]["throughput_per_s"]
    report["compressed"]["agreement_with_baseline"] = None
    report["compressed"]["metrics"]["accuracy"] = {"value": None, "ci95": [None, None]}
    report["delta"].update(macs_ratio=None, accuracy_drop={"value": None, "ci95": [None, None]})
    report["budget"]["worst_case_drop"] = None
    report["cost"] = {}
    for key in ("export", "steps", "notes", "runtime", "data"):
        del report[key]
    return report


def test_renders_with_unknown_fields(sparse_report):
    validate_report(sparse_report)
    md = render_markdown(sparse_report)
    assert "MACs per example: n/a (not measured)" in md
    assert "Cost was not estimated" in md and "Not recorded for this run" in md
    assert "| Peak memory | n/a | n/a | n/a |" in md
    page = render_html(sparse_report)
    assert page.count("<svg") == 2
    rows = {row.label: row for row in comparison_rows(sparse_report)}
    assert rows["accuracy (primary)"].compressed == "n/a"


def test_fidelity_task_with_several_metrics(report):
    report["task"] = {"name": "embedding_fidelity", "primary_metric": "cosine_similarity"}
    for side, shift in (("baseline", 0.0), ("compressed", 0.01)):
        report[side]["metrics"] = {
            "top1_agreement": {"value": 1.0 - shift, "ci95": [1.0 - shift, 1.0 - shift]},
            "cosine_similarity": {"value": 1.0 - shift, "ci95": [0.999 - shift, 1.0 - shift]},
            "relative_error": {"value": shift, "ci95": [shift * 0.8, shift * 1.2]},
        }
    validate_report(report)
    md = render_markdown(report)
    for name in ("top1_agreement", "cosine_similarity (primary)", "relative_error"):
        assert f"| {name} |" in md
    assert "worst-case cosine_similarity drop" in md
    assert "accuracy" not in md.lower()  # no accuracy wording for a label-free task
    svgs = accuracy_tradeoff_figures(report)
    assert set(svgs) == {"metric_vs_size", "metric_vs_latency"}


def test_plots_are_svg_and_draw_candidates(report):
    plain = accuracy_tradeoff_figures(report)
    assert all(svg.lstrip().startswith("<?xml") and "</svg>" in svg for svg in plain.values())
    report["candidates"] = [
        {"label": f"ratio {r}", "size_bytes": int(412_345 * r), "latency_ms": {"batch_n": {"p50": 1.9 * r}},
         "metrics": {"accuracy": {"value": 0.98 - (1 - r) / 20, "ci95": [0.97 - (1 - r) / 20, 0.99 - (1 - r) / 20]}}}
        for r in (0.25, 0.5, 0.75)
    ]
    with_candidates = accuracy_tradeoff_figures(report)
    for key in plain:
        # Each plotted point is one marker reference in the SVG.
        assert with_candidates[key].count("<use") > plain[key].count("<use")


# --- console table --------------------------------------------------------------------------------

def test_summary_table_prints_the_comparison(report):
    from rich.console import Console

    report["baseline"]["metrics"]["[bold]f1"] = {"value": 0.9, "ci95": [0.8, 0.95]}
    report["compressed"]["metrics"]["[bold]f1"] = {"value": 0.9, "ci95": [0.8, 0.95]}
    console = Console(record=True, width=160, color_system=None)
    console.print(summary_table(report))
    text = console.export_text()
    assert [c.header for c in summary_table(report).columns] == ["Metric", "Baseline", "Compressed", "Change"]
    assert "9.1x smaller" in text and "2.1x faster" in text and "-0.20 points" in text
    assert "[bold]f1" in text  # user text is shown, not read as Rich markup


# --- writing --------------------------------------------------------------------------------------

def test_write_reports_writes_three_files_atomically(report, tmp_path):
    out = tmp_path / "out"
    paths = write_reports(report, out)
    assert paths == {fmt: out / name for fmt, name in REPORT_FILES.items()}
    assert sorted(os.listdir(out)) == ["report.html", "report.json", "report.md"]  # no .partial left
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == json.loads(dumps_report(report))
    assert "9.1x smaller" in paths["markdown"].read_text(encoding="utf-8")


def test_write_reports_rejects_invalid_report_before_writing(report, tmp_path):
    report["budget"]["met"] = None
    with pytest.raises(ValueError, match="budget.met"):
        write_reports(report, tmp_path)
    assert os.listdir(tmp_path) == []


def test_import_is_light():
    code = "import sys, shrinkml.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

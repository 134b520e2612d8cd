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


def _latency(p50: float, spread: float) -> dict:
    return {"p50": p50, "p50_ci95": [p50 * 0.98, p50 * 1.02], "p95": p50 * spread, "mean": p50 * 1.05,
            "runs": 30, "p95_over_p50": spread}


def _side(size: int, params: int, p50_1: float, p50_n: float, acc: float, ci: list[float]) -> dict:
    return {
        "size_bytes": size, "params": params, "nonzero_params": params,
        "macs": params * 12,
        "latency_ms": {"batch_1": _latency(p50_1, 1.2), "batch_n": {"n": 32, **_latency(p50_n, 1.15)}},
        "throughput_per_s": {"batch_1": round(1000 / p50_1, 1), "batch_n": round(32 * 1000 / p50_n, 1)},
        "peak_memory_bytes": 5_123_456,
        "metrics": {"accuracy": {"value": acc, "ci95": ci}},
    }


def _speedup(value: float, low: float, high: float) -> dict:
    verdict = "faster" if low > 1 else "slower" if high < 1 else "no measurable difference"
    return {"value": value, "ci95": [low, high], "verdict": verdict, "rounds": 30}


def _timing(**overrides: Any) -> dict:
    return {"rounds": 30, "timed_s": 1.2, "rel_tolerance": 0.05, "max_time_s": 20.0,
            "widest_ci95_rel_half_width": 0.03, "cap_hit": False, "load_average_before": [0.4, 0.5, 0.5],
            "load_average_after": [0.9, 0.6, 0.5], "cpu_count": 2, "unstable": False, "unstable_reasons": [],
            **overrides}


def make_report() -> dict:
    """A classification run: channel pruning, fine-tuning, dynamic quantization of a small CNN."""
    compressed = _side(45_312, 26_000, 0.15, 0.905, 0.979, [0.966, 0.990])
    compressed["agreement_with_baseline"] = {"metric": "top1_agreement", "value": 0.994, "ci95": [0.987, 0.998]}
    baseline = _side(412_345, 100_234, 0.21, 1.9, 0.981, [0.968, 0.992])
    baseline = {"artifact": {"file": None, "description": "the input model builtin:demo, saved as ONNX"}, **baseline}
    compressed = {"artifact": {"file": "model.onnx", "description": "written to --out as model.onnx"}, **compressed}
    return {
        "schema": REPORT_SCHEMA,
        "created": "2026-11-22T18:00:00Z",
        "task": {"name": "classification", "primary_metric": "accuracy"},
        "runtime": {"name": "onnxruntime", "threads": 2, "batch_n": 32},
        "data": {"source": "builtin:digits", "seed": 0, "splits": {"calibration": 180, "finetune": 1078, "test": 539}},
        "baseline": baseline,
        "compressed": compressed,
        "delta": {"size_ratio": 9.1, "params_ratio": 3.86, "macs_ratio": 3.86,
                  "speedup_batch_1": _speedup(1.4, 1.33, 1.47),
                  "speedup_batch_n": _speedup(2.1, 2.02, 2.19),
                  "accuracy_drop": {"value": 0.002, "ci95": [-0.002, 0.006]}},
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
        "timing": {"method": "interleaved rounds", "unstable": False,
                   "batch_1": _timing(), "batch_n": _timing()},
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
    Breakage("schema", "shrinkml.report/1", "schema: expected 'shrinkml.report/2'"),
    Breakage("delta.speedup_batch_1", 1.4, "delta.speedup_batch_1: expected dict, got float"),
    Breakage("delta.speedup_batch_n.verdict", "quicker", "delta.speedup_batch_n.verdict: expected one of"),
    Breakage("delta.speedup_batch_n.ci95", None, "delta.speedup_batch_n.ci95: expected [low, high]"),
    Breakage("compressed.agreement_with_baseline", 0.99, "compressed.agreement_with_baseline: expected dict or None"),
    Breakage("compressed.agreement_with_baseline.metric", "agreement",
             "compressed.agreement_with_baseline.metric: expected one of ['top1_agreement', 'cosine_similarity']"),
    Breakage("baseline.artifact", "baseline.onnx", "baseline.artifact: expected dict, got str"),
    Breakage("timing", _DELETE, "timing: missing, expected dict"),
    Breakage("timing.batch_n.cap_hit", "no", "timing.batch_n.cap_hit: expected bool, got str"),
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
    assert "2.10x faster (95% CI 2.02–2.19x) at batch 32" in md  # the headline
    assert "Speed at batch 1: 1.40x faster (95% CI 1.33–1.47x)" in md
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
    report["delta"].update(speedup_batch_n=_speedup(0.8, 0.76, 0.84), speedup_batch_1=_speedup(0.97, 0.95, 0.99),
                           size_ratio=0.9)
    md = render_markdown(report)
    assert "0.800x (slower; 95% CI 0.760–0.840x) at batch 32" in md
    assert "Speed at batch 1: 0.970x (slower; 95% CI 0.950–0.990x)" in md
    assert "0.9x (larger)" in md
    assert "faster" not in md.replace("called faster or slower", "") and "smaller" not in md


def _rows(report: dict) -> dict:
    return {row.label.split(" (timing")[0]: row for row in comparison_rows(report)}


def test_speedup_whose_ci_includes_one_is_no_measurable_difference(report):
    # The case: a p50 ratio of 1.4 measured under load, with rounds that scatter around 1.
    report["delta"]["speedup_batch_1"] = _speedup(1.4, 0.92, 2.1)
    rows = _rows(report)
    latency = rows["Latency p50 / p95, batch 1"]
    assert latency.change == "no measurable difference (1.40x, 95% CI 0.920–2.10x)"
    assert latency.judgement is None  # never green
    assert rows["Throughput, batch 1"].change == "no measurable difference"
    assert rows["Throughput, batch 1"].judgement is None
    assert rows["Latency p50 / p95, batch 32"].judgement == "better"  # its CI excludes 1.0
    page = render_html(report)
    assert '<td class="num better">no measurable difference' not in page
    assert "no measurable difference (1.40x, 95% CI 0.920–2.10x)" in render_markdown(report)


def test_unstable_timing_is_flagged_everywhere(report):
    from rich.console import Console

    reasons = ["compressed: p95 is 3.51x the p50 (more than 1.5x)",
               "the 1-minute load average reached 3.90 on 2 CPUs: other processes competed for the cores"]
    report["timing"]["batch_1"] = _timing(unstable=True, unstable_reasons=reasons, load_average_after=[3.9, 2.0, 1.0])
    report["timing"]["unstable"] = True
    validate_report(report)
    md = render_markdown(report)
    assert "> **Warning:** Timing at batch 1 is unstable: compressed: p95 is 3.51x the p50" in md
    assert "| Latency p50 / p95, batch 1 (timing unstable) |" in md
    assert "load average (1 / 5 / 15 min) 0.400 / 0.500 / 0.500 before, 3.90 / 2.00 / 1.00 after, on 2 CPUs; UNSTABLE" in md
    assert 'class="alert"' in render_html(report)
    console = Console(record=True, width=200, color_system=None)
    console.print(summary_table(report))
    assert "Timing at batch 1 is unstable" in console.export_text()


@pytest.mark.parametrize(("base", "comp", "judgement"), [
    (100_000_000, 102_000_000, None),      # +2%: noise
    (10_000_000, 13_000_000, None),        # +30% but only 3 MB: noise of RSS peaks
    (100_000_000, 150_000_000, "worse"),
    (200_000_000, 100_000_000, "better"),
])
def test_memory_change_within_noise_is_neutral(report, base, comp, judgement):
    report["baseline"]["peak_memory_bytes"], report["compressed"]["peak_memory_bytes"] = base, comp
    row = _rows(report)["Peak memory"]
    assert row.judgement == judgement
    assert ("within noise" in row.change) == (judgement is None)


def test_baseline_artifact_is_described_not_named(report):
    loaded = json.loads(dumps_report(report))
    assert loaded["baseline"]["artifact"]["file"] is None
    assert loaded["compressed"]["artifact"]["file"] == "model.onnx"


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


def _embedding_report(report: dict) -> dict:
    report["task"] = {"name": "embedding", "primary_metric": "cosine_similarity"}
    # Cosines this close to 1 are what made matplotlib's default axis print "1e-5+1" and ticks of -7..2.
    for side, (value, low, high) in (("baseline", (1.0, 1.0, 1.0)), ("compressed", (0.99997, 0.99995, 0.99999))):
        report[side]["metrics"] = {"cosine_similarity": {"value": value, "ci95": [low, high]},
                                   "top10_agreement": {"value": value - 0.05, "ci95": [low - 0.06, value - 0.04]}}
    report["compressed"]["agreement_with_baseline"] = {"metric": "cosine_similarity", "value": 0.99997,
                                                       "ci95": [0.99995, 0.99999]}
    return report


def test_embedding_agreement_is_named_and_explained(report):
    md = render_markdown(_embedding_report(report))
    assert "| Mean cosine similarity to the baseline's embeddings | — | 1.000 (95% CI 1.000–1.000) | — |" in md
    assert ("- cosine_similarity: mean over test examples of the cosine similarity between the model's embedding"
            " and the baseline model's embedding of the same input") in md
    assert "- top10_agreement: mean share of each test example's 10 nearest test neighbours" in md
    assert "predictions" not in md  # no classification wording for embeddings


def test_plots_have_no_offset_axis_and_say_what_the_metric_is(report):
    from shrinkml.report.plots import _figure, _metric_axis_label, _points

    report = _embedding_report(report)
    label = _metric_axis_label("cosine_similarity", "embedding")
    assert label.startswith("Mean cosine similarity to the baseline's embedding")
    fig = _figure(_points(report), "size_mb", xlabel="Size on disk (MB)", ylabel=label, title="t")
    fig.canvas.draw()  # tick labels and any offset are computed at draw time
    ax = fig.axes[0]
    assert ax.get_ylabel() == label
    assert ax.yaxis.get_major_formatter().get_offset() == ""
    ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert ticks and all(t.startswith(("0.9999", "1.0000")) for t in ticks), ticks  # the values themselves


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
    assert "9.1x smaller" in text and "2.10x faster (95% CI 2.02–2.19x)" in text and "-0.20 points" in text
    assert "[bold]f1" in text  # user text is shown, not read as Rich markup


def _bench_report() -> dict:
    side = _side(412_345, 100_234, 0.21, 1.9, 0.981, [0.968, 0.992])
    return {
        "schema": "shrinkml.bench/2", "model": {"source": "model.onnx"},
        "task": {"name": "classification"}, "runtime": {"name": "onnxruntime", "threads": 2, "batch_n": 32},
        "measurement": {**side, "export_max_abs_diff": 1.2e-6},
        "cost": {"currency": "USD", "cost_per_million_inferences": 0.0000412, "total_per_month": 0.00041},
        "timing": {"unstable": False, "batch_1": _timing(), "batch_n": _timing()},
    }


def test_bench_table_uses_the_compress_units_and_ci_style():
    from rich.console import Console

    from shrinkml.report.table import bench_rows, bench_table

    rows = dict(bench_rows(_bench_report()))
    assert rows["Size on disk"] == "412 kB (412,345 bytes)"  # as in the compress table
    assert rows["Latency p50 / p95, batch 1"] == "0.210 / 0.252 ms (p50 95% CI 0.206–0.214 ms)"
    assert rows["Peak memory"] == "5.12 MB (5,123,456 bytes)"
    assert rows["Cost per million inferences"] == "$0.0000412"  # significant digits, not $0.0000
    assert rows["Total cost per month"] == "$0.00041"
    assert rows["accuracy (share of test examples whose top-1 class is the true label)"] == "0.981 (95% CI 0.968–0.992)"
    console = Console(record=True, width=200, color_system=None)
    console.print(bench_table(_bench_report()))
    assert "model.onnx on onnxruntime (2 threads)" in console.export_text()


def test_verdict_text_is_coloured_by_the_verdict(report):
    from shrinkml.report.table import verdict_text

    met = verdict_text(report)
    assert met.plain.startswith("Budget met: worst-case accuracy drop 0.60 points") and str(met.style) == "green"
    report["budget"]["met"] = False
    assert str(verdict_text(report).style) == "red"


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

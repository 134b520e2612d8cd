"""The search report (``shrinkml.search/1``) as Markdown and as one HTML page with the Pareto plots:
the primary metric against size and against latency (or throughput), every trial drawn, the
feasible Pareto front joined, the constraint lines dashed, the best trial starred.
"""

from __future__ import annotations

import io
import json
from typing import Any

from shrinkml.report.markdown import (
    Bullets,
    Code,
    Document,
    Paragraph,
    Section,
    Table,
    Verdict,
    _md_block,
    md_escape,
)


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.3f} MB"


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _recipe_text(recipe: list[dict] | None) -> str:
    if not recipe:
        return "(no step: the original model)"
    return " -> ".join(
        step["technique"] + ("(" + ", ".join(f"{k}={v}" for k, v in step.items() if k != "technique") + ")"
                             if len(step) > 1 else "")
        for step in recipe
    )


def _speed_key(report: dict) -> str | None:
    return next((k for k in ("latency", "throughput") if k in report["objectives"]), None)


def _value_cells(row: dict, report: dict) -> list[str]:
    values = row.get("values", {})
    cells = [_mb(values.get("size")) if "size" in report["objectives"] else None]
    key = _speed_key(report)
    if key == "latency":
        cells.append(f"{values['latency']:.3f} ms" if "latency" in values else "n/a")
    elif key == "throughput":
        cells.append(f"{values['throughput']:.1f}/s" if "throughput" in values else "n/a")
    cells.append(_num(values.get("metric")))
    return [c for c in cells if c is not None]


def search_document(report: dict) -> Document:
    t, trials = report["targets"], report["trials"]
    best = report.get("best")
    metric = report["baseline_validation"]["metric_name"]
    goals = []
    if t["max_size_bytes"] is not None:
        goals.append(f"size <= {_mb(t['max_size_bytes'])}")
    if t["max_latency_ms"] is not None:
        goals.append(f"p50 latency <= {t['max_latency_ms']:g} ms at batch {t['batch']}")
    if t["min_throughput_per_s"] is not None:
        goals.append(f"throughput >= {t['min_throughput_per_s']:g}/s at batch {t['batch']}")
    reads = report["baseline_validation"].get("budget_reads", f"{metric} drop")
    goals.append(f"{reads} <= {t['max_drop']:g} ({t['drop_type']}, 95% CI worst end)")
    if best is None:
        verdict = Verdict(False, "No feasible recipe", f"none of {trials['finished']} trials met every target")
    else:
        checks = best["test"]["targets_met"]
        missed = [k for k, ok in checks.items() if not ok]
        verdict = Verdict(not missed, "Targets met" if not missed else "Targets NOT met on the test split",
                          f"trial {best['trial']} re-measured on the test split"
                          + (f" misses {', '.join(missed)}" if missed else " meets " + ", ".join(checks)))
    headline = (f"{trials['finished']} trials in {report['duration_s'] / 60:.1f} min"
                f" ({_num(report['trials_per_hour'], 3)} per hour this run): {trials['feasible']} feasible,"
                f" {trials['complete'] - trials['feasible']} infeasible, {trials['stopped_early']} stopped early,"
                f" {trials['failed']} failed, {trials.get('repeated_recipes', 0)} redrew a measured recipe"
                f" (stopped by: {report.get('stopped_because', 'n/a')}). Targets: " + "; ".join(goals) + ".")
    sections = []
    if best is not None:
        test = best["test"]
        drop = test["drop"]
        speed = test["speedup"]
        items = [
            f"recipe: {_recipe_text(best['recipe'])}",
            f"size on disk: {_mb(test['size_bytes'])} ({_num(test['size_ratio'], 3)}x smaller than the baseline)",
            f"p50 latency at batch {t['batch']}: {test['latency_ms_p50']:.3f} {test.get('latency_unit', 'ms')} (95% CI "
            f"{test['latency_ms_p50_ci95'][0]:.3f}-{test['latency_ms_p50_ci95'][1]:.3f}); speedup "
            f"{_num(speed.get('value'), 3)}x (95% CI {_num(speed['ci95'][0], 3)}-{_num(speed['ci95'][1], 3)})",
            f"{drop['metric']} drop on the test split: {drop['value']:.4f} (paired 95% CI {drop['ci95'][0]:.4f}"
            f" to {drop['ci95'][1]:.4f})",
            "the full compress report of this recipe: best/report.md (best/report.json, best/report.html)",
        ]
        sections.append(Section("best", f"Best feasible recipe (trial {best['trial']}, preferred by {report['prefer']})",
                                (Bullets(tuple(items)),)))
    header = ["trial", "recipe", *(["size"] if "size" in report["objectives"] else []),
              *([{"latency": "p50 latency", "throughput": "throughput"}[_speed_key(report)]] if _speed_key(report) else []),
              f"{metric} (validation)"]
    front_rows = tuple((str(r["number"]), _recipe_text(r["recipe"]), *_value_cells(r, report)) for r in report["front"])
    sections.append(Section("front", "Pareto front of the feasible trials (validation split)",
                            (Table(tuple(header), front_rows, numeric=False),) if front_rows
                            else (Paragraph("No trial met every target."),)))
    why = report["trials"]["not_feasible_because"]
    if why:
        sections.append(Section("infeasible", "Why trials were not feasible",
                                (Bullets(tuple(f"{n} trial(s): {reason}" for reason, n in why.items())),)))
    all_rows = tuple(
        (str(r["number"]), r["state"] + ("" if r.get("feasible", True) else ", infeasible"), _recipe_text(r["recipe"]),
         *(_value_cells(r, report) if "values" in r else ["-"] * (len(header) - 2)))
        for r in report["all_trials"]
    )
    sections.append(Section("trials", "Every trial", (Table(("trial", "state", *header[1:]), all_rows, numeric=False),)))
    base = report["baseline_validation"]
    sections.append(Section("setup", "Setup", (Bullets((
        f"model: {report['model']['source']}" + (f" (weights {report['model']['weights']})" if report['model']['weights'] else ""),
        f"data: {report['data']['source']}, splits {json.dumps(report['data']['splits'])}; trials scored on the"
        " validation split, the best recipe re-measured on the test split only at the end",
        f"runtime: {report['runtime']['name']}, {report['runtime']['threads']} threads, batch {report['runtime']['batch']}",
        f"baseline on validation: {_mb(base['size_bytes'])}, {base['latency_ms']:.3f} {base.get('latency_unit', 'ms p50')},"
        f" {metric} {base['metric']:.4f}",
        f"objectives: {', '.join(f'{k} ({v})' for k, v in report['objectives'].items())}; sampler {report['sampler']};"
        f" study {report['study']} in {report['storage']}",
        f"prefix cache: {'on' if report['cache']['enabled'] else 'off'}, {report['cache']['steps_reused']} steps reused,"
        f" {report['cache']['seconds_saved']:.0f} s of step time saved; pruning: "
        f"{'on' if report['pruning']['enabled'] else 'off'}, {report['pruning']['trials_stopped']} trials stopped in training",
    )), Code(json.dumps(report["space"], indent=2), "json"))))
    return Document("shrinkml search", f"{report['model']['source']} on {report['runtime']['name']}", verdict,
                    headline, tuple(sections))


def render_search_markdown(report: dict) -> str:
    doc = search_document(report)
    parts = [f"# {md_escape(doc.title)}", md_escape(doc.byline),
             f"> **{md_escape(doc.verdict.label)}:** {md_escape(doc.verdict.detail)}.", md_escape(doc.headline)]
    for section in doc.sections:
        parts.append(f"## {md_escape(section.title)}")
        parts += [_md_block(block) for block in section.blocks]
    parts.append("*Plots of the search are in search.html.*")
    return "\n\n".join(parts) + "\n"


def _figure(report: dict, x_key: str) -> str:
    from matplotlib.figure import Figure

    metric = report["baseline_validation"]["metric_name"]
    fig = Figure(figsize=(5.6, 4.0), dpi=100)
    ax = fig.subplots()
    scale = 1e-6 if x_key == "size" else 1.0
    rows = [r for r in report["all_trials"] if "values" in r and x_key in r["values"]]
    for feasible, style in ((False, {"color": "#b0b0b0", "label": "infeasible"}),
                            (True, {"color": "#1f5fa8", "label": "feasible"})):
        pts = [(r["values"][x_key] * scale, r["values"]["metric"]) for r in rows if r["feasible"] == feasible]
        if pts:
            ax.plot(*zip(*pts), "o", markersize=5, linestyle="none", **style)
    front = sorted((r["values"][x_key] * scale, r["values"]["metric"]) for r in report["front"] if x_key in r["values"])
    if front:
        ax.plot(*zip(*front), "-", color="#1f5fa8", linewidth=1, label="Pareto front (feasible)")
    base = report["baseline_validation"]
    base_x = {"size": base["size_bytes"], "latency": base["latency_ms"], "throughput": base["throughput_per_s"]}[x_key]
    ax.plot([base_x * scale], [base["metric"]], "s", color="#333333", markersize=7, label="baseline", linestyle="none")
    t = report["targets"]
    limit = {"size": t["max_size_bytes"], "latency": t["max_latency_ms"], "throughput": t["min_throughput_per_s"]}[x_key]
    if limit is not None:
        ax.axvline(limit * scale, color="#c62828", linestyle="--", linewidth=1, label="target")
    allowed = t["max_drop"] * (base["metric"] if t["drop_type"] == "relative" else 1.0)
    ax.axhline(base["metric"] - allowed, color="#c62828", linestyle=":", linewidth=1, label="budget (point)")
    best = report.get("best")
    if best is not None and x_key in best["validation"]:
        ax.plot([best["validation"][x_key] * scale], [best["validation"]["metric"]], "*", color="#d9480f",
                markersize=14, label="best", linestyle="none")
    ax.set_xlabel({"size": "size on disk (MB)", "latency": f"p50 latency at batch {t['batch']} (ms)",
                   "throughput": f"throughput at batch {t['batch']} (per s)"}[x_key])
    ax.set_ylabel(f"{metric} (validation)")
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    return buffer.getvalue()


def render_search_html(report: dict) -> str:
    from shrinkml.report.html import _page

    figures = {"metric_vs_size": _figure(report, "size")} if "size" in report["objectives"] else {}
    key = _speed_key(report)
    if key:
        figures[f"metric_vs_{key}"] = _figure(report, key)
    return _page(search_document(report), figures, plots_after="front", title="Search plots",
                 note="Each dot is a trial scored on the validation split; dashed: the size or speed target;"
                      " dotted: the baseline minus the allowed drop.")

"""Trade-off plots as SVG text: the primary metric against size on disk and against batch-N latency.

Matplotlib is imported inside the function, and only its object-oriented ``Figure`` is used (no
pyplot), so importing the report package costs nothing and no global figure state is touched.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from shrinkml.report.table import (
    METRIC_AXIS_LABELS,
    batch_n,
    finite_number,
    get,
    primary_metric,
)

# Fixed colours per role, so the two plots read the same way side by side.
_STYLES = {
    "candidate": {"fmt": "o", "color": "#9a9a9a", "markersize": 5, "label": "candidates"},
    "baseline": {"fmt": "o", "color": "#1f5fa8", "markersize": 8, "label": "baseline"},
    "compressed": {"fmt": "D", "color": "#d9480f", "markersize": 8, "label": "compressed"},
}


@dataclass(frozen=True)
class _Point:
    role: str
    label: str
    size_mb: float | None
    latency_ms: float | None
    value: float | None
    ci95: tuple[float | None, float | None]


def _point(role: str, label: str, entry: Any, primary: str | None) -> _Point:
    size = finite_number(get(entry, "size_bytes"))
    metric = get(entry, "metrics", primary)
    return _Point(role=role, label=label,
                  size_mb=None if size is None else size / 1e6,
                  latency_ms=finite_number(get(entry, "latency_ms", "batch_n", "p50")),
                  value=finite_number(get(metric, "value")),
                  ci95=(finite_number(get(metric, "ci95", 0)), finite_number(get(metric, "ci95", 1))))


def _points(report: dict) -> list[_Point]:
    primary = primary_metric(report)
    # Candidates first, so baseline and compressed are drawn on top of them.
    points = [_point("candidate", str(get(c, "label") or f"candidate {i}"), c, primary)
              for i, c in enumerate(get(report, "candidates") or [], start=1)]
    points += [_point(role, role, get(report, role), primary) for role in ("baseline", "compressed")]
    return points


def _figure(points: list[_Point], x_field: str, *, xlabel: str, ylabel: str, title: str):
    """The trade-off plot as a matplotlib ``Figure`` (no pyplot state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    drawn: dict[str, tuple[float, float]] = {}
    any_drawn = False
    for role, style in _STYLES.items():
        shown = [p for p in points if p.role == role and getattr(p, x_field) is not None and p.value is not None]
        if not shown:
            continue
        any_drawn = True
        xs = [getattr(p, x_field) for p in shown]
        ys = [p.value for p in shown]
        # Asymmetric bars from the bootstrap interval; a missing bound draws no bar on that side.
        below = [max(0.0, p.value - p.ci95[0]) if p.ci95[0] is not None else 0.0 for p in shown]
        above = [max(0.0, p.ci95[1] - p.value) if p.ci95[1] is not None else 0.0 for p in shown]
        ax.errorbar(xs, ys, yerr=[below, above], fmt=style["fmt"], color=style["color"],
                    markersize=style["markersize"], capsize=4, elinewidth=1.2, label=style["label"],
                    zorder=3 if role != "candidate" else 2)
        for p, x, y in zip(shown, xs, ys):
            ax.annotate(p.label, (x, y), xytext=(7, 7), textcoords="offset points", fontsize=9,
                        color=style["color"])
            if role != "candidate":
                drawn[role] = (x, y)
    if "baseline" in drawn and "compressed" in drawn:
        ax.annotate("", xy=drawn["compressed"], xytext=drawn["baseline"],
                    arrowprops={"arrowstyle": "->", "color": "#555555", "alpha": 0.5, "shrinkA": 6,
                                "shrinkB": 6})
    if not any_drawn:
        ax.text(0.5, 0.5, "no measured points", transform=ax.transAxes, ha="center", va="center")
    else:
        ax.legend(loc="best", fontsize=9)
    ax.margins(x=0.2, y=0.25)
    # The x axis starts at zero so horizontal distances read as the ratios the report states.
    ax.set_xlim(left=0)
    # Plain tick values: an offset axis ("+1" with ticks of -0.0005) makes a reader do arithmetic
    # to read a cosine of 0.9995, and scientific notation hides the same numbers.
    for axis in (ax.xaxis, ax.yaxis):
        formatter = ScalarFormatter(useOffset=False)
        formatter.set_scientific(False)
        axis.set_major_formatter(formatter)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig


def _svg(points: list[_Point], x_field: str, *, key: str, xlabel: str, ylabel: str, title: str) -> str:
    import matplotlib

    fig = _figure(points, x_field, xlabel=xlabel, ylabel=ylabel, title=title)
    buffer = io.BytesIO()
    # A fixed hash salt per plot makes the SVG ids deterministic (same report, same bytes) and
    # different between the two plots, which share one HTML page. Text is drawn as paths, so a
    # label from the report can never become markup. rc_context restores the settings on exit.
    with matplotlib.rc_context({"svg.hashsalt": f"shrinkml-{key}", "svg.fonttype": "path"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue().decode("utf-8")


def _metric_axis_label(name: str, task: Any) -> str:
    """``Mean cosine similarity to the baseline`` above ``(cosine_similarity; bars: 95% CI)``: what
    the number is, then the key it has in the report."""
    label = METRIC_AXIS_LABELS.get(name)
    if label and name == "cosine_similarity" and task == "embedding":
        label += "'s embedding"
    return f"{label}\n({name}; bars: 95% CI)" if label else f"{name} (bars: 95% CI)"


def accuracy_tradeoff_figures(report: dict) -> dict[str, str]:
    """Two SVG plots of the primary metric (with 95% CI bars) against cost: size on disk in MB
    (``"metric_vs_size"``) and batch-N latency p50 in ms (``"metric_vs_latency"``).

    Baseline and compressed are labelled; entries of an optional ``report["candidates"]`` list
    (``{"label", "size_bytes", "latency_ms": {"batch_n": {"p50"}}, "metrics"}``) are drawn too.
    Points with an unknown coordinate are left out rather than guessed.

    >>> svgs = accuracy_tradeoff_figures(report)  # doctest: +SKIP
    >>> Path("size.svg").write_text(svgs["metric_vs_size"])  # doctest: +SKIP
    """
    primary = primary_metric(report) or "metric"
    points = _points(report)
    ylabel = _metric_axis_label(primary, get(report, "task", "name"))
    return {
        "metric_vs_size": _svg(points, "size_mb", key="size", xlabel="Size on disk (MB)",
                               ylabel=ylabel, title=f"{primary} vs size on disk"),
        "metric_vs_latency": _svg(points, "latency_ms", key="latency",
                                  xlabel=f"Latency p50 at batch {batch_n(report) or 'N'} (ms)",
                                  ylabel=ylabel, title=f"{primary} vs latency"),
    }

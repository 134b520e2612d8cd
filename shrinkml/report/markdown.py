"""The report as a document: what it says (``report_document``) and how Markdown writes it
(``render_markdown``).

The document is plain text in small typed blocks, with no markup of any format in it, so the HTML
renderer shows exactly the same words and each renderer escapes user text (notes, recipe values,
metric names) in the one place that knows its format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Union

from shrinkml.report.table import (
    NA,
    agreement_label,
    batch_n,
    comparison_rows,
    finite_number,
    fmt_budget_amount,
    fmt_drop,
    fmt_int,
    fmt_metric,
    fmt_money,
    fmt_ratio,
    fmt_sig,
    fmt_speedup,
    get,
    human_bytes,
    metric_meaning,
    primary_is_fraction,
    primary_metric,
    timing_warnings,
)


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    # Per row, "better"/"worse"/None for the last column; only colour depends on it.
    judgements: tuple[str | None, ...] = ()
    # Whether columns after the first hold figures (right-aligned so digits line up) or text.
    numeric: bool = True


@dataclass(frozen=True)
class Code:
    text: str
    language: str = ""


@dataclass(frozen=True)
class Subheading:
    text: str


@dataclass(frozen=True)
class Alert:
    """A caveat the reader must not miss (e.g. unstable timing), shown apart from the text."""

    text: str


Block = Union[Paragraph, Bullets, Table, Code, Subheading, Alert]


@dataclass(frozen=True)
class Section:
    key: str  # stable name, so a renderer can place extra content (the HTML plots) after a section
    title: str
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Verdict:
    met: bool | None
    label: str  # "Budget met", "Budget NOT met"
    detail: str

    @property
    def text(self) -> str:
        return f"{self.label}: {self.detail}."


@dataclass(frozen=True)
class Document:
    title: str
    byline: str
    verdict: Verdict
    headline: str
    sections: tuple[Section, ...]


def _plain(value: Any) -> str:
    """A user-supplied value as one line of text: scalars as written, containers as compact JSON."""
    if value is None:
        return NA
    if isinstance(value, float):
        return f"{value:.6g}"  # as the user wrote it (0.085, 1e-06), not padded to fixed digits
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _sci(value: Any) -> str:
    # Export differences live around 1e-6; fixed-point would print a row of zeros.
    x = finite_number(value)
    return NA if x is None else f"{x:.2e}"


def verdict(report: dict) -> Verdict:
    """Whether the accuracy budget was met, with the worst-case drop against the allowed one."""
    budget = get(report, "budget") or {}
    met, drop_type = budget.get("met"), budget.get("drop_type")
    fraction = primary_is_fraction(report)
    worst = fmt_budget_amount(budget.get("worst_case_drop"), drop_type, fraction)
    allowed = fmt_budget_amount(budget.get("max_drop"), drop_type, fraction)
    detail = (f"worst-case {primary_metric(report) or 'metric'} drop {worst}, "
              f"allowed {allowed} ({drop_type or 'unknown'} budget)")
    if met is True:
        return Verdict(True, "Budget met", detail)
    if met is False:
        return Verdict(False, "Budget NOT met", detail)
    return Verdict(None, "Budget not evaluated", detail)


def _headline(report: dict) -> str:
    delta = get(report, "delta") or {}
    n = batch_n(report)
    parts = [fmt_ratio(delta.get("size_ratio"), "smaller", "larger")[0] + " on disk",
             fmt_speedup(delta.get("speedup_batch_n"))[0] + f" at batch {n}"]
    metric = primary_metric(report) or "metric"
    drop = get(delta, "accuracy_drop")
    parts.append(f"{metric} drop {fmt_drop(get(drop, 'value'), get(drop, 'ci95'), primary_is_fraction(report))}")
    return "Compressed vs baseline: " + "; ".join(parts) + "."


def _comparison_section(report: dict) -> Section:
    rows = comparison_rows(report)
    table = Table(("", "Baseline", "Compressed", "Change"),
                  tuple((r.label, r.baseline, r.compressed, r.change) for r in rows),
                  tuple(r.judgement for r in rows))
    runtime = get(report, "runtime") or {}
    rounds = [get(report, "baseline", "latency_ms", key, "runs") for key in ("batch_1", "batch_n")]
    counts = ("the" if None in rounds else str(rounds[0]) if rounds[0] == rounds[1]
              else f"{rounds[0]} (batch 1) and {rounds[1]} (batch {batch_n(report)})")
    how = (f"Latency is p50 / p95 in milliseconds over {counts} interleaved rounds"
           f" on {runtime.get('name') or 'the runtime'}"
           + (f" with {runtime['threads']} thread(s)" if runtime.get("threads") is not None else "")
           + ". A speedup is the median over rounds of baseline time / compressed time in the same round,"
             " with a 95% confidence interval over rounds; it is called faster or slower only when that"
             " interval excludes 1.0, otherwise \"no measurable difference\". Throughput follows the same"
             " rounds. A peak-memory change under 5% or 4 MiB is within measurement noise. Metrics show the"
             " 95% bootstrap confidence interval on the test split.")
    blocks: list[Block] = [table, Paragraph(how)]
    blocks += [Alert(w) for w in timing_warnings(report)]
    return Section("comparison", "Before and after", tuple(blocks))


def _metrics_section(report: dict) -> Section | None:
    """What each metric in the table measures, so the numbers read without the source."""
    task = get(report, "task", "name")
    names = list(get(report, "baseline", "metrics") or {})
    names += [n for n in (get(report, "compressed", "metrics") or {}) if n not in names]
    items = [f"{name}: {meaning}" for name in names if (meaning := metric_meaning(name, task))]
    agreement = get(report, "compressed", "agreement_with_baseline")
    if isinstance(agreement, dict) and (meaning := metric_meaning(agreement.get("metric"), task)):
        items.append(f"{agreement_label(agreement, task)} ({agreement.get('metric')}): {meaning}")
    if not items:
        return None
    return Section("metrics", "What the metrics measure", (Bullets(tuple(items)),))


def _delta_section(report: dict) -> Section:
    delta, base, comp = (get(report, k) or {} for k in ("delta", "baseline", "compressed"))
    n = batch_n(report)
    fraction = primary_is_fraction(report)

    def change(ratio_key: str, value_key: str, better: str, worse: str, show=fmt_int) -> str:
        text = fmt_ratio(delta.get(ratio_key), better, worse)[0]
        old, new = base.get(value_key), comp.get(value_key)
        return text if old is None or new is None else f"{text} ({show(old)} → {show(new)})"

    items = [f"Size on disk: {change('size_ratio', 'size_bytes', 'smaller', 'larger', human_bytes)}",
             f"Parameters: {change('params_ratio', 'params', 'fewer', 'more')}"]
    if base.get("nonzero_params") != base.get("params") or comp.get("nonzero_params") != comp.get("params"):
        items.append(f"Nonzero parameters: {fmt_int(base.get('nonzero_params'))} → "
                     f"{fmt_int(comp.get('nonzero_params'))}")
    macs = change("macs_ratio", "macs", "fewer", "more")
    items.append(f"MACs per example: {macs if macs != NA else 'n/a (not measured)'}")
    items.append(f"Speed at batch 1: {fmt_speedup(delta.get('speedup_batch_1'))[0]}")
    items.append(f"Speed at batch {n}: {fmt_speedup(delta.get('speedup_batch_n'))[0]}")
    drop = delta.get("accuracy_drop")
    items.append(f"{primary_metric(report) or 'Primary metric'} drop: "
                 f"{fmt_drop(get(drop, 'value'), get(drop, 'ci95'), fraction)}; "
                 "positive means the compressed model scores lower")
    agreement = comp.get("agreement_with_baseline")
    if "agreement_with_baseline" in comp:
        shown = fmt_metric(agreement) if isinstance(agreement, dict) else NA
        items.append(f"{agreement_label(agreement, get(report, 'task', 'name'))}: {shown}")
    return Section("delta", "What changed", (Bullets(tuple(items)),))


def _cost_section(report: dict) -> Section:
    cost = get(report, "cost") or {}
    if not isinstance(get(cost, "baseline"), dict) or not isinstance(get(cost, "compressed"), dict):
        return Section("cost", "Cost", (Paragraph("Cost was not estimated for this run."),))
    currency = cost.get("currency")
    savings = cost.get("savings") or {}

    def money(value: Any) -> str:
        return fmt_money(value, currency)

    per_month = money(savings.get("per_month"))
    percent = finite_number(savings.get("percent"))
    if percent is not None:
        per_month += f" ({percent:.1f}%)" if percent >= 0 else f" ({percent:.1f}%, costs more)"
    lines = (("Cost per million inferences", "cost_per_million_inferences",
              money(savings.get("per_million_inferences"))),
             ("Instance hours per month", "instance_hours_per_month", ""),
             ("Compute per month", "compute_per_month", ""),
             ("Storage per month", "storage_per_month", ""),
             ("Total per month", "total_per_month", per_month))
    rows, judgements = [], []
    for label, key, saved in lines:
        show = (lambda v: fmt_sig(v, 3)) if key == "instance_hours_per_month" else money
        rows.append((label, show(cost["baseline"].get(key)), show(cost["compressed"].get(key)), saved))
        judgements.append(None)
    assumptions = cost.get("assumptions") or {}
    blocks: list[Block] = [Table(("", "Baseline", "Compressed", "Savings"), tuple(rows), tuple(judgements))]
    if assumptions:
        blocks.append(Paragraph("Assumptions (change them with the cost options; figures scale linearly):"))
        blocks.append(Bullets(tuple(f"{key}: {_plain(value)}" for key, value in assumptions.items())))
    return Section("cost", "Cost", tuple(blocks))


def _notes_section(report: dict) -> Section | None:
    notes = [note for note in (get(report, "notes") or []) if note not in (None, "")]
    if not notes:
        return None
    return Section("notes", "Notes", (Bullets(tuple(_plain(note) for note in notes)),))


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def summary_blocks(summary: dict, prefix: str = "") -> list[Block]:
    """A step summary as blocks: scalars in a Figure/Value table, lists of records (training
    history, search trials, per-layer sensitivity) as tables of their own, nested dicts flattened."""
    rows: list[tuple[str, str]] = []
    extra: list[Block] = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and any(_is_records(v) or isinstance(v, dict) for v in value.values()):
            extra += summary_blocks(value, prefix=f"{name}.")
        elif _is_records(value):
            header = tuple(dict.fromkeys(k for item in value for k in item))
            extra.append(Paragraph(f"{name}:"))
            extra.append(Table(header, tuple(tuple(_plain(item.get(k)) for k in header) for item in value),
                               numeric=False))
        else:
            rows.append((name, _plain(value)))
    return ([Table(("Figure", "Value"), tuple(rows), numeric=False)] if rows else []) + extra


def _steps_section(report: dict) -> Section:
    steps = get(report, "steps") or []
    if not steps:
        return Section("steps", "Steps", (Paragraph("No step summaries were recorded."),))
    blocks: list[Block] = []
    for i, step in enumerate(steps, start=1):
        blocks.append(Subheading(f"{i}. {_plain(get(step, 'technique') or 'step')}"))
        summary = get(step, "summary")
        if isinstance(summary, dict) and summary:
            blocks += summary_blocks(summary)
        else:
            blocks.append(Paragraph("No summary recorded."))
    return Section("steps", "Steps", tuple(blocks))


def _export_section(report: dict) -> Section:
    export = get(report, "export")
    if not isinstance(export, dict) or not export:
        return Section("export", "Export verification", (Paragraph("Not recorded for this run."),))
    tolerance = export.get("tolerance")
    rows = []
    for side in ("baseline", "compressed"):
        diff = export.get(f"{side}_max_abs_diff")
        d, t = finite_number(diff), finite_number(tolerance)
        within = NA if d is None or t is None else ("yes" if d <= t else "NO")
        rows.append((side.capitalize(), _sci(diff), _sci(tolerance), within))
    text = ("Largest absolute difference between the exported artifact's outputs and the model it "
            "was exported from, on the same inputs.")
    return Section("export", "Export verification",
                   (Table(("Model", "Max abs difference", "Tolerance", "Within tolerance"), tuple(rows)),
                    Paragraph(text)))


def _setup_section(report: dict) -> Section:
    task, runtime, data = (get(report, k) or {} for k in ("task", "runtime", "data"))
    splits = data.get("splits")
    split_text = (", ".join(f"{name} {fmt_int(count)}" for name, count in splits.items())
                  if isinstance(splits, dict) else _plain(splits))
    items = (f"Task: {_plain(task.get('name'))}; primary metric: {_plain(task.get('primary_metric'))}",
             f"Runtime: {_plain(runtime.get('name'))}, threads {_plain(runtime.get('threads'))}, "
             f"batch N = {_plain(runtime.get('batch_n', batch_n(report)))}",
             f"Data: {_plain(data.get('source'))}, seed {_plain(data.get('seed'))}; "
             f"examples per split: {split_text}")
    items += _timing_items(report)
    environment = get(report, "environment") or {}
    env_table = Table(("Component", "Value"), tuple((str(k), _plain(v)) for k, v in environment.items()),
                      numeric=False)
    return Section("setup", "Setup and environment", (Bullets(items), env_table))


def _load(value: Any) -> str:
    return "n/a" if not isinstance(value, (list, tuple)) else " / ".join(fmt_sig(v, 3) for v in value)


def _timing_items(report: dict) -> tuple[str, ...]:
    """Per batch size: rounds, time, whether the cap stopped them, load before/after, the verdict."""
    items = []
    for key, label in (("batch_1", "batch 1"), ("batch_n", f"batch {batch_n(report)}")):
        t = get(report, "timing", key)
        if not isinstance(t, dict):
            continue
        tol, cap = finite_number(t.get("rel_tolerance")), finite_number(t.get("max_time_s"))
        stop = ("stopped by the time cap before the CI narrowed" if t.get("cap_hit")
                else "CI within the tolerance")
        items.append(
            f"Timing at {label}: {_plain(t.get('rounds'))} rounds in {fmt_sig(t.get('timed_s'))} s"
            f" (target ±{fmt_sig(100 * tol) if tol is not None else NA}% CI, cap {fmt_sig(cap)} s: {stop});"
            f" load average (1 / 5 / 15 min) {_load(t.get('load_average_before'))} before,"
            f" {_load(t.get('load_average_after'))} after, on {_plain(t.get('cpu_count'))} CPUs;"
            f" {'UNSTABLE' if t.get('unstable') else 'stable'}")
    return tuple(items)


def _recipe_section(report: dict) -> Section:
    recipe = json.dumps(get(report, "recipe"), indent=2, ensure_ascii=False, default=str)
    return Section("recipe", "Resolved recipe",
                   (Paragraph("Every setting the run used, defaults included; save it to rerun the same "
                              "compression."), Code(recipe, "json")))


def report_document(report: dict) -> Document:
    """The report's content in format-neutral blocks, shared by the Markdown and HTML renderers."""
    task = get(report, "task", "name")
    sections = [_comparison_section(report), _metrics_section(report), _delta_section(report), _notes_section(report),
                _cost_section(report), _steps_section(report), _export_section(report),
                _setup_section(report), _recipe_section(report)]
    byline = f"Created {_plain(get(report, 'created'))} · schema {_plain(get(report, 'schema'))}"
    title = f"shrinkml report: {_plain(task)}" if task else "shrinkml report"
    if get(report, "model", "random_weights"):  # said first: every figure below is of an untrained model
        title = f"RANDOM WEIGHTS (architecture benchmark, not a trained model): {title}"
    return Document(title=title,
                    byline=byline, verdict=verdict(report), headline=_headline(report),
                    sections=tuple(s for s in sections if s is not None))


# --- Markdown -------------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"[\\`*\[\]<>|~#]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


def md_escape(text: str) -> str:
    """Text that Markdown shows literally: markup characters backslash-escaped (so a note holding
    ``<script>`` or ``|`` stays text), newlines folded so table rows and list items stay whole."""
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), " ".join(str(text).splitlines()))


def _md_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return md_escape(block.text)
    if isinstance(block, Subheading):
        return f"### {md_escape(block.text)}"
    if isinstance(block, Alert):
        return f"> **Warning:** {md_escape(block.text)}"
    if isinstance(block, Bullets):
        return "\n".join(f"- {md_escape(item)}" for item in block.items)
    if isinstance(block, Table):
        def row(cells: tuple[str, ...]) -> str:
            return "| " + " | ".join(md_escape(cell) for cell in cells) + " |"
        align = "| --- | " + " | ".join("---:" if block.numeric else "---" for _ in block.header[1:]) + " |"
        return "\n".join([row(block.header), align, *(row(r) for r in block.rows)])
    if isinstance(block, Code):
        # A fence longer than any backtick run inside, so recipe text cannot close it early.
        longest = max((len(run) for run in re.findall(r"`+", block.text)), default=0)
        fence = "`" * max(3, longest + 1)
        return f"{fence}{block.language}\n{block.text}\n{fence}"
    raise TypeError(f"unknown block {type(block).__name__}")


def render_markdown(report: dict) -> str:
    """The report as Markdown: verdict, before/after table, what changed, cost, steps, export
    check, notes, environment and the resolved recipe. Fields left ``None`` print as "n/a".

    >>> Path("report.md").write_text(render_markdown(report))  # doctest: +SKIP
    """
    doc = report_document(report)
    parts = [f"# {md_escape(doc.title)}", md_escape(doc.byline),
             f"> **{md_escape(doc.verdict.label)}:** {md_escape(doc.verdict.detail)}.",
             md_escape(doc.headline)]
    for section in doc.sections:
        parts.append(f"## {md_escape(section.title)}")
        parts += [_md_block(block) for block in section.blocks]
    parts.append("*Plots of the trade-off are in report.html.*")
    return "\n\n".join(parts) + "\n"

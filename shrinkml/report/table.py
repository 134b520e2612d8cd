"""The before/after comparison every report format shows, and the console table the CLI prints.

``comparison_rows`` computes the rows once, as text, so that the console, Markdown and HTML say
exactly the same thing; ``bench_rows`` does the same for one model in the same units. The number
formatting lives here with the rows it serves. Rich is imported only inside the console functions
(``summary_table``, ``bench_table``, ``verdict_text``), so renderers that never print pay nothing
for it. A speedup is judged better or worse only where its 95% CI excludes 1.0, a memory change
only where it exceeds the measurement's noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

NA = "n/a"


def get(report: Any, *keys: str | int) -> Any:
    """``report[k1][k2]...``, or ``None`` where any step is missing or not a container.

    Renderers read through this so that a field left ``None`` prints "n/a" instead of crashing.
    """
    node = report
    for key in keys:
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, (list, tuple)) and isinstance(key, int) and -len(node) <= key < len(node):
            node = node[key]
        else:
            return None
    return node


def finite_number(value: Any) -> float | None:
    """A finite float, or None for None, NaN, text and anything else that is not a number."""
    if value is None or isinstance(value, (bool, str)):
        return None
    try:
        number = float(value)  # also takes numpy scalars
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def fmt_sig(value: Any, digits: int = 3) -> str:
    """``value`` with ``digits`` significant figures in plain notation: 0.213, 19.4, 4,700."""
    x = finite_number(value)
    if x is None:
        return NA
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:,.{decimals}f}"


def fmt_int(value: Any) -> str:
    """An exact count with thousands separators: 100,234."""
    x = finite_number(value)
    return NA if x is None else f"{int(x):,}"


def human_bytes(value: Any) -> str:
    """Decimal units (kB = 1000 B), the same MB as the plots' axes: 412 kB."""
    x = finite_number(value)
    if x is None:
        return NA
    for unit in ("B", "kB", "MB", "GB"):
        if abs(x) < 1000 or unit == "GB":
            return f"{fmt_sig(x, 3)} {unit}" if unit != "B" else f"{int(x)} B"
        x /= 1000
    raise AssertionError("unreachable")


def fmt_bytes(value: Any) -> str:
    """Human units plus the exact count, since sizes are compared to the byte: 412 kB (412,345 bytes)."""
    if finite_number(value) is None:
        return NA
    return f"{human_bytes(value)} ({fmt_int(value)} bytes)"


def fmt_ratio(ratio: Any, better: str, worse: str) -> tuple[str, str | None]:
    """An x-fold change worded honestly, with its judgement: ``("9.1x smaller", "better")``,
    ``("0.8x (slower)", "worse")``. ``ratio`` is old/new for costs, new/old for throughput."""
    r = finite_number(ratio)
    if r is None or r <= 0:
        return NA, None
    if abs(r - 1) < 0.005:
        return "1.0x (no change)", None
    text = f"{r:.0f}" if r >= 10 else f"{r:.1f}"
    if text == "1.0":  # 0.97 and 1.04 must not both print as "1.0x"
        text = f"{r:.2f}"
    return (f"{text}x {better}", "better") if r > 1 else (f"{text}x ({worse})", "worse")


def _ratio(old: Any, new: Any) -> float | None:
    a, b = finite_number(old), finite_number(new)
    return a / b if a is not None and b else None


def is_fraction_metric(*values: Any) -> bool:
    """Whether the values look like fractions in [-1, 1] (accuracy, agreement, cosine), which read
    best as percentage points; anything else (loss, error in units) keeps its own scale."""
    numbers = [finite_number(v) for v in values]
    known = [v for v in numbers if v is not None]
    return bool(known) and all(-1.0 <= v <= 1.0 for v in known)


def fmt_metric_value(value: Any, fraction: bool) -> str:
    """0.981 for fractions (three decimals = tenths of a point), four significant figures otherwise."""
    x = finite_number(value)
    if x is None:
        return NA
    return f"{x:.3f}" if fraction else fmt_sig(x, 4)


def fmt_metric(entry: Any, fraction: bool | None = None) -> str:
    """A metric with its bootstrap interval: 0.981 (95% CI 0.968–0.992)."""
    value, ci = get(entry, "value"), get(entry, "ci95")
    if fraction is None:
        fraction = is_fraction_metric(value)
    text = fmt_metric_value(value, fraction)
    if text != NA and isinstance(ci, (list, tuple)) and len(ci) == 2:
        low, high = (fmt_metric_value(b, fraction) for b in ci)
        if NA not in (low, high):
            text += f" (95% CI {low}–{high})"
    return text


def fmt_difference(value: Any, fraction: bool) -> str:
    """A signed metric difference: "+0.20 points" for fractions, "-0.0123" in metric units otherwise."""
    x = finite_number(value)
    if x is None:
        return NA
    if fraction:
        return f"{100 * x:+.2f} points"
    return ("+" if x >= 0 else "") + fmt_sig(x, 3)


def fmt_drop(value: Any, ci: Any, fraction: bool) -> str:
    """A drop and its interval in one unit: "0.20 points (95% CI -0.20 to 0.60 points)"."""
    scale, unit = (100.0, " points") if fraction else (1.0, "")
    x = finite_number(value)
    if x is None:
        return NA
    text = f"{scale * x:.2f}{unit}" if fraction else fmt_sig(x, 3)
    low, high = (finite_number(get(ci, i)) for i in (0, 1))
    if low is not None and high is not None:
        if fraction:
            text += f" (95% CI {scale * low:.2f} to {scale * high:.2f}{unit})"
        else:
            text += f" (95% CI {fmt_sig(low, 3)} to {fmt_sig(high, 3)})"
    return text


def fmt_budget_amount(value: Any, drop_type: Any, fraction: bool) -> str:
    """A budget or worst-case drop in the budget's own terms: points, metric units or % of baseline."""
    x = finite_number(value)
    if x is None:
        return NA
    if drop_type == "relative":
        return f"{100 * x:.2f}% of the baseline"
    return f"{100 * x:.2f} points" if fraction else fmt_sig(x, 3)


def fmt_money(value: Any, currency: Any = "USD") -> str:
    """Money with enough digits to see sub-cent figures: $0.014, $0.0000095, $1,234.50."""
    x = finite_number(value)
    if x is None:
        return NA
    if abs(x) >= 1 or x == 0:
        text = f"{abs(x):,.2f}"
    else:
        decimals = 2 - math.floor(math.log10(abs(x)))  # three significant figures
        text = f"{abs(x):.{decimals}f}".rstrip("0").rstrip(".")
    sign = "-" if x < 0 else ""
    return f"{sign}${text}" if currency in (None, "USD") else f"{sign}{text} {currency}"


# A peak-RSS change smaller than both of these is within the run-to-run noise of the measurement
# (allocator and runtime arenas move by a few MiB), so it is shown without a judgement.
MEMORY_NOISE_FRACTION = 0.05
MEMORY_NOISE_BYTES = 4 * 2**20

# What each metric measures, in the words of a reader who has not seen the source. ``{output}`` is
# "embedding" for embedding tasks and "output" otherwise.
METRIC_MEANINGS = {
    "accuracy": "share of test examples whose top-1 class is the true label",
    "top1_agreement": "share of test examples whose top-1 class is the baseline model's top-1 class",
    "cosine_similarity": "mean over test examples of the cosine similarity between the model's {output} and the"
                         " baseline model's {output} of the same input (1 = same direction)",
    "relative_error": "mean over test examples of |output - baseline output| / |baseline output| (0 = identical)",
    "worst5_cosine": "mean cosine similarity to the baseline over the 5% of test examples where it is lowest",
    "top10_agreement": "mean share of each test example's 10 nearest test neighbours (by cosine) that are the"
                       " same as with the baseline model's embeddings (1 = same neighbours)",
}
# Short names for plot axes.
METRIC_AXIS_LABELS = {
    "accuracy": "Top-1 accuracy",
    "top1_agreement": "Top-1 agreement with the baseline",
    "cosine_similarity": "Mean cosine similarity to the baseline",
    "relative_error": "Mean relative error vs the baseline",
    "worst5_cosine": "Mean cosine of the worst 5%",
    "top10_agreement": "Top-10 neighbour agreement",
}


def metric_meaning(name: Any, task: Any = None) -> str | None:
    """What ``name`` measures, or None for a metric shrinkml does not define."""
    text = METRIC_MEANINGS.get(str(name))
    return None if text is None else text.format(output="embedding" if task == "embedding" else "output")


def fmt_speedup(entry: Any) -> tuple[str, str | None]:
    """A speedup with its interval and the judgement the interval allows:
    ``("1.41x faster (95% CI 1.32–1.50x)", "better")``; ``("no measurable difference (1.02x, 95% CI
    0.95–1.09x)", None)`` when the interval includes 1.0. Without an interval nothing is judged."""
    value = finite_number(get(entry, "value") if isinstance(entry, dict) else entry)
    if value is None or value <= 0:
        return NA, None
    low, high = (finite_number(get(entry, "ci95", i)) for i in (0, 1))
    if low is None or high is None:
        return f"{fmt_sig(value)}x (no confidence interval)", None
    ci = f"95% CI {fmt_sig(low)}–{fmt_sig(high)}x"
    if low > 1.0:
        return f"{fmt_sig(value)}x faster ({ci})", "better"
    if high < 1.0:
        return f"{fmt_sig(value)}x (slower; {ci})", "worse"
    return f"no measurable difference ({fmt_sig(value)}x, {ci})", None


def speedup_judgement(entry: Any) -> str | None:
    """"better"/"worse" only where the speedup's interval excludes 1.0."""
    return fmt_speedup(entry)[1]


def fmt_memory_change(old: Any, new: Any) -> tuple[str, str | None]:
    """Peak memory old -> new: a ratio judged only when the change exceeds the measurement's noise."""
    a, b = finite_number(old), finite_number(new)
    if a is None or b is None or a <= 0 or b <= 0:
        return NA, None
    if abs(b - a) < max(MEMORY_NOISE_FRACTION * a, MEMORY_NOISE_BYTES):
        return f"{100 * (b - a) / a:+.1f}% (within noise)", None
    return fmt_ratio(a / b, "less", "more")


def timing_warnings(report: Any) -> list[str]:
    """One sentence per batch size whose timing was flagged unstable, naming the reasons."""
    warnings = []
    for key, label in _batch_labels(report):
        reasons = get(report, "timing", key, "unstable_reasons")
        if get(report, "timing", key, "unstable") and reasons:
            warnings.append(f"Timing at {label} is unstable: {'; '.join(str(r) for r in reasons)}.")
    return warnings


def _batch_labels(report: Any) -> tuple[tuple[str, str], ...]:
    n = batch_n(report)
    return (("batch_1", "batch 1"), ("batch_n", f"batch {n if n is not None else 'N'}"))


def _is_unstable(report: Any, key: str) -> bool:
    return get(report, "timing", key, "unstable") is True


def batch_n(report: Any) -> Any:
    """The batch size the batch-N figures were measured at."""
    for side in ("compressed", "baseline"):
        n = get(report, side, "latency_ms", "batch_n", "n")
        if n is not None:
            return n
    return get(report, "runtime", "batch_n")


def primary_metric(report: Any) -> str | None:
    return get(report, "task", "primary_metric")


def primary_is_fraction(report: Any) -> bool:
    """Whether the primary metric, its drop and the budget read as percentage points."""
    name = primary_metric(report)
    values: list[Any] = []
    for side in ("baseline", "compressed"):
        entry = get(report, side, "metrics", name)
        values += [get(entry, "value"), get(entry, "ci95", 0), get(entry, "ci95", 1)]
    return is_fraction_metric(*values)


@dataclass(frozen=True)
class ComparisonRow:
    """One line of the before/after table, already formatted."""

    label: str
    baseline: str
    compressed: str
    change: str
    # "better", "worse" or None where the change is no judgement (metric deltas, unknown values).
    judgement: str | None = None


def _latency(side: Any, key: str) -> str:
    p50, p95 = get(side, "latency_ms", key, "p50"), get(side, "latency_ms", key, "p95")
    if finite_number(p50) is None and finite_number(p95) is None:
        return NA
    return f"{fmt_sig(p50)} / {fmt_sig(p95)} ms"


def _throughput(side: Any, key: str) -> str:
    value = get(side, "throughput_per_s", key)
    return NA if finite_number(value) is None else f"{fmt_sig(value)}/s"


def comparison_rows(report: dict) -> list[ComparisonRow]:
    """The before/after rows: size, parameters, MACs, latency, throughput, memory, every metric
    with its 95% CI, and agreement with the baseline. Ratios come from ``report["delta"]`` where
    it has them, so the table and the delta section can never disagree."""
    base, comp, delta = get(report, "baseline") or {}, get(report, "compressed") or {}, get(report, "delta") or {}
    rows: list[ComparisonRow] = []

    def add(label: str, b: str, c: str, change: tuple[str, str | None]) -> None:
        rows.append(ComparisonRow(label, b, c, change[0], change[1]))

    def ratio(delta_key: str | None, old: Any, new: Any) -> float | None:
        value = delta.get(delta_key) if delta_key else None
        return value if finite_number(value) is not None else _ratio(old, new)

    add("Size on disk", fmt_bytes(base.get("size_bytes")), fmt_bytes(comp.get("size_bytes")),
        fmt_ratio(ratio("size_ratio", base.get("size_bytes"), comp.get("size_bytes")), "smaller", "larger"))
    add("Parameters", fmt_int(base.get("params")), fmt_int(comp.get("params")),
        fmt_ratio(ratio("params_ratio", base.get("params"), comp.get("params")), "fewer", "more"))
    add("Nonzero parameters", fmt_int(base.get("nonzero_params")), fmt_int(comp.get("nonzero_params")),
        fmt_ratio(ratio(None, base.get("nonzero_params"), comp.get("nonzero_params")), "fewer", "more"))
    add("MACs per example", fmt_int(base.get("macs")), fmt_int(comp.get("macs")),
        fmt_ratio(ratio("macs_ratio", base.get("macs"), comp.get("macs")), "fewer", "more"))
    for key, label in _batch_labels(report):
        flag = " (timing unstable)" if _is_unstable(report, key) else ""
        add(f"Latency p50 / p95, {label}{flag}", _latency(base, key), _latency(comp, key),
            fmt_speedup(delta.get(f"speedup_{key}")))
    for key, label in _batch_labels(report):
        old, new = get(base, "throughput_per_s", key), get(comp, "throughput_per_s", key)
        text, _ = fmt_ratio(_ratio(new, old), "higher", "lower")
        judgement = speedup_judgement(delta.get(f"speedup_{key}"))
        if judgement is None and text != NA:  # the same rounds as the latency: no claim without its CI
            text = "no measurable difference"
        add(f"Throughput, {label}", _throughput(base, key), _throughput(comp, key), (text, judgement))
    add("Peak memory", fmt_bytes(base.get("peak_memory_bytes")), fmt_bytes(comp.get("peak_memory_bytes")),
        fmt_memory_change(base.get("peak_memory_bytes"), comp.get("peak_memory_bytes")))

    names = list(get(base, "metrics") or {})
    names += [name for name in (get(comp, "metrics") or {}) if name not in names]
    primary = primary_metric(report)
    for name in names:
        b_entry, c_entry = get(base, "metrics", name), get(comp, "metrics", name)
        fraction = is_fraction_metric(get(b_entry, "value"), get(c_entry, "value"))
        b_value, c_value = finite_number(get(b_entry, "value")), finite_number(get(c_entry, "value"))
        diff = c_value - b_value if b_value is not None and c_value is not None else None
        label = f"{name} (primary)" if name == primary else name
        add(label, fmt_metric(b_entry, fraction), fmt_metric(c_entry, fraction),
            (fmt_difference(diff, fraction), None))
    if "agreement_with_baseline" in comp:
        agreement = comp.get("agreement_with_baseline")
        shown = fmt_metric(agreement) if isinstance(agreement, dict) else NA
        add(agreement_label(agreement, get(report, "task", "name")), "—", shown, ("—", None))
    return rows


def agreement_label(agreement: Any, task: Any = None) -> str:
    """The agreement row's name, saying what it measures."""
    metric = get(agreement, "metric")
    if metric == "top1_agreement":
        return "Top-1 agreement with the baseline's predictions"
    if metric == "cosine_similarity":
        return f"Mean cosine similarity to the baseline's {'embeddings' if task == 'embedding' else 'outputs'}"
    return "Agreement with the baseline"


def summary_table(report: dict) -> Table:
    """The before/after console table the CLI prints: metric, baseline, compressed, change.

    >>> from rich.console import Console  # doctest: +SKIP
    >>> Console().print(summary_table(report))  # doctest: +SKIP
    """
    from rich.table import Table
    from rich.text import Text

    task, runtime = get(report, "task", "name"), get(report, "runtime", "name")
    title = "Baseline vs compressed" + "".join(f", {part}" for part in (task, runtime) if part)
    warnings = timing_warnings(report)
    # Text(), not str, wherever report text is shown: it must not be read as Rich markup.
    table = Table(title=title, title_justify="left", caption_justify="left",
                  caption=Text("\n".join(warnings), style="yellow") if warnings else None)
    table.add_column("Metric")
    table.add_column("Baseline", justify="right")
    table.add_column("Compressed", justify="right")
    table.add_column("Change", justify="right")
    styles = {"better": "green", "worse": "red"}
    for row in comparison_rows(report):
        table.add_row(Text(row.label), Text(row.baseline), Text(row.compressed),
                      Text(row.change, style=styles.get(row.judgement or "", "")))
    return table


def verdict_text(report: dict):
    """The budget verdict line ``compress`` prints under the table, coloured by the verdict, in the
    budget's own terms (points, metric units or % of the baseline).

    >>> Console().print(verdict_text(report))  # doctest: +SKIP
    Budget met: worst-case accuracy drop 0.60 points, allowed 1.00 points (absolute budget).
    """
    from rich.text import Text

    from shrinkml.report.markdown import verdict

    v = verdict(report)
    return Text(f"{v.text} The worst case is the upper end of the drop's 95% CI.",
                style={True: "green", False: "red"}.get(v.met, ""))


def _latency_with_ci(measurement: Any, key: str) -> str:
    text = _latency(measurement, key)
    low, high = (finite_number(get(measurement, "latency_ms", key, "p50_ci95", i)) for i in (0, 1))
    if text != NA and low is not None and high is not None:
        text += f" (p50 95% CI {fmt_sig(low)}–{fmt_sig(high)} ms)"
    return text


def _value_ci(entry: Any, fmt: str = "{:.4g}") -> str:
    value = finite_number(get(entry, "value"))
    if value is None:
        return "n/a"
    lo, hi = (finite_number(get(entry, "ci95", i)) for i in (0, 1))
    ci = f" ({fmt.format(lo)}–{fmt.format(hi)})" if lo is not None and hi is not None else ""
    return fmt.format(value) + ci


def _lm_bench_rows(report: dict, m: dict) -> list[tuple[str, str]]:
    """``bench`` figures of a causal LM: size, parameters, perplexity, generation speed."""
    g, w = m.get("generation") or {}, m.get("windows") or {}
    return [
        ("Size on disk", fmt_bytes(m.get("size_bytes"))),
        ("Parameters (tied tensors once)", fmt_int(m.get("params"))),
        (f"Perplexity ({fmt_int(w.get('scored_tokens'))} test tokens, {w.get('context')}-token windows)",
         _value_ci(get(m, "metrics", "perplexity"))),
        (f"Prompt processing, tokens/s ({g.get('prompt_tokens')}-token prompt)", _value_ci(g.get("prompt_tokens_per_s"), "{:.1f}")),
        (f"Generation, tokens/s ({g.get('new_tokens')} new tokens, greedy, batch 1, KV cache)",
         _value_ci(g.get("generation_tokens_per_s"), "{:.1f}")),
        ("Time to first token, ms", _value_ci(g.get("time_to_first_token_ms"), "{:.1f}")),
        ("Peak resident memory of the process", fmt_bytes(m.get("process_peak_rss_bytes"))),
    ]


def bench_rows(report: dict) -> list[tuple[str, str]]:
    """The ``bench`` figures as (label, value) text, in the units and CI style of the compress
    table: decimal bytes, significant figures, "value (95% CI low–high)", money to 3 significant
    figures."""
    m = get(report, "measurement") or {}
    task = get(report, "task", "name")
    if isinstance(m.get("generation"), dict):
        return _lm_bench_rows(report, m)
    params, nonzero = m.get("params"), m.get("nonzero_params")
    rows = [("Size on disk", fmt_bytes(m.get("size_bytes"))),
            ("Parameters", fmt_int(params) + ("" if nonzero in (None, params) else f" ({fmt_int(nonzero)} nonzero)")),
            ("MACs per example", fmt_int(m.get("macs")))]
    for key, label in _batch_labels(report):
        flag = " (timing unstable)" if _is_unstable(report, key) else ""
        rows.append((f"Latency p50 / p95, {label}{flag}", _latency_with_ci(m, key)))
    for key, label in _batch_labels(report):
        rows.append((f"Throughput, {label}", _throughput(m, key)))
    rows.append(("Peak memory", fmt_bytes(m.get("peak_memory_bytes"))))
    currency = get(report, "cost", "currency")
    rows.append(("Cost per million inferences", fmt_money(get(report, "cost", "cost_per_million_inferences"), currency)))
    rows.append(("Total cost per month", fmt_money(get(report, "cost", "total_per_month"), currency)))
    for name, entry in (m.get("metrics") or {}).items():
        meaning = metric_meaning(name, task)
        rows.append((str(name) + (f" ({meaning})" if meaning else ""), fmt_metric(entry)))
    diff = finite_number(m.get("export_max_abs_diff"))
    if diff is not None:
        rows.append(("Export max abs difference vs PyTorch", f"{diff:.2e}"))
    return rows


def bench_table(report: dict) -> Table:
    """The console table of ``shrinkml bench``: one model's figures, timing warnings as caption.

    >>> from rich.console import Console  # doctest: +SKIP
    >>> Console().print(bench_table(shrinkml.bench("model.onnx", data="data.npz")))  # doctest: +SKIP
    """
    from rich.table import Table
    from rich.text import Text

    source, runtime = get(report, "model", "source"), get(report, "runtime", "name")
    threads = get(report, "runtime", "threads")
    title = f"{source or 'model'} on {runtime or 'the runtime'}" + (
        f" ({threads} thread{'s' if threads != 1 else ''})" if threads else "")
    warnings = timing_warnings(report)
    table = Table(title=Text(title), title_justify="left", caption_justify="left",
                  caption=Text("\n".join(warnings), style="yellow") if warnings else None)
    table.add_column("Measure")
    table.add_column("Value", justify="right")
    for label, value in bench_rows(report):
        table.add_row(Text(label), Text(value))
    return table


def lm_summary_table(report: dict) -> Table:
    """The console table of ``shrinkml compress`` on a causal LM (``shrinkml.lm_report/1``)."""
    from rich.table import Table
    from rich.text import Text

    b, c, d = get(report, "baseline") or {}, get(report, "compressed") or {}, get(report, "delta") or {}
    table = Table(title=Text(f"{get(report, 'model', 'source')} on {get(report, 'runtime', 'name')}"
                             f" ({get(report, 'runtime', 'threads')} threads)"), title_justify="left")
    for name, justify in (("Measure", "left"), ("Original", "right"), ("Compressed", "right"), ("Change", "right")):
        table.add_column(name, justify=justify)

    def row(label: str, bv: str, cv: str, change: str = "") -> None:
        table.add_row(Text(label), Text(bv), Text(cv), Text(change))

    size_ratio = finite_number(d.get("size_ratio"))
    row("Size on disk", fmt_bytes(b.get("size_bytes")), fmt_bytes(c.get("size_bytes")),
        "" if not size_ratio else f"{fmt_sig(size_ratio)}x smaller" if size_ratio >= 1 else f"{fmt_sig(1 / size_ratio)}x LARGER")
    inc = d.get("perplexity_increase") or {}
    row(f"Perplexity ({fmt_int(get(report, 'data', 'scored_tokens'))} test tokens)",
        _value_ci(get(b, "metrics", "perplexity")), _value_ci(get(c, "metrics", "perplexity")),
        _value_ci({"value": 100 * inc["value"], "ci95": [100 * v for v in inc["ci95"]]}, "{:+.2f}") + " %" if inc else "")
    row("KL divergence vs original (mean per token)", "", _value_ci(get(c, "metrics", "kl_divergence"), "{:.4f}"))
    row("Top-1 next-token agreement", "", _value_ci(get(c, "metrics", "top1_agreement"), "{:.4f}"))
    for key, label, fmt in (("prompt_tokens_per_s", "Prompt processing, tokens/s", "{:.1f}"),
                            ("generation_tokens_per_s", "Generation, tokens/s", "{:.1f}"),
                            ("time_to_first_token_ms", "Time to first token, ms", "{:.1f}")):
        row(label, _value_ci(get(b, "generation", key), fmt), _value_ci(get(c, "generation", key), fmt),
            _value_ci(d.get(f"{key}_ratio"), "{:.2f}") + "x" if d.get(f"{key}_ratio") else "")
    mem = get(report, "compression_memory") or {}
    if mem:
        row("Peak process memory while compressing", "", fmt_bytes(mem.get("process_peak_rss_bytes")),
            f"FP32 model {fmt_bytes(mem.get('fp32_model_bytes'))}"
            + (f" ({mem['peak_vs_fp32']:.2f}x)" if mem.get("peak_vs_fp32") else ""))
        if mem.get("peak_above_libraries_bytes") is not None:
            row("  of which above PyTorch + transformers imported", "", fmt_bytes(mem["peak_above_libraries_bytes"]),
                f"{mem['peak_above_libraries_vs_fp32']:.2f}x the FP32 model")
    budget = get(report, "budget") or {}
    row(f"Budget: {budget.get('drop_type')} perplexity increase <= {budget.get('max_drop')}",
        "", "met" if budget.get("met") else "NOT met", f"worst case {fmt_sig(budget.get('worst_case_drop'))}")
    return table

"""Rendering of ``shrinkml explain``: which layers cost accuracy when quantized, as Markdown, HTML
(with a per-layer plot) and the console table."""

from __future__ import annotations

from typing import Any

from shrinkml.report.markdown import Bullets, Document, Paragraph, Section, Table, Verdict, _md_block, md_escape


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value == float("inf"):
            return "inf"
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _points(value: float) -> str:
    return f"{value * 100:.2f} points"


def explain_document(result: dict) -> Document:
    metric = result["metric"]
    allq = result["all_quantized"]
    layers = result["layers"]
    worst = layers[0] if layers else None
    headline = (
        f"Quantizing every layer with {result['technique']['technique']}: {metric} drop "
        f"{_points(allq['drop'])} (95% CI upper end {_points(allq['drop_ci95_upper'])}), output SQNR "
        f"{_fmt(allq['output_sqnr_db'])} dB."
    )
    if worst is not None:
        headline += f" Most sensitive layer: {worst['layer']} ({_fmt(worst['output_sqnr_db'])} dB)."
    rows = tuple(
        (
            r["layer"],
            r["op_type"],
            _fmt(r["weight_elements"]),
            _fmt(r["output_sqnr_db"]),
            _points(r["metric_drop"]),
        )
        for r in layers
    )
    sections = (
        Section(
            "layers",
            "Per-layer sensitivity",
            (
                Paragraph(
                    "Each row quantizes that layer alone (all others float) and compares the model's output "
                    f"with the float model on the {result['data']['evaluated_on']} split "
                    f"({result['data']['examples']} examples). Lower SQNR and a larger drop mean the layer "
                    "costs more; list such layers in keep_float, or use keep_float: auto."
                ),
                Table(("Layer", "Op", "Weights", "Output SQNR (dB)", f"{metric} drop"), rows),
            ),
        ),
        Section(
            "setup",
            "Setup",
            (
                Bullets(
                    (
                        f"Model: {result['model']['source']}",
                        f"Data: {result['data']['source']}",
                        f"Technique: {result['technique']}",
                        f"Environment: {result['environment']}",
                    )
                ),
            ),
        ),
    )
    return Document(
        title="shrinkml explain: quantization sensitivity",
        byline=f"schema {result['schema']}",
        verdict=Verdict(None, "Sensitivity", f"{len(layers)} layers analysed"),
        headline=headline,
        sections=sections,
    )


def sensitivity_figure(result: dict) -> str:
    """Horizontal bars: per-layer output SQNR (dB), most sensitive at the top."""
    import io

    from matplotlib.figure import Figure

    layers = result["layers"]
    names = [r["layer"] for r in layers][::-1]
    finite = [r["output_sqnr_db"] if r["output_sqnr_db"] != float("inf") else 0.0 for r in layers][::-1]
    fig = Figure(figsize=(7, 0.35 * max(len(names), 3) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(range(len(names)), finite, color="#1f5fa8")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("output SQNR with only this layer quantized (dB, higher is better)")
    ax.set_title(f"Per-layer sensitivity, {result['technique']['technique']}")
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    return buffer.getvalue()


def render_explain_markdown(result: dict) -> str:
    doc = explain_document(result)
    parts = [f"# {md_escape(doc.title)}", md_escape(doc.headline)]
    for section in doc.sections:
        parts.append(f"## {md_escape(section.title)}")
        parts += [_md_block(block) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


def render_explain_html(result: dict) -> str:
    from shrinkml.report.html import _page

    return _page(
        explain_document(result),
        {"sensitivity": sensitivity_figure(result)},
        plots_after="layers",
        title="Per-layer plot",
        note="Bars: output SQNR in dB with only that layer quantized; the shortest bars cost the most.",
    )


def explain_table(result: dict):
    from rich.table import Table as RichTable

    table = RichTable(title=f"Quantization sensitivity ({result['technique']['technique']}, {result['metric']})")
    for column in ("layer", "op", "weights", "output SQNR (dB)", "drop"):
        table.add_column(column, justify="left" if column in ("layer", "op") else "right")
    for r in result["layers"]:
        table.add_row(r["layer"], r["op_type"], _fmt(r["weight_elements"]), _fmt(r["output_sqnr_db"]), _points(r["metric_drop"]))
    return table


def render_explain_files(result: dict) -> dict[str, str]:
    """``explain.json`` / ``.md`` / ``.html`` by name, for the output folder."""
    import json

    from shrinkml.report.json_report import to_jsonable

    return {
        "explain.json": json.dumps(to_jsonable(result), indent=2) + "\n",
        "explain.md": render_explain_markdown(result),
        "explain.html": render_explain_html(result),
    }

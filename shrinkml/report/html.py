"""The report as one self-contained HTML page: inline CSS, inline SVG plots, no scripts, no
external assets, so it can be mailed, attached to a CI run or opened offline.

Every piece of report text goes through ``html.escape``: notes, recipe values and metric names come
from users. A Content-Security-Policy that forbids scripts backs that up in case anything slips.
"""

from __future__ import annotations

import html

from shrinkml.report.markdown import (
    Alert,
    Block,
    Bullets,
    Code,
    Document,
    Paragraph,
    Subheading,
    Table,
    report_document,
)

_CSS = """
:root { color-scheme: light; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       background: #f6f7f9; margin: 0; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 1.7em; margin: 0.2em 0; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #e3e5e8; padding-bottom: 4px; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
.byline { color: #666; margin-top: 0; }
.verdict { padding: 14px 18px; border-radius: 6px; border-left: 6px solid; font-size: 1.05em; }
.verdict.met { background: #e7f5ea; border-color: #1e7e34; color: #14532d; }
.verdict.not-met { background: #fdecea; border-color: #c62828; color: #7f1d1d; }
.verdict.unknown { background: #f1f1f1; border-color: #888; }
.headline { font-size: 1.05em; }
.alert { background: #fff7e0; border-left: 4px solid #b7791f; padding: 8px 12px; }
table { border-collapse: collapse; margin: 0.6em 0; min-width: 60%; }
th, td { padding: 5px 12px; border-bottom: 1px solid #e3e5e8; text-align: left; vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.better { color: #1e7e34; font-weight: 600; }
td.worse { color: #c62828; font-weight: 600; }
pre { background: #f6f8fa; padding: 12px 14px; border-radius: 6px; overflow-x: auto; font-size: 13px; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
figure { flex: 1 1 440px; margin: 0; }
figure svg { width: 100%; height: auto; }
figcaption { color: #666; font-size: 0.9em; text-align: center; }
"""

_PLOT_CAPTIONS = {
    "metric_vs_size": "Primary metric against size on disk",
    "metric_vs_latency": "Primary metric against batch-N latency (p50)",
    "sensitivity": "Output SQNR per layer, each quantized alone",
}


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_e(block.text)}</p>"
    if isinstance(block, Subheading):
        return f"<h3>{_e(block.text)}</h3>"
    if isinstance(block, Alert):
        return f'<p class="alert" role="note"><strong>Warning:</strong> {_e(block.text)}</p>'
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_e(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Code):
        return f"<pre><code>{_e(block.text)}</code></pre>"
    if isinstance(block, Table):
        numeric = block.numeric
        num = ' class="num"'
        head = "".join(f"<th{num if i and numeric else ''}>{_e(cell)}</th>" for i, cell in enumerate(block.header))
        rows = []
        for r, cells in enumerate(block.rows):
            judgement = block.judgements[r] if r < len(block.judgements) else None
            tds = []
            for i, cell in enumerate(cells):
                classes = ["num"] if i and numeric else []
                if i == len(cells) - 1 and judgement in ("better", "worse"):
                    classes.append(judgement)
                attr = f' class="{" ".join(classes)}"' if classes else ""
                tds.append(f"<td{attr}>{_e(cell)}</td>")
            rows.append("<tr>" + "".join(tds) + "</tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    raise TypeError(f"unknown block {type(block).__name__}")


def _inline_svg(svg: str, label: str) -> str:
    # Drop the XML prolog and DOCTYPE, which are not allowed inside an HTML body.
    start = svg.find("<svg")
    if start < 0:
        raise ValueError("plot is not an SVG document")
    return svg[start:].replace("<svg", f'<svg role="img" aria-label="{_e(label)}"', 1)


def _plots_section(figures: dict[str, str], title: str = "Trade-off",
                   note: str = "Error bars are 95% bootstrap confidence intervals; the x axes start at zero.") -> str:
    items = []
    for key, svg in figures.items():
        caption = _PLOT_CAPTIONS.get(key, key)
        items.append(f"<figure>{_inline_svg(svg, caption)}<figcaption>{_e(caption)}</figcaption></figure>")
    return (f'<section id="plots"><h2>{_e(title)}</h2><div class="plots">{"".join(items)}</div>'
            f"<p>{_e(note)}</p></section>")


def _page(doc: Document, figures: dict[str, str], *, plots_after: str = "delta", **plots: str) -> str:
    state = {True: "met", False: "not-met"}.get(doc.verdict.met, "unknown")
    body = [f"<h1>{_e(doc.title)}</h1>", f'<p class="byline">{_e(doc.byline)}</p>',
            f'<div class="verdict {state}" role="status"><strong>{_e(doc.verdict.label)}:</strong> '
            f"{_e(doc.verdict.detail)}.</div>",
            f'<p class="headline">{_e(doc.headline)}</p>']
    for section in doc.sections:
        blocks = "".join(_block(block) for block in section.blocks)
        body.append(f'<section id="{_e(section.key)}"><h2>{_e(section.title)}</h2>{blocks}</section>')
        if section.key == plots_after:  # the plots illustrate that section, so they follow it
            body.append(_plots_section(figures, **plots))
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        # No script may run and nothing may be fetched: the page is complete as written.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src data:\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(doc.title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body><main>",
        *body,
        "</main></body>",
        "</html>",
        "",
    ])


def render_html(report: dict) -> str:
    """The report as one self-contained HTML page: the verdict in a coloured banner, the same
    tables and text as the Markdown report, and the two trade-off plots inlined as SVG.

    >>> Path("report.html").write_text(render_html(report))  # doctest: +SKIP
    """
    from shrinkml.report.plots import accuracy_tradeoff_figures

    return _page(report_document(report), accuracy_tradeoff_figures(report))

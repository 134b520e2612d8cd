"""Reports that prove what compression gained: JSON (the schema-versioned record), Markdown and a
self-contained HTML page with plots, plus the console table the CLI prints.

The report dict is built elsewhere (``shrinkml.api``); this package only validates, renders and
writes it. Importing it is cheap: Rich and matplotlib load only when a table or plot is drawn.
"""

from __future__ import annotations

import os
from pathlib import Path

from shrinkml.report.json_report import REPORT_SCHEMA, dumps_report, validate_report

__all__ = ["REPORT_FILES", "REPORT_SCHEMA", "dumps_report", "validate_report", "write_reports"]

# Format -> file name inside the output folder.
REPORT_FILES = {"json": "report.json", "markdown": "report.md", "html": "report.html"}


def write_reports(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Validate ``report``, then write report.json, report.md and report.html into ``out_dir``.

    Every text is rendered before anything is written, so a rendering error leaves the folder as it
    was; each file is then written atomically (temporary name, then rename). Returns the paths by
    format: ``{"json": ..., "markdown": ..., "html": ...}``.

    >>> paths = write_reports(report, Path("shrinkml-out"))  # doctest: +SKIP
    >>> paths["html"].name  # doctest: +SKIP
    'report.html'
    """
    from shrinkml.atomic import write_text
    from shrinkml.report.html import render_html
    from shrinkml.report.markdown import render_markdown

    validate_report(report)
    texts = {"json": dumps_report(report), "markdown": render_markdown(report), "html": render_html(report)}
    out = Path(out_dir)
    return {fmt: write_text(out / REPORT_FILES[fmt], text) for fmt, text in texts.items()}

"""Shared by the benchmark scripts: keep each script's section of docs/benchmarks.md current."""

from __future__ import annotations

from pathlib import Path

from shrinkml.atomic import write_text

TITLE = "# shrinkml benchmarks\n\nEvery figure names the command, machine and library versions that produced it.\n"


def update_docs(path: Path, name: str, section: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (append if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else TITLE
    block = f"{start}\n{section.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text(path, text)

"""Progress on stderr (Rich), shown only to a person at a terminal, never into a pipe."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class _Bar:
    def __init__(self, progress, task_id) -> None:
        self._progress, self._task_id = progress, task_id

    def advance(self, n: float = 1, **fields: object) -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, advance=n, **fields)


class Progress:
    """Phase messages and progress bars on stderr.

    ``enabled=None`` shows them only when stderr is a terminal, so ``--json`` output piped into
    another program stays clean.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._console = None
        if self.enabled:
            from rich.console import Console

            self._console = Console(stderr=True)

    def log(self, message: str) -> None:
        if self._console is not None:
            self._console.print(f"[dim]shrinkml[/dim] {message}", highlight=False)

    @contextmanager
    def bar(self, description: str, total: float | None) -> Iterator[_Bar]:
        if self._console is None:
            yield _Bar(None, None)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
        )
        with RichProgress(*columns, console=self._console, transient=False) as rich_progress:
            task_id = rich_progress.add_task(description, total=total, status="")
            yield _Bar(rich_progress, task_id)


SILENT = Progress(enabled=False)

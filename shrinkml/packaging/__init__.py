"""Output folders: checked before work, locked, staged beside ``--out`` and swapped in whole."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from shrinkml.packaging.output import Interrupted, OutputFolder, Terminated, check_out, read_marker

__all__ = ["Interrupted", "OutputFolder", "Terminated", "check_out", "read_marker", "run_folder"]


class _Scratch:
    """A run without ``out``: a temporary work folder, nothing to commit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def commit(self, files: Mapping[str, object]) -> dict[str, Path]:
        raise RuntimeError("this run has no output folder to commit to")


@contextmanager
def run_folder(out: str | os.PathLike | None, inputs: Mapping[str, object]) -> Iterator[OutputFolder | _Scratch]:
    """An :class:`OutputFolder` for ``out`` (checked and locked now), or a scratch folder when None."""
    if out is None:
        with tempfile.TemporaryDirectory(prefix="shrinkml-") as tmp:
            yield _Scratch(Path(tmp))
        return
    with OutputFolder(out, inputs) as folder:
        yield folder

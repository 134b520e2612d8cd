"""The output folder of a run: checked before any work, locked for the whole run, committed whole.

A run that writes ``--out`` goes through one :class:`OutputFolder`:

* **Before any work** it refuses an ``--out`` that is a file, lies under a file, cannot be written,
  holds files shrinkml did not write, or overlaps an input (equals it, contains it, or lies inside
  an input directory), so a run never overwrites or deletes what the user gave it.
* **A lock** (``.OUT.lock`` beside ``--out``, held with ``flock`` so a killed run never leaves a
  stale one) makes a second run into the same folder fail fast, naming the holder's PID.
* **Scratch and staging** live in one hidden folder beside ``--out`` (``.OUT.partial-PID-*``):
  ``work/`` for intermediate files, ``stage/`` for the result. A run killed at any moment leaves
  only that folder, and the next run into the same ``--out`` removes it.
* **The commit** is one directory swap: ``stage/`` and ``--out`` are exchanged atomically
  (``renameat2(RENAME_EXCHANGE)`` on Linux), or, where the system cannot exchange, the old result
  is renamed aside and the new one renamed in; a kill between those two renames leaves ``--out``
  absent and the old result aside, which the next run puts back. So ``--out`` is always absent,
  the complete previous result, or the complete new one.

Every committed folder holds ``.shrinkml-output.json`` listing each file and its size, written
last: it is how shrinkml recognises its own folders (and a reader can check completeness).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from shrinkml.errors import InputError

MARKER = ".shrinkml-output.json"
MARKER_SCHEMA = "shrinkml.output/1"
# folders written before the marker existed are recognised by these files' schema prefixes
_LEGACY_MARKERS = ("manifest.json", "explain.json")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM during a run, with what the output folder holds now."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, exit_code

    def __str__(self) -> str:
        return self.message


class Terminated(KeyboardInterrupt):
    """Raised by the CLI's SIGTERM handler so that cleanup runs as for Ctrl-C."""


def _resolve(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def _is_relative_to(path: Path, other: Path) -> bool:
    try:
        path.relative_to(other)
        return True
    except ValueError:
        return False


def _is_shrinkml_output(folder: Path) -> bool:
    if (folder / MARKER).is_file():
        return True
    for name in _LEGACY_MARKERS:
        try:
            with open(folder / name, "rb") as f:
                head = f.read(4096)
        except OSError:
            continue
        if b'"schema": "shrinkml.' in head:
            return True
    return False


def check_out(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> Path:
    """Refuse an unusable ``--out`` before any work; return it resolved.

    ``inputs`` maps a name the user knows (``--model``, ``--data``, ...) to a path, or to None /
    a non-path spec, which is skipped.
    """
    target = _resolve(out)
    shown = str(out)
    for option, raw in inputs.items():
        if raw is None or not isinstance(raw, (str, os.PathLike)) or not os.path.exists(raw):
            continue
        path = _resolve(raw)
        if path == target or _is_relative_to(path, target):
            problem = "is" if path == target else "contains"
            raise InputError(
                f"the output folder {problem} an input: writing the result would overwrite or delete it",
                where=f"--out {shown} and {option} {raw}",
                expected="an output folder apart from every input",
                fix="pass another folder to --out, e.g. a new folder beside the input",
            )
        if path.is_dir() and _is_relative_to(target, path):
            raise InputError(
                "the output folder lies inside an input folder, whose contents shrinkml must not change",
                where=f"--out {shown} and {option} {raw}",
                expected="an output folder outside every input folder",
                fix=f"pass a folder outside {raw} to --out",
            )
    if target.exists() and not target.is_dir():
        raise InputError(
            "the output folder is an existing file", where=f"--out {shown}",
            expected="a folder that does not exist yet, or one an earlier shrinkml run wrote",
            found=f"a file of {target.stat().st_size:,} bytes", fix="pass a new folder name to --out",
        )
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(
            "the output folder lies under a file", where=f"--out {shown}",
            expected="a path whose parents are folders", found=f"{ancestor} is a file",
            fix="pass a folder path to --out",
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(
            "the output folder cannot be created or replaced: its parent is not writable",
            where=f"--out {shown}", found=f"no write permission on {ancestor}",
            fix="pass a folder you can write to, or fix the permissions",
        )
    if target.is_dir() and any(target.iterdir()) and not _is_shrinkml_output(target):
        raise InputError(
            "the output folder already holds files shrinkml did not write; replacing it would delete them",
            where=f"--out {shown}", expected="a new or empty folder, or one an earlier shrinkml run wrote",
            found=f"{sum(1 for _ in target.iterdir())} entries without {MARKER}",
            fix="pass a new folder name to --out",
        )
    return target


# ----------------------------------------------------------------------------- the lock


class _Lock:
    """An exclusive ``flock`` on ``path``, which records the holder's PID."""

    def __init__(self, path: Path, shown_out: str) -> None:
        self.path, self.shown_out, self.fd = path, shown_out, None

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = self._holder()
                raise InputError(
                    "another shrinkml run is writing to this output folder",
                    where=f"--out {self.shown_out}", found=f"lock {self.path} held by PID {holder}",
                    fix="wait for that run to finish, or pass another folder to --out",
                ) from None
            # The previous holder unlinks the file on release; if that happened between our open
            # and our flock, we hold a lock on a file nobody else will see: take the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def _holder(self) -> str:
        try:
            return self.path.read_text(encoding="ascii").strip() or "unknown"
        except (OSError, UnicodeDecodeError):
            return "unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


# ----------------------------------------------------------------------------- the swap

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(a))


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the folder is swapped; they are delivered right after."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signals = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@dataclass(frozen=True)
class SameAs:
    """An output entry that is another entry's file (written earlier in the same commit): hard-linked,
    so one model file serves both layouts without taking its bytes twice; copied where the file
    system has no hard links."""

    name: str


def _write_entry(target: Path, content: Path | str | bytes | SameAs, stage: Path | None = None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, SameAs):
        source = stage / content.name
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    elif isinstance(content, Path) and content.is_dir():  # e.g. a loadable model directory
        shutil.copytree(content, target)
    elif isinstance(content, Path):
        shutil.copyfile(content, target)
    elif isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content, encoding="utf-8")


def _listing(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER
    }


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The committed folder's file listing, or None when ``folder`` is not a complete result."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("schema") == MARKER_SCHEMA else None


class OutputFolder:
    """One run's output folder: see the module docstring. Use as a context manager.

    >>> with OutputFolder("out", {"--model": "m.onnx"}) as folder:  # doctest: +SKIP
    ...     build_things(folder.workdir)
    ...     folder.commit({"model.onnx": folder.workdir / "m.onnx", "report.json": text})
    """

    def __init__(self, out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> None:
        self.shown = str(out)
        self.out = check_out(out, inputs)
        self.had_result = self.out.is_dir() and any(self.out.iterdir())
        self.committed = False
        self._lock = _Lock(self.out.parent / f".{self.out.name}.lock", self.shown)
        self._partial: Path | None = None

    @property
    def workdir(self) -> Path:
        assert self._partial is not None, "use OutputFolder as a context manager"
        return self._partial / "work"

    def __enter__(self) -> OutputFolder:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self._recover()
            import tempfile

            self._partial = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-{os.getpid()}-", dir=self.out.parent))
            self.workdir.mkdir()
        except BaseException:
            self._lock.release()
            raise
        return self

    def _recover(self) -> None:
        """Put back a previous result a killed commit left aside; remove dead runs' folders."""
        leftovers = sorted(self.out.parent.glob(f".{self.out.name}.partial-*"))
        for left in leftovers:
            aside = left / "old"
            if not self.out.exists() and aside.is_dir() and read_marker(aside) is not None:
                os.rename(aside, self.out)
            shutil.rmtree(left, ignore_errors=True)
        self.had_result = self.out.is_dir() and any(self.out.iterdir())

    def commit(self, files: Mapping[str, Path | str | bytes]) -> dict[str, Path]:
        """Write ``files`` (name -> source file/folder, text or bytes) and swap them in as ``--out``."""
        stage = self._partial / "stage"
        stage.mkdir()
        for name, content in files.items():
            _write_entry(stage / name, content, stage)
        marker = {"schema": MARKER_SCHEMA, "files": _listing(stage)}
        (stage / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        with _signals_deferred():
            if not self.out.exists():
                os.rename(stage, self.out)
            elif not _exchange(stage, self.out):
                os.rename(self.out, self._partial / "old")
                os.rename(stage, self.out)
            self.committed = True
        shutil.rmtree(self._partial / "stage", ignore_errors=True)  # the old result, after an exchange
        return {name: self.out / name for name in files}

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._partial is not None:
                shutil.rmtree(self._partial, ignore_errors=True)
        finally:
            self._lock.release()
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):
            raise Interrupted(self.interrupt_message(exc), 143 if isinstance(exc, Terminated) else 130) from exc

    def interrupt_message(self, exc: BaseException) -> str:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        if self.committed:
            return f"{what} after the new result was written; {self.shown} holds it"
        if self.had_result:
            return f"{what}; {self.shown} still holds the previous result"
        return f"{what}; nothing was written to {self.shown}"

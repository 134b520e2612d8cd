"""A real PostgreSQL server for the search tests (Optuna's RDB storage, several workers on one study).

`postgres_url` starts a private server from the Debian package `postgresql` (its binaries live in
/usr/lib/postgresql/<version>/bin, not on PATH) once per test session: a fresh data directory, trust
auth, listening only on 127.0.0.1 at a free port, fsync off. It yields a SQLAlchemy URL to an empty
database and stops the server and removes its folders at teardown.

Missing binaries or psycopg2 fail the test when CI is set (so CI never passes by skipping) and skip it
otherwise. PostgreSQL refuses to run as root; as root the server runs as the `postgres` system user
that the Debian package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

DB_USER = "shrinkml"
DB_NAME = "shrinkml_test"
INSTALL_HINT = (
    "install the Debian package `postgresql` "
    "(apt-get install -y --no-install-recommends postgresql) and `pip install -e '.[dev]'`"
)
# A unix socket's path must fit in sockaddr_un (107 bytes); leave room for "/.s.PGSQL.NNNNN".
_MAX_SOCKET_DIR = 80


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> None:
    """Fail in CI, skip elsewhere: never a silent pass."""
    message = f"{reason}; {INSTALL_HINT}"
    if _in_ci():
        pytest.fail(f"CI is set and {message}", pytrace=False)
    pytest.skip(message)


def _version_key(bindir: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in bindir.parent.name.split("."))
    except ValueError:
        return (-1,)


def _find_bindir() -> Path | None:
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    candidates = [d for d in candidates if (d / "pg_ctl").is_file()]
    return max(candidates, key=_version_key) if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, bindir: Path, base: Path, run_as: pwd.struct_passwd | None):
        self.bindir = bindir
        self.base = base  # holds data/, sock/ and server.log
        self.run_as = run_as
        self.data = base / "data"
        self.sock = base / "sock"
        self.log = base / "server.log"
        self.port: int | None = None
        self.started = False

    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / tool), *args]
        return ["runuser", "-u", self.run_as.pw_name, "--", *cmd] if self.run_as else cmd

    def _run(self, tool: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        # cwd inside base: the server user may not be able to enter the caller's working directory.
        proc = subprocess.run(
            self._cmd(tool, *args), cwd=self.base, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
        )
        if check and proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{tool} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n--- server.log ---\n{log}"
            )
        return proc

    def setup_dirs(self) -> None:
        self.data.mkdir(mode=0o700)
        self.sock.mkdir(mode=0o700)
        if self.run_as:
            for path in (self.base, self.data, self.sock):
                os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)

    def initdb(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-U", DB_USER, "--auth=trust", "--encoding=UTF8",
            "--locale=C", "--no-sync", "--no-instructions",
        )

    def start(self, attempts: int = 3) -> None:
        # The free port can be taken between probing and binding; retry on a fresh one.
        for attempt in range(attempts):
            self.port = _free_port()
            options = " ".join([
                "-c listen_addresses=127.0.0.1", f"-c port={self.port}",
                f"-c unix_socket_directories={self.sock}", "-c fsync=off",
                "-c synchronous_commit=off", "-c full_page_writes=off", "-c max_connections=100",
            ])
            proc = self._run(
                "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log),
                "-o", options, check=attempt == attempts - 1,
            )
            if proc.returncode == 0:
                self.started = True
                return

    def stop(self) -> None:
        if not self.started:
            return
        proc = self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D", str(self.data), check=False)
        if proc.returncode != 0:
            self._run("pg_ctl", "stop", "-w", "-t", "30", "-m", "immediate", "-D", str(self.data), check=False)
        self.started = False

    def remove(self) -> None:
        # Also when it is pytest's: the data directory is large and pytest keeps three sessions' dirs.
        shutil.rmtree(self.base, ignore_errors=True)


def _server_base(tmp_path_factory: pytest.TempPathFactory, run_as: pwd.struct_passwd | None) -> Path:
    """A folder for the server: under pytest's tmp dir if the server user can reach it and the socket
    path is short enough; else a fresh /tmp/shrinkml-pg-* folder (pytest's tmp dirs under
    /tmp/pytest-of-root are mode 0700, which the postgres user cannot traverse)."""
    base = tmp_path_factory.mktemp("postgres")
    short_enough = len(str(base / "sock")) <= _MAX_SOCKET_DIR
    if run_as is None and short_enough:
        return base
    if run_as is not None and short_enough:
        os.chown(base, run_as.pw_uid, run_as.pw_gid)
        probe = subprocess.run(["runuser", "-u", run_as.pw_name, "--", "test", "-w", str(base), "-a", "-x", str(base)])
        if probe.returncode == 0:
            return base
    base.rmdir()
    base = Path(tempfile.mkdtemp(prefix="shrinkml-pg-", dir="/tmp"))
    base.chmod(0o755)
    return base


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory):
    """SQLAlchemy URL of an empty database on a private PostgreSQL server, for this test session."""
    bindir = _find_bindir()
    if bindir is None:
        _unavailable("the PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb, pg_ctl) are missing")
    try:
        import psycopg2
        from psycopg2 import sql
    except ImportError as exc:
        _unavailable(f"psycopg2 cannot be imported ({exc})")

    run_as = None
    if os.geteuid() == 0:
        try:
            run_as = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root, and there is no `postgres` system user to run the server as")
        if shutil.which("runuser") is None:
            pytest.fail("running as root and `runuser` (util-linux) is missing: cannot drop to the postgres user")

    server = _Server(bindir, _server_base(tmp_path_factory, run_as), run_as)
    try:
        server.setup_dirs()
        server.initdb()
        server.start()
        conn = psycopg2.connect(host="127.0.0.1", port=server.port, user=DB_USER, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB_NAME)))
        finally:
            conn.close()
        yield f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{server.port}/{DB_NAME}"
    finally:
        server.stop()
        server.remove()


@pytest.fixture(scope="module")
def mlp_weights(tmp_path_factory):
    """The weights of a digits MLP trained as `shrinkml demo` trains its CNN (the search tests' model)."""
    from shrinkml.examples.demo import build_demo_model, demo_data, digits_mlp
    from shrinkml.progress import SILENT

    root = tmp_path_factory.mktemp("mlp")
    build_demo_model(demo_data(0), seed=0, progress=SILENT, weights_out=root / "mlp.safetensors", factory=digits_mlp)
    return root / "mlp.safetensors"

"""Shared fixtures: every contract test runs on a real SQLite file and on a real PostgreSQL.

PostgreSQL comes from ``MINFLOW_TEST_PG_DSN`` (default: the local server); each test gets its own
schema, dropped afterwards. With ``MINFLOW_REQUIRE_PG=1`` an unreachable server fails the run
instead of skipping the PostgreSQL half.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minflow  # noqa: E402

PG_DSN = os.environ.get("MINFLOW_TEST_PG_DSN", "postgres://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("MINFLOW_REQUIRE_PG") == "1"
DIALECTS = ["sqlite", "postgres"]


def wait_for(predicate, timeout=15.0, interval=0.01, message="condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def _pg_params(dsn: str) -> dict:
    parts = urlsplit(dsn)
    return {
        "user": parts.username or "postgres",
        "password": parts.password,
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
        "database": (parts.path or "/postgres").lstrip("/") or "postgres",
    }


def pg_connect(dsn: str = PG_DSN):
    """A raw pg8000 connection for test set-up and inspection (never used by minflow itself)."""
    import pg8000.native

    return pg8000.native.Connection(timeout=10, **_pg_params(dsn))


_pg_state: dict = {}


def pg_available() -> bool:
    if "ok" not in _pg_state:
        try:
            pg_connect().close()
            _pg_state["ok"] = True
        except Exception as exc:  # any failure means "no server here"
            _pg_state["ok"] = False
            _pg_state["why"] = repr(exc)
    return _pg_state["ok"]


def require_pg():
    if not pg_available():
        message = f"PostgreSQL unavailable at {PG_DSN}: {_pg_state.get('why')}"
        if REQUIRE_PG:
            pytest.fail(message)
        pytest.skip(message)


def with_query(dsn: str, **params) -> str:
    sep = "&" if "?" in dsn else "?"
    return dsn + sep + "&".join(f"{k}={v}" for k, v in params.items())


class PgSchema:
    """A throw-away schema in the shared test database."""

    def __init__(self, base_dsn: str = PG_DSN):
        self.base_dsn = base_dsn
        self.name = "t_" + uuid.uuid4().hex[:12]
        self.dsn = with_query(base_dsn, schema=self.name)

    def drop(self):
        conn = pg_connect(self.base_dsn)
        try:
            conn.run(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
        finally:
            conn.close()


def make_dsn(kind: str, tmp_path: Path, request) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'minflow.db'}"
    require_pg()
    schema = PgSchema()
    request.addfinalizer(schema.drop)
    return schema.dsn


@pytest.fixture(params=DIALECTS)
def dialect(request) -> str:
    return request.param


@pytest.fixture
def dsn(dialect, tmp_path, request) -> str:
    """A fresh, empty database location for this test (SQLite file or PostgreSQL schema)."""
    return make_dsn(dialect, tmp_path, request)


@pytest.fixture
def client(dsn):
    """A migrated Client on a fresh database."""
    c = minflow.Client(dsn)
    c.migrate()
    yield c
    c.close()


@pytest.fixture
def app(dsn):
    """A migrated App (Client + handler registry) on a fresh database."""
    a = minflow.App(dsn)
    a.migrate()
    yield a
    a.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed")
    return found


class PrivateCluster:
    """A PostgreSQL cluster of this test's own, so it may be stopped, killed or restarted."""

    def __init__(self, base: Path):
        self.base = base
        self.data = base / "data"
        self.port = free_port()
        self.dsn = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(argv)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def init(self):
        self.base.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.base, "postgres", "postgres")
        self._run(
            _pg_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        return self

    def start(self):
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c fsync=off"
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.base / "log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def stop(self, mode: str = "fast"):
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return None
        return int(pidfile.read_text().split()[0])

    def kill(self):
        pid = self.pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            # Children of a SIGKILLed postmaster exit on their own once they notice it is gone.
            (self.data / "postmaster.pid").unlink(missing_ok=True)


@pytest.fixture
def private_pg(tmp_path_factory):
    """Start a private PostgreSQL cluster on a free port; stopped by pid at teardown."""
    cluster = PrivateCluster(tmp_path_factory.mktemp("pgcluster")).init().start()
    yield cluster
    cluster.stop("immediate")


def db(client, statement: str, **params) -> list:
    """Run raw SQL on the client's database; ``{now}``, ``{time:x}``, ``{uuid:x}``... as in minflow."""
    sql = minflow._render(statement, client._dialect.fragments)
    with client._pool.connection() as conn:
        return conn.query(sql, params or None)


def event_types(client, run_id: str) -> list[str]:
    return [e.event_type for e in client.events(run_id)]

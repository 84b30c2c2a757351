"""Shared fixtures: every contract test runs on a real SQLite file and on a real PostgreSQL.

PostgreSQL comes from ``MINFLOW_TEST_PG_DSN`` (default: the local server); each test gets its own
schema, dropped afterwards. With ``MINFLOW_REQUIRE_PG=1`` an unreachable server fails the run
instead of skipping the PostgreSQL half, and with ``MINFLOW_REQUIRE_BROWSER=1`` a missing
Chromium fails the browser tests instead of skipping them. Every other ``MINFLOW_*`` variable is
removed before any test runs. Private clusters, pgbouncer, a TCP proxy and the browser are
implemented in ``infra.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import infra
from infra import free_port, wait_for  # noqa: F401 (the test modules import them from here)

infra.scrub_environment()

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minflow  # noqa: E402

PG_DSN = os.environ.get("MINFLOW_TEST_PG_DSN", "postgres://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("MINFLOW_REQUIRE_PG") == "1"
REQUIRE_BROWSER = os.environ.get("MINFLOW_REQUIRE_BROWSER") == "1"
DIALECTS = ["sqlite", "postgres"]


def pg_connect(dsn: str = PG_DSN):
    """A raw pg8000 connection for test set-up and inspection (never used by minflow itself)."""
    return infra.pg_connect(dsn)


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


def missing(message: str, required: bool):
    """Skip the test for want of a component, or fail it when the run requires one (CI does)."""
    if required:
        pytest.fail(message)
    pytest.skip(message)


def require_pg():
    if not pg_available():
        missing(f"PostgreSQL unavailable at {PG_DSN}: {_pg_state.get('why')}", REQUIRE_PG)


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
def sqlite_client(tmp_path):
    """A migrated SQLite client, for behaviour that does not depend on the dialect."""
    c = minflow.Client(f"sqlite:///{tmp_path / 'sqlite.db'}")
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
        self._as_postgres = infra.AS_POSTGRES

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

    def read_only(self, on: bool = True, terminate: bool = False):
        """Refuse writes with SQLSTATE 25006 from the next transaction on, as a demoted primary
        does (``on=False`` accepts them again); see ``infra.set_read_only``."""
        infra.set_read_only(self.dsn, on, terminate=terminate)


@pytest.fixture
def private_pg():
    """Start a private PostgreSQL cluster on a free port; stopped by pid at teardown."""
    base = infra.postgres_dir("minflow-pg-")
    try:
        cluster = PrivateCluster(base).init().start()
        yield cluster
        cluster.stop("immediate")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pgbouncer(private_pg):
    """Start Debian's pgbouncer (transaction pooling) in front of a private cluster.

    ``pgbouncer(cluster=None, **settings)`` returns a started ``infra.Pgbouncer``; the cluster
    defaults to this test's ``private_pg``; ``settings`` go into pgbouncer.ini (defaults:
    ``default_pool_size=5``, ``max_client_conn=100``). Every one started is stopped by pid at
    teardown. Skipped when pgbouncer is not installed, failed instead with MINFLOW_REQUIRE_PG=1.
    """
    with contextlib.ExitStack() as started:

        def start(cluster: PrivateCluster | None = None, **settings) -> infra.Pgbouncer:
            if infra.pgbouncer_binary() is None:
                missing("pgbouncer not installed (apt-get install pgbouncer)", REQUIRE_PG)
            bouncer = infra.Pgbouncer((cluster or private_pg).port, **settings)
            started.callback(bouncer.stop)
            return bouncer.start()

        yield start


@pytest.fixture
def tcp_proxy():
    """``tcp_proxy(port, host="127.0.0.1")`` starts an ``infra.TcpProxy`` in front of host:port.

    It can ``freeze()``, ``thaw()`` and ``cut()`` its connections; ``proxy.dsn(dsn)`` points a DSN
    at it. Every one started is stopped (its thread joined, its sockets closed) at teardown.
    """
    with contextlib.ExitStack() as started:

        def start(port: int, host: str = "127.0.0.1") -> infra.TcpProxy:
            proxy = infra.TcpProxy(port, host)
            started.callback(proxy.stop)
            return proxy.start()

        yield start


@contextlib.contextmanager
def chromium_session():
    """A selenium ``webdriver.Chrome`` on headless Debian chromium with a fresh profile.

    Quit on exit, and any process still using its profile killed by pid. Skips the test when
    chromium, chromedriver or selenium is missing; fails it instead with MINFLOW_REQUIRE_BROWSER=1.
    """
    paths = zip(("chromium", "chromedriver"), infra.chromium_paths(), strict=True)
    absent = [name for name, path in paths if not path]
    try:
        import selenium  # noqa: F401
    except ImportError:
        absent.append("selenium (pip install -e '.[dev]')")
    if absent:
        needs = ", ".join(absent)
        missing(
            f"browser tests need {needs} (apt-get install chromium chromium-driver)",
            REQUIRE_BROWSER,
        )
    profile = Path(tempfile.mkdtemp(prefix="minflow-chromium-"))
    try:
        chrome = infra.start_chromium(profile)
        try:
            yield chrome
        finally:
            infra.stop_chromium(chrome, profile)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser():
    """A browser of its own for one test (see ``chromium_session``)."""
    with chromium_session() as chrome:
        yield chrome


def db(client, statement: str, **params) -> list:
    """Run raw SQL on the client's database; ``{now}``, ``{time:x}``, ``{uuid:x}``... as in minflow.

    Bare table names are the client's: minflow sends no search_path, so on PostgreSQL the
    statement runs in a transaction that sets one for itself alone.
    """
    fragments = client._dialect.fragments
    sql = minflow._render(statement, fragments)
    with client._pool.connection() as conn:
        if "schema" not in fragments:
            return conn.query(sql, params or None)
        with conn.transaction():
            conn.query(f"SET LOCAL search_path TO {fragments['schema']}")
            return conn.query(sql, params or None)


def event_types(client, run_id: str) -> list[str]:
    return [e.event_type for e in client.events(run_id)]

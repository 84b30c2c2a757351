"""Benchmark fixtures: targets on the shared PostgreSQL server and on the local disk, the report."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness import Report, pg_admin_dsn

_REPORT = Report()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "peers: compares minflow with other queues (bench-peers)")
    config.addinivalue_line("markers", "soak: the 10-minute soak (bench-soak)")
    config.addinivalue_line("markers", "quick: also part of the short A/B run (bench-quick)")


@pytest.fixture(scope="session")
def report() -> Report:
    """Where figures go; printed as one table when the session ends."""
    return _REPORT


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _REPORT.figures:
        return
    text = _REPORT.render()
    print("\n\n" + text + "\n")
    out = os.environ.get("BENCH_OUT")
    if out:
        Path(out).write_text(text + "\n")


@pytest.fixture(scope="session")
def pg_available() -> str:
    """The PostgreSQL server benchmarks use; skip PostgreSQL figures if none answers."""
    import pg8000.native
    from harness import pg_connect

    try:
        pg_connect(pg_admin_dsn()).close()
    except (OSError, pg8000.native.InterfaceError, pg8000.native.DatabaseError) as exc:
        pytest.skip(f"no PostgreSQL at MINFLOW_BENCH_PG_DSN/MINFLOW_TEST_PG_DSN: {exc}")
    return pg_admin_dsn()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SQLite files and latency logs live here: the local disk, as the peers use it."""
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        request.getfixturevalue("pg_available")
    return request.param

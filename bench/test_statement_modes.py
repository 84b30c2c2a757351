"""What a PostgreSQL statement costs named (prepared once per connection) and unnamed (parsed at
every execution, the mode for PgBouncer's transaction pooling): microseconds per statement.

Each statement runs ``STATEMENTS`` times inside one transaction, so no commit (and no fsync) is
in the figure: only the round trip, parse, plan and execution. Median of ``repeats()`` runs.
Run it alone with ``make bench PYTEST_ARGS="-k statement_modes"``.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import pytest
from harness import median_of, pg_admin_dsn, pg_connect, repeats

import minflow

STATEMENTS = 2000
MODES = {"named": "prepared_statements=yes", "unnamed": "prepared_statements=no"}


class _Undo(Exception):
    """Raised to roll the measuring transaction back."""


def _per_statement(client: minflow.Client, statement: str) -> float:
    """Microseconds per execution of one of minflow's hot statements, in one transaction."""
    dialect = client._dialect
    claim = minflow._Filter(("bench.none",), (), frozenset())
    with contextlib.suppress(_Undo), client._pool.connection() as conn, conn.transaction():

        def once() -> None:
            if statement == "submit":
                job = minflow.Job("bench.modes", {"n": 1})
                dialect.submit(conn, [client._job_row(job)])
            elif statement == "get":
                conn.query(dialect.sql["get_run"], {"id": str(uuid.uuid4())})
            else:  # a claim cycle that finds nothing (no runs of its type)
                dialect.cycle(conn, "bench", [], 10, 30.0, claim)

        for _ in range(50):  # warm: the named mode prepares on first use
            once()
        start = time.perf_counter()
        for _ in range(STATEMENTS):
            once()
        elapsed = time.perf_counter() - start
        raise _Undo
    return elapsed / STATEMENTS * 1e6


@pytest.mark.parametrize("statement", ["submit", "get", "cycle"])
def test_statement_modes(pg_available, statement):
    schema = f"bench_modes_{uuid.uuid4().hex[:8]}"
    figures = {}
    try:
        for mode, option in MODES.items():
            dsn = f"{pg_admin_dsn()}{'&' if '?' in pg_admin_dsn() else '?'}schema={schema}&{option}"
            with minflow.Client(dsn) as client:
                client.migrate()
                figures[mode] = median_of(repeats(), lambda c=client: _per_statement(c, statement))
    finally:
        conn = pg_connect(pg_admin_dsn())
        try:
            conn.run(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            conn.close()
    print(
        f"\n  postgres statement {statement:7} named {figures['named']:7.0f} us   "
        f"unnamed {figures['unnamed']:7.0f} us   ({STATEMENTS} per transaction, "
        f"median of {repeats()})"
    )
    assert figures["named"] > 0 and figures["unnamed"] > 0

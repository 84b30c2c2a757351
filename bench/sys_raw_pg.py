"""The PostgreSQL ceiling: hand-written pg8000 statements on minflow's own schema.

S2: a loop claims 100 due runs in one ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP
LOCKED)``, runs the no-op, and marks the 100 succeeded in one ``UPDATE``, each statement its own
transaction (committed with the server's durable defaults). S1: one prepared ``INSERT`` per run,
each its own transaction, and all runs in one ``INSERT ... SELECT FROM unnest(...)``. No events,
no heartbeats, no retries, no NOTIFY: what is left is the least work a durable queue on this
table can do, so the gap to it is the price of everything else. One of the benchmark's system
modules (the interface every ``bench/sys_*.py`` exposes); it has no S3 (no wake-ups) and no
settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pg8000.native

import harness
import minflow

NAME = "raw pg8000"
BACKENDS = ("postgres",)
SCENARIOS = frozenset({"S1", "S2"})

BATCH = 100
IDLE_SLEEP = 0.01  # seconds between claims that found nothing
LEASE = "30 seconds"

SETTINGS = (
    f"one connection and loop per worker process claiming {BATCH} runs per UPDATE ... FOR UPDATE "
    "SKIP LOCKED and completing them in one UPDATE; submits: one INSERT per transaction, and one "
    "INSERT ... SELECT FROM unnest for the bulk; prepared statements, autocommit, time-ordered "
    "ids like minflow's; minflow's schema and indexes"
)

DEFAULTS: dict = {}


def sweep(concurrencies) -> list[dict]:
    """Nothing to tune: one loop per process, the no-op needs no concurrency."""
    return [{}]


def describe(setting: dict) -> str:
    return f"{BATCH}/stmt"


_CLAIM = f"""
UPDATE workflow_run SET status = 'leased', attempt = attempt + 1, leased_by = :worker,
  lease_until = NOW() + INTERVAL '{LEASE}', updated_at = NOW()
WHERE id IN (SELECT id FROM workflow_run
             WHERE status = 'pending' AND deleted_at IS NULL AND run_at <= NOW()
             ORDER BY priority, run_at, created_at LIMIT {BATCH}
             FOR UPDATE SKIP LOCKED)
RETURNING id, payload"""

_COMPLETE = """
UPDATE workflow_run SET status = 'succeeded', updated_at = NOW()
WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'leased' AND leased_by = :worker"""

_COUNT_SQL = "SELECT count(*) FROM workflow_run WHERE status = 'succeeded'"


def _dsn(target: Any) -> str:
    return target.dsn


def _schema(dsn: str) -> str:
    """The schema minflow puts its tables in for this DSN (``schema=`` or ``search_path=``)."""
    options = dict(parse_qsl(urlsplit(dsn).query))
    if "schema" in options:
        return options["schema"]
    if "search_path" in options:
        return options["search_path"].split(",")[0].strip()
    return minflow.DEFAULT_SCHEMA


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _connect(dsn: str) -> Any:
    url = urlsplit(dsn)
    return pg8000.native.Connection(
        user=unquote(url.username or "postgres"),
        password=unquote(url.password) if url.password else None,
        host=url.hostname or "localhost",
        port=url.port or 5432,
        database=unquote(url.path.lstrip("/")) or None,
        startup_params={"search_path": _quote(_schema(dsn))},
    )


def prepare(target: Any) -> None:
    """Make an empty queue: drop minflow's schema and apply minflow's migrations."""
    release(target)
    conn = _connect(_dsn(target))
    try:
        conn.run(f"DROP SCHEMA IF EXISTS {_quote(_schema(_dsn(target)))} CASCADE")
    finally:
        conn.close()
    with minflow.Client(_dsn(target)) as client:
        client.migrate()


_INSERT = """
INSERT INTO workflow_run (id, type, payload, run_at, created_at, updated_at)
VALUES (CAST(:id AS uuid), 'noop', CAST(:payload AS jsonb), NOW(), NOW(), NOW())"""

_INSERT_MANY = """
INSERT INTO workflow_run (id, type, payload, run_at, created_at, updated_at)
SELECT id, 'noop', payload, NOW(), NOW(), NOW()
FROM unnest(CAST(:ids AS uuid[]), CAST(:payloads AS jsonb[])) AS j(id, payload)"""


@contextlib.contextmanager
def producer(target: Any) -> Iterator[Callable[[dict], None]]:
    """Yield ``submit(payload)``: one prepared INSERT, its own transaction."""
    conn = _connect(_dsn(target))
    try:
        insert = conn.prepare(_INSERT)
        yield lambda payload: insert.run(id=harness.time_ordered_id(), payload=json.dumps(payload))
    finally:
        conn.close()


def enqueue_bulk(target: Any, payloads: list[dict]) -> None:
    """Every payload in one INSERT ... SELECT FROM unnest (one statement, one transaction)."""
    conn = _connect(_dsn(target))
    try:
        conn.run(
            _INSERT_MANY,
            ids=[harness.time_ordered_id() for _ in payloads],
            payloads=[json.dumps(p) for p in payloads],
        )
    finally:
        conn.close()


def _count(target: Any, sql: str) -> int:
    # Its own connection: the search_path points at minflow's schema.
    return harness.scalar(target, sql, lambda: _connect(_dsn(target)))


release = harness.release_counter


def _loop(dsn: str, stop: threading.Event, handler: Callable[[Any], None] | None) -> None:
    worker = f"raw-{os.getpid()}-{threading.get_ident()}"
    conn = _connect(dsn)
    try:
        claim = conn.prepare(_CLAIM)
        complete = conn.prepare(_COMPLETE)
        while not stop.is_set():
            rows = claim.run(worker=worker)
            if not rows:
                stop.wait(IDLE_SLEEP)
                continue
            if handler is not None:
                for _, payload in rows:
                    handler(payload)
            complete.run(ids=[str(row[0]) for row in rows], worker=worker)
    finally:
        conn.close()


def serve(
    target: Any, setting: dict, mode: str, out: str | None, ready: Callable[[], None]
) -> None:
    """Run the claim/complete loop until SIGTERM (``setting`` is always empty)."""
    stop = threading.Event()
    sink = open(out, "a", buffering=1) if mode == "latency" else None  # noqa: SIM115
    try:
        handler = None
        if sink is not None:

            def handler(payload: Any) -> None:
                sink.write(f"{time.time() - payload['t']}\n")

        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        ready()
        _loop(_dsn(target), stop, handler)
    finally:
        if sink is not None:
            sink.close()


def latency_inprocess(target: Any, n: int, interval: float, setting: dict) -> list[float]:
    """Not measured: the ceiling has no wake-up mechanism to compare (no S3 in SCENARIOS)."""
    raise NotImplementedError("the raw ceilings take part in S1 and S2 only")


def done_count(target: Any) -> int:
    """Runs in status ``succeeded``."""
    return _count(target, _COUNT_SQL)


def remaining(target: Any) -> int:
    """Runs not finished yet, counted through the partial indexes."""
    return _count(
        target,
        "SELECT (SELECT count(*) FROM workflow_run WHERE status = 'pending' AND deleted_at IS NULL)"
        " + (SELECT count(*) FROM workflow_run WHERE status = 'leased')",
    )

"""The SQLite ceiling: hand-written stdlib sqlite3 statements on minflow's own schema.

S2: a loop claims 100 due runs in one ``UPDATE ... RETURNING``, runs the no-op, and marks the 100
succeeded in one ``UPDATE``, each in its own ``BEGIN IMMEDIATE`` transaction, with the durability
minflow uses by default (WAL, synchronous FULL). S1: one ``INSERT`` per transaction, and all runs
in one transaction. No events, no heartbeats, no retries: what is left is the least work a
durable queue on this table can do, so the gap to it is the price of everything else. One of the
benchmark's system modules (the interface every ``bench/sys_*.py`` exposes); it has no S3 (no
wake-ups) and no settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import harness
import minflow

NAME = "raw sqlite3"
BACKENDS = ("sqlite",)
SCENARIOS = frozenset({"S1", "S2"})

BATCH = 100
IDLE_SLEEP = 0.01  # seconds between claims that found nothing
BUSY_TIMEOUT_MS = minflow.SQLITE_BUSY_TIMEOUT_MS

SETTINGS = (
    f"one loop per worker process claiming {BATCH} runs per UPDATE ... RETURNING and completing "
    "them in one UPDATE, each in BEGIN IMMEDIATE; submits: one INSERT per transaction, and one "
    f"transaction for the bulk; WAL, synchronous=FULL and busy_timeout={BUSY_TIMEOUT_MS} ms like "
    "minflow's defaults; time-ordered ids like minflow's; minflow's schema and indexes"
)

DEFAULTS: dict = {}


def sweep(concurrencies) -> list[dict]:
    """Nothing to tune: one loop per process, the no-op needs no concurrency."""
    return [{}]


def describe(setting: dict) -> str:
    return f"{BATCH}/txn"


_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"

# The same INDEXED BY as minflow's claim: without statistics SQLite picks the seed's status index
# and sorts every due run on each claim, which no one tuning this loop would leave in place.
_CLAIM = f"""
UPDATE workflow_run SET status = 'leased', attempt = attempt + 1, leased_by = :worker,
  lease_until = strftime('%Y-%m-%d %H:%M:%f', 'now', '+30 seconds'), updated_at = {_NOW}
WHERE id IN (SELECT id FROM workflow_run INDEXED BY minflow_run_claim
             WHERE status = 'pending' AND deleted_at IS NULL AND run_at <= {_NOW}
             ORDER BY priority, run_at, created_at LIMIT {BATCH})
RETURNING id, payload"""

_COMPLETE = f"""
UPDATE workflow_run SET status = 'succeeded', updated_at = {_NOW}
WHERE status = 'leased' AND leased_by = ? AND id IN ({{marks}})"""

_COUNT_SQL = "SELECT count(*) FROM workflow_run WHERE status = 'succeeded'"


def _path(target: Any) -> str:
    return os.path.abspath(target.dsn)


def _minflow_dsn(target: Any) -> str:
    return "sqlite://" + _path(target)


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def prepare(target: Any) -> None:
    """Make an empty queue: delete the database file and apply minflow's migrations."""
    path = _path(target)
    release(target)
    harness.remove_sqlite(path)
    with minflow.Client(_minflow_dsn(target)) as client:
        client.migrate()


_INSERT = f"""
INSERT INTO workflow_run (id, type, payload, run_at, created_at, updated_at)
VALUES (?, 'noop', ?, {_NOW}, {_NOW}, {_NOW})"""


@contextlib.contextmanager
def producer(target: Any) -> Iterator[Callable[[dict], None]]:
    """Yield ``submit(payload)``: one INSERT, its own transaction (autocommit)."""
    conn = _connect(_path(target))
    try:
        yield lambda payload: conn.execute(
            _INSERT, (harness.time_ordered_id(), json.dumps(payload))
        )
    finally:
        conn.close()


def enqueue_bulk(target: Any, payloads: list[dict]) -> None:
    """Every payload inserted in one ``BEGIN IMMEDIATE`` transaction."""
    conn = _connect(_path(target))
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_INSERT, [(harness.time_ordered_id(), json.dumps(p)) for p in payloads])
        conn.execute("COMMIT")
    finally:
        conn.close()


def done_count(target: Any) -> int:
    """Runs in status ``succeeded``, read on a connection kept open between polls."""
    return harness.scalar(target, _COUNT_SQL)


def remaining(target: Any) -> int:
    """Runs not finished yet, through the partial indexes: cheap, as the queue drains."""
    return harness.scalar(
        target,
        "SELECT (SELECT count(*) FROM workflow_run WHERE status = 'pending' AND deleted_at IS NULL)"
        " + (SELECT count(*) FROM workflow_run WHERE status = 'leased')",
    )


release = harness.release_counter


def _loop(path: str, stop: threading.Event, handler: Callable[[Any], None] | None) -> None:
    worker = f"raw-{os.getpid()}-{threading.get_ident()}"
    conn = _connect(path)
    try:
        while not stop.is_set():
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(_CLAIM, {"worker": worker}).fetchall()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if not rows:
                stop.wait(IDLE_SLEEP)
                continue
            if handler is not None:
                for _, payload in rows:
                    handler(payload)
            ids = [row[0] for row in rows]
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(_COMPLETE.format(marks=", ".join("?" * len(ids))), [worker, *ids])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
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
                sink.write(f"{time.time() - json.loads(payload)['t']}\n")

        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        ready()
        _loop(_path(target), stop, handler)
    finally:
        if sink is not None:
            sink.close()


def latency_inprocess(target: Any, n: int, interval: float, setting: dict) -> list[float]:
    """Not measured: the ceiling has no wake-up mechanism to compare (no S3 in SCENARIOS)."""
    raise NotImplementedError("the raw ceilings take part in S1 and S2 only")

"""A worker and a client outlive their database going away: lost connections, a restarted
server, a locked SQLite file. Nothing is lost, and nothing runs twice unless its lease expired.

PostgreSQL tests stop and kill servers, so each uses a private cluster (``private_pg``).
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import minflow
from conftest import ROOT, db, pg_connect, wait_for

UTC = dt.timezone.utc
RUNS = 120


class Recorder:
    """A handler that records every execution and blocks until the test opens its gate."""

    def __init__(self):
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.executions: list[tuple[str, int]] = []

    def __call__(self, run: minflow.RunContext):
        with self.lock:
            self.executions.append((run.id, run.attempt))
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        return run.attempt

    def started(self) -> int:
        with self.lock:
            return len(self.executions)


def poll_errors(worker: minflow.Worker) -> float:
    return worker.metrics.value(
        "workflow_worker_poll_errors_total", worker_id=worker.worker_id, error_type="unavailable"
    )


def assert_executed_once_or_after_expiry(app: minflow.App, ids: list[str], executions) -> None:
    """Every run succeeded; a second execution only after a lease genuinely expired.

    From the event log: at most one ``started`` per attempt, attempts within max_attempts, and
    one more execution than the run had lease expiries (``retried`` with reason lease_expired).
    The handler's own record must agree with the event log.
    """
    per_run = collections.Counter(run_id for run_id, _ in executions)
    assert set(per_run) == set(ids)
    for run_id in ids:
        run = app.get(run_id)
        assert run.status == "succeeded", (run_id, run.status, run.last_error)
        assert run.attempt <= run.max_attempts
        events = app.events(run_id)
        starts = [e for e in events if e.event_type == "started"]
        leases = [e.data["attempt"] for e in events if e.event_type == "leased"]
        assert len(starts) == len(leases) == len(set(leases)) == run.attempt
        expiries = [
            e
            for e in events
            if e.event_type == "retried" and (e.data or {}).get("reason") == "lease_expired"
        ]
        assert per_run[run_id] == len(starts) == len(expiries) + 1, (run_id, events)
        assert [e.event_type for e in events].count("succeeded") == 1


def drain_through(app: minflow.App, outage, *, lease: float = 30.0) -> tuple[minflow.Worker, list]:
    """Start a worker on RUNS gated runs, call ``outage()`` while 4 are in flight, open the gate
    and wait until everything succeeded. Returns the worker (stopped) and the executions.

    With the default lease every outage here is far shorter than the lease, so each run must
    have run exactly once; a shorter lease allows re-runs, but only after an expiry."""
    handler = Recorder()
    app.handler("t")(handler)
    ids = app.submit_many([minflow.Job("t", {"n": n}) for n in range(RUNS)])
    worker = minflow.Worker(app, concurrency=4, lease=lease, schedules=False).start()
    try:
        wait_for(lambda: handler.started() == 4, 30, message="4 handlers in flight")
        outage(worker, handler)
        wait_for(
            lambda: app.stats() == {"t": {"succeeded": RUNS}}, 60, 0.05, "every run to succeed"
        )
        assert worker._thread.is_alive()
    finally:
        worker.stop(timeout=30)
    if lease >= 30:
        assert len(handler.executions) == RUNS
    assert_executed_once_or_after_expiry(app, ids, handler.executions)
    return worker, handler.executions


# -- PostgreSQL -----------------------------------------------------------------------------


@pytest.fixture
def pg_app(private_pg):
    app = minflow.App(private_pg.dsn + "?schema=resilience")
    app.migrate()
    yield app
    app.close()


def minflow_backends(cluster, terminate: bool = False) -> int:
    admin = pg_connect(cluster.dsn)
    try:
        rows = admin.run(
            f"SELECT {'pg_terminate_backend(pid)' if terminate else 'pid'} FROM pg_stat_activity "
            "WHERE application_name = 'minflow' AND pid <> pg_backend_pid()"
        )
    finally:
        admin.close()
    return len(rows)


def test_worker_survives_terminated_connections(private_pg, pg_app):
    def outage(worker, handler):
        # Every minflow connection dies: the claim loop's, the LISTEN one, the housekeeper's
        # (the side threads connect while the first claims run: wait for them).
        wait_for(lambda: minflow_backends(private_pg) >= 3, 30, message="3 connections")
        assert minflow_backends(private_pg, terminate=True) >= 3
        handler.gate.set()
        wait_for(lambda: poll_errors(worker) >= 1, 30, message="the loop to notice")

    worker, _ = drain_through(pg_app, outage)
    assert poll_errors(worker) >= 1


def test_worker_survives_a_server_restart_mid_drain(private_pg, pg_app):
    def outage(worker, handler):
        private_pg.stop("fast")
        handler.gate.set()  # outcomes now pile up in memory, to be written after the restart
        wait_for(lambda: poll_errors(worker) >= 2, 30, message="the loop to retry while down")
        assert worker._thread.is_alive()
        private_pg.start()

    worker, _ = drain_through(pg_app, outage)
    assert worker.processed == RUNS


def test_leases_that_expire_during_an_outage_are_rerun_once(private_pg, pg_app):
    """Down longer than the lease: the held runs may run again (their leases genuinely expired),
    but each at most once more, and the stale outcomes are fenced off."""
    leases = []

    def outage(worker, handler):
        # The 4 running and the runs in the worker's prefetch buffer.
        leases.extend(r.lease_until for r in pg_app.list(status="leased", limit=1000))
        assert 4 <= len(leases) <= 4 + worker.prefetch
        private_pg.stop("fast")
        handler.gate.set()
        # Heartbeats cannot reach the server now: wait out the leases (the condition is the
        # database's clock passing them; this machine's clock is that clock).
        wait_for(lambda: dt.datetime.now(UTC) > max(leases) + dt.timedelta(seconds=0.5), 30)
        assert worker._thread.is_alive()
        private_pg.start()

    _, executions = drain_through(pg_app, outage, lease=2.0)
    assert RUNS <= len(executions) <= RUNS + len(leases)


def test_client_raises_unavailable_while_the_server_is_down(private_pg, pg_app):
    run_id = pg_app.submit("t")
    private_pg.stop("fast")
    fresh = minflow.Client(private_pg.dsn + "?schema=resilience")
    calls = {
        "submit": lambda: pg_app.submit("t"),
        "get": lambda: pg_app.get(run_id),
        "list": lambda: pg_app.list(),
        "cancel": lambda: pg_app.cancel(run_id),
        "stats": pg_app.stats,
        "new client": lambda: fresh.get(run_id),
        "migrate": fresh.migrate,
    }
    outcomes = {}
    for name, call in calls.items():
        try:
            call()
            outcomes[name] = "no error"
        except Exception as exc:  # the type is the assertion
            outcomes[name] = type(exc).__name__
    assert outcomes == dict.fromkeys(calls, "Unavailable")

    private_pg.start()
    assert pg_app.get(run_id).status == "pending"
    assert fresh.get(run_id).status == "pending"
    assert pg_app.get(pg_app.submit("t")).status == "pending"
    fresh.close()


def test_client_works_after_a_restart_between_calls(private_pg, pg_app):
    """Pooled connections that died with the old server are replaced, not handed out."""
    run_id = pg_app.submit("t")
    assert pg_app.get(run_id) is not None  # the pool now holds a live connection
    private_pg.stop("fast")
    private_pg.start()
    assert pg_app.get(run_id).status == "pending"
    assert pg_app.get(pg_app.submit("t")).status == "pending"


# -- SQLite ---------------------------------------------------------------------------------


def test_sqlite_worker_survives_a_locked_database(tmp_path):
    """Another process holding the write lock longer than busy_timeout is an outage too."""
    path = tmp_path / "locked.db"
    app = minflow.App(f"sqlite:///{path}?busy_timeout=100")
    app.migrate()
    locker = sqlite3.connect(path, isolation_level=None)

    def outage(worker, handler):
        locker.execute("BEGIN IMMEDIATE")  # the single write lock, held by someone else
        try:
            handler.gate.set()
            wait_for(lambda: poll_errors(worker) >= 2, 30, message="the loop to hit the lock")
            with pytest.raises(minflow.Unavailable):
                app.submit("t")
        finally:
            locker.execute("COMMIT")

    try:
        drain_through(app, outage)
    finally:
        locker.close()
        app.close()


def test_sqlite_client_unavailable_until_the_file_can_be_opened(tmp_path):
    """A database that cannot be opened (here: its directory is missing) is Unavailable, and
    the same Client works once it can."""
    folder = tmp_path / "not-yet"
    client = minflow.Client(f"sqlite:///{folder / 'q.db'}")
    with pytest.raises(minflow.Unavailable):
        client.migrate()
    folder.mkdir()
    client.migrate()
    assert client.get(client.submit("t")).status == "pending"
    client.close()


# -- a lease that genuinely expires ---------------------------------------------------------


def test_rerun_after_expiry_while_the_first_execution_still_runs(app):
    """The worker's own rescue hands a run back to the same worker while the first execution
    is still running (its heartbeats failed). The two executions must be tracked apart: the
    stale one finishing must not make the worker forget the live one."""
    gates = {1: threading.Event(), 2: threading.Event()}
    started = {1: threading.Event(), 2: threading.Event()}

    @app.handler("t")
    def handler(run):
        started[run.attempt].set()
        if not gates[run.attempt].wait(30):
            raise TimeoutError("gate never opened")
        return run.attempt

    run_id = app.submit("t")
    worker = minflow.Worker(app, lease=1.0, schedules=False, backoff=lambda a: 0.0).start()
    try:
        assert started[1].wait(10)
        # As if attempt 1's heartbeats had stopped reaching the database: the lease runs out
        # and belongs to nobody, so the rescue sweep puts the run back to pending.
        db(
            app,
            "UPDATE workflow_run SET leased_by = 'unreachable', lease_until = {time:t} "
            "WHERE id = {uuid:id}",
            id=run_id,
            t=dt.datetime.now(UTC) - dt.timedelta(seconds=5),
        )
        assert started[2].wait(10), "the rescued run was not claimed again"
        assert worker.running == 2
        gates[1].set()  # the stale execution ends; its outcome is fenced off
        labels = {"workflow_type": "t", "worker_id": worker.worker_id, "status": "lost"}
        wait_for(lambda: worker.metrics.value("workflow_run_completed_total", **labels) == 1)
        assert worker.running == 1, "the live execution was forgotten (no heartbeats, no slot)"
        lease = app.get(run_id).lease_until
        # Still heartbeated: its lease keeps moving forward.
        wait_for(lambda: app.get(run_id).lease_until > lease, 10, 0.05, "a heartbeat")
        gates[2].set()
        wait_for(lambda: app.get(run_id).status == "succeeded", 10)
    finally:
        for gate in gates.values():
            gate.set()
        worker.stop(timeout=10)
    run = app.get(run_id)
    assert (run.attempt, run.result) == (2, 2)
    events = app.events(run_id)
    kinds = [e.event_type for e in events]
    assert kinds == ["created", "leased", "started", "retried", "leased", "started", "succeeded"]
    assert events[3].data["reason"] == "lease_expired"


def test_worker_started_before_the_server_waits_for_it(private_pg, tmp_path):
    dsn = private_pg.dsn + "?schema=late"
    with minflow.Client(dsn) as client:
        client.migrate()
        ids = client.submit_many([minflow.Job("proc.record") for _ in range(5)])
    private_pg.stop("fast")
    records = tmp_path / "records"
    records.mkdir()
    env = {**os.environ, "MINFLOW_TEST_RECORD_DIR": str(records)}
    log = tmp_path / "worker.stderr"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minflow", "worker", "tests.proc_app:app", "--dsn", dsn]
            + ["--no-schedules"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        # It has tried, failed and is retrying (or it gave up, which is the bug).
        wait_for(lambda: "retrying" in log.read_text() or proc.poll() is not None, 30)
        assert proc.poll() is None, log.read_text()[-2000:]
        private_pg.start()
        with minflow.Client(dsn) as client:
            wait_for(lambda: {client.get(i).status for i in ids} == {"succeeded"}, 30, 0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)


def test_buffered_runs_wait_while_heartbeats_fail(private_pg, pg_app):
    """With the database gone, a prefetched run whose lease, as the worker last knew it, has
    under a third left is not started: it waits for a heartbeat to extend it, or for the
    rescue once the lease expired."""
    handler = Recorder()
    pg_app.handler("t")(handler)
    ids = pg_app.submit_many([minflow.Job("t", {"n": n}) for n in range(3)])
    worker = minflow.Worker(pg_app, concurrency=1, prefetch=2, lease=3.0, schedules=False)
    worker.start()
    try:
        wait_for(lambda: handler.started() == 1, 30, message="one running")
        wait_for(lambda: len(pg_app.list(status="leased")) == 3, 30, message="two buffered")
        private_pg.stop("fast")
        # No heartbeat gets through now: wait until the buffered leases have under lease/3
        # left as far as the worker knows.
        wait_for(
            lambda: all(
                ctx._lease_end < time.monotonic() + worker.lease / 3 for ctx in worker._buffer
            ),
            30,
            message="the buffered leases to run low",
        )
        handler.gate.set()
        # The slot is handed on (or not) in the same step that queues the outcome.
        wait_for(lambda: worker._completions, 30, message="the running handler to finish")
        with worker._lock:
            assert worker.running == 0 and len(worker._buffer) == 2
        assert handler.started() == 1
        private_pg.start()
        wait_for(
            lambda: pg_app.stats() == {"t": {"succeeded": 3}}, 60, 0.05, "every run to succeed"
        )
    finally:
        handler.gate.set()
        worker.stop(timeout=30)
    assert_executed_once_or_after_expiry(pg_app, ids, handler.executions)

"""A worker and a client outlive their database going away: lost connections, a restarted
server, a locked SQLite file. Nothing is lost, and nothing runs twice unless its lease expired.

PostgreSQL tests stop and kill servers, so each uses a private cluster (``private_pg``).
"""

from __future__ import annotations

import collections
import datetime as dt
import errno
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


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_worker_survives_a_server_restart_mid_drain(private_pg, pg_app, mode):
    """``fast`` ends sessions cleanly; ``immediate`` is a crash: no shutdown checkpoint, so the
    server replays its WAL at the next start."""
    resumed = []

    def outage(worker, handler):
        private_pg.stop(mode)
        handler.gate.set()  # outcomes now pile up in memory, to be written after the restart
        wait_for(lambda: poll_errors(worker) >= 2, 30, message="the loop to retry while down")
        assert worker._thread.is_alive()
        private_pg.start()
        back = time.monotonic()
        wait_for(lambda: _succeeded(pg_app) > 0, 30, 0.02, "a first outcome after the restart")
        resumed.append(time.monotonic() - back)

    worker, executions = drain_through(pg_app, outage)
    assert worker.processed == RUNS
    print(
        f"\nreliability: PostgreSQL restart ({mode}) mid-drain, 4 runs in flight: lost 0 of "
        f"{RUNS}, duplicates {len(executions) - RUNS}, first outcome {resumed[0]:.2f} s after "
        "the server accepted connections again"
    )


def _succeeded(client: minflow.Client) -> int:
    try:
        return client.stats().get("t", {}).get("succeeded", 0)
    except minflow.Unavailable:
        return 0  # a pooled connection the server ended: the next call gets a fresh one


def test_worker_survives_a_backend_kill_storm(private_pg, pg_app):
    """Every minflow connection is terminated every 0.2 s for 5 s while 2,000 runs drain."""
    total = 2000
    executions: list[tuple[str, int]] = []
    lock = threading.Lock()

    @pg_app.handler("t")
    def handler(run):
        with lock:
            executions.append((run.id, run.attempt))
        time.sleep(0.02)  # work: 2,000 runs on 4 threads take 10 s, twice the storm

    ids = pg_app.submit_many([minflow.Job("t", {"n": n}) for n in range(total)])
    worker = minflow.Worker(pg_app, concurrency=4, schedules=False).start()
    kills = 0
    try:
        wait_for(lambda: len(executions) >= 100, 30, message="the drain to be under way")
        storm_end = time.monotonic() + 5
        while time.monotonic() < storm_end:
            kills += minflow_backends(private_pg, terminate=True)
            time.sleep(0.2)  # the storm's rhythm, not synchronisation
        done_at_end = _succeeded(pg_app)
        calm = time.monotonic()
        wait_for(lambda: _succeeded(pg_app) == total, 120, 0.05, "every run to succeed")
        drained = time.monotonic() - calm
        assert worker._thread.is_alive()
    finally:
        worker.stop(timeout=30)
    assert done_at_end < total, "the storm ended after the drain: it tested nothing"
    assert kills >= 25
    runs = collections.Counter(run_id for run_id, _ in executions)
    assert set(runs) == set(ids)
    duplicates = sum(runs.values()) - total
    assert duplicates == 0  # the lease (30 s) outlasts the storm: nothing may run twice
    assert {pg_app.get(i).status for i in ids[:50]} == {"succeeded"}
    print(
        f"\nreliability: PostgreSQL backend-kill storm, {kills} connections terminated in 5 s "
        f"mid-drain: lost 0 of {total}, duplicates {duplicates}, {poll_errors(worker):.0f} poll "
        f"errors, the remaining {total - done_at_end} runs drained {drained:.1f} s after the storm"
    )


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


# -- SQLite: a full disk, and processes killed inside write transactions -------------------


def _fill(directory) -> str:
    """Write a file into ``directory`` until its filesystem has no space left; its path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return path


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs of its own (mounting needs root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_sqlite_disk_full_is_unavailable_and_loses_nothing(small_disk, caplog):
    """The filesystem fills while a worker has runs in flight: submits raise Unavailable naming
    the full disk, the worker keeps its outcomes and retries, nothing committed is lost, the
    file stays consistent, and everything finishes once space is freed."""
    caplog.set_level("WARNING", logger="minflow")
    app = minflow.App(f"sqlite:///{small_disk / 'q.db'}")
    app.migrate()

    def outage(worker, handler):
        filler = _fill(small_disk)
        with pytest.raises(minflow.Unavailable, match="disk full") as refused:
            app.submit("t", {"refused": True})
        handler.gate.set()  # outcomes now cannot be written: they wait in the worker's memory
        wait_for(lambda: poll_errors(worker) >= 2, 30, message="the loop to hit the full disk")
        assert worker._thread.is_alive()
        assert app.stats()["t"].get("succeeded", 0) == 0  # reads work; writes wait
        freed = time.monotonic()
        os.remove(filler)
        wait_for(lambda: app.stats()["t"].get("succeeded", 0) > 0, 30, 0.02, "a write")
        resumed.append(time.monotonic() - freed)
        message.append(str(refused.value))

    resumed: list[float] = []
    message: list[str] = []
    try:
        worker, executions = drain_through(app, outage)
        assert app.list(type="t", limit=1000, status="pending") == []
        assert len(app.list(type="t", limit=1000)) == RUNS  # the refused submit left nothing
        (check,) = db(app, "PRAGMA integrity_check")
        assert check[0] == "ok"
        warnings = [r for r in caplog.records if "disk full" in r.getMessage()]
        assert warnings, "the worker never said the disk is full"
        print(
            f"\nreliability: SQLite disk full with 4 runs in flight: lost 0 of {RUNS}, "
            f"duplicates {len(executions) - RUNS}, integrity ok, resumed {resumed[0]:.2f} s "
            f"after space was freed; the submit raised Unavailable: {message[0]}"
        )
    finally:
        app.close()


_WRITER = r"""
import os, sqlite3, sys, time
import minflow

path, marks, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = minflow.Client(f"sqlite:///{path}")


def mark(text):
    fd = os.open(marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (text + "\n").encode())
    os.close(fd)


client.submit_many(minflow.Job("proc.record", {"batch": batch, "n": n}) for n in range(200))
mark(f"committed {batch}")
while not os.path.exists(f"{marks}.{batch}"):  # the test says when (after killing the worker)
    time.sleep(0.01)
# A second batch inside one write transaction, large enough (about 3.5 MB against SQLite's
# 2 MB page cache) that uncommitted pages are spilled into the WAL before the kill.
conn = sqlite3.connect(path, isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
for n in range(3000):
    client.submit("proc.record", {"batch": batch + 1, "n": n, "pad": "x" * 1000}, connection=conn)
mark(f"open {batch + 1}")
time.sleep(600)  # SIGKILLed here, its write transaction open
"""


def test_sqlite_processes_killed_inside_write_transactions(tmp_path):
    """Four times: a draining worker process is SIGKILLed mid-drain, and a producer is
    SIGKILLed holding an open write transaction whose pages have spilled into the WAL. The
    committed batches are whole, the uncommitted ones absent, the file consistent, and a new
    worker finishes every committed run."""
    path = tmp_path / "killed.db"
    marks = tmp_path / "marks"
    records = tmp_path / "records"
    records.mkdir()
    dsn = f"sqlite:///{path}"
    app = minflow.App(dsn)
    app.migrate()
    env = {**os.environ, "MINFLOW_TEST_RECORD_DIR": str(records), "PYTHONPATH": str(ROOT)}
    worker_cmd = [sys.executable, "-m", "minflow", "worker", "tests.proc_app:app", "--dsn", dsn]
    worker_cmd += ["--no-schedules", "--lease", "1"]
    procs: list[subprocess.Popen] = []

    def start(command, worker_id=None):
        extra = ["--worker-id", worker_id] if worker_id else []
        with open(tmp_path / f"{len(procs)}.stderr", "wb") as stderr:
            proc = subprocess.Popen(
                command + extra, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        procs.append(proc)
        return proc

    def kill(proc):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)

    held = 0
    spilled = []
    try:
        for cycle in range(4):
            batch = 2 * cycle
            worker_id = f"killed-{cycle}"
            worker = start(worker_cmd, worker_id)
            writer = start([sys.executable, "-c", _WRITER, str(path), str(marks), str(batch)])
            # The worker dies mid-drain: as soon as it has executed a run of the new batch.
            ran = records / f"{worker.pid}.log"
            wait_for(lambda ran=ran: ran.exists() and ran.stat().st_size, 60, 0.005, "a first run")
            kill(worker)
            held += len(app.list(status="leased", limit=1000))
            (tmp_path / f"marks.{batch}").touch()
            wait_for(
                lambda b=batch: marks.exists() and f"open {b + 1}" in marks.read_text(), 60, 0.02,
                f"batch {batch + 1} written and left open",
            )  # fmt: skip
            spilled.append(os.path.getsize(f"{path}-wal"))
            kill(writer)
        survivor = start(worker_cmd, "survivor")
        opened = time.monotonic()
        committed = {2 * cycle for cycle in range(4)}

        def finished() -> bool:
            return app.stats() == {"proc.record": {"succeeded": 200 * len(committed)}}

        wait_for(
            lambda: finished() or survivor.poll() is not None, 60, 0.05,
            "every committed run to succeed",
        )  # fmt: skip
        drained = time.monotonic() - opened
        log = tmp_path / f"{len(procs) - 1}.stderr"
        assert survivor.poll() is None, log.read_text(errors="replace")[-3000:]
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill(proc)
    batches = dict(
        db(app, "SELECT json_extract(payload, '$.batch'), COUNT(*) FROM workflow_run GROUP BY 1")
    )
    assert batches == dict.fromkeys(committed, 200), batches  # whole, or not there at all
    (check,) = db(app, "PRAGMA integrity_check")
    assert check[0] == "ok"
    runs = collections.Counter(
        fields[1] for lines in proc_app_records(records).values() for fields in lines
    )
    assert len(runs) == 200 * len(committed)  # every committed run executed
    duplicates = sum(runs.values()) - len(runs)
    assert duplicates <= held, (duplicates, held)
    app.close()
    print(
        f"\nreliability: SQLite, 4 producers SIGKILLed inside open write transactions "
        f"(WAL {min(spilled) / 2**20:.1f}-{max(spilled) / 2**20:.1f} MiB with uncommitted pages) "
        f"and 4 worker processes SIGKILLed mid-drain: committed batches whole (4 x 200), "
        f"uncommitted absent, integrity ok, lost 0, duplicates {duplicates} (runs held by the "
        f"killed workers: {held}); a new worker process finished the rest {drained:.1f} s "
        "after it started"
    )


def proc_app_records(directory) -> dict[int, list[list[str]]]:
    from tests import proc_app

    return proc_app.read_records(directory)


def test_buffered_runs_wait_while_heartbeats_fail(private_pg, pg_app):
    """With the database gone, a prefetched run whose lease, as the worker last knew it, has
    under a third left is not started: it waits for a heartbeat to extend it, or for the
    rescue once the lease expired."""
    handler = Recorder()
    pg_app.handler("t")(handler)
    pg_app.handler("warm")(lambda run: None)
    worker = minflow.Worker(pg_app, concurrency=1, prefetch=2, lease=3.0, schedules=False)
    worker.start()
    try:
        # One quick execution first: until the worker has seen one, it buffers nothing.
        warm = pg_app.submit("warm")
        wait_for(lambda: pg_app.get(warm).status == "succeeded", 30, message="the warm-up")
        ids = pg_app.submit_many([minflow.Job("t", {"n": n}) for n in range(3)])
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
            lambda: pg_app.stats().get("t") == {"succeeded": 3}, 60, 0.05, "every run to succeed"
        )
    finally:
        handler.gate.set()
        worker.stop(timeout=30)
    assert_executed_once_or_after_expiry(pg_app, ids, handler.executions)

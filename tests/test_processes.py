"""Several processes on one queue: draining, idempotency, migrations, signals, crash loops.

Workers here are real ``python -m minflow worker tests.proc_app:app`` subprocesses (or spawned
``multiprocessing`` children). Handlers leave side records in files (see ``proc_app``), which are
checked against the event log. Every process a test starts is stopped by that test, by pid.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import minflow
from conftest import ROOT, db, wait_for
from tests import proc_app

pytestmark = pytest.mark.slow


class WorkerProcess:
    """``python -m minflow worker tests.proc_app:app`` with stderr in a file to poll."""

    def __init__(self, dsn: str, records: Path, *args: str, env: dict | None = None):
        self.log = records / f"worker-{time.monotonic_ns()}.stderr"
        environment = {
            **os.environ,
            "MINFLOW_DSN": dsn,
            "MINFLOW_TEST_RECORD_DIR": str(records),
            **(env or {}),
        }
        with open(self.log, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "minflow", "worker", "tests.proc_app:app", "--dsn", dsn]
                + ["--no-schedules", *args],
                cwd=ROOT,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {self.pid} still running after {timeout}s:\n{self.stderr()}")

    def stdout(self) -> str:
        return self.proc.stdout.read().decode() if self.proc.stdout else ""

    def kill(self) -> None:
        """Stop this process (by its pid) if a failed assertion left it running."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def workers():
    """Start worker subprocesses; any still alive at teardown are killed by pid."""
    started: list[WorkerProcess] = []

    def start(*args, **kwargs) -> WorkerProcess:
        worker = WorkerProcess(*args, **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture
def records(tmp_path) -> Path:
    path = tmp_path / "records"
    path.mkdir()
    return path


def event_counts(client) -> dict[str, collections.Counter]:
    """{run id: Counter(event_type)} from one query over the whole event log."""
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for run_id, event_type, count in db(
        client,
        "SELECT workflow_id, event_type, COUNT(*) FROM workflow_event "
        "GROUP BY workflow_id, event_type",
    ):
        out[str(run_id)][event_type] = int(count)
    return out


def status_of(client, run_ids) -> collections.Counter:
    return collections.Counter(client.get(run_id).status for run_id in run_ids)


# -- draining -------------------------------------------------------------------------------


def test_four_processes_drain_2000_runs_exactly_once(dsn, dialect, records, workers):
    """4 worker processes x 4 handler threads drain 2,000 runs: each executed once, none lost."""
    total, processes = 2000, 4
    client = minflow.Client(dsn)
    client.migrate()
    ids = client.submit_many([minflow.Job("proc.record", {"n": i}) for i in range(total)])
    assert len(set(ids)) == total
    barrier = records / "barrier"
    barrier.mkdir()

    started = time.monotonic()
    procs = [
        workers(
            dsn,
            records,
            "--burst",
            "--concurrency",
            "4",
            "--worker-id",
            f"drain-{i}",
            env={"MINFLOW_TEST_BARRIER": f"{barrier}:{processes}"},
        )
        for i in range(processes)
    ]
    # One deadline for all four, inside pytest's own timeout, so a stall fails with the
    # workers' logs and the queue's state rather than a bare timeout.
    deadline = started + 100
    for p in procs:
        try:
            p.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"drain not finished after 100s: {client.stats()}\n"
                + "\n".join(f"--- {q.pid}:\n{q.stderr()[-1500:]}" for q in procs)
            )
    codes = [p.proc.returncode for p in procs]
    wall = time.monotonic() - started
    assert codes == [0] * processes, [p.stderr()[-2000:] for p in procs]
    executed = sum(int(p.stdout().split()[0]) for p in procs)

    # The side records: every run ran exactly once, across all processes together.
    by_pid = proc_app.read_records(records)
    ran = [fields[1] for lines in by_pid.values() for fields in lines if fields[0] == "ran"]
    assert len(ran) == total and set(ran) == set(ids)
    assert executed == total
    # Several processes took part (else this would not be a concurrency test at all).
    per_process = sorted((len(lines) for lines in by_pid.values()), reverse=True)
    assert len(per_process) >= 2, per_process

    # The event log agrees: one lease, one start, one success per run, nothing else.
    counts = event_counts(client)
    assert set(counts) == set(ids)
    for run_id in ids:
        assert counts[run_id] == {"created": 1, "leased": 1, "started": 1, "succeeded": 1}, run_id
    assert client.stats() == {"proc.record": {"succeeded": total}}
    assert {r.attempt for r in client.list(limit=1000)} == {1}

    first_claim, last_done = db(
        client,
        "SELECT MIN(CASE WHEN event_type = 'leased' THEN created_at END), "
        "MAX(CASE WHEN event_type = 'succeeded' THEN created_at END) FROM workflow_event",
    )[0]
    span = (minflow._parse_time(last_done) - minflow._parse_time(first_claim)).total_seconds()
    print(
        f"\n[drain] {dialect}: {total} runs, {processes} processes x 4 threads: "
        f"{span:.2f}s from first claim to last completion (database clock), "
        f"{wall:.2f}s wall including process start-up; runs per process {per_process}"
    )
    client.close()


# -- idempotency ----------------------------------------------------------------------------


def _assert_one_run(dsn: str, key: str, ids: list[str], submitters: int) -> None:
    assert len(ids) == submitters and len(set(ids)) == 1, collections.Counter(ids)
    with minflow.Client(dsn) as client:
        rows = client.list(idempotency_key=key)
        assert [r.id for r in rows] == [ids[0]]
        assert db(client, "SELECT COUNT(*) FROM workflow_run")[0][0] == 1
        # Exactly one submitter created it: one 'created' event, its payload one of theirs.
        assert [e.event_type for e in client.events(ids[0])] == ["created"]
        assert rows[0].payload["n"] in range(submitters)


def test_sixteen_threads_submit_one_key(dsn):
    """16 threads, each with its own Client, submit one key at the same instant."""
    minflow.Client(dsn).migrate()
    barrier = threading.Barrier(16)
    results: list = [None] * 16

    def submit(n: int) -> None:
        try:
            with minflow.Client(dsn) as client:
                client.stats()  # connect first: the barrier should line up the inserts
                barrier.wait(30)
                results[n] = client.submit("idem.thread", {"n": n}, idempotency_key="one-key")
        except Exception as exc:  # kept and asserted below: a thread cannot fail the test
            results[n] = exc

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    errors = [r for r in results if not isinstance(r, str)]
    assert errors == []
    _assert_one_run(dsn, "one-key", results, 16)


def _spawn_and_go(target, dsn: str, count: int, *args) -> list:
    """Run ``target`` in ``count`` spawned processes, release them together, collect results."""
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=target, args=(dsn, *args, n, ready, go, results)) for n in range(count)
    ]
    for proc in procs:
        proc.start()
    try:
        arrived = set()
        deadline = time.monotonic() + 60
        while len(arrived) < count:
            try:
                arrived.add(ready.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    pytest.fail(f"only {len(arrived)} of {count} processes got ready")
            # A child that died before reporting ready would otherwise cost the whole deadline.
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"children died before the start: {dead}"
        go.set()
        out = [results.get(timeout=60) for _ in range(count)]
        for proc in procs:
            proc.join(30)
        assert [p.exitcode for p in procs] == [0] * count
        return sorted(out)
    finally:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(10)


def test_sixteen_processes_submit_one_key(dsn):
    """16 processes submit one key at the same instant: one row, the same id for all."""
    minflow.Client(dsn).migrate()
    out = _spawn_and_go(proc_app.submit_same_key, dsn, 16, "proc-key")
    assert [status for _, status, _ in out] == ["ok"] * 16, out
    _assert_one_run(dsn, "proc-key", [run_id for _, _, run_id in out], 16)


# -- migrations -----------------------------------------------------------------------------


def test_ten_processes_migrate_a_fresh_database_at_once(dsn):
    """migrate() from 10 processes at the same moment: all succeed, each version applied once."""
    out = _spawn_and_go(proc_app.migrate_at_once, dsn, 10)
    assert [status for _, status, _ in out] == ["ok"] * 10, out
    migrations = len(minflow._PG_MIGRATIONS)
    # Every migration was applied by exactly one process, and every process saw the result.
    assert sum(applied for _, _, (applied, _) in out) == migrations
    assert {version for _, _, (_, version) in out} == {minflow.SCHEMA_VERSION}
    with minflow.Client(dsn) as client:
        rows = db(client, "SELECT version, COUNT(*) FROM minflow_migration GROUP BY version")
        assert sorted((v, int(c)) for v, c in rows) == [
            (v, 1) for v in range(1, minflow.SCHEMA_VERSION + 1)
        ]
        assert client.migrate() == 0
        run_id = client.submit("t")  # the schema is whole, not just the version table
        assert client.get(run_id).status == "pending"


# -- signals --------------------------------------------------------------------------------


def _starts(records: Path) -> list[list[str]]:
    return [
        f for lines in proc_app.read_records(records).values() for f in lines if f[0] == "start"
    ]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_first_signal_lets_running_handlers_finish_and_exits_zero(dsn, records, workers, signum):
    client = minflow.Client(dsn)
    client.migrate()
    ids = [client.submit("proc.gate", {"n": n}) for n in range(5)]
    worker = workers(dsn, records, "--concurrency", "3", "--worker-id", "graceful")
    in_flight = wait_for(lambda: len(_starts(records)) == 3 and _starts(records), 30, 0.02)
    running = {fields[1] for fields in in_flight}

    worker.proc.send_signal(signum)
    name = signal.Signals(signum).name
    wait_for(lambda: f"{name} received" in worker.stderr(), 15, 0.02, f"the worker to log {name}")
    # Handlers are still blocked on the gate: the worker must be waiting for them, not gone.
    assert worker.proc.poll() is None
    (records / "gate").touch()
    assert worker.wait(30) == 0, worker.stderr()[-3000:]

    for run_id in ids:
        run = client.get(run_id)
        if run_id in running:
            assert (run.status, run.attempt, run.result) == ("succeeded", 1, {"pid": worker.pid})
        else:
            # Stopped claiming at the first signal: the rest were never touched.
            assert (run.status, run.attempt, run.leased_by) == ("pending", 0, None)
    done = [f for lines in proc_app.read_records(records).values() for f in lines if f[0] == "done"]
    assert {fields[1] for fields in done} == running
    client.close()


def test_a_double_ctrl_c_is_one_signal(dsn, records, workers):
    """Two SIGINTs a moment apart (a terminal's double press) stop the worker gracefully; the
    handler only notes a signal, so nothing logs from inside it ("--- Logging error ---")."""
    client = minflow.Client(dsn)
    client.migrate()
    run_id = client.submit("proc.gate")
    worker = workers(dsn, records, "--worker-id", "pressed-twice")
    wait_for(lambda: len(_starts(records)) == 1, 30, 0.02, "the handler to start")
    worker.proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    worker.proc.send_signal(signal.SIGINT)
    wait_for(lambda: "ignored" in worker.stderr(), 15, 0.02, "the second SIGINT to be ignored")
    assert worker.proc.poll() is None  # still waiting for the running handler
    (records / "gate").touch()
    assert worker.wait(30) == 0, worker.stderr()[-3000:]
    assert client.get(run_id).status == "succeeded"
    log = worker.stderr()
    assert log.count("SIGINT received") == 2 and "Logging error" not in log, log[-3000:]
    client.close()


def test_second_sigterm_forces_exit_and_leases_are_rescued(dsn, records, workers):
    client = minflow.Client(dsn)
    client.migrate()
    ids = [client.submit("proc.gate", {"n": n}) for n in range(2)]
    # A short lease so the abandoned runs are rescued within a second or so.
    first = workers(dsn, records, "--concurrency", "2", "--lease", "1", "--worker-id", "forced")
    wait_for(lambda: len(_starts(records)) == 2, 30, 0.02, "both handlers to start")

    first.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in first.stderr(), 15, 0.02, "the worker to log SIGTERM")
    time.sleep(minflow.SIGNAL_DEBOUNCE + 0.1)  # a second signal sooner is taken for a double press
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(30) != 0, "a forced exit must not look like a clean one"
    assert "exiting now" in first.stderr()
    assert [client.get(i).status for i in ids] == ["leased", "leased"]  # nothing recorded

    # Another worker rescues the expired leases and runs them to completion.
    (records / "gate").touch()
    second = workers(dsn, records, "--concurrency", "2", "--lease", "1", "--worker-id", "rescuer")
    wait_for(lambda: status_of(client, ids) == {"succeeded": 2}, 30, 0.05, "the runs to finish")
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0, second.stderr()[-3000:]

    for run_id in ids:
        run = client.get(run_id)
        assert (run.attempt, run.leased_by, run.result) == (2, "rescuer", {"pid": second.pid})
        events = client.events(run_id)
        kinds = [e.event_type for e in events]
        assert kinds == [
            "created",
            "leased",
            "started",
            "retried",
            "leased",
            "started",
            "succeeded",
        ], kinds
        assert events[3].data["reason"] == "lease_expired"
        assert events[3].data["worker_id"] == "forced"
    by_pid = proc_app.read_records(records)
    assert sorted(f[0] for f in by_pid[first.pid]) == ["start", "start"]  # never finished
    assert sorted(f[0] for f in by_pid[second.pid]) == ["done", "done", "start", "start"]
    client.close()


def test_a_dead_workers_run_is_taken_over_within_a_second_of_lease_expiry(dsn, records, workers):
    """A worker holding a run with a 2 s lease is killed; a survivor with the default 30 s
    lease (so its own lease does not pace its sweep) runs it about a second after expiry."""
    app = minflow.App(dsn)
    app.migrate()
    run_id = app.submit("proc.gate")
    dying = workers(dsn, records, "--lease", "2", "--worker-id", "dying")
    wait_for(lambda: len(_starts(records)) == 1, 30, 0.02, "the handler to start")
    taken = threading.Event()
    app.handler("proc.gate")(lambda run: taken.set() or "taken over")
    survivor = minflow.Worker(app, schedules=False, worker_id="survivor").start()
    try:
        dying.kill()
        [[now]] = db(app, "SELECT {now}")
        remaining = (app.get(run_id).lease_until - minflow._parse_time(now)).total_seconds()
        expiry = time.monotonic() + remaining
        assert 0 < remaining <= 2.1
        assert taken.wait(remaining + 20), "never taken over"
        late = time.monotonic() - expiry
        assert late < 1.5, f"taken over {late:.2f}s after the lease expired"
        wait_for(lambda: app.get(run_id).status == "succeeded", 10, 0.02)
    finally:
        survivor.stop(timeout=10)
    run = app.get(run_id)
    assert (run.attempt, run.leased_by, run.result) == (2, "survivor", "taken over")
    assert [e.event_type for e in app.events(run_id)].count("succeeded") == 1
    print(
        f"\nreliability: worker SIGKILLed holding a run (lease 2 s), {app.dialect}: lost 0, "
        f"executed again once (it was mid-execution), taken over {late:.2f} s after the lease "
        f"expired ({remaining + late:.2f} s after the kill)"
    )
    app.close()


def test_a_worker_paused_past_its_lease_is_fenced_and_resumes(dsn, records, workers):
    """SIGSTOP freezes a worker holding three runs (a VM paused, a process swapped out): a
    second worker takes them over once the 2 s leases expire; after SIGCONT the frozen
    worker's handlers finish, but their outcomes are fenced off, and it claims work again."""
    client = minflow.Client(dsn)
    client.migrate()
    ids = [client.submit("proc.gate", {"n": n}) for n in range(3)]
    frozen = workers(dsn, records, "--concurrency", "3", "--lease", "2", "--worker-id", "frozen")
    wait_for(lambda: len(_starts(records)) == 3, 30, 0.02, "three handlers to start")
    os.kill(frozen.pid, signal.SIGSTOP)
    paused = time.monotonic()
    try:
        other = workers(dsn, records, "--concurrency", "3", "--worker-id", "other")
        wait_for(lambda: len(_starts(records)) == 6, 30, 0.02, "the runs to be taken over")
        taken_over = time.monotonic() - paused
        (records / "gate").touch()
        wait_for(lambda: status_of(client, ids) == {"succeeded": 3}, 30, 0.05, "the outcomes")
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    resumed = time.monotonic()

    # The frozen worker's handlers now finish (the gate is open): three late outcomes.
    def frozen_done() -> int:
        return sum(f[0] == "done" for f in proc_app.read_records(records).get(frozen.pid, []))

    wait_for(lambda: frozen_done() == 3, 30, 0.02, "the frozen worker's handlers to finish")
    other.proc.send_signal(signal.SIGTERM)
    assert other.wait(30) == 0, other.stderr()[-3000:]
    late = client.submit("proc.record")
    wait_for(lambda: client.get(late).status == "succeeded", 30, 0.02, "the frozen one to claim")
    claimed_again = time.monotonic() - resumed
    assert client.get(late).leased_by == "frozen"
    for run_id in ids:
        run = client.get(run_id)
        assert (run.status, run.attempt, run.leased_by) == ("succeeded", 2, "other")
        kinds = [e.event_type for e in client.events(run_id)]
        assert kinds.count("succeeded") == 1 and kinds.count("started") == 2, kinds
    frozen.proc.send_signal(signal.SIGTERM)
    assert frozen.wait(30) == 0, frozen.stderr()[-3000:]
    print(
        f"\nreliability: worker paused (SIGSTOP) past its 2 s lease holding 3 runs, "
        f"{client.dialect}: lost 0, 3 executed again by the other worker, duplicate outcomes 0 "
        f"(the paused worker's were fenced off), taken over {taken_over:.2f} s after the "
        f"pause, the paused worker claimed again {claimed_again:.2f} s after SIGCONT"
    )
    client.close()


# -- crash loops ----------------------------------------------------------------------------


def test_crash_loop_ends_in_failed_at_max_attempts(dsn, records, workers):
    """A handler that kills its worker process: after max_attempts the run is failed, not looping."""
    client = minflow.Client(dsn)
    client.migrate()
    run_id = client.submit("proc.crash", max_attempts=3)
    lease = ("--lease", "0.5", "--concurrency", "1")

    for attempt in (1, 2, 3):
        # Each worker waits for the previous one's lease to expire, rescues, claims, and dies.
        worker = workers(dsn, records, *lease, "--worker-id", f"crash-{attempt}")
        assert worker.wait(60) == proc_app.CRASH_EXIT, worker.stderr()[-3000:]
        run = client.get(run_id)
        assert (run.status, run.attempt, run.leased_by) == ("leased", attempt, f"crash-{attempt}")

    last = workers(dsn, records, *lease, "--worker-id", "survivor")
    wait_for(lambda: client.get(run_id).status == "failed", 30, 0.05, "the rescue to give up")
    last.proc.send_signal(signal.SIGTERM)
    assert last.wait(30) == 0, last.stderr()[-3000:]

    run = client.get(run_id)
    assert (run.status, run.attempt) == ("failed", 3)
    assert "lease expired" in run.last_error
    events = client.events(run_id)
    assert [e.event_type for e in events].count("started") == 3
    rescues = [e for e in events if e.event_type in ("retried", "failed")]
    assert [(e.event_type, e.data["reason"], e.data["attempt"]) for e in rescues] == [
        ("retried", "lease_expired", 1),
        ("retried", "lease_expired", 2),
        ("failed", "lease_expired", 3),
    ]
    crashes = [f for lines in proc_app.read_records(records).values() for f in lines]
    assert sorted(f[2] for f in crashes if f[0] == "crash") == ["1", "2", "3"]

    # Not an infinite loop: yet another worker finds nothing to do.
    again = workers(dsn, records, *lease, "--burst", "--worker-id", "after")
    assert again.wait(60) == 0
    assert again.stdout().strip() == "0 runs executed"
    assert client.get(run_id).status == "failed"
    client.close()

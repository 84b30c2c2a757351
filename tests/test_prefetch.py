"""The worker's prefetch buffer (Worker(prefetch=N)) on both dialects: claim order, leases,
release on a clean stop, takeover after a crash, caps and cancellation."""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import minflow
from conftest import ROOT, db, event_types, wait_for

NO_WAIT = {"backoff": lambda attempt: 0.0, "schedules": False}


def _held(app, worker_id: str) -> int:
    return db(
        app,
        "SELECT COUNT(*) FROM workflow_run WHERE status = 'leased' AND leased_by = :w",
        w=worker_id,
    )[0][0]


def _warm_up(app) -> None:
    """Let the worker see an execution finish quickly: until one has, its buffer holds nothing
    (it cannot tell quick handlers from slow ones), and a claim takes only the free slots."""
    run_id = app.submit("warm")
    wait_for(lambda: app.get(run_id).status == "succeeded", message="the warm-up run")


def _blocking_handler(app, run_type: str = "t"):
    """A handler that records what it ran and waits on ``release`` for the payload "block"."""
    seen: list = []
    first, release = threading.Event(), threading.Event()
    app.handler("warm")(lambda run: None)

    @app.handler(run_type)
    def job(run):
        seen.append(run.payload)
        if run.payload == "block":
            first.set()
            release.wait(20)
        return run.attempt

    return seen, first, release


def test_prefetch_is_validated(app):
    app.handler("t")(lambda run: None)
    for bad in (-1, 1.5, "4", None):
        with pytest.raises(minflow.InvalidInput, match="prefetch"):
            minflow.Worker(app, prefetch=bad)
    assert minflow.Worker(app, prefetch=0).prefetch == 0
    assert minflow.Worker(app).prefetch == minflow.DEFAULT_PREFETCH


def test_prefetched_runs_start_in_claim_order(app):
    seen, first, release = _blocking_handler(app)
    worker = minflow.Worker(app, worker_id="pf", concurrency=1, prefetch=4, **NO_WAIT).start()
    try:
        _warm_up(app)
        blocker = app.submit("t", "block", priority=0)
        assert first.wait(10)
        # Submitted while the only slot is busy, out of order: the next claim buffers them.
        ids = {
            name: app.submit("t", name, priority=priority)
            for name, priority in [("c", 30), ("a", 10), ("d", 40), ("b", 20)]
        }
        wait_for(lambda: _held(app, "pf") == 5, message="the four runs buffered")
        # Claimed, not started: leased events only.
        for run_id in ids.values():
            assert event_types(app, run_id) == ["created", "leased"]
        assert app.get(ids["a"]).attempt == 1
        release.set()
        wait_for(lambda: len(seen) == 5, message="every run executed")
    finally:
        release.set()
        worker.stop(timeout=20)
    assert seen == ["block", "a", "b", "c", "d"]
    for run_id in ids.values():
        assert event_types(app, run_id) == ["created", "leased", "started", "succeeded"]
        assert app.get(run_id).status == "succeeded"
    assert event_types(app, blocker) == ["created", "leased", "started", "succeeded"]


def test_a_clean_stop_gives_back_buffered_runs_without_charging_an_attempt(app, caplog):
    seen, first, release = _blocking_handler(app)
    worker = minflow.Worker(app, worker_id="pf", concurrency=1, prefetch=3, **NO_WAIT).start()
    try:
        _warm_up(app)
        app.submit("t", "block", max_attempts=1)
        assert first.wait(10)
        # max_attempts=1: were the buffer to cost an attempt, these could never run again.
        waiting = [app.submit("t", f"w{i}", max_attempts=1) for i in range(3)]
        wait_for(lambda: _held(app, "pf") == 4, message="three runs buffered")
        assert {app.get(r).attempt for r in waiting} == {1}
        stopper = threading.Thread(target=worker.stop, kwargs={"timeout": 20})
        with caplog.at_level(logging.INFO, logger="minflow.worker"):
            stopper.start()
            # Given back at once, while the running handler still runs.
            wait_for(
                lambda: all(app.get(r).status == "pending" for r in waiting),
                message="buffered runs back to pending",
            )
            assert worker.running == 1
            release.set()
            stopper.join(20)
        assert not stopper.is_alive()
    finally:
        release.set()
        worker.stop(timeout=20)
    assert seen == ["block"]
    assert "gave back 3 prefetched runs" in caplog.text
    assert worker.metrics.value("workflow_run_released_total", worker_id="pf") == 3
    for run_id in waiting:
        run = app.get(run_id)
        assert (run.status, run.attempt) == ("pending", 0)
        events = app.events(run_id)
        assert [e.event_type for e in events] == ["created", "leased", "retried"]
        assert events[-1].data == {"reason": "released", "attempt": 0, "worker_id": "pf"}
    # Another worker runs them on their one and only attempt.
    minflow.Worker(app, worker_id="next", prefetch=0, **NO_WAIT).run(burst=True)
    for run_id in waiting:
        run = app.get(run_id)
        assert (run.status, run.attempt, run.result) == ("succeeded", 1, 1)


_CRASHING_WORKER = """
import sys, threading
sys.path.insert(0, {root!r})
import minflow
app = minflow.App({dsn!r})
app.handler("warm")(lambda run: None)
app.handler("t")(lambda run: threading.Event().wait(600))
minflow.Worker(app, worker_id="doomed", concurrency=1, prefetch=3, lease=2,
               schedules=False).run()
"""


def test_buffered_runs_of_a_killed_worker_are_taken_over_after_lease_expiry(app, tmp_path):
    script = tmp_path / "doomed.py"
    script.write_text(_CRASHING_WORKER.format(root=str(ROOT), dsn=app.dsn))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.DEVNULL)
    try:
        _warm_up(app)
        ids = [app.submit("t", i) for i in range(4)]
        wait_for(lambda: _held(app, "doomed") == 4, timeout=30, message="one running, 3 buffered")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    done = []
    app.handler("t")(lambda run: done.append(run.id) or run.attempt)
    worker = minflow.Worker(app, worker_id="heir", **NO_WAIT).start()
    try:
        wait_for(lambda: len(done) == 4, timeout=30, message="the heir to run all four")
    finally:
        worker.stop(timeout=20)
    assert sorted(done) == sorted(ids)
    for run_id in ids:
        run = app.get(run_id)
        # A crash costs the attempt of every run it held, buffered or running, as before.
        assert (run.status, run.attempt, run.leased_by) == ("succeeded", 2, "heir")
        rescue = [e for e in app.events(run_id) if e.event_type == "retried"]
        assert [e.data["reason"] for e in rescue] == ["lease_expired"]


def test_prefetch_respects_a_handler_concurrency_cap(app):
    running: collections.Counter = collections.Counter()
    peak: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def track(run):
        with lock:
            running[run.type] += 1
            peak[run.type] = max(peak[run.type], running[run.type])
        time.sleep(0.02)
        with lock:
            running[run.type] -= 1

    app.handler("capped", concurrency=1)(track)
    app.handler("free")(track)
    for i in range(12):
        app.submit("capped", i)
        app.submit("free", i)
    worker = minflow.Worker(app, worker_id="pf", concurrency=4, prefetch=8, **NO_WAIT)
    held_capped = []
    stop = threading.Event()

    def watch():  # a capped type is never buffered beyond its cap either
        while not stop.is_set():
            held_capped.append(
                db(
                    app,
                    "SELECT COUNT(*) FROM workflow_run WHERE status = 'leased' AND type = 'capped'",
                )[0][0]
            )
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert worker.run(burst=True) == 24
    finally:
        stop.set()
        watcher.join(10)
    assert peak["capped"] == 1
    assert peak["free"] >= 2
    assert held_capped and max(held_capped) <= 1
    assert {r.status for r in app.list(limit=100)} == {"succeeded"}


def test_a_run_cancelled_in_the_buffer_is_dropped_unstarted(app, caplog):
    seen, first, release = _blocking_handler(app)
    worker = minflow.Worker(app, worker_id="pf", concurrency=1, prefetch=2, lease=1.5, **NO_WAIT)
    with caplog.at_level(logging.INFO, logger="minflow.worker"):
        worker.start()
        try:
            _warm_up(app)
            app.submit("t", "block")
            assert first.wait(10)
            doomed = app.submit("t", "doomed")
            kept = app.submit("t", "kept")
            wait_for(lambda: _held(app, "pf") == 3, message="two runs buffered")
            app.cancel(doomed)
            # The heartbeat (every lease/3 = 0.5 s) finds the lease gone and drops the run.
            wait_for(lambda: "dropped unstarted" in caplog.text, message="the buffered run dropped")
            release.set()
            wait_for(lambda: app.get(kept).status == "succeeded", message="the kept run")
        finally:
            release.set()
            worker.stop(timeout=20)
    assert seen == ["block", "kept"]
    assert app.get(doomed).status == "cancelled"
    assert event_types(app, doomed) == ["created", "leased", "cancelled"]


def test_the_buffer_stays_empty_until_handlers_are_seen_to_be_quick(app):
    """A claim takes only the free slots while no execution has finished, and while the
    handlers are slow (the slots would not reach a buffered run within PREFETCH_HORIZON):
    those runs stay in the database, where any worker may take them."""
    seen, first, release = _blocking_handler(app)
    app.handler("slow")(lambda run: time.sleep(0.3))
    for n in range(6):
        app.submit("t", "block" if n == 0 else n)
    worker = minflow.Worker(app, worker_id="pf", concurrency=1, prefetch=8, **NO_WAIT).start()
    try:
        assert first.wait(10)
        # Blocked before any execution finished: one run held, five still pending.
        wait_for(lambda: app.stats()["t"].get("pending") == 5, message="the claim to settle")
        assert _held(app, "pf") == 1
        release.set()
        wait_for(lambda: len(seen) == 6, message="every run executed")
    finally:
        release.set()
        worker.stop(timeout=20)
    # Slow executions from the start (0.3 s each, above the horizon of 0.05 s per slot).
    ids = [app.submit("slow") for _ in range(4)]
    worker = minflow.Worker(app, worker_id="slow", concurrency=1, prefetch=8, **NO_WAIT).start()
    held = []
    try:
        while any(app.get(r).status != "succeeded" for r in ids):
            held.append(_held(app, "slow"))
            time.sleep(0.005)
    finally:
        worker.stop(timeout=20)
    assert held and max(held) == 1

"""Handler execution on both dialects: async def handlers, per-handler policies (backoff,
timeout, concurrency) and bounded snoozes."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time

import pytest

import minflow
from conftest import db, event_types, wait_for

UTC = dt.timezone.utc
NO_WAIT = {"backoff": lambda attempt: 0.0, "schedules": False}


def snoozes(client, run_id: str) -> int:
    [(count,)] = db(client, "SELECT snoozes FROM workflow_run WHERE id = {uuid:id}", id=run_id)
    return count


def metric(worker, name: str, **labels) -> float:
    return worker.metrics.value(name, worker_id=worker.worker_id, **labels)


# -- async def handlers ----------------------------------------------------------------------


def test_async_handler_is_awaited_and_its_result_stored(app):
    loops = []

    @app.handler("t")
    async def handler(run):
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0.01)
        return {"double": run.payload * 2}

    ids = [app.submit("t", n) for n in range(3)]
    assert minflow.Worker(app, **NO_WAIT).run(burst=True) == 3
    assert [app.get(i).result for i in ids] == [{"double": 0}, {"double": 2}, {"double": 4}]
    assert event_types(app, ids[0]) == ["created", "leased", "started", "succeeded"]
    assert len(set(map(id, loops))) == 1  # one event loop per worker


def test_plain_handler_returning_a_coroutine_is_awaited(app):
    async def compute(run):
        await asyncio.sleep(0)
        return run.payload + 1

    app.handler("t")(lambda run: compute(run))  # not an async def itself
    run_id = app.submit("t", 41)
    minflow.Worker(app, **NO_WAIT).run(burst=True)
    assert app.get(run_id).status == "succeeded" and app.get(run_id).result == 42


def test_async_failure_and_retry_request(app):
    @app.handler("fails")
    async def fails(run):
        raise ValueError("async boom")

    @app.handler("snoozes")
    async def snoozing(run):
        if run.snoozes == 0:
            raise minflow.Retry(delay=0)
        return run.snoozes

    failed = app.submit("fails", max_attempts=1)
    snoozed = app.submit("snoozes")
    minflow.Worker(app, **NO_WAIT).run(burst=True)
    assert app.get(failed).status == "failed"
    assert app.get(failed).last_error == "ValueError: async boom"
    assert (app.get(snoozed).status, app.get(snoozed).result) == ("succeeded", 1)


def test_concurrency_counts_sync_and_async_handlers_together(app):
    release = threading.Event()
    lock = threading.Lock()
    running = {"now": 0, "most": 0, "async": 0}

    def enter(kind):
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
            running[kind] = running.get(kind, 0) + 1

    def leave():
        with lock:
            running["now"] -= 1

    @app.handler("sync")
    def sync_handler(run):
        enter("sync")
        release.wait(20)
        leave()

    @app.handler("async")
    async def async_handler(run):
        enter("async")
        while not release.is_set():  # the loop stays free for the other async handlers
            await asyncio.sleep(0.01)
        leave()

    ids = app.submit_many([minflow.Job(t) for t in ("sync", "async") * 4])
    # Without prefetch, so the three runs beyond the slots stay pending.
    worker = minflow.Worker(app, concurrency=5, prefetch=0, **NO_WAIT).start()
    try:
        wait_for(lambda: running["now"] == 5, message="five handlers running")
        assert worker.running == 5
        counts = app.stats()
        assert sum(c.get("leased", 0) for c in counts.values()) == 5
        assert sum(c.get("pending", 0) for c in counts.values()) == 3
        assert running["async"] >= 2  # several async handlers at once on the one loop
        release.set()
        wait_for(lambda: all(app.get(i).status == "succeeded" for i in ids), message="all runs")
    finally:
        release.set()
        worker.stop(timeout=10)
    assert running["most"] == 5


def test_async_is_cancelled_reflects_the_heartbeat_and_a_heartbeat_helps(app):
    seen = {}

    @app.handler("t")
    async def handler(run):
        await run.aheartbeat(600)
        seen["lease"] = (await asyncio.to_thread(app.get, run.id)).lease_until
        await asyncio.to_thread(app.cancel, run.id)
        # No database on the loop: the worker's knowledge, which its heartbeat updates.
        seen["right_after"] = run.is_cancelled()
        seen["checked"] = await run.ais_cancelled()
        seen["then"] = run.is_cancelled()
        try:
            await run.aheartbeat()
        except minflow.LeaseLost:
            seen["lost"] = True
        try:
            run.heartbeat()  # on the loop: known lost, so it raises at once
        except minflow.LeaseLost:
            seen["lost_on_loop"] = True
        return "ignored"

    run_id = app.submit("t")
    minflow.Worker(app, **NO_WAIT).run(burst=True)
    assert seen["lease"] > dt.datetime.now(UTC) + dt.timedelta(seconds=500)
    assert seen["right_after"] is False and seen["checked"] is True and seen["then"] is True
    assert seen["lost"] and seen["lost_on_loop"]
    assert app.get(run_id).status == "cancelled" and app.get(run_id).result is None
    assert [e.data for e in app.events(run_id) if e.event_type == "heartbeat"] == [
        {"extended_by_seconds": 600}
    ]


def test_async_handler_learns_of_cancellation_from_the_heartbeat(app):
    started = threading.Event()
    seen = {}

    @app.handler("t")
    async def handler(run):
        started.set()
        run.heartbeat(60)  # on the loop: sent from a thread, returns at once
        deadline = time.monotonic() + 20
        while not run.is_cancelled() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        seen["cancelled"] = run.is_cancelled()

    run_id = app.submit("t")
    worker = minflow.Worker(app, lease=0.9, **NO_WAIT).start()  # heartbeats every 0.3 s
    try:
        assert started.wait(10)
        wait_for(lambda: [e for e in app.events(run_id) if e.event_type == "heartbeat"])
        app.cancel(run_id)
        wait_for(lambda: "cancelled" in seen, message="the handler to notice")
    finally:
        worker.stop(timeout=10)
    assert seen["cancelled"] is True
    assert app.get(run_id).status == "cancelled"


def test_stop_lets_async_handlers_finish_and_a_forced_stop_cancels_them(app):
    release = threading.Event()
    cancelled = threading.Event()

    @app.handler("graceful")
    async def graceful(run):
        while not release.is_set():
            await asyncio.sleep(0.01)
        return "finished"

    @app.handler("endless")
    async def endless(run):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    run_id = app.submit("graceful")
    worker = minflow.Worker(app, **NO_WAIT).start()
    wait_for(lambda: worker.running == 1)
    stopper = threading.Thread(target=worker.stop, kwargs={"timeout": 20})
    stopper.start()
    release.set()
    stopper.join(20)
    assert app.get(run_id).result == "finished"

    # Past the shutdown grace, and at a forced stop (stop()'s own timeout, a second signal).
    for grace, wait in ((0.3, 10), (30, 0.3)):
        cancelled.clear()
        stuck = app.submit("endless")
        worker = minflow.Worker(app, shutdown_timeout=grace, **NO_WAIT).start()
        wait_for(lambda w=worker: w.running == 1)
        worker.stop(timeout=wait)
        assert cancelled.is_set()
        assert worker._stopped_hard() is (wait < grace)
        assert app.get(stuck).status == "leased"  # left to lease expiry, as threads are


# -- per-handler backoff -----------------------------------------------------------------------


def test_handler_backoff_overrides_the_workers(app):
    attempts = []

    def slow(attempt):
        attempts.append(attempt)
        return 3600.0 * attempt

    @app.handler("own", backoff=slow)
    def own(run):
        raise RuntimeError("own backoff")

    @app.handler("own.snooze", backoff=slow)
    def own_snooze(run):
        raise minflow.Retry()  # no delay: the type's backoff decides

    @app.handler("worker")
    def worker_default(run):
        raise RuntimeError("worker backoff")

    ids = [app.submit("own"), app.submit("own.snooze"), app.submit("worker", max_attempts=2)]
    minflow.Worker(app, **NO_WAIT).run(burst=True)
    own_run, snoozed, fell_through = (app.get(i) for i in ids)
    assert attempts == [1, 1]
    for run in (own_run, snoozed):
        assert run.status == "pending"
        assert 3599 <= (run.run_at - run.updated_at).total_seconds() <= 3601
    assert (fell_through.status, fell_through.attempt) == ("failed", 2)  # the worker's 0 s


def test_a_broken_handler_backoff_falls_back_to_the_workers(app):
    app.handler("t", backoff=lambda attempt: -1)(lambda run: 1 / 0)
    run_id = app.submit("t")
    minflow.Worker(app, backoff=lambda attempt: 120.0, schedules=False).run(burst=True)
    run = app.get(run_id)
    assert 119 <= (run.run_at - run.updated_at).total_seconds() <= 121


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backoff": 5},
        {"timeout": 0},
        {"timeout": float("nan")},
        {"timeout": True},
        {"concurrency": 0},
        {"concurrency": 1.5},
    ],
)
def test_handler_policies_are_validated(app, kwargs):
    with pytest.raises(minflow.InvalidInput):
        app.handler("t", **kwargs)
    assert "t" not in app.handlers


# -- timeouts ----------------------------------------------------------------------------------


def test_timeout_fails_the_attempt_and_fences_the_late_outcome(app):
    release = threading.Event()
    seen = {}

    @app.handler("t", timeout=0.3, backoff=lambda attempt: 3600.0)
    def stuck(run):
        release.wait(20)
        seen["cancelled"] = run.is_cancelled()
        return "too late"

    run_id = app.submit("t")
    worker = minflow.Worker(app, **NO_WAIT).start()
    try:
        run = wait_for(lambda: (r := app.get(run_id)).last_error and r, message="the timeout")
        assert (run.status, run.attempt, run.result) == ("pending", 1, None)
        assert (
            run.last_error == "TimeoutError: the handler did not finish within its timeout of 0.3s"
        )
        assert 3599 <= (run.run_at - run.updated_at).total_seconds() <= 3601  # its backoff
        assert metric(worker, "workflow_worker_stuck_threads") == 1
        events = event_types(app, run_id)
        release.set()
        wait_for(lambda: metric(worker, "workflow_worker_stuck_threads") == 0, message="return")
    finally:
        release.set()
        worker.stop(timeout=10)
    assert seen["cancelled"] is True
    assert app.get(run_id).result is None and event_types(app, run_id) == events
    assert events[-1] == "retried" and worker.processed == 1
    assert metric(worker, "workflow_run_timeouts_total", workflow_type="t") == 1
    assert (
        metric(worker, "workflow_run_completed_total", workflow_type="t", status="pending") == 1
    )  # counted once, not again when the handler came back
    assert (
        metric(worker, "workflow_run_completed_total", workflow_type="t", status="succeeded") == 0
    )


def test_a_stuck_handler_does_not_stop_the_worker(app):
    release = threading.Event()
    app.handler("stuck", timeout=0.2)(lambda run: release.wait(30))
    app.handler("quick")(lambda run: run.payload)
    stuck = app.submit("stuck", max_attempts=1, priority=0)  # claimed first
    quick = app.submit_many([minflow.Job("quick", n) for n in range(5)])
    worker = minflow.Worker(app, concurrency=1, **NO_WAIT).start()
    try:
        wait_for(lambda: all(app.get(i).status == "succeeded" for i in quick), message="the rest")
        run = app.get(stuck)
        assert run.status == "failed" and "timeout of 0.2s" in run.last_error
        assert metric(worker, "workflow_worker_stuck_threads") == 1  # still in release.wait
    finally:
        release.set()
        worker.stop(timeout=10)
    assert [app.get(i).result for i in quick] == [0, 1, 2, 3, 4]


def test_stuck_threads_are_replaced_up_to_concurrency(app):
    releases = [threading.Event(), threading.Event()]
    app.handler("stuck", timeout=0.2)(lambda run: releases[run.payload].wait(30))
    app.handler("quick")(lambda run: "done")
    stuck = app.submit_many([minflow.Job("stuck", n, max_attempts=1, priority=0) for n in (0, 1)])
    quick = app.submit_many([minflow.Job("quick", priority=1) for _ in range(2)])
    worker = minflow.Worker(app, concurrency=1, prefetch=0, **NO_WAIT).start()
    try:
        wait_for(lambda: all(app.get(i).status == "failed" for i in stuck), message="timeouts")
        assert metric(worker, "workflow_worker_stuck_threads") == 2
        # One stuck thread was replaced, the second was not (at most `concurrency` are): no
        # slot is left, so the worker claims nothing until a thread comes back.
        assert [app.get(i).status for i in quick] == ["pending", "pending"]
        assert worker.running == 0
        releases[0].set()  # one comes back while the other is still stuck: one slot again
        wait_for(lambda: all(app.get(i).status == "succeeded" for i in quick), message="a slot")
        assert metric(worker, "workflow_worker_stuck_threads") == 1
        releases[1].set()
        wait_for(lambda: metric(worker, "workflow_worker_stuck_threads") == 0)
        prefix = f"{worker.worker_id}-handler-"
        wait_for(  # back to its size
            lambda: sum(t.name.startswith(prefix) for t in threading.enumerate()) == 1,
            message="the pool to shrink back to one thread",
        )
    finally:
        for release in releases:
            release.set()
        worker.stop(timeout=10)


def test_async_timeout_cancels_and_counts_toward_max_attempts(app):
    cancelled = []

    @app.handler("t", timeout=0.2)
    async def slow(run):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(run.attempt)
            raise

    run_id = app.submit("t", max_attempts=2)
    worker = minflow.Worker(app, **NO_WAIT)
    assert worker.run(burst=True) == 2
    run = app.get(run_id)
    assert (run.status, run.attempt) == ("failed", 2) and "timeout of 0.2s" in run.last_error
    assert cancelled == [1, 2]
    assert event_types(app, run_id)[-4:] == ["retried", "leased", "started", "failed"]
    assert metric(worker, "workflow_worker_stuck_threads") == 0  # nothing to replace


# -- concurrency caps --------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["types", "prefixes"])
def test_a_capped_type_is_left_for_other_workers(app, via):
    release = threading.Event()
    app.handler("cap.x", concurrency=2)(lambda run: release.wait(20) and "capped")
    app.handler("free")(lambda run: release.wait(20) and "free")
    capped = app.submit_many([minflow.Job("cap.x", n, priority=0) for n in range(5)])
    free = app.submit_many([minflow.Job("free", n, priority=1) for n in range(3)])
    options = {"types": ["free"], "prefixes": ["cap."]} if via == "prefixes" else {}
    worker = minflow.Worker(app, concurrency=6, **options, **NO_WAIT).start()
    other = minflow.App(app.dsn)
    other.handler("cap.x")(lambda run: "elsewhere")
    try:
        wait_for(lambda: worker.running == 5, message="two capped and three free runs")
        assert app.stats()["cap.x"] == {"leased": 2, "pending": 3}
        # The worker has a free slot, but leaves the capped runs to another worker.
        assert minflow.Worker(other, types=["cap.x"], **NO_WAIT).run(burst=True) == 3
        release.set()
        wait_for(lambda: all(app.get(i).status == "succeeded" for i in capped + free))
    finally:
        release.set()
        worker.stop(timeout=10)
        other.close()
    results = sorted(str(app.get(i).result) for i in capped)
    assert results == ["capped", "capped", "elsewhere", "elsewhere", "elsewhere"]


def test_capped_types_keep_claim_order_and_fill_their_room(app):
    order = []
    lock = threading.Lock()

    def record(run):
        with lock:
            order.append(run.payload)

    app.handler("capped", concurrency=1)(record)
    app.handler("free")(record)
    app.submit_many(
        [minflow.Job("free", f"f{n}", priority=5) for n in range(3)]
        + [minflow.Job("capped", f"c{n}", priority=n) for n in range(3)]
    )
    # Without prefetch: a capped type is never buffered beyond its cap, so with a buffer the
    # free runs would start while c1 and c2 wait for room.
    assert minflow.Worker(app, concurrency=1, prefetch=0, **NO_WAIT).run(burst=True) == 6
    assert order == ["c0", "c1", "c2", "f0", "f1", "f2"]  # priority decides across both


# -- snoozes -----------------------------------------------------------------------------------


def test_snoozes_are_counted_persisted_and_bounded(app):
    seen = []

    @app.handler("t")
    def snooze(run):
        seen.append((run.attempt, run.snoozes))
        raise minflow.Retry(delay=0)

    run_id = app.submit("t", max_attempts=2)
    minflow.Worker(app, max_snoozes=3, **NO_WAIT).run(burst=True)
    run = app.get(run_id)
    # Three snoozes, then every further request is a failed attempt.
    assert seen == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 3)]
    assert (run.status, run.attempt) == ("failed", 2)
    assert "snoozed 3 times" in run.last_error and "max_snoozes" in run.last_error
    assert snoozes(app, run_id) == 3
    app.retry(run_id)  # a revived run may snooze again
    assert snoozes(app, run_id) == 0
    seen.clear()
    minflow.Worker(app, max_snoozes=1, **NO_WAIT).run(burst=True)
    assert seen == [(1, 0), (1, 1), (2, 1)]


def test_max_snoozes_is_validated_and_defaults_to_25(app):
    assert minflow.Worker(app).max_snoozes == 25 == minflow.DEFAULT_MAX_SNOOZES
    for bad in (-1, 1.5, None):
        with pytest.raises(minflow.InvalidInput):
            minflow.Worker(app, max_snoozes=bad)


# -- logs --------------------------------------------------------------------------------------


def test_one_info_line_per_finished_execution(app, caplog):
    cancel_me = threading.Event()

    @app.handler("ok")
    def ok(run):
        return 1

    @app.handler("flaky")
    def flaky(run):
        raise ConnectionError("try again")

    @app.handler("snooze")
    def snooze(run):
        if run.snoozes == 0:
            raise minflow.Retry(delay=0)

    @app.handler("cancelled")
    def cancelled(run):
        app.cancel(run.id)
        cancel_me.set()

    ids = {t: app.submit(t, max_attempts=2) for t in ("ok", "flaky", "snooze", "cancelled")}
    with caplog.at_level("INFO", logger="minflow.worker"):
        minflow.Worker(app, worker_id="w-log", **NO_WAIT).run(burst=True)
    finished = [r for r in caplog.records if getattr(r, "outcome", None)]
    seen = {(r.type, r.attempt, r.outcome, r.levelname) for r in finished}
    assert seen == {
        ("ok", 1, "succeeded", "INFO"),
        ("flaky", 1, "retrying", "INFO"),
        ("flaky", 2, "failed", "ERROR"),  # failed for good: the error line, as before
        ("snooze", 1, "snoozed", "INFO"),
        ("snooze", 1, "succeeded", "INFO"),
        ("cancelled", 1, "lost", "INFO"),
    }
    assert len(finished) == len(seen)
    for record in finished:
        assert record.run_id == ids[record.type] and record.worker_id == "w-log"
        assert record.duration >= 0
    line = next(r for r in finished if r.type == "ok").getMessage()
    assert line.startswith(f"run {ids['ok']} (ok) attempt 1 succeeded after ")
    failure = next(
        r for r in caplog.records if r.levelname == "WARNING" and getattr(r, "type", "") == "flaky"
    )
    assert failure.run_id == ids["flaky"] and "ConnectionError: try again" in failure.getMessage()

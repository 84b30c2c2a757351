"""Worker rules (design §5, §6) on both dialects, in one process."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import quote

import pytest

import minflow
from conftest import PG_DSN, ROOT, PgSchema, db, event_types, require_pg, wait_for, with_query

UTC = dt.timezone.utc
NO_WAIT = {"backoff": lambda attempt: 0.0, "schedules": False}


def test_success_records_result_and_events(app):
    seen = []

    @app.handler("billing.invoice.v1")
    def invoice(run):
        seen.append((run.id, run.type, run.payload, run.attempt, run.max_attempts))
        return {"total": run.payload["n"] * 2}

    run_id = app.submit("billing.invoice.v1", {"n": 21})
    worker = minflow.Worker(app, worker_id="w1", **NO_WAIT)
    assert worker.run(burst=True) == 1
    assert seen == [(run_id, "billing.invoice.v1", {"n": 21}, 1, 3)]
    run = app.get(run_id)
    assert (run.status, run.result, run.attempt, run.leased_by) == (
        "succeeded",
        {"total": 42},
        1,
        "w1",
    )
    events = app.events(run_id)
    assert [e.event_type for e in events] == ["created", "leased", "started", "succeeded"]
    assert events[1].data == {"worker_id": "w1", "attempt": 1}
    assert events[2].data == {"worker_id": "w1"}
    assert [e.id for e in events] == sorted(e.id for e in events)


def test_none_result_is_stored(app):
    app.handler("t")(lambda run: None)
    run_id = app.submit("t")
    app.run_worker(burst=True, **NO_WAIT)
    assert app.get(run_id).status == "succeeded"
    assert app.get(run_id).result is None


def test_claim_order_priority_then_run_at(app):
    order = []
    app.handler("t")(lambda run: order.append(run.payload))
    now = dt.datetime.now(UTC)
    app.submit("t", "late-low", priority=100, run_at=now - dt.timedelta(seconds=1))
    app.submit("t", "early-low", priority=100, run_at=now - dt.timedelta(seconds=30))
    app.submit("t", "urgent", priority=1)
    app.submit("t", "future", priority=0, run_in=3600)
    app.submit("t", "negative", priority=-10, run_at=now - dt.timedelta(seconds=5))
    minflow.Worker(app, concurrency=1, **NO_WAIT).run(burst=True)
    assert order == ["negative", "urgent", "early-low", "late-low"]
    assert app.list(status="pending")[0].payload == "future"


def test_exact_type_routing(app):
    app.handler("billing.invoice.v1")(lambda run: "ok")
    mine = app.submit("billing.invoice.v1")
    sibling = app.submit("billing.payment.v1")  # the seed's first-segment prefix stole this (C-7)
    assert app.run_worker(burst=True, **NO_WAIT) == 1
    assert app.get(mine).status == "succeeded"
    assert app.get(sibling).status == "pending"


def test_types_narrow_and_must_have_handlers(app):
    app.handler("a")(lambda run: "a")
    app.handler("b")(lambda run: "b")
    a, b = app.submit("a"), app.submit("b")
    assert minflow.Worker(app, types=["b"], **NO_WAIT).run(burst=True) == 1
    assert (app.get(a).status, app.get(b).status) == ("pending", "succeeded")
    with pytest.raises(minflow.InvalidInput, match="without a registered handler"):
        minflow.Worker(app, types=["c"], **NO_WAIT).run(burst=True)


def test_prefixes_match_literally(app):
    app.handler("media_x.video.v1")(lambda run: "video")
    exact = app.submit("media_x.video.v1")
    sibling = app.submit("media_x.audio.v1")  # claimed by prefix, but has no handler here
    underscore = app.submit("mediaAx.video.v1")  # `_` must not act as a wildcard (C-8)
    percent = app.submit("media%x.video.v1")
    worker = minflow.Worker(app, prefixes=["media_x."], **NO_WAIT)
    worker.run(burst=True)
    assert app.get(exact).status == "succeeded"
    sib = app.get(sibling)
    assert sib.attempt >= 1 and "no handler registered" in sib.last_error
    assert app.get(underscore).attempt == 0
    assert app.get(percent).attempt == 0


def test_failure_retries_with_backoff_then_fails(app):
    @app.handler("t")
    def boom(run):
        raise ValueError(f"bad input on attempt {run.attempt}")

    run_id = app.submit("t", max_attempts=3)
    delays = []

    def backoff(attempt):
        delays.append(attempt)
        return 3600.0

    minflow.Worker(app, backoff=backoff, schedules=False).run(burst=True)
    run = app.get(run_id)
    assert (run.status, run.attempt) == ("pending", 1)
    assert run.last_error == "ValueError: bad input on attempt 1"
    # run_at = database now + backoff(1)
    wait = (run.run_at - run.updated_at).total_seconds()
    assert 3599 <= wait <= 3601
    assert delays == [1]
    retried = app.events(run_id)[-1]
    assert retried.event_type == "retried"
    assert retried.data == {"attempt": 1, "error": "ValueError: bad input on attempt 1"}


def test_max_attempts_ends_in_failed(app):
    calls = []

    @app.handler("t")
    def boom(run):
        calls.append(run.attempt)
        raise RuntimeError("always")

    run_id = app.submit("t", max_attempts=3)
    minflow.Worker(app, **NO_WAIT).run(burst=True)
    run = app.get(run_id)
    assert calls == [1, 2, 3]
    assert (run.status, run.attempt) == ("failed", 3)
    types = event_types(app, run_id)
    assert types == ["created"] + ["leased", "started", "retried"] * 2 + [
        "leased",
        "started",
        "failed",
    ]
    assert app.events(run_id)[-1].data == {"attempt": 3, "error": "RuntimeError: always"}
    app.retry(run_id)
    assert (app.get(run_id).status, app.get(run_id).attempt) == ("pending", 0)


def test_max_attempts_one_fails_at_once(app):
    app.handler("t")(lambda run: 1 / 0)
    run_id = app.submit("t", max_attempts=1)
    minflow.Worker(app, **NO_WAIT).run(burst=True)
    assert app.get(run_id).status == "failed"


def test_a_run_that_failed_for_good_keeps_its_run_at(app):
    """No retry is due, so run_at is not moved to now + backoff: it stays as submitted."""
    app.handler("t")(lambda run: 1 / 0)
    planned = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
    run_id = app.submit("t", max_attempts=1, run_at=planned)
    minflow.Worker(app, backoff=lambda attempt: 3600.0, schedules=False).run(burst=True)
    run = app.get(run_id)
    assert (run.status, run.run_at) == ("failed", planned)
    # The same when the lease of its last attempt expired (a crash loop ends).
    crashed = app.submit("t", max_attempts=1, run_at=planned)
    db(
        app,
        "UPDATE workflow_run SET status = 'leased', attempt = 1, leased_by = 'crashed', "
        "lease_until = {time:t} WHERE id = {uuid:id}",
        id=crashed,
        t=dt.datetime.now(UTC) - dt.timedelta(seconds=1),
    )
    minflow.Worker(app, **NO_WAIT).run(burst=True)
    run = app.get(crashed)
    assert (run.status, run.run_at) == ("failed", planned)


def test_a_short_lease_is_honoured_as_given(app, caplog):
    """lease=0.05 is 50 ms in the database and in the log (it was shown as 0.1 s)."""
    spans = []

    @app.handler("t")
    def handler(run):
        row = app.get(run.id)
        spans.append((row.lease_until - row.updated_at).total_seconds())

    app.submit("t")
    caplog.set_level("INFO", logger="minflow.worker")
    minflow.Worker(app, lease=0.05, **NO_WAIT).run(burst=True)
    assert spans and abs(spans[0] - 0.05) < 0.0015, spans
    assert any("lease=0.05s" in r.getMessage() for r in caplog.records)


def test_seed_backoff_formula():
    for attempt in (1, 2, 3, 10):
        samples = [minflow.seed_backoff(attempt) for _ in range(200)]
        base = 60.0 * attempt * attempt
        assert all(base <= s < base * 1.1 for s in samples)
        assert max(samples) > base  # the jitter is really there


def test_backoff_default_is_the_seed_formula(app):
    app.handler("t")(lambda run: 1 / 0)
    run_id = app.submit("t")
    minflow.Worker(app, schedules=False).run(burst=True)
    run = app.get(run_id)
    wait = (run.run_at - run.updated_at).total_seconds()
    assert 59 <= wait <= 66.5


def test_retry_exception_does_not_consume_attempts(app):
    calls = []

    @app.handler("t")
    def snooze(run):
        calls.append(run.attempt)
        if len(calls) < 3:
            raise minflow.Retry(delay=0)
        return "done"

    run_id = app.submit("t", max_attempts=1)
    minflow.Worker(app, **NO_WAIT).run(burst=True)
    run = app.get(run_id)
    assert (run.status, run.result, run.last_error) == ("succeeded", "done", None)
    assert calls == [1, 1, 1]
    retried = [e for e in app.events(run_id) if e.event_type == "retried"]
    assert len(retried) == 2 and retried[0].data["reason"] == "retry_requested"


def test_retry_delay_is_honoured(app):
    @app.handler("t")
    def snooze(run):
        raise minflow.Retry(delay=120)

    run_id = app.submit("t")
    minflow.Worker(app, **NO_WAIT).run(burst=True)
    run = app.get(run_id)
    assert run.status == "pending" and 119 <= (run.run_at - run.updated_at).total_seconds() <= 121
    with pytest.raises(minflow.InvalidInput):
        minflow.Retry(delay=-1)


def test_unserialisable_result_fails_the_attempt(app):
    app.handler("t")(lambda run: {"when": dt.datetime.now()})
    run_id = app.submit("t", max_attempts=1)
    minflow.Worker(app, **NO_WAIT).run(burst=True)
    run = app.get(run_id)
    assert run.status == "failed" and "not JSON-serialisable" in run.last_error


def test_cancel_while_running_is_sticky(app):
    started, release = threading.Event(), threading.Event()
    outcome = {}

    @app.handler("t")
    def long_job(run):
        started.set()
        release.wait(10)
        outcome["cancelled"] = run.is_cancelled()
        if run.payload == "raise":
            raise RuntimeError("stopping because cancelled")
        return "finished anyway"

    for mode in ("return", "raise"):
        run_id = app.submit("t", mode)
        started.clear()
        release.clear()
        worker = minflow.Worker(app, **NO_WAIT).start()
        assert started.wait(10)
        app.cancel(run_id)
        release.set()
        wait_for(lambda w=worker: not w.running, message="handler to return")
        worker.stop(timeout=10)
        run = app.get(run_id)
        assert outcome["cancelled"] is True
        assert run.status == "cancelled", mode
        assert run.result is None and run.last_error is None
        assert event_types(app, run_id)[-1] == "cancelled"


def test_fencing_stale_worker_changes_nothing(app):
    started, release = threading.Event(), threading.Event()
    errors = []

    @app.handler("t")
    def job(run):
        started.set()
        release.wait(10)
        try:
            run.heartbeat()
        except minflow.LeaseLost as exc:
            errors.append(exc)
        return "stale result"

    run_id = app.submit("t")
    worker = minflow.Worker(app, worker_id="stale", **NO_WAIT).start()
    assert started.wait(10)
    # Another worker took the run over (as after a lease expiry): new owner, next attempt.
    db(
        app,
        "UPDATE workflow_run SET leased_by = 'new-owner', attempt = attempt + 1 WHERE id = {uuid:id}",
        id=run_id,
    )
    release.set()
    wait_for(lambda: not worker.running)
    worker.stop(timeout=10)
    run = app.get(run_id)
    assert (run.status, run.leased_by, run.result) == ("leased", "new-owner", None)
    assert len(errors) == 1
    assert "succeeded" not in event_types(app, run_id)


def test_expired_lease_is_rescued_and_rerun(app):
    app.handler("t")(lambda run: run.attempt)
    run_id = app.submit("t")
    db(
        app,
        "UPDATE workflow_run SET status = 'leased', attempt = 1, leased_by = 'dead-worker', "
        "lease_until = {time:t} WHERE id = {uuid:id}",
        id=run_id,
        t=dt.datetime.now(UTC) - dt.timedelta(seconds=5),
    )
    minflow.Worker(app, **NO_WAIT).run(burst=True)
    run = app.get(run_id)
    assert (run.status, run.result, run.attempt) == ("succeeded", 2, 2)
    rescue = [e for e in app.events(run_id) if e.event_type == "retried"][0]
    assert rescue.data == {"reason": "lease_expired", "attempt": 1, "worker_id": "dead-worker"}


def test_rescue_at_max_attempts_ends_the_crash_loop(app):
    app.handler("t")(lambda run: "should not run")
    run_id = app.submit("t", max_attempts=2)
    db(
        app,
        "UPDATE workflow_run SET status = 'leased', attempt = 2, leased_by = 'crashed', "
        "lease_until = {time:t} WHERE id = {uuid:id}",
        id=run_id,
        t=dt.datetime.now(UTC) - dt.timedelta(seconds=1),
    )
    assert minflow.Worker(app, **NO_WAIT).run(burst=True) == 0
    run = app.get(run_id)
    assert run.status == "failed" and "lease expired" in run.last_error
    assert app.events(run_id)[-1].event_type == "failed"


def test_active_lease_is_not_rescued(app):
    app.handler("t")(lambda run: "x")
    run_id = app.submit("t")
    db(
        app,
        "UPDATE workflow_run SET status = 'leased', attempt = 1, leased_by = 'alive', "
        "lease_until = {later:s} WHERE id = {uuid:id}",
        id=run_id,
        s=60.0,
    )
    assert minflow.Worker(app, **NO_WAIT).run(burst=True) == 0
    assert app.get(run_id).leased_by == "alive"


def test_leases_are_extended_while_a_handler_runs(app):
    release = threading.Event()
    app.handler("t")(lambda run: release.wait(20) and "done")
    run_id = app.submit("t")
    worker = minflow.Worker(app, lease=1.5, **NO_WAIT).start()
    first = wait_for(
        lambda: app.get(run_id).lease_until if app.get(run_id).status == "leased" else None
    )
    # Several heartbeat periods (lease/3) later the lease has moved on, and a second worker
    # that sweeps for expired leases finds nothing to rescue.
    wait_for(
        lambda: app.get(run_id).lease_until > first + dt.timedelta(seconds=1), message="a heartbeat"
    )
    other = minflow.App(app.dsn)
    other.handler("t")(lambda run: "duplicate")
    assert minflow.Worker(other, **NO_WAIT).run(burst=True) == 0
    release.set()
    wait_for(lambda: app.get(run_id).status == "succeeded")
    worker.stop(timeout=10)
    assert app.get(run_id).result == "done"
    assert event_types(app, run_id).count("started") == 1
    other.close()


def test_explicit_heartbeat(app):
    result = {}

    @app.handler("t")
    def job(run):
        run.heartbeat(600)
        result["lease"] = app.get(run.id).lease_until
        return "ok"

    run_id = app.submit("t")
    minflow.Worker(app, **NO_WAIT).run(burst=True)
    assert result["lease"] > dt.datetime.now(UTC) + dt.timedelta(seconds=500)
    heartbeat = [e for e in app.events(run_id) if e.event_type == "heartbeat"]
    assert [e.data for e in heartbeat] == [{"extended_by_seconds": 600}]


def test_heartbeat_after_cancel_raises_lease_lost(app):
    outcome = {}

    @app.handler("t")
    def job(run):
        app.cancel(run.id)
        try:
            run.heartbeat()
        except minflow.LeaseLost:
            outcome["lost"] = True
        outcome["cancelled"] = run.is_cancelled()

    run_id = app.submit("t")
    minflow.Worker(app, **NO_WAIT).run(burst=True)
    assert outcome == {"lost": True, "cancelled": True}
    assert app.get(run_id).status == "cancelled"


def test_handler_exceptions_never_kill_the_worker(app):
    @app.handler("t")
    def job(run):
        if run.payload == "exit":
            raise SystemExit(3)
        if run.payload == "interrupt":
            raise KeyboardInterrupt
        return "fine"

    ids = [app.submit("t", p, max_attempts=1) for p in ("exit", "interrupt", "ok")]
    assert minflow.Worker(app, **NO_WAIT).run(burst=True) == 3
    assert [app.get(i).status for i in ids] == ["failed", "failed", "succeeded"]


def test_start_and_stop_wait_for_running_handlers(app):
    started, release = threading.Event(), threading.Event()

    @app.handler("t")
    def job(run):
        started.set()
        release.wait(10)
        return "graceful"

    run_id = app.submit("t")
    worker = minflow.Worker(app, **NO_WAIT).start()
    assert started.wait(10)
    stopper = threading.Thread(target=worker.stop, kwargs={"timeout": 20})
    stopper.start()
    wait_for(worker._stop.is_set, message="stop() to take effect")
    # Stopping stops claiming: a run submitted now stays pending (a claim already under way
    # may buffer it, but a stopping worker starts no buffered run and gives them back).
    later = app.submit("t")
    release.set()
    stopper.join(20)
    assert not stopper.is_alive()
    assert app.get(run_id).result == "graceful"
    assert app.get(later).status == "pending"
    with pytest.raises(minflow.InvalidState):
        worker.run()


def test_stop_timeout_abandons_a_stuck_handler(app):
    started = threading.Event()
    app.handler("t")(lambda run: started.set() or threading.Event().wait(30))
    run_id = app.submit("t")
    worker = minflow.Worker(app, shutdown_timeout=0.5, **NO_WAIT).start()
    assert started.wait(10)
    t0 = time.monotonic()
    worker.stop(timeout=0.5)
    assert time.monotonic() - t0 < 15
    assert app.get(run_id).status == "leased"  # left to lease expiry and rescue


def test_in_process_submit_wakes_an_idle_worker(app):
    done = threading.Event()
    app.handler("t")(lambda run: done.set())
    # A poll interval far longer than the deadline: only a wake-up can explain success.
    worker = minflow.Worker(app, poll_interval=60, **NO_WAIT).start()
    app.submit("t")
    assert done.wait(10)
    worker.stop(timeout=10)


def test_submit_from_another_process_wakes_an_idle_worker(app):
    done = threading.Event()
    app.handler("t")(lambda run: done.set())
    worker = minflow.Worker(app, poll_interval=60, **NO_WAIT).start()
    code = "import sys, minflow; minflow.Client(sys.argv[1]).submit('t')"
    subprocess.run([sys.executable, "-c", code, app.dsn], check=True, cwd=ROOT, timeout=60)
    assert done.wait(10), "NOTIFY / data_version did not wake the worker"
    worker.stop(timeout=10)


def test_short_retry_delay_is_picked_up_without_polling(app):
    calls = []

    @app.handler("t")
    def flaky(run):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("first attempt fails")
        return "ok"

    run_id = app.submit("t")
    worker = minflow.Worker(app, poll_interval=60, backoff=lambda n: 0.3, schedules=False).start()
    wait_for(lambda: app.get(run_id).status == "succeeded", timeout=20)
    worker.stop(timeout=10)
    assert len(calls) == 2


def test_no_handlers_is_refused(app):
    with pytest.raises(minflow.InvalidInput, match="no handlers"):
        minflow.Worker(app).run(burst=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"concurrency": 0},
        {"lease": 0},
        {"lease": "30"},
        {"poll_interval": -1},
        {"backoff": 5},
        {"shutdown_timeout": float("inf")},
    ],
)
def test_worker_options_are_validated(app, kwargs):
    with pytest.raises(minflow.InvalidInput):
        minflow.Worker(app, **kwargs)


def test_bad_backoff_falls_back_to_the_default(app):
    app.handler("t")(lambda run: 1 / 0)
    run_id = app.submit("t")
    minflow.Worker(app, backoff=lambda n: -5, schedules=False).run(burst=True)
    run = app.get(run_id)
    assert 59 <= (run.run_at - run.updated_at).total_seconds() <= 66.5


def test_worker_migrates_a_fresh_database(dsn):
    app = minflow.App(dsn)
    app.handler("t")(lambda run: "x")
    assert minflow.Worker(app, **NO_WAIT).run(burst=True) == 0
    assert app.schema_version() == minflow.SCHEMA_VERSION
    app.close()


def test_concurrency_runs_handlers_in_parallel(app):
    barrier = threading.Barrier(4, timeout=10)
    app.handler("t")(lambda run: barrier.wait())
    ids = app.submit_many([minflow.Job("t") for _ in range(4)])
    minflow.Worker(app, concurrency=4, **NO_WAIT).run(burst=True)
    assert {app.get(i).status for i in ids} == {"succeeded"}


def test_memory_database_worker():
    app = minflow.App("sqlite://:memory:")
    app.migrate()
    app.handler("t")(lambda run: run.payload + 1)
    run_id = app.submit("t", 41)
    assert app.run_worker(burst=True, **NO_WAIT) == 1
    assert app.get(run_id).result == 42
    app.close()


@pytest.mark.parametrize("schedules", [False, True])
def test_an_idle_worker_sleeps(app, schedules):
    # A housekeeping deadline that never advanced once made an idle worker spin a core and
    # starve its own claim loop of the GIL; CPU time over a quiet second tells.
    app.handler("t")(lambda run: None)
    worker = minflow.Worker(app, schedules=schedules, tick_interval=0.1).start()
    try:
        time.sleep(0.3)  # past the first tick deadline
        wall, cpu = time.monotonic(), time.process_time()
        time.sleep(1.0)  # the measurement window, not synchronisation
        used = (time.process_time() - cpu) / (time.monotonic() - wall)
    finally:
        worker.stop(timeout=10)
    assert used < 0.25, f"an idle worker used {used:.0%} of a core"


def test_outcome_and_rescue_events_keep_their_stored_shapes(app):
    """The data of the event after each outcome and after a rescue, as stored: SQLite keeps the
    text minflow wrote, which the Go reader parses; PostgreSQL keeps the same JSON values."""
    app.handler("ok")(lambda run: 1)

    @app.handler("fail")
    def fail(run):
        raise ValueError("boom")

    snoozed = []

    @app.handler("snooze")
    def snooze(run):
        if not snoozed:
            snoozed.append(run.id)
            raise minflow.Retry(delay=0)

    ids = [app.submit("ok"), app.submit("fail", max_attempts=1), app.submit("snooze")]
    stranded = app.submit("ok")
    db(
        app,
        "UPDATE workflow_run SET status = 'leased', attempt = 1, leased_by = 'gone', "
        "lease_until = {time:t} WHERE id = {uuid:id}",
        id=stranded,
        t=dt.datetime.now(UTC) - dt.timedelta(seconds=5),
    )
    assert app.run_worker(burst=True, **NO_WAIT) == 5
    stored = {
        run_id: [
            (event, text)
            for event, text in db(
                app,
                "SELECT event_type, CAST(data AS TEXT) FROM workflow_event "
                "WHERE workflow_id = {uuid:id} AND event_type IN ('succeeded', 'failed', 'retried') "
                "ORDER BY id",
                id=run_id,
            )
        ]
        for run_id in [*ids, stranded]
    }
    expected = {
        ids[0]: [("succeeded", None)],
        ids[1]: [("failed", '{"attempt": 1, "error": "ValueError: boom"}')],
        ids[2]: [
            ("retried", '{"attempt": 0, "reason": "retry_requested", "delay": 0}'),
            ("succeeded", None),
        ],
        stranded: [
            ("retried", '{"reason": "lease_expired", "attempt": 1, "worker_id": "gone"}'),
            ("succeeded", None),
        ],
    }
    if app.dialect == "postgres":  # jsonb keeps values, not text
        decode = lambda pairs: [(e, None if t is None else json.loads(t)) for e, t in pairs]  # noqa: E731
        stored = {k: decode(v) for k, v in stored.items()}
        expected = {k: decode(v) for k, v in expected.items()}
    assert stored == expected


@pytest.mark.parametrize("schema", ["jobs", "jobs é"], ids=["ascii-schema", "non-ascii-schema"])
def test_non_ascii_types_and_schemas_keep_the_listen_connection(schema, caplog):
    """pg8000 reads NOTIFY channels and payloads as ASCII: a type (or schema) with é must
    neither cut the idle workers' LISTEN connection nor leave them polling."""
    require_pg()
    name = f"{schema} {uuid.uuid4().hex[:6]}"
    target = PgSchema()
    tag = f"listen-{uuid.uuid4().hex[:8]}"
    target.name = name
    target.dsn = with_query(PG_DSN, schema=quote(name, safe=""), application_name=tag)
    app = minflow.App(target.dsn)
    try:
        app.migrate()
        seen = []
        app.handler("email.envoyé.v1")(lambda run: seen.append(run.payload))
        worker = minflow.Worker(app, poll_interval=60, schedules=False).start()
        try:
            # The listening connection runs LISTEN, then reads its own test notification with
            # an empty statement; no other connection of this worker sends either.
            listen = f"LISTEN {minflow._quote_ident(app._dialect.channel)}"
            count = (
                "SELECT COUNT(*) FROM pg_stat_activity "
                "WHERE application_name = :tag AND query IN (:q, '')"
            )
            wait_for(lambda: db(app, count, tag=tag, q=listen)[0][0] == 1, 10, 0.01, "the LISTEN")
            # From another process: only the NOTIFY can wake this worker in time.
            script = (
                "import sys, time, minflow\n"
                "with minflow.Client(sys.argv[1]) as c:\n"
                "    for n in range(3):\n"
                "        c.submit('email.envoyé.v1', n); time.sleep(0.2)\n"
            )
            subprocess.run([sys.executable, "-c", script, target.dsn], check=True, timeout=60)
            wait_for(lambda: len(seen) == 3, 10, 0.01, "the NOTIFYs to wake the worker")
        finally:
            worker.stop(timeout=10)
        cut = [r.getMessage() for r in caplog.records if "LISTEN connection" in r.getMessage()]
        assert cut == []
    finally:
        app.close()
        target.drop()

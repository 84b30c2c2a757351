"""Operating a queue for months (design §8): retention, bulk retry and cancel, the worker
registry, the oldest-due age and run_at bounds, through the Client and the Worker, on both
dialects (the REST API and the command line: test_operate_surface.py)."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

import minflow
from conftest import ROOT, db, event_types, pg_connect, wait_for

UTC = dt.timezone.utc
LONG_AGO = dt.datetime(2020, 1, 1, tzinfo=UTC)


def finish(client, ids, status: str, when: dt.datetime = LONG_AGO) -> None:
    """Move runs to a finished ``status``, last updated at ``when`` (no worker needed)."""
    for run_id in ids:
        db(
            client,
            "UPDATE {workflow_run} SET status = :status, updated_at = {time:when} "
            "WHERE id = {uuid:id}",
            status=status,
            when=when,
            id=run_id,
        )


def statuses(client) -> dict[str, str]:
    return {run.id: run.status for run in client.list(limit=1000)}


def event_count(client) -> int:
    return db(client, "SELECT COUNT(*) FROM {workflow_event}")[0][0]


class Statements:
    """Records the statements one pooled connection runs (the Client reuses its last idle one,
    so the next call in this thread runs on it)."""

    def __init__(self, client):
        self.seen: list[tuple[str, dict | None, list]] = []
        with client._pool.connection() as conn:
            query = conn.query

            def spy(sql, params=None):
                rows = query(sql, params)
                self.seen.append((sql, params, rows))
                return rows

            conn.query = spy

    def named(self, client, name: str, **pieces: str) -> list[tuple[dict | None, list]]:
        """(parameters, rows) of each run of statement ``name`` (composed with ``pieces``)."""
        sql = client._dialect.compose(name, **pieces) if pieces else client._dialect.sql[name]
        return [(params, rows) for text, params, rows in self.seen if text == sql]


# -- retention ---------------------------------------------------------------------------------


def test_prune_deletes_old_finished_runs_with_their_events_and_frees_keys(client):
    old = client.submit_many(
        [minflow.Job("t", {"i": i}, idempotency_key=f"old-{i}") for i in range(6)]
    )
    finish(client, old[:2], "succeeded")
    finish(client, old[2:4], "failed")
    finish(client, old[4:], "cancelled")
    recent = client.submit("t", idempotency_key="recent")
    finish(client, [recent], "succeeded", dt.datetime.now(UTC))
    pending = client.submit("t")
    leased = client.submit("t")
    # Pending and leased runs that look ancient are never touched.
    finish(client, [pending], "pending")
    finish(client, [leased], "leased")
    events_before = event_count(client)

    assert client.prune(older_than=dt.timedelta(days=1), dry_run=True) == 6
    assert event_count(client) == events_before and len(statuses(client)) == 9

    assert client.prune(older_than=86400) == 6
    assert set(statuses(client)) == {recent, pending, leased}
    assert all(client.events(run_id) == [] for run_id in old)
    assert event_count(client) == events_before - 6  # one created event each
    assert client.events(recent) != []
    # A pruned key is free: the same submit creates a new run.
    again = client.submit("t", idempotency_key="old-0")
    assert not again.deduplicated and again != old[0]
    assert client.submit("t", idempotency_key="recent").deduplicated
    assert client.prune(older_than=86400) == 0


def test_prune_by_status(client):
    ids = client.submit_many([minflow.Job("t") for _ in range(3)])
    for run_id, status in zip(ids, ("succeeded", "failed", "cancelled"), strict=True):
        finish(client, [run_id], status)
    assert client.prune(older_than=60, statuses=["failed", "cancelled"], dry_run=True) == 2
    assert client.prune(older_than=60, statuses="failed") == 1
    assert set(statuses(client).values()) == {"succeeded", "cancelled"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"older_than": 0}, "older_than must be more than 0"),
        ({"older_than": -5}, "older_than must be more than 0"),
        ({"older_than": float("nan")}, "older_than"),
        ({"older_than": "7d"}, "older_than"),
        ({"older_than": 1e12}, "100 years"),
        ({"older_than": 60, "statuses": ["pending"]}, "statuses for prune must be among"),
        ({"older_than": 60, "statuses": ["succeeded", "leased"]}, "'leased'"),
        ({"older_than": 60, "statuses": []}, "got none"),
        ({"older_than": 60, "statuses": [1]}, "list of strings"),
    ],
)
def test_prune_rejects_bad_arguments(client, kwargs, match):
    run_id = client.submit("t")
    finish(client, [run_id], "succeeded")
    with pytest.raises(minflow.InvalidInput, match=match):
        client.prune(**kwargs)
    assert client.get(run_id) is not None


def test_prune_goes_in_bounded_batches_each_its_own_transaction(client):
    ids = client.submit_many([minflow.Job("t") for _ in range(2500)])
    db(
        client,
        "UPDATE {workflow_run} SET status = 'succeeded', updated_at = {time:when}",
        when=LONG_AGO,
    )
    recorder = Statements(client)
    assert client.prune(older_than=3600) == 2500
    begins = [sql for sql, _, _ in recorder.seen if sql == client._dialect.sql["begin"]]
    assert client.list(limit=10) == [] and event_count(client) == 0
    every_status = minflow._status_filter(3)
    if client.dialect == "postgres":
        # One statement per batch, autocommitted: 1,000 + 1,000 + 500.
        named = recorder.named(client, "prune_batch", filters=every_status)
        assert [rows[0][0] for _, rows in named] == [1000, 1000, 500] and begins == []
    else:
        # Batches sized to a short write lock, never over 1,000, each in a BEGIN IMMEDIATE of
        # its own (a last one may find nothing).
        picks = [
            len(rows) for _, rows in recorder.named(client, "prune_pick", filters=every_status)
        ]
        assert sum(picks) == 2500 and max(picks) <= 1000 and len([p for p in picks if p]) >= 3
        assert len(begins) == len(picks)
    assert len(ids) == 2500


def test_prune_batches_walk_the_finished_runs_index(client):
    """The plan a prune batch gets, with enough finished runs that a scan would look cheap to
    a planner that ignores their order; on PostgreSQL the generic plan, which knows no cut-off
    (the worker's prepared statement may get it)."""
    dialect, every_status = client._dialect, minflow._status_filter(3)
    params = {"cutoff": "2030-01-01", "limit": 1000}
    params.update({f"status{i}": s for i, s in enumerate(minflow.FINISHED_STATUSES)})
    if client.dialect == "sqlite":
        pick = dialect.compose("prune_pick", filters=every_status)
        plan = " ".join(row[-1] for row in db(client, "EXPLAIN QUERY PLAN " + pick, **params))
        assert "USING INDEX minflow_run_finished" in plan, plan
        return
    db(
        client,
        "INSERT INTO {workflow_run} (id, type, payload, status, updated_at) "
        "SELECT gen_random_uuid(), 't', '{}', 'succeeded', TIMESTAMPTZ '2020-01-01' "
        "+ make_interval(secs => i) FROM generate_series(1, 20000) AS i",
    )
    db(client, "ANALYZE {workflow_run}")
    batch = dialect.compose("prune_batch", filters=every_status)
    names = list(dict.fromkeys(re.findall(r":(\w+)", batch)))
    numbered = re.sub(r":(\w+)", lambda m: f"${names.index(m[1]) + 1}", batch)
    values = ", ".join(f"'{params[name]}'" for name in names)
    with client._pool.connection() as conn:
        conn.query("SET plan_cache_mode = force_generic_plan")
        conn.query(f"PREPARE prune_plan AS {numbered}")
        explained = conn.query(f"EXPLAIN EXECUTE prune_plan({values})")
        plan = "\n".join(row[0] for row in explained)
        conn.query("DEALLOCATE prune_plan")
        conn.query("RESET plan_cache_mode")
    assert "Index Scan using minflow_run_finished" in plan, plan
    assert "Seq Scan on workflow_run" not in plan, plan  # the deletes go by key too


def test_prune_cutoff_is_judged_on_updated_at_by_the_database_clock(client):
    run_id = client.submit("t")
    now = client._db_now  # the database's clock, not this process's
    with client._pool.connection() as conn:
        clock = now(conn)
    finish(client, [run_id], "succeeded", clock - dt.timedelta(seconds=30))
    assert client.prune(older_than=60) == 0
    assert client.prune(older_than=10) == 1


# -- bulk retry and cancel ---------------------------------------------------------------------


def test_retry_many_writes_what_retry_writes(client):
    one, many = client.submit("t"), client.submit_many([minflow.Job("t") for _ in range(3)])
    finish(client, [one, *many], "failed", dt.datetime.now(UTC))
    client.retry(one)
    assert client.retry_many() == 3
    for run_id in many:
        run = client.get(run_id)
        assert (run.status, run.attempt) == ("pending", 0)
        assert [(e.event_type, e.data) for e in client.events(run_id)] == [
            (e.event_type, e.data) for e in client.events(one)
        ]
    assert event_types(client, many[0]) == ["created", "retried"]
    assert client.retry_many() == 0


def test_cancel_many_writes_what_cancel_writes(client):
    one, many = client.submit("t"), client.submit_many([minflow.Job("t") for _ in range(3)])
    finish(client, [many[0]], "leased", dt.datetime.now(UTC))
    client.cancel(one)
    assert client.cancel_many(dry_run=True) == 3
    assert client.cancel_many() == 3
    assert set(statuses(client).values()) == {"cancelled"}
    assert [(e.event_type, e.data) for e in client.events(many[0])] == [
        (e.event_type, e.data) for e in client.events(one)
    ]
    assert client.cancel_many() == 0


def test_bulk_filters_each_narrow_the_set(client):
    a1 = client.submit("a.v1", idempotency_key="imp-2030_01-1")
    a2 = client.submit("a.v1", idempotency_key="imp-2030x01-2")  # `_` must be literal
    b = client.submit("b.v1", idempotency_key="IMP-2030_01-3")  # case matters
    c = client.submit("a.v1", idempotency_key="im*[p]?%")
    d = client.submit("a.v1")  # no key
    created = {r.id: r.created_at for r in client.list()}
    later = max(created.values()) + dt.timedelta(milliseconds=1)

    def matching(**filters) -> int:
        return client.cancel_many(dry_run=True, **filters)

    assert matching(type="a.v1") == 4
    assert matching(key_prefix="imp-2030_01-") == 1
    assert matching(key_prefix="imp-2030") == 2
    assert matching(key_prefix="im*[p]?%") == 1
    assert matching(key_prefix="im*") == 1
    assert matching(created_before=later) == 5 and matching(created_after=later) == 0
    assert matching(created_after=created[a1], created_before=later) == 5
    assert matching(created_before=created[a1]) == 0  # excluded
    assert matching(status="leased") == 0

    assert client.cancel_many(type="a.v1", key_prefix="imp-") == 2
    assert {k for k, v in statuses(client).items() if v == "cancelled"} == {a1, a2}
    assert client.retry_many(key_prefix="imp-2030_", dry_run=True) == 1
    assert client.retry_many(status=["cancelled"], type="a.v1") == 2
    assert client.retry_many(status="failed") == 0
    assert set(statuses(client).values()) == {"pending"} and {b, c, d} <= set(statuses(client))


@pytest.mark.parametrize(
    "method, kwargs, match",
    [
        ("retry_many", {"status": "pending"}, "status for a bulk retry must be among failed"),
        ("retry_many", {"status": ["failed", "succeeded"]}, "'succeeded'"),
        ("cancel_many", {"status": "failed"}, "bulk cancel must be among pending, leased"),
        ("cancel_many", {"status": {"pending": 1}}, "list of strings"),
        ("cancel_many", {"type": ""}, "type must not be empty"),
        ("cancel_many", {"key_prefix": " "}, "key_prefix must not be empty"),
        ("cancel_many", {"created_before": dt.datetime(2030, 1, 1)}, "timezone-aware"),
        ("retry_many", {"created_after": "2030-01-01"}, "must be a datetime"),
    ],
)
def test_bulk_changes_reject_bad_filters(client, method, kwargs, match):
    run_id = client.submit("t")
    with pytest.raises(minflow.InvalidInput, match=match):
        getattr(client, method)(**kwargs)
    assert client.get(run_id).status == "pending"


def test_bulk_cancel_of_running_runs_reaches_their_handlers(app):
    started, seen = [], []
    release = threading.Event()

    @app.handler("slow")
    def slow(run):
        started.append(run.id)
        release.wait(10)
        seen.append(run.is_cancelled())

    ids = app.submit_many([minflow.Job("slow") for _ in range(2)])
    worker = minflow.Worker(app, concurrency=2, schedules=False).start()
    try:
        wait_for(lambda: len(started) == 2, message="both handlers running")
        assert app.cancel_many(status="leased") == 2
        release.set()
        wait_for(lambda: len(seen) == 2, message="both handlers finishing")
    finally:
        worker.stop(10)
    assert seen == [True, True]
    assert {app.get(i).status for i in ids} == {"cancelled"}


def test_bulk_retry_wakes_workers_in_other_processes(dsn, client):
    ids = client.submit_many([minflow.Job("wake.v1"), minflow.Job("other.v1")])
    finish(client, ids, "failed", dt.datetime.now(UTC))
    if client.dialect == "postgres":
        listener = pg_connect(dsn.split("?")[0])
        try:
            listener.run(f'LISTEN "minflow_{dsn.split("schema=")[1]}"')
            assert client.retry_many() == 2
            listener.run("SELECT 1")  # reads what the server sent meanwhile
            assert sorted(n[2] for n in listener.notifications) == ["other.v1", "wake.v1"]
        finally:
            listener.close()
    else:
        # Another process's SQLite worker sees the commit through PRAGMA data_version.
        watcher = client._dialect._open()
        before = watcher.execute("PRAGMA data_version").fetchone()[0]
        assert client.retry_many() == 2
        assert watcher.execute("PRAGMA data_version").fetchone()[0] != before
        watcher.close()


# -- the worker registry and retention ---------------------------------------------------------


def test_workers_appear_renew_and_disappear(app):
    release = threading.Event()
    app.handler("reg.v1")(lambda run: release.wait(10))
    worker = minflow.Worker(
        app, worker_id="reg-1", lease=0.6, concurrency=3, prefixes=["reg."], schedules=False
    )
    assert app.workers() == []
    worker.start()
    try:
        entry = wait_for(lambda: app.workers(), message="the worker's entry")[0]
        assert (entry.id, entry.pid, entry.host) == ("reg-1", os.getpid(), socket.gethostname())
        assert (entry.types, entry.prefixes, entry.concurrency) == (("reg.v1",), ("reg.",), 3)
        assert entry.alive and entry.version == minflow.__version__
        assert entry.heartbeat_interval == pytest.approx(0.2)
        first_seen = entry.last_seen_at
        app.submit("reg.v1")
        renewed = wait_for(
            lambda: [w for w in app.workers() if w.last_seen_at > first_seen and w.running == 1],
            message="a renewal that counts the running handler",
        )[0]
        assert renewed.started_at == entry.started_at
        assert entry.to_json()["types"] == ["reg.v1"]
    finally:
        release.set()
        worker.stop(10)
    assert app.workers() == []


def test_killed_worker_turns_dead_and_old_entries_are_forgotten(app, dsn, tmp_path):
    # An entry last seen two days ago: any live worker deletes it.
    row = {
        "id": "ancient",
        "host": "h",
        "pid": 1,
        "type_list": "[]",
        "prefix_list": "[]",
        "concurrency": 1,
        "running": 0,
        "heartbeat_interval": 10.0,
        "version": "0",
    }
    with app._pool.connection() as conn:
        app._register_worker(conn, row, first=True)
    db(app, "UPDATE {minflow_worker} SET last_seen_at = {time:t}", t=LONG_AGO)
    assert [(w.id, w.alive) for w in app.workers()] == [("ancient", False)]
    (tmp_path / "regjobs.py").write_text(
        "import minflow\napp = minflow.App()\napp.handler('x')(print)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "minflow", "worker", "regjobs", "--dsn", dsn, "--lease", "0.6",
         "--worker-id", "doomed", "--no-schedules"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(
            lambda: [(w.id, w.alive) for w in app.workers()] == [("doomed", True)],
            timeout=30,
            message="the worker's entry, and the ancient one gone",
        )
        proc.send_signal(signal.SIGKILL)  # no clean shutdown: the entry stays
        proc.wait(10)
        dead = wait_for(
            lambda: [w for w in app.workers() if not w.alive],
            message="the killed worker's entry to turn dead",
        )
        assert [w.id for w in dead] == ["doomed"] and dead[0].pid == proc.pid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_worker_retention_prunes_in_the_housekeeper(app):
    app.handler("keep.v1")(lambda run: None)
    old = app.submit_many([minflow.Job("keep.v1") for _ in range(5)])
    finish(app, old, "succeeded")
    waiting = app.submit("keep.v1", run_in=3600)
    finish(app, [waiting], "pending")  # pending, however old, stays
    worker = minflow.Worker(app, retention=1, lease=3, schedules=False).start()
    try:
        wait_for(lambda: all(app.get(i) is None for i in old), message="the old runs pruned")
        assert worker.metrics.value("workflow_run_pruned_total", worker_id=worker.worker_id) == 5
    finally:
        worker.stop(10)
    assert app.get(waiting).status == "pending"
    with pytest.raises(minflow.InvalidInput, match="retention must be more than 0"):
        minflow.Worker(app, retention=0)
    assert minflow.Worker(app, retention=dt.timedelta(days=7)).retention == 7 * 86400


# -- the oldest-due age and run_at bounds ------------------------------------------------------


def test_oldest_due_age_counts_from_creation_when_run_at_is_older(client):
    client.submit("late.v1", run_at=dt.datetime(2000, 1, 1, tzinfo=UTC))
    (row,) = minflow._queue_snapshot(client)
    assert row[:3] == ("late.v1", "pending", 1) and 0 <= row[3] < 60


@pytest.mark.parametrize(
    "run_at",
    [
        dt.datetime(2, 1, 1, tzinfo=UTC),
        dt.datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC),
        dt.datetime.now(UTC) + dt.timedelta(days=365.25 * 100 + 2),
    ],
)
def test_run_at_out_of_range_is_invalid_input(client, run_at):
    with pytest.raises(minflow.InvalidInput, match="between 1970-01-01 and 100 years from now"):
        client.submit("t", run_at=run_at)
    assert client.list() == []
    assert client.get(client.submit("t", run_at=dt.datetime(1970, 1, 1, tzinfo=UTC)))

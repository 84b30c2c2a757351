"""The producer API (design §3) on both dialects."""

from __future__ import annotations

import datetime as dt
import json
import pickle
import threading
import uuid

import pytest

import minflow
from conftest import PgSchema, db, event_types, pg_connect, require_pg, wait_for, with_query

UTC = dt.timezone.utc


def count_runs(client) -> int:
    return db(client, "SELECT COUNT(*) FROM workflow_run")[0][0]


def test_submit_and_get_with_defaults(client):
    run_id = client.submit("billing.invoice.v1", {"order": 42, "lines": [1, 2], "note": "ünïcode"})
    run = client.get(run_id)
    assert isinstance(run, minflow.Run)
    assert run.id == run_id
    assert run.type == "billing.invoice.v1"
    assert run.payload == {"order": 42, "lines": [1, 2], "note": "ünïcode"}
    assert (run.status, run.priority, run.attempt, run.max_attempts) == ("pending", 100, 0, 3)
    assert run.idempotency_key is None and run.leased_by is None and run.result is None
    assert run.created_at.tzinfo is not None and run.run_at.tzinfo is not None
    assert abs((run.created_at - dt.datetime.now(UTC)).total_seconds()) < 60
    assert run.run_at <= run.created_at + dt.timedelta(seconds=1)
    assert event_types(client, run_id) == ["created"]


@pytest.mark.parametrize(
    "payload", [None, 0, "text", [1, "a", None], {"nested": {"deep": [True, 1.5]}}]
)
def test_payload_round_trips(client, payload):
    assert client.get(client.submit("t", payload)).payload == payload


def test_submit_options(client):
    at = dt.datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    run = client.get(
        client.submit("t", priority=-5, max_attempts=7, run_at=at, idempotency_key="k")
    )
    assert (run.priority, run.max_attempts, run.idempotency_key) == (-5, 7, "k")
    assert run.run_at == at
    later = client.get(client.submit("t", run_in=dt.timedelta(hours=1)))
    assert dt.timedelta(minutes=59) < later.run_at - later.created_at < dt.timedelta(minutes=61)
    seconds = client.get(client.submit("t", run_in=90))
    assert dt.timedelta(seconds=89) < seconds.run_at - seconds.created_at < dt.timedelta(seconds=91)


def test_priority_zero_is_kept(client):
    # The seed silently turned priority 0 into 100 (seed-spec C-15).
    assert client.get(client.submit("t", priority=0)).priority == 0


def test_idempotency_key_returns_existing_id(client):
    first = client.submit("t", {"v": 1}, idempotency_key="order-1")
    again = client.submit("t", {"v": 2}, idempotency_key="order-1")
    assert again == first
    assert count_runs(client) == 1
    assert client.get(first).payload == {"v": 1}
    assert event_types(client, first) == ["created"]


def test_idempotency_with_concurrent_submitters(dsn):
    ids, errors = [], []
    barrier = threading.Barrier(16)

    def submit():
        with minflow.Client(dsn) as c:
            try:
                barrier.wait()
                ids.append(c.submit("t", idempotency_key="same"))
            except Exception as exc:  # collected and asserted below
                errors.append(exc)

    minflow.Client(dsn).migrate()
    threads = [threading.Thread(target=submit) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ids) == 16 and len(set(ids)) == 1
    with minflow.Client(dsn) as c:
        assert count_runs(c) == 1


def test_submit_many(client):
    existing = client.submit("t", idempotency_key="k1")
    jobs = [
        minflow.Job("a", {"i": 1}),
        minflow.Job("b", {"i": 2}, priority=5, idempotency_key="k1"),
        minflow.Job("c", None, idempotency_key="k2", run_in=10),
        minflow.Job("d", [1], idempotency_key="k2"),
    ]
    ids = client.submit_many(jobs)
    assert len(ids) == 4
    assert ids[1] == existing and ids[3] == ids[2]
    assert len(set(ids)) == 3
    assert [client.get(i).type for i in ids] == ["a", "t", "c", "c"]
    assert count_runs(client) == 3
    assert client.submit_many([]) == []


def test_submit_many_is_all_or_nothing(client):
    jobs = [minflow.Job("a"), minflow.Job("b", {"bad": {1, 2}})]
    with pytest.raises(minflow.InvalidInput, match="payload"):
        client.submit_many(jobs)
    assert count_runs(client) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"type": ""}, "type must not be empty"),
        ({"type": "x" * 256}, "at most 255"),
        ({"type": 7}, "type must be a string"),
        ({"type": "t\x00"}, "NUL"),
        ({"type": "t", "payload": float("nan")}, "not JSON"),
        ({"type": "t", "payload": {"x": object()}}, "not JSON"),
        ({"type": "t", "payload": "a\x00b"}, "NUL"),
        ({"type": "t", "priority": "high"}, "priority must be an integer"),
        ({"type": "t", "priority": True}, "priority must be an integer"),
        ({"type": "t", "priority": 2**40}, "priority must be between"),
        ({"type": "t", "max_attempts": 0}, "max_attempts"),
        ({"type": "t", "run_at": dt.datetime(2030, 1, 1)}, "timezone-aware"),
        ({"type": "t", "run_at": "tomorrow"}, "run_at must be a datetime"),
        ({"type": "t", "run_in": -1}, "run_in"),
        ({"type": "t", "run_in": 5, "run_at": dt.datetime.now(UTC)}, "not both"),
        ({"type": "t", "idempotency_key": 5}, "idempotency_key"),
    ],
)
def test_malformed_submit_writes_nothing(client, kwargs, match):
    with pytest.raises(minflow.InvalidInput, match=match):
        client.submit(**kwargs)
    assert count_runs(client) == 0


def test_get_unknown(client):
    assert client.get("7f0c3b5e-0000-4000-8000-000000000000") is None
    assert client.get("not-a-uuid") is None
    assert client.events("not-a-uuid") == []


def test_list_filters_and_order(client):
    a = client.submit("a", idempotency_key="ka")
    b = client.submit("b")
    c = client.submit("a")
    client.cancel(b)
    assert [r.id for r in client.list()] == [c, b, a]
    assert [r.id for r in client.list(type="a")] == [c, a]
    assert [r.id for r in client.list(status="cancelled")] == [b]
    assert [r.id for r in client.list(idempotency_key="ka")] == [a]
    assert [r.id for r in client.list(type="a", status="pending", limit=1, offset=1)] == [a]
    assert client.list(type="zzz") == []


@pytest.mark.parametrize(
    "kwargs", [{"status": "done"}, {"limit": 0}, {"limit": 100_000}, {"offset": -1}, {"type": ""}]
)
def test_list_rejects_bad_filters(client, kwargs):
    with pytest.raises(minflow.InvalidInput):
        client.list(**kwargs)


def test_cancel_pending(client):
    run_id = client.submit("t")
    client.cancel(run_id)
    assert client.get(run_id).status == "cancelled"
    assert event_types(client, run_id) == ["created", "cancelled"]
    with pytest.raises(minflow.AlreadyComplete):
        client.cancel(run_id)
    with pytest.raises(minflow.NotFound):
        client.cancel("7f0c3b5e-0000-4000-8000-000000000000")
    with pytest.raises(minflow.NotFound):
        client.cancel("nope")


def test_cancel_finished_run_is_refused(client):
    run_id = client.submit("t")
    db(client, "UPDATE workflow_run SET status = 'succeeded' WHERE id = {uuid:id}", id=run_id)
    with pytest.raises(minflow.AlreadyComplete, match="succeeded"):
        client.cancel(run_id)
    assert client.get(run_id).status == "succeeded"


def test_retry_revives_failed_and_cancelled_runs(client):
    failed = client.submit("t", max_attempts=2)
    db(
        client,
        "UPDATE workflow_run SET status = 'failed', attempt = 2, last_error = 'boom', "
        "run_at = {time:at} WHERE id = {uuid:id}",
        id=failed,
        at=dt.datetime(2000, 1, 1, tzinfo=UTC),
    )
    client.retry(failed)
    run = client.get(failed)
    assert (run.status, run.attempt) == ("pending", 0)
    assert run.run_at > dt.datetime(2020, 1, 1, tzinfo=UTC)
    assert client.events(failed)[-1].event_type == "retried"
    cancelled = client.submit("t")
    client.cancel(cancelled)
    client.retry(cancelled)
    assert client.get(cancelled).status == "pending"
    with pytest.raises(minflow.InvalidState, match="pending"):
        client.retry(cancelled)
    with pytest.raises(minflow.NotFound):
        client.retry("7f0c3b5e-0000-4000-8000-000000000000")


def test_stats(client):
    client.submit_many([minflow.Job("a"), minflow.Job("a"), minflow.Job("b")])
    client.cancel(client.submit("b"))
    assert client.stats() == {"a": {"pending": 2}, "b": {"pending": 1, "cancelled": 1}}


def test_migrate_is_idempotent_and_versioned(dsn):
    with minflow.Client(dsn) as c:
        assert c.schema_version() == 0
        assert c.migrate() == minflow.SCHEMA_VERSION
        assert c.migrate() == 0
        assert c.schema_version() == minflow.SCHEMA_VERSION


def test_unmigrated_database_gives_a_clear_error(dsn):
    with minflow.Client(dsn) as c, pytest.raises(minflow.MinflowError, match="migrate"):
        c.submit("t")


def test_client_is_a_context_manager_and_closes(dsn):
    with minflow.Client(dsn) as c:
        c.migrate()
    with pytest.raises(minflow.MinflowError, match="closed"):
        c.submit("t")


def test_memory_database_shares_one_connection():
    with minflow.Client("sqlite://:memory:") as c:
        c.migrate()
        run_id = c.submit("t", {"x": 1})
        assert c.get(run_id).payload == {"x": 1}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"type": "t\ud800"}, "lone surrogate"),
        ({"type": "t", "payload": {"k": "\udfff"}}, "lone surrogate"),
        ({"type": "t", "idempotency_key": "\ud800"}, "lone surrogate"),
        ({"type": "t", "run_in": 1e12}, "100 years"),
    ],
)
def test_unencodable_text_and_absurd_delays_are_invalid_input(client, kwargs, match):
    with pytest.raises(minflow.InvalidInput, match=match):
        client.submit(**kwargs)
    assert count_runs(client) == 0


def test_submit_tells_whether_it_deduplicated(client):
    first = client.submit("t", idempotency_key="k")
    again = client.submit("t", {"other": 1}, idempotency_key="k")
    assert again == first and (first.deduplicated, again.deduplicated) == (False, True)
    ids = client.submit_many([minflow.Job("t", idempotency_key="k"), minflow.Job("t")])
    assert ids[0] == first and [i.deduplicated for i in ids] == [True, False]
    # Still an id wherever a str goes: lookups, JSON, pickling.
    assert client.get(again).id == first and json.dumps(again) == f'"{first}"'
    assert pickle.loads(pickle.dumps(again)).deduplicated
    assert client.get(first).payload is None  # the second submit wrote nothing


def test_pointing_a_client_elsewhere_closes_its_old_connections(tmp_path):
    """What ``minflow worker --dsn`` does to an imported App: the old pool is closed."""
    require_pg()
    schema = PgSchema()
    name = f"mf_old_{uuid.uuid4().hex[:8]}"
    admin = pg_connect()
    try:
        app = minflow.App(with_query(schema.dsn, application_name=name))
        app.migrate()  # leaves a pooled connection open
        sessions = "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = :name"
        assert admin.run(sessions, name=name) == [[1]]
        # Closed, not merely dropped: with a reference left (here), or without CPython's
        # reference counting, a dropped pool would keep its sessions open.
        old_pool = app._pool
        app._configure(f"sqlite:///{tmp_path / 'other.db'}")
        wait_for(lambda: admin.run(sessions, name=name) == [[0]], 10, message="the old session")
        assert old_pool is not app._pool
        app.migrate()
        assert app.dialect == "sqlite" and app.get(app.submit("t")).status == "pending"
        app.close()
    finally:
        admin.close()
        schema.drop()

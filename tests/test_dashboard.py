"""The read-only endpoints the dashboard draws on: run counts (what ``stats --json`` prints) and
runs finished per minute, on both dialects."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

import minflow
from conftest import db
from test_cli import cli, ok_json
from test_http import API, Api
from test_operate import finish

UTC = dt.timezone.utc


@pytest.fixture
def served(client):
    """The API on a fresh database (both dialects), without a key."""
    api = Api(client)
    yield api
    api.close()


# -- the endpoints it draws on -----------------------------------------------------------------


def test_stats_answers_what_stats_json_prints(served, client, dsn, tmp_path):
    client.submit_many([minflow.Job("a.v1"), minflow.Job("a.v1", run_in=3600)])
    client.submit("b.v1", run_in=3600)  # pending, but not due: no age
    done = client.submit_many([minflow.Job("a.v1") for _ in range(3)])
    finish(client, done[:2], "succeeded")
    finish(client, done[2:], "failed")
    status, _, answer = served.call("GET", f"{API}/stats")
    printed = ok_json(cli(tmp_path, "stats", "--json", "--dsn", dsn))
    assert status == 200 and answer.keys() == printed.keys() == {"a.v1", "b.v1"}
    for document in (answer, printed):
        waited = document["a.v1"].pop("oldest_due_pending_seconds")
        assert 0 <= waited < 60
    assert answer == printed
    assert answer == {
        "a.v1": {"pending": 2, "succeeded": 2, "failed": 1},
        "b.v1": {"pending": 1, "oldest_due_pending_seconds": None},
    }


def test_throughput_counts_finished_runs_per_minute_of_the_database_clock(served, client):
    run_id = client.submit("t.v1")
    with client._pool.connection() as conn:
        now = client._db_now(conn)
    minute = now.replace(second=0, microsecond=0)
    events = [
        ("succeeded", minute - dt.timedelta(minutes=2, seconds=-5)),
        ("succeeded", minute - dt.timedelta(minutes=2, seconds=-50)),
        ("failed", minute - dt.timedelta(minutes=2, seconds=-30)),
        ("retried", minute - dt.timedelta(minutes=2, seconds=-30)),  # not finished: not counted
        ("failed", minute - dt.timedelta(minutes=7)),
        ("succeeded", minute - dt.timedelta(minutes=60)),  # before the hour's first minute
    ]
    for event_type, when in events:
        db(
            client,
            "INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at) "
            "VALUES ({uuid:id}, :event_type, NULL, {time:when})",
            id=run_id,
            event_type=event_type,
            when=when,
        )
    status, _, answer = served.call("GET", f"{API}/throughput")
    assert status == 200 and answer["minutes"] == 60
    per_minute = answer["per_minute"]
    starts = [minflow._parse_time(m["minute"]) for m in per_minute]
    assert len(starts) == 60 and starts == sorted(starts)
    assert {b - a for a, b in itertools.pairwise(starts)} == {dt.timedelta(minutes=1)}
    # The last minute is the current one (the clock may have moved on to the next meanwhile).
    assert starts[-1] - minute in (dt.timedelta(0), dt.timedelta(minutes=1))

    def counted(answer: dict) -> dict:
        return {
            minflow._parse_time(m["minute"]): (m["succeeded"], m["failed"])
            for m in answer["per_minute"]
            if m["succeeded"] or m["failed"]
        }

    expected = {
        minute - dt.timedelta(minutes=2): (2, 1),
        minute - dt.timedelta(minutes=7): (0, 1),
    }
    assert counted(answer) == expected
    status, _, answer = served.call("GET", f"{API}/throughput?minutes=3")
    first = minflow._parse_time(answer["per_minute"][0]["minute"])
    assert status == 200 and len(answer["per_minute"]) == 3
    assert counted(answer) == {k: v for k, v in expected.items() if k >= first}
    assert first <= minute - dt.timedelta(minutes=1)  # 3 minutes back: never the 7th
    for query, needle in (
        ("0", "minutes must be 1 to 1440"),
        ("1441", "got 1441"),
        ("x", "integer"),
    ):
        status, _, answer = served.call("GET", f"{API}/throughput?minutes={query}")
        assert status == 400 and needle in answer["error"], answer


def test_throughput_reads_the_event_type_index(client):
    """With a long history, the last hour is a range of the index, not a scan of the table;
    on PostgreSQL also in the generic plan, which knows no cut-off (a prepared statement may
    get it)."""
    run_id = client.submit("t.v1")
    statement = client._dialect.sql["throughput"]
    since = dt.datetime.now(UTC) - dt.timedelta(hours=1)
    if client.dialect == "sqlite":
        plan = " ".join(
            str(row[-1]) for row in db(client, "EXPLAIN QUERY PLAN " + statement, since=since)
        )
        assert "idx_workflow_event_type" in plan and "SCAN workflow_event" not in plan, plan
        return
    db(
        client,
        "INSERT INTO {workflow_event} (workflow_id, event_type, created_at) "
        "SELECT {uuid:id}, (ARRAY['created', 'succeeded', 'failed'])[1 + i % 3], "
        "TIMESTAMPTZ '2020-01-01' + make_interval(secs => i) FROM generate_series(1, 30000) AS i",
        id=run_id,
    )
    db(client, "ANALYZE {workflow_event}")
    numbered = statement.replace(":since", "$1")
    with client._pool.connection() as conn:
        conn.query("SET plan_cache_mode = force_generic_plan")
        conn.query(f"PREPARE throughput_plan AS {numbered}")
        explained = conn.query(f"EXPLAIN EXECUTE throughput_plan('{since.isoformat()}')")
        conn.query("DEALLOCATE throughput_plan")
        conn.query("RESET plan_cache_mode")
    plan = "\n".join(row[0] for row in explained)
    assert "idx_workflow_event_type" in plan and "Seq Scan" not in plan, plan

"""minflow and the Go library share one database (design §4, seed-spec §1, §14.1).

A database created with the seed's own DDL is migrated by only adding; rows its producer
inserts are claimed and completed by a minflow worker; rows minflow writes come back through the
seed's queries and its timestamp parser. The seed's side is restated in ``seed_compat``.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3

import pytest

import minflow
from conftest import db, pg_connect, require_pg, wait_for
from seed_compat import (
    CLAIM_DUE,
    GET_EVENTS,
    GET_RUN,
    LIST_SCHEDULES,
    SeedDB,
    go_parse_timestamp,
    go_sqlite_time_format,
    go_time_string,
    go_utc_text,
    go_zoned_time_string,
    list_runs,
)

UTC = dt.timezone.utc
NO_WAIT = {"backoff": lambda attempt: 0.0, "schedules": False}


def open_seed(dsn: str, dialect: str) -> SeedDB:
    parsed = minflow._parse_dsn(dsn)
    if dialect == "sqlite":
        return SeedDB("sqlite", path=parsed.path)
    conn = pg_connect()
    # The seed never creates its schema (seed-spec §1.1): whoever deploys it does.
    conn.run(f'CREATE SCHEMA IF NOT EXISTS "{parsed.schema}"')
    return SeedDB("postgres", pg=conn, schema=parsed.schema)


@pytest.fixture
def seed_db(dsn, dialect):
    """A database created by the seed's AutoMigrate, and a connection the way Go opens one."""
    seed = open_seed(dsn, dialect)
    seed.migrate()
    yield seed
    seed.close()


# -- the parser port itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-03-09 07:05:12", "2026-03-09T07:05:12+00:00"),
        # Go accepts a fraction after the seconds even where the layout has none.
        ("2026-03-09 07:05:12.123", "2026-03-09T07:05:12.123000+00:00"),
        ("2026-03-09T07:05:12.123456789Z", "2026-03-09T07:05:12.123456+00:00"),
        ("2026-03-09T09:05:12+02:00", "2026-03-09T07:05:12+00:00"),
        ("2026-03-09 07:05:12.5 +0000 UTC", "2026-03-09T07:05:12.500000+00:00"),
        ("2026-03-09 00:05:12.1 -0700 PDT", "2026-03-09T07:05:12.100000+00:00"),
        ("2026-03-09 07:05:12+00", "2026-03-09T07:05:12+00:00"),
        # time.Time.String() with its monotonic suffix: Go's reader yields the zero time.
        ("2026-03-09 07:05:12.123456789 +0000 UTC m=+61.234567890", None),
        ("2026-13-09 07:05:12", None),
        ("yesterday", None),
    ],
)
def test_go_parse_timestamp_port(text, expected):
    parsed = go_parse_timestamp(text)
    assert (parsed.isoformat() if parsed else None) == expected


# -- migrate() on a seed database ------------------------------------------------------------


def schema_snapshot(seed: SeedDB) -> dict:
    """Tables with their columns, indexes and constraints, in comparable form."""
    norm = lambda text: re.sub(r"\s+", " ", text or "").strip()  # noqa: E731
    out: dict = {"tables": {}, "indexes": {}, "constraints": {}}
    if seed.dialect == "sqlite":
        tables = seed.run(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
        for name, sql in tables:
            out["tables"][name] = {
                row[1]: (row[2].upper(), row[3], row[4], row[5])
                for row in seed.run(f"PRAGMA table_info('{name}')")
            }
            # CHECKs, REFERENCES and UNIQUE live in the CREATE TABLE text; ADD COLUMN only
            # inserts before its closing parenthesis.
            out["constraints"][name] = norm(sql).rstrip(")").rstrip()
            for fk in seed.run(f"PRAGMA foreign_key_list('{name}')"):
                out["constraints"][f"{name}.fk.{fk[3]}"] = tuple(fk[2:])
        for name, table, sql in seed.run(
            "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index'"
        ):
            columns = tuple(r[2] for r in seed.run(f"PRAGMA index_info('{name}')"))
            out["indexes"][name] = (table, columns, norm(sql))
    else:
        for table, column, kind, nullable, default in seed.run(
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = current_schema()"
        ):
            out["tables"].setdefault(table, {})[column] = (kind, nullable, default)
        for name, definition in seed.run(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
        ):
            out["indexes"][name] = definition
        for table, name, definition in seed.run(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE connamespace = current_schema()::regnamespace"
        ):
            out["constraints"][f"{table}.{name}"] = definition
    return out


def test_migrate_on_a_seed_database_only_adds(dsn, seed_db):
    before = schema_snapshot(seed_db)
    assert set(before["tables"]) == {
        "workflow_run",
        "workflow_event",
        "workflow_registry",
        "workflow_schedule",
    }
    with minflow.Client(dsn) as client:
        assert client.migrate() == len(minflow._PG_MIGRATIONS)
        assert client.migrate() == 0
        assert client.schema_version() == minflow.SCHEMA_VERSION
    after = schema_snapshot(seed_db)

    for table, columns in before["tables"].items():
        kept = {name: after["tables"][table].get(name) for name in columns}
        assert kept == columns, f"{table}: a seed column was changed or dropped"
        added = set(after["tables"][table]) - set(columns)
        # Whatever minflow adds to a seed table must not break the seed's INSERTs.
        for name in added:
            definition = after["tables"][table][name]
            nullable = (
                definition[1] == "YES" if seed_db.dialect == "postgres" else not definition[1]
            )
            assert nullable or definition[2] is not None, f"{table}.{name} is NOT NULL"
    for name, definition in before["indexes"].items():
        assert after["indexes"].get(name) == definition, f"index {name} changed or dropped"
    for name, definition in before["constraints"].items():
        if seed_db.dialect == "sqlite" and "." not in name:
            assert after["constraints"][name].startswith(definition), f"{name} rewritten"
        else:
            assert after["constraints"].get(name) == definition, f"constraint {name} changed"
    assert "minflow_migration" in after["tables"]
    assert set(after["indexes"]) > set(before["indexes"])


# -- rows the Go producer wrote, run by minflow ----------------------------------------------


def test_go_rows_are_claimed_and_completed_by_minflow(dsn, dialect, seed_db):
    now = dt.datetime.now(UTC).replace(microsecond=0)
    due = now - dt.timedelta(seconds=5)
    expected: dict[str, object] = {}  # run id -> payload

    # A run a Go worker claimed and then died on: seed claim with a 0 s lease (seed-spec C-18).
    abandoned = seed_db.create_run("go.job", b'{"n": 0}', go_utc_text(due), priority=1)
    assert [str(r[0]) for r in seed_db.claim_run("go-worker-1", 0)] == [abandoned]
    expected[abandoned] = {"n": 0}
    # JSON bound as []byte (a BLOB on SQLite) and as text, run_at in Create's format.
    expected[seed_db.create_run("go.job", b'{"n": 1}', go_utc_text(due), key="k1")] = {"n": 1}
    expected[seed_db.create_run("go.job", '{"n": 2}', go_utc_text(due))] = {"n": 2}
    if dialect == "sqlite":
        # MarkFailed's retry time as modernc writes a time.Time (seed-spec C-6).
        go_due = due.replace(microsecond=123456)
        go_string = go_time_string(go_due)
        expected[seed_db.create_run("go.job", b'{"n": 3}', go_string)] = {"n": 3}
        literal = "2026-03-09 07:05:12.123456789 +0000 UTC m=+61.234567890"
        expected[seed_db.create_run("go.job", b'{"n": 4}', literal)] = {"n": 4}
        kinds = dict(seed_db.run("SELECT id, typeof(payload) FROM workflow_run"))
        assert sorted(kinds.values()) == ["blob", "blob", "blob", "blob", "text"]
    # A raw insert relying on every column default.
    default_id = "7b0c4f3e-2a51-4d7e-9c1e-0f6a2b3c4d5e"
    seed_db.run(
        "INSERT INTO workflow_run (id, type, payload) VALUES ($1, $2, $3)",
        default_id,
        "go.job",
        "[]",
    )
    expected[default_id] = []

    app = minflow.App(dsn)
    app.migrate()
    # minflow reads every stored time format, including Go's time.String() one.
    for run_id in expected:
        run = app.get(run_id)
        assert run.run_at is not None and run.created_at is not None, run
        assert run.run_at <= dt.datetime.now(UTC)
    if dialect == "sqlite":
        assert app.get(list(expected)[3]).run_at == go_due
        assert app.get(list(expected)[4]).run_at == dt.datetime(
            2026, 3, 9, 7, 5, 12, 123456, tzinfo=UTC
        )

    seen = {}

    @app.handler("go.job")
    def handle(run):
        seen[run.id] = run.payload
        return {"echo": run.payload}

    assert minflow.Worker(app, **NO_WAIT).run(burst=True) == len(expected)
    assert seen == expected
    for run_id, payload in expected.items():
        run = app.get(run_id)
        assert (run.status, run.result) == ("succeeded", {"echo": payload})
        kinds = [e.event_type for e in app.events(run_id)]
        assert kinds[-3:] == ["leased", "started", "succeeded"]
    assert [e.event_type for e in app.events(abandoned)] == [
        "created",
        "leased",  # the Go worker's
        "retried",  # minflow's rescue of its expired lease
        "leased",
        "started",
        "succeeded",
    ]
    assert app.events(abandoned)[2].data["reason"] == "lease_expired"
    app.close()


# -- rows minflow wrote, read by the seed -----------------------------------------------------


def _go_time(seed: SeedDB, value) -> dt.datetime:
    parsed = go_parse_timestamp(seed.as_scanned_string(value))
    assert parsed is not None, f"the Go reader would show {value!r} as 0001-01-01"
    return parsed


def _same_time(seed: SeedDB, stored, expected: dt.datetime | None) -> None:
    assert expected is not None
    assert abs(_go_time(seed, stored) - expected) < dt.timedelta(milliseconds=1), (stored, expected)


@pytest.fixture
def minflow_db(dsn):
    """A database minflow created, with runs in every state, events, and a fired schedule."""
    app = minflow.App(dsn)
    app.migrate()
    app.handler("ok")(lambda run: {"ok": run.payload})

    @app.handler("flaky")
    def flaky(run):
        if run.attempt == 1:
            raise RuntimeError("first attempt fails")
        return "second time lucky"

    @app.handler("dead")
    def dead(run):
        raise ValueError("always fails")

    runs = {
        "ok": app.submit("ok", {"a": [1, "two", None]}, idempotency_key="idem-1"),
        "flaky": app.submit("flaky", "text payload"),
        "dead": app.submit("dead", 42, max_attempts=1),
        "later": app.submit("ok", None, run_in=3600),
        "cancelled": app.submit("ok", {"x": 1}),
    }
    app.cancel(runs["cancelled"])
    assert minflow.Worker(app, **NO_WAIT).run(burst=True) == 4
    schedule_id = app.schedule("report", {"k": "v"}, cron="*/5 * * * *")
    # Let a slot come due (as if five minutes passed), then let minflow fire it.
    db(
        app,
        "UPDATE workflow_schedule SET next_run_at = {time:t} WHERE id = {uuid:id}",
        id=schedule_id,
        t=dt.datetime.now(UTC) - dt.timedelta(minutes=1),
    )
    assert app.tick() == 1
    runs["scheduled"] = app.list(type="report")[0].id
    yield app, runs, schedule_id
    app.close()


def test_minflow_rows_read_by_the_seed(dsn, dialect, minflow_db):
    app, runs, schedule_id = minflow_db
    seed = open_seed(dsn, dialect)
    try:
        states = {}
        for name, run_id in runs.items():
            mine = app.get(run_id)
            rows = seed.run(GET_RUN, run_id)
            assert len(rows) == 1, name
            row = rows[0]
            (rid, run_type, payload, status, priority, run_at, key, attempt, max_attempts) = row[:9]
            leased_by, lease_until, last_error, result, created_at, updated_at = row[9:]
            assert (str(rid), run_type, status, priority, key) == (
                run_id,
                mine.type,
                mine.status,
                mine.priority,
                mine.idempotency_key,
            )
            assert (attempt, max_attempts, leased_by, last_error) == (
                mine.attempt,
                mine.max_attempts,
                mine.leased_by,
                mine.last_error,
            )
            assert (
                seed.json_value(payload) == mine.payload and seed.json_value(result) == mine.result
            )
            _same_time(seed, run_at, mine.run_at)
            _same_time(seed, created_at, mine.created_at)
            _same_time(seed, updated_at, mine.updated_at)
            if lease_until is not None:
                _same_time(seed, lease_until, mine.lease_until)
            states[name] = status
            if dialect == "sqlite":
                # The design stores JSON as TEXT; Go scans it into []byte either way.
                kinds = seed.run(
                    "SELECT typeof(payload), typeof(result) FROM workflow_run WHERE id = $1", run_id
                )[0]
                assert kinds[0] == "text" and kinds[1] in ("text", "null")
        assert states == {
            "ok": "succeeded",
            "flaky": "succeeded",
            "dead": "failed",
            "later": "pending",
            "cancelled": "cancelled",
            "scheduled": "pending",
        }
        assert _go_time(seed, seed.run(GET_RUN, runs["later"])[0][5]) > dt.datetime.now(UTC)

        # List, with and without filters, agrees with minflow's.
        for filters in ({}, {"type": "ok"}, {"status": "succeeded"}, {"idempotency_key": "idem-1"}):
            sql, args = list_runs(**filters)
            theirs = [str(r[0]) for r in seed.run(sql, *args)]
            assert sorted(theirs) == sorted(r.id for r in app.list(**filters)), filters

        # Events: every row readable, same set as minflow's.
        for name, run_id in runs.items():
            theirs = seed.run(GET_EVENTS, run_id)
            mine = app.events(run_id)
            assert sorted(int(r[0]) for r in theirs) == [e.id for e in mine], name
            by_id = {e.id: e for e in mine}
            for event_id, workflow_id, event_type, data, created_at in theirs:
                event = by_id[int(event_id)]
                assert (str(workflow_id), event_type) == (run_id, event.event_type)
                assert seed.json_value(data) == event.data
                _same_time(seed, created_at, event.created_at)

        # Schedules: the list reads, and a fired schedule is not due again.
        mine = app.get_schedule(schedule_id)
        [(sid, stype, payload, cron, zone, next_run_at, last_run_at, enabled, prio, attempts)] = (
            seed.run(LIST_SCHEDULES)
        )
        assert (str(sid), stype, cron, zone, bool(enabled), prio, attempts) == (
            schedule_id,
            "report",
            "*/5 * * * *",
            "UTC",
            True,
            100,
            3,
        )
        assert seed.json_value(payload) == {"k": "v"}
        _same_time(seed, next_run_at, mine.next_run_at)
        _same_time(seed, last_run_at, mine.last_run_at)
        assert _go_time(seed, next_run_at) > dt.datetime.now(UTC)
        assert seed.run(CLAIM_DUE[dialect]) == []
        # The seed never reads a schedule's created_at/updated_at, but they are its columns too.
        [(created, updated)] = seed.run(
            "SELECT created_at, updated_at FROM workflow_schedule WHERE id = $1", schedule_id
        )
        _same_time(seed, created, mine.created_at)
        assert _go_time(seed, updated) >= _go_time(seed, created)

        # The seed's claim takes a due minflow run (pending since a second ago at least).
        fresh = app.submit(
            "ok", {"go": True}, run_at=dt.datetime.now(UTC) - dt.timedelta(seconds=5)
        )
        [(cid, ctype, cpayload, cattempt, cmax)] = seed.claim_run("go-worker", 30, ["ok%"])
        assert (str(cid), ctype, seed.json_value(cpayload), cattempt, cmax) == (
            fresh,
            "ok",
            {"go": True},
            0,
            3,
        )
        claimed = app.get(fresh)
        assert (claimed.status, claimed.leased_by) == ("leased", "go-worker")
        assert claimed.lease_until > dt.datetime.now(UTC)
    finally:
        seed.close()


def test_schedule_payload_is_scannable_by_the_go_ticker(tmp_path):
    """The Go ticker scans a schedule's payload into json.RawMessage, which database/sql fills
    from a BLOB but refuses from TEXT (seed-spec §1.6, C-20): on SQLite minflow must store it
    as the Go library does, or one minflow schedule stops every Go tick."""
    path = tmp_path / "sched.db"
    client = minflow.Client(f"sqlite:///{path}")
    client.migrate()
    first = client.schedule("report", {"k": 1}, cron="@daily", name="nightly")
    client.schedule("report", {"k": 2}, cron="@daily", name="nightly")  # updated in place
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT id, typeof(payload) FROM workflow_schedule").fetchall() == [
            (first, "blob")
        ]
    finally:
        raw.close()
    assert client.get_schedule(first).payload == {"k": 2}
    client.close()


def test_go_schedules_fire_in_minflow_with_the_seed_slot_key(dsn, dialect, seed_db):
    """A schedule the Go client created fires in minflow's ticker under the key a Go ticker
    would use for the same slot, so a mixed fleet still fires each slot once."""
    # Yearly, so that no newer slot can come due while the test runs.
    cron = "0 0 1 1 *"
    slot = dt.datetime(dt.datetime.now(UTC).year, 1, 1, tzinfo=UTC)
    create = (
        "INSERT INTO workflow_schedule (id, type, payload, schedule, timezone, next_run_at, "
        "priority, max_attempts) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
    )
    blob_id, default_id = (
        "3f2b1c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
        "4a3b2c1d-6e5f-4b7a-9c8d-1f0e3b2a5c4d",
    )
    payload = b'{"report": "weekly"}' if dialect == "sqlite" else '{"report": "weekly"}'
    seed_db.run(create, blob_id, "go.report", payload, cron, "UTC", go_utc_text(slot), 50, 2)
    # Raw SQL relying on the payload default '{}' (TEXT on SQLite, which Go itself cannot scan).
    seed_db.run(
        "INSERT INTO workflow_schedule (id, type, schedule, next_run_at) VALUES ($1, $2, $3, $4)",
        default_id,
        "go.report",
        cron,
        go_utc_text(slot),
    )

    app = minflow.App(dsn)
    app.migrate()
    assert {s.id: s.payload for s in app.schedules()} == {
        blob_id: {"report": "weekly"},
        default_id: {},
    }
    assert app.tick() == 2
    assert app.tick() == 0
    runs = {r.idempotency_key: r for r in app.list(type="go.report")}
    unix = int(slot.timestamp())
    assert set(runs) == {f"schedule:{blob_id}:{unix}", f"schedule:{default_id}:{unix}"}
    fired = runs[f"schedule:{blob_id}:{unix}"]
    assert (fired.payload, fired.priority, fired.max_attempts) == ({"report": "weekly"}, 50, 2)
    for schedule in app.schedules():
        assert schedule.next_run_at == slot.replace(year=slot.year + 1)
        assert schedule.last_run_at is not None

    # A Go ticker that processed the same slot inserts with the same key: nothing new.
    go_insert = (
        "INSERT INTO workflow_run (id, type, payload, priority, run_at, idempotency_key, "
        "max_attempts) VALUES ($1, $2, $3, $4, {now}, $5, $6) "
        "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
    ).replace("{now}", "datetime('now')" if dialect == "sqlite" else "NOW()")
    again = seed_db.run(
        go_insert,
        "5b4c3d2e-7f6a-4c8b-ad9e-2a1b4c3d6e5f",
        "go.report",
        payload,
        50,
        f"schedule:{blob_id}:{unix}",
        2,
    )
    assert again == []
    assert len(app.list(type="go.report")) == 2
    app.close()


# -- times and event order as the Go library writes and reads them --------------------------


def test_go_zoned_retry_times_are_claimed_at_their_instant(tmp_path):
    """A Go worker outside UTC writes SQLite retry times as Go's time text in its own zone:
    each is claimed at its instant, east of UTC (not 9 h late) and west of it (not early)."""
    dsn = f"sqlite://{tmp_path / 'zoned.db'}"
    seed = open_seed(dsn, "sqlite")
    seed.migrate()
    tokyo, new_york = dt.timezone(dt.timedelta(hours=9)), dt.timezone(dt.timedelta(hours=-5))
    now = dt.datetime.now(UTC)
    soon, later = now + dt.timedelta(seconds=1.5), now + dt.timedelta(hours=1)
    runs = {
        "tokyo": seed.create_run("go.retry", b'"tokyo"', go_zoned_time_string(soon, tokyo, "JST")),
        "mattn": seed.create_run("go.retry", b'"mattn"', go_sqlite_time_format(soon, tokyo)),
        "new_york": seed.create_run(
            "go.retry", b'"new_york"', go_zoned_time_string(later, new_york, "EST")
        ),
    }
    seed.close()
    app = minflow.App(dsn)
    app.migrate()
    started: dict[str, dt.datetime] = {}
    app.handler("go.retry")(lambda run: started.setdefault(run.payload, dt.datetime.now(UTC)))
    worker = minflow.Worker(app, schedules=False).start()
    try:
        wait_for(lambda: len(started) >= 2, 15, 0.02, "the +09:00 retries to be claimed")
    finally:
        worker.stop(timeout=10)
    for name in ("tokyo", "mattn"):
        assert soon - dt.timedelta(seconds=0.1) <= started[name] <= soon + dt.timedelta(seconds=3)
    assert "new_york" not in started  # due in an hour: not claimed early
    run = app.get(runs["new_york"])
    assert run.status == "pending" and abs(run.run_at - later) < dt.timedelta(milliseconds=1)
    # Rewritten as minflow's UTC text, which the Go reader parses to the same instant.
    [[stored]] = db(app, "SELECT run_at FROM workflow_run WHERE id = :id", id=runs["new_york"])
    assert len(stored) == 23 and go_parse_timestamp(stored) == run.run_at
    app.close()


def test_events_have_distinct_times_in_causal_order_on_postgres(tmp_path, request):
    """The Go reader orders a run's events by created_at alone: every event of a run has its
    own time, in the order the run went through them (and ids agree)."""
    require_pg()
    from conftest import make_dsn

    app = minflow.App(make_dsn("postgres", tmp_path, request))
    app.migrate()
    app.handler("t")(lambda run: None)
    ids = app.submit_many([minflow.Job("t", {"n": n}) for n in range(200)])
    assert app.run_worker(burst=True, concurrency=50, schedules=False) == 200
    rows = db(
        app,
        "SELECT CAST(workflow_id AS text), event_type, created_at, id FROM {workflow_event} "
        "ORDER BY workflow_id, created_at, id",
    )
    by_run: dict[str, list] = {}
    for run_id, event_type, created_at, event_id in rows:
        by_run.setdefault(run_id, []).append((event_type, created_at, event_id))
    assert set(by_run) == set(ids)
    for run_id, events in by_run.items():
        assert [e[0] for e in events] == ["created", "leased", "started", "succeeded"], run_id
        times, event_ids = [e[1] for e in events], [e[2] for e in events]
        assert times == sorted(set(times)), f"{run_id}: events share a time: {events}"
        assert event_ids == sorted(event_ids)
    app.close()

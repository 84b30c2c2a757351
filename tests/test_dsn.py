"""Connection strings (design §2): every accepted form, clear errors, masked passwords, quoted
schema names. Parsing needs no database; only the end-to-end schema tests touch PostgreSQL."""

from __future__ import annotations

import os
import re
import threading
import uuid
from urllib.parse import quote

import pytest

import minflow
from conftest import PG_DSN, PgSchema, pg_connect, require_pg, wait_for, with_query


def parse(text):
    return minflow._parse_dsn(text)


# -- SQLite ---------------------------------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINFLOW_DSN", raising=False)
    return tmp_path


@pytest.mark.parametrize(
    "text, relative",
    [
        ("sqlite://jobs.db", "jobs.db"),
        ("sqlite3://jobs.db", "jobs.db"),
        ("SQLite://jobs.db", "jobs.db"),  # schemes are case-insensitive (seed-spec C-19)
        ("sqlite://data/jobs.db", "data/jobs.db"),  # the Go library's host + path
        ("sqlite://my%20jobs.db", "my jobs.db"),
        ("sqlite://jobs.db#fragment", "jobs.db"),
    ],
)
def test_sqlite_relative_paths(in_tmp, text, relative):
    dsn = parse(text)
    assert (dsn.kind, dsn.path, dsn.memory) == ("sqlite", str(in_tmp / relative), False)
    assert (dsn.synchronous, dsn.busy_timeout_ms) == ("full", minflow.SQLITE_BUSY_TIMEOUT_MS)


@pytest.mark.parametrize(
    "text, path",
    [
        ("sqlite:///tmp/workflow.db", "/tmp/workflow.db"),  # the Go library's own example
        ("sqlite:////tmp/workflow.db", "/tmp/workflow.db"),
        ("sqlite3:///var/lib/app/jobs.db?_busy_timeout=5000", "/var/lib/app/jobs.db"),
        ("sqlite:///my%20dir/jobs.db", "/my dir/jobs.db"),
    ],
)
def test_three_slashes_are_an_absolute_path_as_in_the_go_library(in_tmp, text, path):
    assert parse(text).path == path


def test_sqlite_absolute_path(tmp_path):
    assert parse(f"sqlite://{tmp_path}/abs.db").path == str(tmp_path / "abs.db")
    assert parse(f"sqlite:///{tmp_path}/abs.db").path == str(tmp_path / "abs.db")


def test_one_dsn_names_one_file_for_both_libraries(tmp_path, in_tmp):
    """The string a Go service uses opens the same file in minflow, whatever the directory."""
    go_dsn = f"sqlite://{tmp_path}/shared.db"
    with minflow.Client(go_dsn) as client:
        client.migrate()
        run_id = client.submit("t")
    (tmp_path / "elsewhere").mkdir()
    os.chdir(tmp_path / "elsewhere")
    with minflow.Client(go_dsn) as client:
        assert client.get(run_id) is not None
    assert not (tmp_path / "elsewhere" / "shared.db").exists()


def test_a_three_slash_path_that_cannot_be_opened_says_how_it_was_read(in_tmp):
    client = minflow.Client("sqlite:///no-such-dir/jobs.db")
    with pytest.raises(minflow.Unavailable) as error:
        client.migrate()
    message = str(error.value)
    assert "/no-such-dir/jobs.db" in message and "absolute" in message
    assert "sqlite://no-such-dir/jobs.db" in message  # the relative form
    # A relative DSN that cannot be opened has no such remark.
    with pytest.raises(minflow.Unavailable) as error:
        minflow.Client("sqlite://no-such-dir/jobs.db").migrate()
    assert "absolute" not in str(error.value)


@pytest.mark.parametrize("text", ["sqlite://:memory:", "sqlite3://:memory:", "sqlite://"])
def test_sqlite_memory(text):
    dsn = parse(text)
    assert (dsn.kind, dsn.memory, dsn.path) == ("sqlite", True, ":memory:")


def test_sqlite_options(in_tmp):
    dsn = parse("sqlite://jobs.db?synchronous=normal&busy_timeout=250")
    assert (dsn.synchronous, dsn.busy_timeout_ms) == ("normal", 250)
    assert parse("sqlite://jobs.db?synchronous=EXTRA").synchronous == "extra"


# The query parameters of the Go library's SQLite drivers (modernc.org/sqlite, and the
# mattn/go-sqlite3 names it also reads): every one is accepted.
GO_SQLITE_DSNS = [
    "sqlite:///tmp/test.db?_busy_timeout=5000",  # from the Go library's own tests
    "sqlite://jobs.db?_pragma=busy_timeout(5000)&_pragma=journal_mode(WAL)&_pragma=foreign_keys(1)",
    "sqlite://jobs.db?_pragma=busy_timeout%3D5000",
    "sqlite://jobs.db?_txlock=immediate&_time_format=sqlite",
    "sqlite://jobs.db?cache=shared&mode=rwc",
    "sqlite://jobs.db?mode=ro&vfs=unix",
    "sqlite://jobs.db?_journal_mode=WAL&_synchronous=FULL&_foreign_keys=1&_timeout=100",
    "sqlite://jobs.db?_journal=WAL&_sync=2&_fk=true&_loc=auto&_mutex=no&_locking_mode=NORMAL",
    "sqlite://jobs.db?_pragma=synchronous(NORMAL)&_journal_mode=DELETE&_fk=0",
    "sqlite://jobs.db?_pragma=cache_size(-20000)&journal=wal",
]


@pytest.mark.parametrize("text", GO_SQLITE_DSNS)
def test_go_sqlite_driver_parameters_are_accepted(in_tmp, text):
    with minflow.Client(text) as client:
        client.migrate()
        assert client.get(client.submit("t")).status == "pending"


def _pragmas(client) -> tuple:
    with client._pool.connection() as conn:
        raw = conn.raw
        return tuple(
            raw.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("busy_timeout", "journal_mode", "synchronous", "foreign_keys")
        )


@pytest.mark.parametrize(
    "query, busy",
    [
        ("_pragma=busy_timeout(1234)", 1234),
        ("_pragma=busy_timeout=1234", 1234),
        ("_busy_timeout=1234", 1234),
        ("_timeout=1234", 1234),
        ("busy_timeout=99&_busy_timeout=1234", 99),  # minflow's own option wins
    ],
)
def test_go_busy_timeout_is_honoured(in_tmp, query, busy):
    with minflow.Client(f"sqlite://jobs.db?{query}") as client:
        client.migrate()
        assert client._dsn.busy_timeout_ms == busy
        assert _pragmas(client)[0] == busy


def test_go_parameters_never_weaken_wal_or_durability(in_tmp, caplog):
    text = "sqlite://jobs.db?_pragma=synchronous(NORMAL)&_journal_mode=DELETE&_fk=0&foo=bar"
    with minflow.Client(text) as client:
        client.migrate()
        # WAL, FULL (2) and foreign keys stay; minflow's own synchronous=normal is the opt-in.
        assert _pragmas(client)[1:] == ("wal", 2, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    for word in ("synchronous=NORMAL", "journal_mode=DELETE", "foreign_keys=0", "foo=bar"):
        assert word in warnings[0]
    with minflow.Client("sqlite://jobs.db?_pragma=synchronous(EXTRA)") as client:
        assert _pragmas(client)[2] == 3  # more durable than minflow's default: honoured
    with minflow.Client("sqlite://jobs.db?synchronous=normal&_sync=FULL") as client:
        assert _pragmas(client)[2] == 1


def test_ignored_go_parameters_that_change_nothing_log_nothing(in_tmp, caplog):
    minflow.Client("sqlite://quiet.db?_txlock=immediate&cache=shared&mode=rwc&_busy_timeout=5")
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []


def test_default_dsn_is_a_file_in_the_working_directory(in_tmp):
    client = minflow.Client()
    assert client.dsn == "sqlite://minflow.db" and client.dialect == "sqlite"
    assert client._dsn.path == str(in_tmp / "minflow.db")
    assert not (in_tmp / "minflow.db").exists()  # parsing touches nothing


def test_default_dsn_comes_from_the_environment(in_tmp, monkeypatch):
    monkeypatch.setenv("MINFLOW_DSN", "sqlite://from-env.db")
    assert minflow.Client().dsn == "sqlite://from-env.db"
    assert minflow.Client("sqlite://explicit.db").dsn == "sqlite://explicit.db"


# -- PostgreSQL -----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "POSTGRES", "PostgreSQL"])
def test_postgres_url(scheme):
    dsn = parse(f"{scheme}://alice:s3cret@db.example:6543/app?schema=jobs")
    assert (dsn.kind, dsn.host, dsn.port, dsn.user, dsn.password, dsn.database) == (
        "postgres",
        "db.example",
        6543,
        "alice",
        "s3cret",
        "app",
    )
    assert dsn.search_path == ("jobs",) and dsn.schema == "jobs"


def test_postgres_url_defaults():
    dsn = parse("postgres://db.example/app")
    assert (dsn.port, dsn.password, dsn.search_path, dsn.sslmode) == (
        5432,
        None,
        (minflow.DEFAULT_SCHEMA,),
        "disable",
    )
    assert dsn.timeout == minflow.PG_TIMEOUT


@pytest.mark.parametrize(
    "query, path",
    [
        ("search_path=jobs,public", ("jobs", "public")),
        ("search_path=jobs", ("jobs",)),
        ("schema=jobs&search_path=jobs,public", ("jobs", "public")),  # consistent: fine
        ("schema=my%20jobs", ("my jobs",)),
        ("schema=a%2Cb", ("a,b",)),  # a schema named "a,b", not a search path
    ],
)
def test_postgres_schema_and_search_path(query, path):
    dsn = parse(f"postgres://h/db?{query}")
    assert dsn.search_path == path and dsn.schema == path[0]


def test_postgres_url_decodes_percent_escapes():
    dsn = parse("postgres://al%40ce:p%40ss%3Aw%2Frd@h/my%20db")
    assert (dsn.user, dsn.password, dsn.database) == ("al@ce", "p@ss:w/rd", "my db")


def test_postgres_ipv6_and_unix_socket_hosts():
    assert parse("postgres://u@[::1]:5433/db").host == "::1"
    dsn = parse("postgres://u@%2Fvar%2Frun%2Fpostgresql/db")
    assert dsn.unix_sock == "/var/run/postgresql/.s.PGSQL.5432"
    assert parse("host=/tmp port=5499 dbname=d").unix_sock == "/tmp/.s.PGSQL.5499"


def test_postgres_options_are_honoured():
    dsn = parse(
        "postgres://h/db?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/k.pem"
        "&connect_timeout=7&application_name=billing"
    )
    assert (dsn.sslmode, dsn.ssl_files, dsn.timeout, dsn.application_name) == (
        "verify-full",
        ("/ca.pem", "/c.pem", "/k.pem"),
        7.0,
        "billing",
    )
    assert parse("postgres://h/db?timeout=2.5").timeout == 2.5


def test_binary_parameters_is_accepted():
    """lib/pq's binary_parameters (a Go service's DSN may carry it), as a boolean."""
    assert parse("postgres://h/db?binary_parameters=yes").binary_parameters is True
    assert parse("postgres://h/db?binary_parameters=no").binary_parameters is False
    assert parse("postgres://h/db").binary_parameters is False
    assert parse("host=h dbname=d binary_parameters=yes").binary_parameters is True


def test_libpq_keyword_form():
    dsn = parse(
        "host=db port=5433 dbname=app user=me password='s p\\'q' schema=jobs sslmode=require"
    )
    assert (dsn.host, dsn.port, dsn.database, dsn.user, dsn.password) == (
        "db",
        5433,
        "app",
        "me",
        "s p'q",
    )
    assert (dsn.search_path, dsn.sslmode) == (("jobs",), "require")
    assert parse("  dbname = app   host=db  ").database == "app"
    assert parse("dbname=app search_path='my jobs,public'").search_path == ("my jobs", "public")


# -- malformed ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        42,
        b"sqlite://x.db",
        "mysql://u@h/db",
        "http://h/db",
        "just words",
        "sqlite://x.db?synchronous=sometimes",
        "sqlite://x.db?busy_timeout=soon",
        "sqlite://x.db?busy_timeout=-5",
        "sqlite://x.db?_busy_timeout=soon",
        "sqlite://x.db?_pragma=busy_timeout(soon)",
        "sqlite://x.db?_pragma=",
        "sqlite://x.db?synchronous=full&synchronous=normal",
        "postgres://h/db?binary_parameters=maybe",
        "postgres://h/db?sslmode=require&foo=bar",  # unknown parameters are never dropped
        "postgres://h/db?sslmode=sometimes",
        "postgres://h:notaport/db",
        "postgres://h:99999/db",
        "postgres://h/db?timeout=-1",
        "postgres://h/db?timeout=soon",
        "postgres://h/db?schema=a&search_path=b,a",  # contradictory
        "postgres://h/db?schema=",  # empty, not "the default"
        "postgres://h/db?search_path=",
        "postgres://h/db?schema=a&schema=b",  # which one?
        "postgres://h/db?schema=" + "x" * 64,  # longer than a PostgreSQL identifier
        "postgres://h/db?schema=" + quote("é" * 32),  # 64 bytes: too long as well
        "postgres://h/db?schema=a%00b",
        "postgres://h/db?=x",
        "host=h foo=bar",
        "host=h port=abc",
        "host='unterminated",
        "host=h password='s p",
    ],
)
def test_malformed_dsn_raises_invalid_input(text):
    with pytest.raises(minflow.InvalidInput):
        minflow.Client(text)
    with pytest.raises(minflow.InvalidInput):
        minflow.App(text)


def test_malformed_dsn_errors_are_clear():
    with pytest.raises(minflow.InvalidInput, match="sslmode"):
        parse("postgres://h/db?sslmode=sometimes")
    with pytest.raises(minflow.InvalidInput, match="foo"):
        parse("postgres://h/db?foo=bar")
    with pytest.raises(minflow.InvalidInput, match="mysql"):
        parse("mysql://h/db")


# -- passwords never shown ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, secrets",
    [
        ("postgres://alice:s3cret@h/db?schema=jobs", ["s3cret"]),
        ("postgresql://alice:p%40ss%3Aw%2Frd@h/db", ["p%40ss%3Aw%2Frd", "p@ss:w/rd"]),
        ("postgres://alice:pa@ss@h/db", ["pa@ss"]),  # a raw @: everything before the last
        ("postgres://alice:alice@alice/alice", [":alice@"]),  # same text as user and host
        ("host=h user=alice password=s3cret dbname=d", ["s3cret"]),
        ("host=h password='two words' dbname=d", ["two words", "two", "words"]),
        ("password = s3cret host=h", ["s3cret"]),
    ],
)
def test_passwords_are_masked(text, secrets):
    client = minflow.Client(text)
    shown = [client.dsn, repr(client), str(client), repr(client._dsn)]
    for secret in secrets:
        for text_shown in shown:
            assert secret not in text_shown, text_shown
    assert "***" in client.dsn
    assert client._dsn.password is not None  # masked for display only


def test_password_is_not_in_connection_errors():
    client = minflow.Client("postgres://alice:s3cret@127.0.0.1:1/db?timeout=5")
    with pytest.raises(minflow.Unavailable) as error:
        client.stats()
    assert "s3cret" not in str(error.value) and "***" in str(error.value)


# -- schema names end to end ----------------------------------------------------------------


def _drop_schema(name: str) -> None:
    conn = pg_connect()
    try:
        conn.run(f"DROP SCHEMA IF EXISTS {minflow._quote_ident(name)} CASCADE")
    finally:
        conn.close()


@pytest.mark.parametrize(
    "base",
    [
        'mf "odd" schema',
        'evil"; CREATE TABLE mf_pwned (x int); --',
        "Mixed.Case-é",
        "ü" * 25,  # 25 characters, 50 bytes: the NOTIFY channel name must fit in 63 bytes
    ],
)
def test_schema_names_are_quoted_end_to_end(base):
    """A schema name with quotes, spaces, dots or upper case is one identifier: migrate,
    submit, NOTIFY wake-up, claim and complete all work, in exactly that schema."""
    require_pg()
    name = base[:40] + " " + uuid.uuid4().hex[:6]  # unique: other test runs share the server
    dsn = with_query(PG_DSN, schema=quote(name, safe=""))
    try:
        app = minflow.App(dsn)
        assert app._dsn.schema == name
        app.migrate()
        done = threading.Event()
        app.handler("t")(lambda run: done.set() or run.payload)
        # A long poll interval: only the NOTIFY on this schema's channel can wake it in time.
        worker = minflow.Worker(app, poll_interval=60, schedules=False).start()
        try:
            run_id = app.submit("t", {"schema": name})
            assert done.wait(10), "the submit's NOTIFY did not wake the worker"
            wait_for(lambda: app.get(run_id).status == "succeeded", 10)
        finally:
            worker.stop(timeout=10)
        assert app.get(run_id).result == {"schema": name}
        app.close()
        conn = pg_connect()
        try:
            tables = conn.run(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = :s",
                s=name,
            )
            assert {"workflow_run", "workflow_event", "minflow_migration"} <= {t[0] for t in tables}
            assert conn.run("SELECT COUNT(*) FROM pg_tables WHERE tablename = 'mf_pwned'") == [[0]]
        finally:
            conn.close()
    finally:
        _drop_schema(name)


def test_keyword_dsn_with_a_quoted_schema_end_to_end():
    require_pg()
    name = f"kv schema {uuid.uuid4().hex[:6]}"
    base = minflow._parse_dsn(PG_DSN)
    text = (
        f"host={base.host} port={base.port} user={base.user} dbname={base.database} schema='{name}'"
    )
    try:
        with minflow.Client(text) as client:
            client.migrate()
            assert client.get(client.submit("t")).status == "pending"
            assert client.schema_version() == minflow.SCHEMA_VERSION
        conn = pg_connect()
        try:
            assert conn.run("SELECT COUNT(*) FROM pg_namespace WHERE nspname = :s", s=name) == [[1]]
        finally:
            conn.close()
    finally:
        _drop_schema(name)


# -- statements name their schema -----------------------------------------------------------

_TABLE_WORD = r"(?<![\w.])({})(?![\w.])"


def test_every_postgres_statement_names_its_schema():
    """No PostgreSQL statement leaves a table to the search_path: every table reference is
    qualified (column references like workflow_run.attempt aside)."""
    dialect = minflow._PostgresDialect(parse(with_query(PG_DSN, schema=quote('my "q" schema'))))
    statements = [*dialect.sql.values(), *(s for _, _, ddl in dialect.migrations for s in ddl)]
    statements.append(dialect.compose("list_runs", filters=minflow._LIST_FILTERS["type"]))
    bare = re.compile(_TABLE_WORD.format("|".join(minflow._TABLES)))
    qualified = '"my ""q"" schema".'
    for statement in statements:
        assert "{" not in statement.replace("'{}'", ""), statement  # every slot filled
        assert not bare.search(statement.replace(qualified, qualified + "."))
    assert any(qualified + "workflow_run" in s for s in statements)


def test_statements_do_not_depend_on_the_search_path(monkeypatch):
    """On connections whose search_path leads to another minflow schema (a caller's own
    connection, PgBouncer in transaction mode), migrate, submit, claim, complete, rescue,
    schedules and reads all use the DSN's schema, and the other one stays empty."""
    require_pg()
    decoy, mine = PgSchema(), PgSchema()
    try:
        with minflow.Client(decoy.dsn) as other:
            other.migrate()  # an unqualified statement would find these tables first
        connect = minflow._PostgresDialect.connect

        def connect_elsewhere(dialect):
            conn = connect(dialect)
            conn.query(f"SET search_path TO {minflow._quote_ident(decoy.name)}")
            return conn

        monkeypatch.setattr(minflow._PostgresDialect, "connect", connect_elsewhere)
        app = minflow.App(mine.dsn)
        assert app.migrate() == len(minflow._PG_MIGRATIONS)

        @app.handler("t")
        def handler(run):
            run.heartbeat(60)
            assert not run.is_cancelled()
            return run.payload

        first = app.submit("t", {"n": 1}, idempotency_key="k")
        ids = app.submit_many([minflow.Job("t", {"n": 2}), minflow.Job("t", idempotency_key="k")])
        assert ids[1] == first
        app.cancel(ids[0])
        app.retry(ids[0])
        schedule_id = app.schedule("t", {"n": 3}, cron="0 0 1 1 *", name="yearly")
        app.pause_schedule(schedule_id)
        app.resume_schedule(schedule_id)
        raw = pg_connect()
        try:
            table = f"{minflow._quote_ident(mine.name)}.workflow_schedule"
            raw.run(f"UPDATE {table} SET next_run_at = NOW() - interval '1 minute'")
            assert app.tick() == 1
            stranded = app.submit("t", {"n": 4})
            table = f"{minflow._quote_ident(mine.name)}.workflow_run"
            raw.run(
                f"UPDATE {table} SET status = 'leased', attempt = 1, leased_by = 'gone', "
                "lease_until = NOW() - interval '1 second' WHERE id = :id",
                id=stranded,
            )
            assert app.run_worker(burst=True, schedules=False) == 4
            runs = app.list()
            assert sorted(r.payload["n"] for r in runs) == [1, 2, 3, 4]
            assert {r.status for r in runs} == {"succeeded"}
            assert "retried" in [e.event_type for e in app.events(stranded)]
            assert app.stats() == {"t": {"succeeded": 4}}
            assert app.get_schedule(schedule_id).name == "yearly"
            app.delete_schedule(schedule_id)
            assert app.schedules() == []
            events = sum(len(app.events(r.id)) for r in runs)
            # Per run: created, leased, started, heartbeat, succeeded; and cancelled, retried
            # by hand, retried by the rescue.
            assert events == 4 * 5 + 3
            app.close()
            for name, want_runs, want_events in ((mine.name, 4, events), (decoy.name, 0, 0)):
                schema = minflow._quote_ident(name)
                counts = raw.run(
                    f"SELECT (SELECT COUNT(*) FROM {schema}.workflow_run), "
                    f"(SELECT COUNT(*) FROM {schema}.workflow_event), "
                    f"(SELECT COUNT(*) FROM {schema}.workflow_schedule WHERE deleted_at IS NULL)"
                )
                assert counts == [[want_runs, want_events, 0]], name
        finally:
            raw.close()
    finally:
        decoy.drop()
        mine.drop()

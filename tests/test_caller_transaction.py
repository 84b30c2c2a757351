"""submit(connection=...): runs written inside the caller's own transaction, on every driver.

Each driver is used as an application would: the caller writes a row of its own table and
submits in the same transaction, then commits, rolls back or fails; afterwards both exist or
neither does, as seen from another connection.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time

import pytest

import minflow
from conftest import PG_DSN, PgSchema, db, event_types, require_pg, wait_for
from infra import pg_params


class Caller:
    """The application's side: its own connection, its own table, its own transaction."""

    def __init__(self, conn, run, begin=None):
        self.conn = conn
        self._run = run  # run(sql) -> rows, on the caller's connection
        self._begin = begin  # what opens a transaction, where the driver opens none itself
        self.table = "orders"

    def begin(self) -> None:
        if self._begin:
            self._run(self._begin)

    def execute(self, sql: str):
        return self._run(sql.format(orders=self.table))

    def order(self, number: int) -> None:
        self.execute(f"INSERT INTO {{orders}} (id) VALUES ({number})")

    def commit(self) -> None:
        if self._begin:
            self._run("COMMIT")
        else:
            self.conn.commit()

    def rollback(self) -> None:
        if self._begin:
            self._run("ROLLBACK")
        else:
            self.conn.rollback()

    def close(self) -> None:
        self.conn.close()


def _cursor_run(conn):
    def run(sql):
        cursor = conn.cursor()
        cursor.execute(sql)
        rows = cursor.fetchall() if cursor.description else []
        cursor.close()
        return rows

    return run


def _sqlite(path, **options) -> Caller:
    conn = sqlite3.connect(path, **options)
    # In autocommit mode the application begins its transactions itself.
    autocommit = conn.isolation_level is None or getattr(conn, "autocommit", None) is True
    begin = "BEGIN" if autocommit else None
    return Caller(conn, lambda sql: conn.execute(sql).fetchall(), begin)


def _pg8000(module: str, **options) -> Caller:
    import pg8000.dbapi
    import pg8000.legacy
    import pg8000.native

    params = {"timeout": 10, **pg_params(PG_DSN)}
    if module == "native":
        conn = pg8000.native.Connection(**params)
        return Caller(conn, conn.run, "START TRANSACTION")
    factory = pg8000.dbapi.connect if module == "dbapi" else pg8000.legacy.Connection
    conn = factory(**params)
    return Caller(conn, _cursor_run(conn))


def _psycopg() -> Caller:
    import psycopg

    conn = psycopg.connect(PG_DSN)

    def run(sql):
        cursor = conn.execute(sql)
        return cursor.fetchall() if cursor.description else []

    return Caller(conn, run)


def _psycopg2() -> Caller:
    import psycopg2

    conn = psycopg2.connect(PG_DSN)
    return Caller(conn, _cursor_run(conn))


# name -> (dialect, open the caller's connection to the client's database)
DRIVERS = {
    "sqlite3": ("sqlite", lambda path: _sqlite(path)),
    "sqlite3-isolation-none": ("sqlite", lambda path: _sqlite(path, isolation_level=None)),
    "sqlite3-autocommit": ("sqlite", lambda path: _sqlite(path, autocommit=True)),
    "pg8000-native": ("postgres", lambda _: _pg8000("native")),
    "pg8000-dbapi": ("postgres", lambda _: _pg8000("dbapi")),
    "pg8000-legacy": ("postgres", lambda _: _pg8000("legacy")),
    "psycopg": ("postgres", lambda _: _psycopg()),
    "psycopg2": ("postgres", lambda _: _psycopg2()),
}


def open_caller(name: str, client: minflow.Client, dialect: str) -> Caller:
    if name == "sqlite3-autocommit" and sys.version_info < (3, 12):
        pytest.skip("sqlite3's autocommit attribute is Python 3.12's")
    caller = DRIVERS[name][1](client._dsn.path)
    if dialect == "postgres":
        caller.table = f'"{client._dsn.schema}".orders'
    caller.begin()
    caller.execute("CREATE TABLE {orders} (id INTEGER PRIMARY KEY)")
    caller.commit()
    return caller


@pytest.fixture(scope="module")
def shared_pg():
    """One migrated schema for this module's PostgreSQL tests, emptied after each: migrating a
    schema per test would cost more than the tests themselves."""
    require_pg()
    schema = PgSchema()
    with minflow.Client(schema.dsn) as client:
        client.migrate()
    yield schema
    schema.drop()


def _empty(client: minflow.Client) -> None:
    s = f'"{client._dsn.schema}"'
    db(
        client,
        f"SET lock_timeout = '10s'; DROP TABLE IF EXISTS {s}.orders; "
        f"DROP TRIGGER IF EXISTS boom ON {s}.workflow_run; DROP FUNCTION IF EXISTS {s}.boom(); "
        f"DELETE FROM {s}.workflow_run",  # its events go with it (ON DELETE CASCADE)
    )


@pytest.fixture
def new_client(request, tmp_path):
    """``new_client(dialect, cls=minflow.Client)``: a migrated client on an empty database
    (a SQLite file of this test's, or the module's PostgreSQL schema); closed at teardown."""
    made: list[minflow.Client] = []

    def make(dialect: str, cls: type[minflow.Client] = minflow.Client) -> minflow.Client:
        if dialect == "sqlite":
            dsn = f"sqlite:///{tmp_path / 'minflow.db'}"
        else:
            dsn = request.getfixturevalue("shared_pg").dsn
        client = cls(dsn)
        client.migrate()
        made.append(client)
        return client

    yield make
    for client in made:
        if client.dialect == "postgres":
            _empty(client)


@pytest.fixture(params=list(DRIVERS))
def setup(request, new_client):
    """(client, caller) for one driver: a migrated client and the caller's open connection to
    the same database, with the caller's own table ``orders``."""
    dialect = DRIVERS[request.param][0]
    client = new_client(dialect)
    caller = open_caller(request.param, client, dialect)
    yield client, caller
    caller.close()


def orders(client, caller) -> list[int]:
    """The caller's committed orders, read on another connection."""
    return [row[0] for row in db(client, f"SELECT id FROM {caller.table} ORDER BY id")]


def runs(client) -> list[str]:
    return [run.id for run in client.list(limit=100)]


def fail_on_type(client, caller, run_type: str) -> None:
    """A trigger that makes the database reject runs of ``run_type``: a failure part way
    through minflow's own statements."""
    if client.dialect == "sqlite":
        sql = (
            f"CREATE TRIGGER boom BEFORE INSERT ON workflow_run WHEN NEW.type = '{run_type}' "
            "BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
        db(client, sql)
        return
    schema = f'"{client._dsn.schema}"'
    db(
        client,
        f"CREATE FUNCTION {schema}.boom() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'boom'; END $$",
    )
    db(
        client,
        f"CREATE TRIGGER boom BEFORE INSERT ON {schema}.workflow_run FOR EACH ROW "
        f"WHEN (NEW.type = '{run_type}') EXECUTE FUNCTION {schema}.boom()",
    )


# -- the matrix: driver x outcome --------------------------------------------------------------


def test_commit_keeps_both(setup):
    client, caller = setup
    caller.begin()
    caller.order(1)
    run_id = client.submit("billing.invoice.v1", {"order": 1}, connection=caller.conn)
    assert client.get(run_id) is None  # not before the caller commits
    assert orders(client, caller) == []
    caller.commit()
    assert orders(client, caller) == [1]
    run = client.get(run_id)
    assert (run.status, run.payload) == ("pending", {"order": 1})
    assert event_types(client, run_id) == ["created"]


def test_rollback_keeps_neither(setup):
    client, caller = setup
    caller.begin()
    # minflow's statements first: the transaction they open is the caller's, not theirs.
    ids = client.submit_many([minflow.Job("t", {"n": n}) for n in range(3)], connection=caller.conn)
    caller.order(2)
    caller.rollback()
    assert orders(client, caller) == [] and runs(client) == []
    assert all(client.get(run_id) is None for run_id in ids)


def test_exception_mid_transaction_keeps_neither(setup):
    client, caller = setup
    caller.begin()
    with pytest.raises(RuntimeError, match="payment declined"):
        try:
            caller.order(3)
            client.submit("billing.invoice.v1", {"order": 3}, connection=caller.conn)
            raise RuntimeError("payment declined")
        except RuntimeError:
            caller.rollback()
            raise
    assert orders(client, caller) == [] and runs(client) == []


def test_failure_inside_minflow_undoes_only_minflow(setup):
    client, caller = setup
    fail_on_type(client, caller, "boom")
    caller.begin()
    caller.order(4)
    with pytest.raises(minflow.MinflowError, match="boom"):
        # The first run is written before the second is refused.
        client.submit_many([minflow.Job("ok"), minflow.Job("boom")], connection=caller.conn)
    # The caller's transaction is still usable (on PostgreSQL too, thanks to the savepoint).
    kept = client.submit("after", connection=caller.conn)
    caller.commit()
    assert orders(client, caller) == [4]
    assert runs(client) == [kept]


# -- more of the contract -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sqlite3", "psycopg"])
def test_deduplication_inside_the_callers_transaction(name, new_client):
    dialect = DRIVERS[name][0]
    client = new_client(dialect)
    caller = open_caller(name, client, dialect)
    try:
        existing = client.submit("t", idempotency_key="order-5")
        caller.begin()
        again = client.submit("t", idempotency_key="order-5", connection=caller.conn)
        ids = client.submit_many(
            [minflow.Job("t", idempotency_key="order-5"), minflow.Job("t", idempotency_key="new")],
            connection=caller.conn,
        )
        caller.commit()
        assert (again, again.deduplicated) == (existing, True)
        assert ids[0] == existing and ids[0].deduplicated and not ids[1].deduplicated
        assert client.get(ids[1]).idempotency_key == "new"
    finally:
        caller.close()


def test_callers_row_factory_does_not_matter(tmp_path, new_client):
    client = new_client("sqlite")
    existing = client.submit("t", idempotency_key="k")
    conn = sqlite3.connect(client._dsn.path)
    conn.row_factory = lambda cursor, row: {"row": row}
    try:
        assert client.submit("t", idempotency_key="k", connection=conn) == existing
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("name", ["psycopg", "psycopg2"])
def test_postgres_row_factories_do_not_matter(name, new_client):
    client = new_client("postgres")
    existing = client.submit("t", idempotency_key="k")
    if name == "psycopg":
        import psycopg
        import psycopg.rows

        conn = psycopg.connect(PG_DSN, row_factory=psycopg.rows.dict_row)
    else:
        import psycopg2
        import psycopg2.extras

        conn = psycopg2.connect(PG_DSN, cursor_factory=psycopg2.extras.RealDictCursor)
    try:
        assert client.submit("t", idempotency_key="k", connection=conn) == existing
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("style", ["format", "pyformat", "named", "qmark", "numeric"])
def test_pg8000_dbapi_follows_its_paramstyle(style, new_client, monkeypatch):
    import pg8000.dbapi

    monkeypatch.setattr(pg8000.dbapi, "paramstyle", style)
    client = new_client("postgres")
    conn = pg8000.dbapi.connect(**pg_params(PG_DSN))
    try:
        ids = client.submit_many(
            [minflow.Job("t", {"text": "50% off: 'quoted'"}), minflow.Job("t", None)],
            connection=conn,
        )
        conn.commit()
        assert [client.get(i).payload for i in ids] == [{"text": "50% off: 'quoted'"}, None]
    finally:
        conn.close()


@pytest.mark.parametrize("name", ["sqlite3-isolation-none", "sqlite3-autocommit"])
def test_sqlite_autocommit_call_is_its_own_transaction(name, new_client):
    client = new_client("sqlite")
    caller = open_caller(name, client, "sqlite")
    try:
        fail_on_type(client, caller, "boom")
        # No transaction is open: the call commits its own, or leaves nothing.
        run_id = client.submit("t", connection=caller.conn)
        assert client.get(run_id).status == "pending"
        assert not caller.conn.in_transaction
        with pytest.raises(minflow.MinflowError, match="boom"):
            client.submit_many([minflow.Job("ok"), minflow.Job("boom")], connection=caller.conn)
        assert runs(client) == [run_id] and not caller.conn.in_transaction
    finally:
        caller.close()


@pytest.mark.parametrize("name", ["pg8000-native", "pg8000-dbapi", "psycopg", "psycopg2"])
def test_postgres_autocommit_call_is_its_own_transaction(name, new_client):
    client = new_client("postgres")
    caller = DRIVERS[name][1](None)
    caller.table = f'"{client._dsn.schema}".orders'
    if name != "pg8000-native":  # pg8000.native is in autocommit mode unless the caller begins
        caller.conn.autocommit = True
    try:
        fail_on_type(client, caller, "boom")
        run_id = client.submit("t", connection=caller.conn)
        assert client.get(run_id).status == "pending"
        with pytest.raises(minflow.MinflowError, match="boom"):
            client.submit_many([minflow.Job("ok"), minflow.Job("boom")], connection=caller.conn)
        assert runs(client) == [run_id]
    finally:
        caller.close()


def test_sqlite_first_statement_opens_the_transaction_immediate(tmp_path, new_client):
    client = new_client("sqlite")
    conn = sqlite3.connect(client._dsn.path, timeout=0.2)
    other = sqlite3.connect(client._dsn.path, timeout=0.2, isolation_level=None)
    try:
        client.submit("t", connection=conn)
        # minflow's BEGIN IMMEDIATE holds the write lock for the caller's transaction, so its
        # later writes cannot meet SQLITE_BUSY; other writers wait meanwhile.
        assert conn.in_transaction
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        conn.commit()
        other.execute("BEGIN IMMEDIATE")
        other.rollback()
    finally:
        conn.close()
        other.close()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite_errorname is Python 3.11's")
def test_sqlite_stale_read_snapshot_is_explained(tmp_path, new_client):
    client = new_client("sqlite")
    conn = sqlite3.connect(client._dsn.path, isolation_level=None)
    try:
        conn.execute("BEGIN")  # deferred: its first read fixes the snapshot
        conn.execute("SELECT COUNT(*) FROM workflow_run").fetchall()
        client.submit("t")  # another connection writes meanwhile
        with pytest.raises(minflow.Unavailable, match="BEGIN IMMEDIATE"):
            client.submit("t", connection=conn)
        conn.execute("ROLLBACK")
        assert len(runs(client)) == 1
    finally:
        conn.close()


# -- refusals --------------------------------------------------------------------------------------


def test_wrong_sqlite_file_is_refused(tmp_path, new_client):
    client = new_client("sqlite")
    other = sqlite3.connect(tmp_path / "other.db")
    memory = sqlite3.connect(":memory:")
    try:
        with pytest.raises(minflow.InvalidInput, match="other.db.*minflow.db"):
            client.submit("t", connection=other)
        with pytest.raises(minflow.InvalidInput, match="in-memory"):
            client.submit("t", connection=memory)
        assert runs(client) == []
        # The same file under another name is the same database.
        (tmp_path / "link.db").symlink_to(tmp_path / "minflow.db")
        linked = sqlite3.connect(tmp_path / "link.db")
        client.submit("t", connection=linked)
        linked.commit()
        linked.close()
        assert len(runs(client)) == 1
    finally:
        other.close()
        memory.close()


def test_memory_client_refuses_connections():
    client = minflow.Client("sqlite://:memory:")
    client.migrate()
    conn = sqlite3.connect(":memory:")
    try:
        with pytest.raises(minflow.InvalidInput, match="database file"):
            client.submit("t", connection=conn)
    finally:
        conn.close()
        client.close()


def test_missing_sqlite_schema_leaves_nothing(tmp_path):
    client = minflow.Client(f"sqlite:///{tmp_path / 'empty.db'}")
    conn = sqlite3.connect(tmp_path / "empty.db")
    try:
        conn.execute("CREATE TABLE orders (id INTEGER)")
        conn.execute("INSERT INTO orders VALUES (1)")
        with pytest.raises(minflow.MinflowError, match="migrate"):
            client.submit("t", connection=conn)
        conn.commit()  # the caller's own work goes on
        assert conn.execute("SELECT COUNT(*) FROM orders").fetchone() == (1,)
    finally:
        conn.close()
        client.close()


def test_wrong_postgres_database_or_schema_is_refused(tmp_path, new_client):
    import psycopg

    client = new_client("postgres")
    elsewhere = psycopg.connect(PG_DSN.rsplit("/", 1)[0] + "/postgres")
    unmigrated = minflow.Client(client.dsn.replace(client._dsn.schema, client._dsn.schema + "x"))
    same = psycopg.connect(PG_DSN)
    try:
        with pytest.raises(minflow.InvalidInput, match="'postgres'.*'test'"):
            client.submit("t", connection=elsewhere)
        with pytest.raises(minflow.InvalidInput, match="no minflow tables.*migrate"):
            unmigrated.submit("t", connection=same)
        assert runs(client) == []
    finally:
        elsewhere.close()
        same.close()
        unmigrated.close()


@pytest.mark.parametrize("name", ["pg8000-native", "pg8000-dbapi", "psycopg", "psycopg2"])
def test_failed_transaction_is_refused(name, new_client):
    client = new_client("postgres")
    caller = DRIVERS[name][1](None)
    try:
        caller.begin()
        caller.execute("SELECT 1")  # the connection's first use checks the database
        client.submit("first", connection=caller.conn)
        with pytest.raises(Exception, match="division by zero"):
            caller.execute("SELECT 1/0")
        with pytest.raises(minflow.InvalidInput, match="aborted.*roll it back"):
            client.submit("t", connection=caller.conn)
        caller.rollback()
        assert runs(client) == []
        caller.begin()
        run_id = client.submit("t", connection=caller.conn)
        caller.commit()
        assert runs(client) == [run_id]
    finally:
        caller.close()


def test_closed_and_foreign_objects_are_refused(tmp_path, new_client):
    client = new_client("sqlite")
    closed = sqlite3.connect(client._dsn.path)
    closed.close()
    with pytest.raises(minflow.InvalidInput, match="closed"):
        client.submit("t", connection=closed)
    conn = sqlite3.connect(client._dsn.path)
    for wrong in (conn.cursor(), "sqlite:///minflow.db", 42):
        with pytest.raises(minflow.InvalidInput, match=r"sqlite3\.Connection\); got"):
            client.submit_many([minflow.Job("t")], connection=wrong)
    assert runs(client) == []
    conn.close()


def test_driver_of_the_other_dialect_is_refused(tmp_path, new_client):
    import psycopg

    client = new_client("postgres")
    conn = sqlite3.connect(tmp_path / "x.db")
    with pytest.raises(minflow.InvalidInput, match=r"psycopg\.Connection.*got sqlite3\.Connection"):
        client.submit("t", connection=conn)
    lite = minflow.Client(f"sqlite:///{tmp_path / 'x.db'}")
    pg = psycopg.connect(PG_DSN)
    with pytest.raises(minflow.InvalidInput, match="sqlite3.Connection.*got psycopg.Connection"):
        lite.submit("t", connection=pg)
    for c in (conn, pg, lite):
        c.close()


def test_invalid_arguments_are_refused_before_the_connection_is_used(tmp_path, new_client):
    client = new_client("sqlite")
    conn = sqlite3.connect(client._dsn.path)
    try:
        with pytest.raises(minflow.InvalidInput, match="max_attempts"):
            client.submit("t", max_attempts=0, connection=conn)
        assert not conn.in_transaction
    finally:
        conn.close()


# -- wake-ups ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sqlite3", "psycopg"])
def test_idle_worker_picks_up_a_committed_run_at_once(name, new_client):
    dialect = DRIVERS[name][0]
    app = new_client(dialect, minflow.App)
    caller = open_caller(name, app, dialect)
    started: dict[str, float] = {}
    done = threading.Event()

    @app.handler("t")
    def handle(run):
        started[run.payload] = time.monotonic()
        done.set()

    # A 30 s poll: only the wake-up (SQLite's data_version, PostgreSQL's NOTIFY) explains a
    # pickup within the bound below.
    worker = app.worker(poll_interval=30, concurrency=1, schedules=False).start()
    try:
        caller.begin()
        warm_id = app.submit("t", "warm-up", connection=caller.conn)
        caller.commit()
        wait_for(lambda: "warm-up" in started, message="the warm-up run")
        caller.begin()
        app.submit("t", "measured", connection=caller.conn)
        caller.order(1)
        committed = time.monotonic()
        caller.commit()
        wait_for(lambda: "measured" in started, timeout=5, message="the committed run")
        latency = started["measured"] - committed
        assert latency < 1.0, f"picked up {latency:.3f}s after commit"
        assert app.get(warm_id).status in ("leased", "succeeded")
    finally:
        worker.stop(timeout=10)
        caller.close()

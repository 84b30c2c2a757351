"""minflow through PgBouncer in transaction pooling mode, as users deploy it in front of many
worker machines: no start-up parameters it refuses, no statement that outlives its transaction,
LISTEN only on a direct connection, and a pool of ten server connections shared by 128 worker
threads.

Each test starts Debian's pgbouncer (``pool_mode = transaction``, no
``ignore_startup_parameters``) in front of a private cluster of its own.
"""

from __future__ import annotations

import collections
import datetime as dt
import http.client
import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, db, wait_for

import infra
import minflow
from tests import proc_app

pytestmark = pytest.mark.slow

UTC = dt.timezone.utc
TABLES = ("workflow_run", "workflow_event", "workflow_schedule", "workflow_registry")


def http_call(server: minflow._Server, method: str, path: str, body=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        conn.request(method, path, None if body is None else json.dumps(body))
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def prepared_names(client: minflow.Client) -> list[str]:
    """The named statements of the session behind one of ``client``'s pooled connections."""
    with client._pool.connection() as conn:
        return sorted(row[0] for row in conn.query("SELECT name FROM pg_prepared_statements"))


def pooler_warnings(records) -> list[str]:
    return [r.getMessage() for r in records if "prepared_statements=no" in r.getMessage()]


# -- connection strings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "binary", "prepared"),
    [
        ("", False, "auto"),
        ("?binary_parameters=yes", True, "auto"),
        ("?binary_parameters=no", False, "auto"),
        ("?binary_parameters=TRUE", True, "auto"),
        ("?binary_parameters=0", False, "auto"),
        ("?prepared_statements=no", False, "no"),
        ("?prepared_statements=false", False, "no"),
        ("?prepared_statements=yes", False, "yes"),
        ("?prepared_statements=auto&binary_parameters=1", True, "auto"),
    ],
)
def test_statement_mode_parameters(query, binary, prepared):
    dsn = minflow._parse_dsn("postgres://u@h/db" + query)
    assert (dsn.binary_parameters, dsn.prepared_statements) == (binary, prepared)
    keywords = minflow._parse_dsn("host=h dbname=db " + query.lstrip("?").replace("&", " "))
    assert (keywords.binary_parameters, keywords.prepared_statements) == (binary, prepared)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("binary_parameters=maybe", "binary_parameters must be yes or no"),
        ("prepared_statements=sometimes", "prepared_statements must be auto, yes or no"),
        ("binary_parameters=yes&prepared_statements=yes", "drop prepared_statements=yes"),
    ],
)
def test_statement_mode_parameters_rejected(query, message):
    with pytest.raises(minflow.InvalidInput, match=message):
        minflow._parse_dsn("postgres://u@h/db?" + query)


def test_listen_dsn_must_be_postgres(tmp_path):
    app = minflow.App(f"sqlite:///{tmp_path / 'q.db'}")
    app.handler("t")(lambda run: None)
    with pytest.raises(minflow.InvalidInput, match="listen_dsn is for PostgreSQL"):
        minflow.Worker(app, listen_dsn="postgres://u@h/db")
    pg = minflow.App("postgres://u@h/db")
    pg.handler("t")(lambda run: None)
    with pytest.raises(minflow.InvalidInput, match="must be a PostgreSQL DSN"):
        minflow.Worker(pg, listen_dsn=f"sqlite:///{tmp_path / 'q.db'}")
    with pytest.raises(minflow.InvalidInput):
        minflow.Worker(pg, listen_dsn="postgres://u@h/db?nonsense=1")


# -- statement modes ------------------------------------------------------------------------


def exercise(client: minflow.Client) -> None:
    """A few parameterised statements, twice each, on the client's (single) pooled connection."""
    client.migrate()
    for _ in range(2):
        run_id = client.submit("t", {"n": 1}, idempotency_key=f"k-{time.monotonic_ns()}")
        assert client.get(run_id).payload == {"n": 1}
        assert client.list(type="t", limit=1)[0].id == run_id


def test_direct_connections_keep_prepared_statements_poolers_and_the_dsn_switch_them_off(
    private_pg, pgbouncer, caplog
):
    bouncer = pgbouncer(default_pool_size=1)  # one server connection: it saw every statement
    modes = {
        "direct": private_pg.dsn + "?schema=modes",
        "binary_parameters=yes": private_pg.dsn + "?schema=modes&binary_parameters=yes",
        "prepared_statements=no": private_pg.dsn + "?schema=modes&prepared_statements=no",
        "pgbouncer": bouncer.dsn + "?schema=modes",
    }
    names = {}
    for mode, dsn in modes.items():
        with minflow.Client(dsn) as client:
            exercise(client)
            names[mode] = prepared_names(client)
    # Prepared once on this connection, under names no other client uses.
    assert len(names["direct"]) >= 4
    assert all(name.startswith("minflow_") for name in names["direct"])
    assert len({name.rsplit("_", 1)[0] for name in names["direct"]}) == 1
    assert names["binary_parameters=yes"] == names["prepared_statements=no"] == []
    assert names["pgbouncer"] == []
    # Detecting the pooler is said once, naming the DSN parameter that avoids the detour.
    (warning,) = pooler_warnings(caplog.records)
    assert f"{bouncer.port}" in warning and "connection pooler" in warning


def test_clients_sharing_a_server_connection_never_meet_each_others_statements(
    private_pg, pgbouncer
):
    """pg8000 names every connection's statements pg8000_statement_0, 1...: two clients on one
    server connection met with 42P05 (or ran each other's statement). minflow's names are
    unique per connection."""
    bouncer = pgbouncer(default_pool_size=1)
    dsn = bouncer.dsn + "?schema=shared&prepared_statements=yes"
    first, second = minflow.Client(dsn), minflow.Client(dsn)
    try:
        first.migrate()
        for n in range(5):
            a = first.submit("a", {"n": n})
            b = second.submit("b", {"n": -n})
            assert (first.get(b).type, second.get(a).type) == ("b", "a")
            assert (first.get(a).payload, second.get(b).payload) == ({"n": n}, {"n": -n})
        assert len(prepared_names(first)) >= 4  # both clients' statements, side by side
        assert first.stats() == {"a": {"pending": 5}, "b": {"pending": 5}}
    finally:
        first.close()
        second.close()


def test_a_statement_lost_behind_the_pooler_switches_to_unnamed_statements(
    private_pg, pgbouncer, caplog
):
    """With prepared_statements=yes (no detection at connect), a statement the next server
    connection does not know (26000) switches the dialect to unnamed statements: outside a
    transaction the call is simply retried; inside one it fails with Unavailable, having
    changed nothing, and succeeds when called again."""
    bouncer = pgbouncer(default_pool_size=1)
    dsn = bouncer.dsn + "?schema=lost&prepared_statements=yes"
    with minflow.Client(dsn) as client:
        client.migrate()
        run_id = client.submit("t")
        assert client.get(run_id).status == "pending"  # get_run now prepared
        bouncer.admin("RECONNECT")  # the server connection, and its statements, go away
        assert client.get(run_id).status == "pending"
        (warning,) = pooler_warnings(caplog.records)
        assert "26000" in warning
        assert prepared_names(client) == []

    caplog.clear()
    with minflow.Client(dsn) as client:
        first, second = client.submit("t"), client.submit("t")
        client.cancel(first)  # the cancel statements are prepared inside a transaction
        bouncer.admin("RECONNECT")
        with pytest.raises(minflow.Unavailable, match="retry"):
            client.cancel(second)
        assert client.get(second).status == "pending"  # the transaction was rolled back
        client.cancel(second)
        assert [e.event_type for e in client.events(second)] == ["created", "cancelled"]
        assert len(pooler_warnings(caplog.records)) == 1


def test_without_pg8000s_internals_statements_still_run_correctly(
    private_pg, pgbouncer, monkeypatch, caplog
):
    """A pg8000 without the pieces the one-round-trip statements use: said once, and
    statements take pg8000's own run(), each in a transaction of its own outside one, so that
    its three requests reach one server connection even through the pooler."""
    import pg8000.core

    monkeypatch.delattr(pg8000.core, "Context")
    assert minflow._pg_wire.__wrapped__() is None
    (warning,) = [r.getMessage() for r in caplog.records if "pg8000's run()" in r.getMessage()]
    assert "core.Context" in warning
    monkeypatch.undo()

    bouncer = pgbouncer(default_pool_size=2)
    for dsn in (private_pg.dsn + "?schema=nowire", bouncer.dsn + "?schema=nowire"):
        with minflow.Client(dsn) as client:
            client._dialect._wire = None  # as _pg_wire() answers for such a pg8000
            exercise(client)
            run_id = client.submit("t", {"n": 2})
            client.cancel(run_id)  # inside a transaction: pg8000's run() as it is
            assert client.get(run_id).status == "cancelled"
            assert prepared_names(client) == []


# -- everything through the pooler ----------------------------------------------------------


def test_everything_works_through_pgbouncer_in_transaction_mode(
    private_pg, pgbouncer, caplog, tmp_path
):
    caplog.set_level(logging.INFO, logger="minflow")
    bouncer = pgbouncer(default_pool_size=1)
    dsn = bouncer.dsn + "?schema=acc_x"
    app = minflow.App(dsn)
    # migrate: the tables land in the DSN's schema, nowhere else (no search_path involved).
    assert app.migrate() == minflow.SCHEMA_VERSION
    direct = infra.pg_connect(private_pg.dsn)
    try:
        found = direct.run(
            "SELECT DISTINCT table_schema FROM information_schema.tables "
            "WHERE table_name = ANY(:names)",
            names=list(TABLES),
        )
    finally:
        direct.close()
    assert found == [["acc_x"]]

    # Producers: submit, submit_many, idempotency, reads, cancel and retry.
    single = app.submit("pool.fast", {"n": 0})
    keyed = app.submit_many(
        [minflow.Job("pool.fast", {"n": n}, idempotency_key=f"k{n}") for n in range(1, 6)]
    )
    again = app.submit("pool.fast", idempotency_key="k1")
    assert again == keyed[0] and again.deduplicated
    assert app.get(single).payload == {"n": 0}
    assert len(app.list(type="pool.fast")) == 6
    app.cancel(keyed[4])
    app.retry(keyed[4])
    assert [e.event_type for e in app.events(keyed[4])] == ["created", "cancelled", "retried"]

    # Schedules: a due slot becomes one run.
    schedule = app.schedule("pool.fast", {"from": "cron"}, cron="* * * * *")
    db(
        app,
        "UPDATE workflow_schedule SET next_run_at = {time:t} WHERE id = {uuid:id}",
        id=schedule,
        t=dt.datetime.now(UTC) - dt.timedelta(minutes=1),
    )
    assert app.tick() == 1
    # Paused through the pooler too; else the worker's ticker below adds a run when its burst
    # crosses a minute boundary.
    app.pause_schedule(schedule)
    assert app.tick() == 0

    # A run whose worker died: the rescue sweep hands it back.
    dead = app.submit("pool.fast", {"n": "dead"})
    db(
        app,
        "UPDATE workflow_run SET status = 'leased', attempt = 1, leased_by = 'gone', "
        "lease_until = {time:t} WHERE id = {uuid:id}",
        id=dead,
        t=dt.datetime.now(UTC) - dt.timedelta(minutes=1),
    )

    # Workers: claim cycles, explicit heartbeats, and automatic ones keeping a short lease.
    @app.handler("pool.fast")
    def fast(run):
        run.heartbeat(30)
        return {"ok": True}

    @app.handler("pool.slow")
    def slow(run):
        time.sleep(3.0)  # past the 2 s lease: only the automatic heartbeats keep it
        return {"slept": True}

    slow_id = app.submit("pool.slow")
    worker = minflow.Worker(app, concurrency=4, lease=2.0)
    assert worker.run(burst=True, handle_signals=False) == 9
    assert app.stats() == {"pool.fast": {"succeeded": 8}, "pool.slow": {"succeeded": 1}}
    assert [e.event_type for e in app.events(slow_id)].count("leased") == 1
    assert "heartbeat" in [e.event_type for e in app.events(single)]
    assert "retried" in [e.event_type for e in app.events(dead)]

    # The HTTP API on a client whose DSN is the pooler's.
    server = minflow._Server("127.0.0.1", 0, app)
    thread = minflow._start_server(server, poll_interval=0.02)
    try:
        status, body = http_call(server, "POST", "/api/v1/workflows", {"type": "pool.http"})
        assert status == 201
        assert http_call(server, "GET", f"/api/v1/workflows/{body['id']}")[1]["type"] == "pool.http"
        assert http_call(server, "DELETE", f"/api/v1/workflows/{body['id']}")[0] == 200
        assert http_call(server, "GET", "/api/v1/workflows?status=cancelled")[0] == 200
        assert http_call(server, "GET", "/healthz") == (200, {"status": "ok"})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)

    # The migrate command.
    result = subprocess.run(
        [sys.executable, "-m", "minflow", "migrate", "--dsn", bouncer.dsn + "?schema=acc_cli"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    version = minflow.SCHEMA_VERSION
    assert f"schema version {version} ({version} migrations applied)" in result.stdout

    # Nothing was left prepared on the one server connection every statement went through.
    assert prepared_names(app) == []
    assert len(pooler_warnings(caplog.records)) == 1
    app.close()


# -- wake-ups -------------------------------------------------------------------------------


def test_listen_needs_a_direct_connection(private_pg, pgbouncer, caplog):
    """Through the pooler a worker says once that it polls instead of listening; with
    listen_dsn pointing at the server it hears a submit at once, poll interval or not."""
    caplog.set_level(logging.INFO, logger="minflow")
    bouncer = pgbouncer()
    app = minflow.App(bouncer.dsn + "?schema=wake")
    app.migrate()
    seen = threading.Event()
    app.handler("t")(lambda run: seen.set())
    # The producer reaches the server directly: no in-process wake-up helps the worker.
    producer = minflow.Client(private_pg.dsn + "?schema=wake")
    try:
        polling = minflow.Worker(app, poll_interval=0.2, schedules=False).start()
        try:
            wait_for(
                lambda: any("no wake-ups" in r.getMessage() for r in caplog.records),
                10,
                message="the polling notice",
            )
            producer.submit("t")
            assert seen.wait(10), "a polling worker did not find the run"
        finally:
            polling.stop(10)
        (notice,) = [r for r in caplog.records if "no wake-ups" in r.getMessage()]
        assert notice.levelno == logging.WARNING
        assert (
            "connection pooler" in notice.getMessage()
            and "polling every 0.2s" in notice.getMessage()
        )

        seen.clear()
        listening = minflow.Worker(
            app, poll_interval=60, schedules=False, listen_dsn=private_pg.dsn
        ).start()
        try:
            # The first poll, then the one the watcher asks for once it listens: with a poll
            # interval of a minute, what wakes the worker from now on is a notification.
            polls = {"worker_id": listening.worker_id}
            wait_for(
                lambda: listening.metrics.value("workflow_worker_poll_cycle_total", **polls) >= 2,
                10,
                message="the worker to listen",
            )
            producer.submit("t")
            assert seen.wait(5), "the listening worker heard nothing"
        finally:
            listening.stop(10)
        assert len([r for r in caplog.records if "no wake-ups" in r.getMessage()]) == 1

        # A listen_dsn that reaches another database never hears the producers: the start-up
        # self-test says so, and the worker polls.
        elsewhere = private_pg.dsn.rsplit("/", 1)[0] + "/template1"
        stray = minflow.Worker(app, schedules=False, listen_dsn=elsewhere).start()
        try:
            wait_for(
                lambda: len([r for r in caplog.records if "no wake-ups" in r.getMessage()]) == 2,
                minflow.PG_LISTEN_SELF_TEST + 10,
                message="the self-test's verdict",
            )
        finally:
            stray.stop(10)
        notice = [r.getMessage() for r in caplog.records if "no wake-ups" in r.getMessage()][-1]
        assert "a test notification" in notice and "template1" in notice
    finally:
        producer.close()
        app.close()


# -- many workers, few server connections ---------------------------------------------------

# 16 processes x 8 threads through 10 server connections: 20,000 runs take about 30 s on a
# 2-core machine, process start-up included (MINFLOW_TEST_POOLED_RUNS to change the count).
POOLED_RUNS = int(os.environ.get("MINFLOW_TEST_POOLED_RUNS", "20000"))
POOLED_PROCESSES, POOLED_THREADS, POOLED_SERVERS = 16, 8, 10


def test_sixteen_worker_processes_drain_through_ten_server_connections(
    private_pg, pgbouncer, tmp_path
):
    bouncer = pgbouncer(default_pool_size=POOLED_SERVERS, max_client_conn=300)
    dsn = bouncer.dsn + "?schema=drain"  # each process detects the pooler by itself
    with minflow.Client(private_pg.dsn + "?schema=drain") as producer:
        producer.migrate()
        for start in range(0, POOLED_RUNS, 5000):
            count = min(5000, POOLED_RUNS - start)
            producer.submit_many([minflow.Job("proc.record") for _ in range(count)])
    records = tmp_path / "records"
    barrier = records / "barrier"
    barrier.mkdir(parents=True)
    env = {
        **os.environ,
        "MINFLOW_TEST_RECORD_DIR": str(records),
        "MINFLOW_TEST_BARRIER": f"{barrier}:{POOLED_PROCESSES}",
    }
    peak, sampling = [0], threading.Event()

    def sample() -> None:
        while not sampling.wait(0.1):
            peak[0] = max(peak[0], bouncer.server_connections())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    procs = []
    try:
        for n in range(POOLED_PROCESSES):
            log = tmp_path / f"worker-{n}.stderr"
            with open(log, "wb") as stderr:
                procs.append(
                    (
                        subprocess.Popen(
                            [sys.executable, "-m", "minflow", "worker", "tests.proc_app:app"]
                            + ["--dsn", dsn, "--burst", "--no-schedules"]
                            + ["--concurrency", str(POOLED_THREADS), "--worker-id", f"pool-{n}"],
                            cwd=ROOT,
                            env=env,
                            stdout=subprocess.PIPE,
                            stderr=stderr,
                        ),
                        log,
                    )
                )
        deadline = started + 110
        for proc, log in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"drain not finished in 110s:\n{log.read_text()[-2000:]}")
        wall = time.monotonic() - started
    finally:
        sampling.set()
        sampler.join(5)
        for proc, _ in procs:
            infra.stop_process(proc, timeout=5)
    failed = [log.read_text()[-2000:] for proc, log in procs if proc.returncode != 0]
    assert not failed, failed
    for _, log in procs:
        assert log.read_text().count("prepared_statements=no") == 1, log.read_text()[-2000:]
    executed = [int(proc.stdout.read().split()[0]) for proc, _ in procs]
    for proc, _ in procs:
        proc.stdout.close()

    # Each run executed exactly once: the handlers' own records and the event log agree.
    ran = collections.Counter(
        fields[1]
        for lines in proc_app.read_records(records).values()
        for fields in lines
        if fields[0] == "ran"
    )
    assert len(ran) == POOLED_RUNS and set(ran.values()) == {1}
    assert sum(executed) == POOLED_RUNS
    with minflow.Client(private_pg.dsn + "?schema=drain") as client:
        assert client.stats() == {"proc.record": {"succeeded": POOLED_RUNS}}
        events = {
            kind: (int(total), int(runs))
            for kind, total, runs in db(
                client,
                "SELECT event_type, COUNT(*), COUNT(DISTINCT workflow_id) FROM workflow_event "
                "GROUP BY event_type",
            )
        }
        span = db(
            client,
            "SELECT EXTRACT(EPOCH FROM MAX(created_at) - MIN(created_at)) FROM workflow_event "
            "WHERE event_type IN ('leased', 'succeeded')",
        )[0][0]
    every = (POOLED_RUNS, POOLED_RUNS)
    assert events == dict.fromkeys(("created", "leased", "started", "succeeded"), every)
    # The pool bounded what the server saw, 128 handler threads notwithstanding.
    assert 0 < peak[0] <= POOLED_SERVERS
    busiest = sorted(executed, reverse=True)
    print(
        f"\n  pgbouncer drain: {POOLED_RUNS} runs, lost 0, duplicates 0, {POOLED_PROCESSES} "
        f"processes x "
        f"{POOLED_THREADS} threads, server connections max {peak[0]} (pool {POOLED_SERVERS}); "
        f"{float(span):.1f}s first claim to last completion, {wall:.1f}s wall with start-up; "
        f"runs per process {busiest[0]}..{busiest[-1]}"
    )

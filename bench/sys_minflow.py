"""minflow itself, in the shape every benchmarked system has (see harness.py).

A setting is a dict of ``minflow.Worker`` keyword arguments and nothing else, so the defaults
table is whatever ``Worker()`` does today and follows minflow's defaults when they change.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import sqlite3
import threading
import time

import harness
import minflow

NAME = "minflow"
BACKENDS = ("postgres", "sqlite")
SCENARIOS = frozenset({"S1", "S2", "S3"})
SETTINGS = (
    "`App.worker(**setting)`, one worker per process; defaults: `Worker()` with every keyword at "
    "its default (SQLite: WAL, synchronous=FULL; PostgreSQL: LISTEN/NOTIFY wake-ups; the schedule "
    "ticker on); the sweep changes only the keywords named in its setting"
)

DEFAULTS: dict = {}

# The Worker keywords the sweep varies, each with the values it tries besides "concurrency"
# (which takes the harness's concurrencies); the sweep is their product. A keyword this
# minflow's Worker does not accept is skipped. The prefetch buffer is minflow's batch size, as
# pgqueuer's batch_size is its: its default and a larger one.
EXTRA_AXES: dict[str, tuple] = {"prefetch": (64, 256)}


def _worker_parameters() -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(minflow.Worker).parameters)


def _axes(concurrencies) -> dict[str, tuple]:
    accepted = _worker_parameters()
    axes = {"concurrency": tuple(concurrencies), **EXTRA_AXES}
    return {name: values for name, values in axes.items() if name in accepted}


def sweep(concurrencies) -> list[dict]:
    """Every combination of the axes' values, as Worker keyword arguments."""
    axes = _axes(concurrencies)
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def describe(setting: dict) -> str:
    """The swept keywords' values in effect (defaults read from Worker's signature), so ``{}``
    and ``{"concurrency": 4}`` read alike while 4 is the default."""
    accepted = _worker_parameters()
    names = dict.fromkeys([*_axes((1,)), *setting])
    return ", ".join(
        f"{name} {setting[name] if name in setting else accepted[name].default}" for name in names
    )


def dsn(target) -> str:
    """The minflow DSN of a harness target."""
    return f"sqlite://{target.dsn}" if target.backend == "sqlite" else target.dsn


def prepare(target) -> None:
    """An empty, migrated database."""
    release(target)
    if target.backend == "sqlite":
        harness.remove_sqlite(target.dsn)
    else:
        conn = harness.pg_connect(target.dsn)
        try:
            conn.run(f"DROP SCHEMA IF EXISTS {minflow.DEFAULT_SCHEMA} CASCADE")
        finally:
            conn.close()
    with minflow.Client(dsn(target)) as client:
        client.migrate()


@contextlib.contextmanager
def producer(target):
    """``submit(payload)`` through one Client: one ``Client.submit`` per call."""
    with minflow.Client(dsn(target)) as client:
        client.stats()  # connect before the clock starts

        def submit(payload: dict) -> None:
            client.submit("noop", payload)

        yield submit


def enqueue_bulk(target, payloads: list[dict]) -> None:
    """``Client.submit_many``: one transaction."""
    with minflow.Client(dsn(target)) as client:
        client.submit_many(minflow.Job("noop", payload) for payload in payloads)


def done_count(target) -> int:
    """Runs in ``succeeded``."""
    return harness.scalar(
        target, f"SELECT COUNT(*) FROM {table(target, 'workflow_run')} WHERE status = 'succeeded'"
    )


def remaining(target) -> int:
    """Runs not finished yet (pending or leased): both partial indexes make this cheap."""
    run = table(target, "workflow_run")
    return harness.scalar(
        target,
        f"SELECT (SELECT COUNT(*) FROM {run} WHERE status = 'pending' AND deleted_at IS NULL)"
        f" + (SELECT COUNT(*) FROM {run} WHERE status = 'leased')",
    )


release = harness.release_counter


def _app(target, on_start) -> minflow.App:
    app = minflow.App(dsn(target))
    app.handler("noop")(on_start)
    app.stats()  # connect and check the schema before reporting ready
    return app


def serve(target, setting: dict, mode: str, out: str | None, ready) -> None:
    """A minflow Worker until SIGTERM (which it handles itself: finish in-flight runs, exit)."""
    sink = open(out, "a", buffering=1) if out else None  # noqa: SIM115 - the process's lifetime
    lock = threading.Lock()
    if mode == "latency":

        def on_start(run) -> None:
            sink.write(f"{time.time() - run.payload['t']}\n")

    elif mode == "record":
        # S4: one line per execution; the harness looks for runs executed twice or never.
        def on_start(run) -> None:
            line = f"{run.id} {run.attempt} {run.worker_id} {time.time()}\n"
            with lock:
                sink.write(line)

    elif mode == "soak":
        # S6: runs marked "fail" fail their first attempt and are retried a second later.
        def on_start(run) -> None:
            if run.payload.get("fail") and run.attempt == 1:
                raise RuntimeError("soak: first attempt fails")

    else:

        def on_start(run) -> None:
            pass

    app = _app(target, on_start)
    options = {"backoff": lambda attempt: 1.0} if mode == "soak" else {}
    worker = app.worker(**setting, **options)
    ready()
    worker.run()
    app.close()


def latency_inprocess(target, n: int, interval: float, setting: dict) -> list[float]:
    """A Worker thread beside the producer in this process (in-process wake-ups)."""
    delays: list[float] = []
    finished = threading.Event()

    def on_start(run) -> None:
        delays.append(time.time() - run.payload["t"])
        if len(delays) >= n:
            finished.set()

    app = _app(target, on_start)
    worker = app.worker(**setting).start()
    try:
        time.sleep(0.5)  # an idle worker, not one still starting
        start = time.monotonic()
        for i in range(n):
            # The same schedule as the peers' in-process producers: a submit every interval.
            pause = start + i * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            app.submit("noop", {"t": time.time()})
        if not finished.wait(60):
            raise TimeoutError(f"only {len(delays)} of {n} handlers started")
    finally:
        worker.stop()
        app.close()
    return delays


# -- raw access for the minflow-only scenarios (S4-S6) ------------------------------------------


def table(target, name: str) -> str:
    """A table's name as raw SQL must spell it (PostgreSQL keeps minflow's tables in a schema)."""
    return name if target.backend == "sqlite" else f"{minflow.DEFAULT_SCHEMA}.{name}"


def query(target, text: str) -> list:
    """Run one raw statement with its own connection; ``{run}``/``{event}`` name the tables."""
    text = text.format(run=table(target, "workflow_run"), event=table(target, "workflow_event"))
    if target.backend == "sqlite":
        conn = sqlite3.connect(target.dsn, timeout=30, isolation_level=None)
        try:
            return conn.execute(text).fetchall()
        finally:
            conn.close()
    conn = harness.pg_connect(target.dsn)
    try:
        return conn.run(text) or []
    finally:
        conn.close()


HISTORY_BEFORE = "2021-01-01"  # terminal rows S5 adds are created before this, new runs after


def add_history(target, n: int) -> None:
    """``n`` finished runs of the same type (80% succeeded, 10% failed, 10% cancelled), as a
    queue that has been in production for a while has; S5 measures that they cost nothing."""
    status = "CASE i % 10 WHEN 0 THEN 'failed' WHEN 1 THEN 'cancelled' ELSE 'succeeded' END"
    if target.backend == "sqlite":
        when = "strftime('%Y-%m-%d %H:%M:%f', '2020-01-01', printf('+%d seconds', i))"
        query(
            target,
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < "
            f"{int(n)}) INSERT INTO {{run}} (id, type, payload, status, priority, run_at, "
            "attempt, max_attempts, created_at, updated_at) SELECT "
            f"printf('00000000-0000-4000-8000-%012d', i), 'noop', '{{{{\"i\": 0}}}}', {status}, "
            f"100, {when}, 1, 3, {when}, {when} FROM c",
        )
    else:
        when = "TIMESTAMPTZ '2020-01-01' + make_interval(secs => i)"
        query(
            target,
            "INSERT INTO {run} (id, type, payload, status, priority, run_at, attempt, "
            "max_attempts, created_at, updated_at) SELECT gen_random_uuid(), 'noop', "
            f"'{{{{\"i\": 0}}}}', {status}, 100, {when}, 1, 3, {when}, {when} "
            f"FROM generate_series(1, {int(n)}) AS i",
        )
        query(target, "ANALYZE {run}")


def clear_recent(target) -> None:
    """Delete the runs (and events) of the last drain, keeping S5's history."""
    recent = f"SELECT id FROM {{run}} WHERE created_at >= '{HISTORY_BEFORE}'"
    query(target, f"DELETE FROM {{event}} WHERE workflow_id IN ({recent})")
    query(target, f"DELETE FROM {{run}} WHERE created_at >= '{HISTORY_BEFORE}'")


def explain_claim(target) -> str:
    """The plan of the claim query as the worker sends it (PostgreSQL: its row-picking part)."""
    import re

    if target.backend == "sqlite":
        dialect = minflow._SQLiteDialect(minflow._parse_dsn(dsn(target)))
        claim = dialect.compose("claim", filter="type IN ('noop')")
        claim = re.sub(r":(\w+)", lambda m: {"limit": "100", "lease": "30"}.get(m[1], "'w'"), claim)
        rows = query(target, "EXPLAIN QUERY PLAN " + claim.replace("{", "{{").replace("}", "}}"))
        return "\n".join(row[-1] for row in rows)
    picked = re.search(r"picked AS \((.*?)\n\), claimed", minflow._PG_SQL["cycle"], re.S)[1]
    picked = (
        picked.replace("{workflow_run}", "{run}")
        .replace(":claim_types", "'{{noop}}'")
        .replace(":patterns", "'{{}}'")
        .replace(":limit", "100")
    )
    return "\n".join(row[0] for row in query(target, "EXPLAIN " + picked))

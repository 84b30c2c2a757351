"""pgqueuer on PostgreSQL through asyncpg, the driver its docs recommend.

One of the benchmark's system modules (the interface every ``bench/sys_*.py`` exposes: prepare,
producer, enqueue_bulk, done_count, serve, latency_inprocess). Imports only in the peers venv
(``bench/peers-requirements.txt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import uvloop
from pgqueuer import Queries, QueueManager
from pgqueuer.db import AsyncpgDriver

import harness

NAME = "pgqueuer"
BACKENDS = ("postgres",)
SCENARIOS = frozenset({"S1", "S2", "S3"})

SETTINGS = (
    "QueueManager on one asyncpg connection (its advice for the consumer), run on uvloop like "
    "`pgq run`; defaults: `run()` with every option at its default (batch_size 10, no "
    "max_concurrent_tasks limit, LISTEN/NOTIFY, 30 s polling fallback); the sweep sets "
    "max_concurrent_tasks to each concurrency with batch_size 10 and with the largest batch it "
    "allows (half the limit; a limit of 1 cannot be set), plus the defaults; tables as "
    "`pgq install` makes them (durable)"
)

DEFAULTS: dict = {}


def _run_defaults() -> dict:
    parameters = inspect.signature(QueueManager.run).parameters
    return {name: parameters[name].default for name in ("batch_size", "max_concurrent_tasks")}


def sweep(concurrencies) -> list[dict]:
    """The defaults, then each concurrency as max_concurrent_tasks with batch_size 10 (its
    default) and half the limit (the largest ``run()`` accepts: it wants a limit of at least twice
    the batch)."""
    default_batch = _run_defaults()["batch_size"]
    settings = [dict(DEFAULTS)]
    for limit in concurrencies:
        for batch in sorted({min(default_batch, limit // 2), limit // 2}):
            if batch >= 1:
                settings.append({"max_concurrent_tasks": limit, "batch_size": batch})
    return settings


def describe(setting: dict) -> str:
    values = {**_run_defaults(), **setting}
    limit = values["max_concurrent_tasks"] or "unlimited"
    return f"{limit} tasks, batch {values['batch_size']}"


# pgqueuer deletes finished jobs from its queue table and logs each outcome in pgqueuer_log,
# whose rows are kept (the statistics roll-up only marks them aggregated).
_COUNT_SQL = "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"


def _dsn(target: Any) -> str:
    return target.dsn


def _encode(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def prepare(target: Any) -> None:
    """Make an empty queue: drop the ``public`` schema and install pgqueuer's tables."""
    release(target)

    async def run() -> None:
        conn = await asyncpg.connect(_dsn(target))
        try:
            await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")
            await Queries(AsyncpgDriver(conn)).install()
        finally:
            await conn.close()

    asyncio.run(run())


@contextlib.contextmanager
def producer(target: Any) -> Iterator[Callable[[dict], None]]:
    """Yield ``submit(payload)``, one ``Queries.enqueue`` of one job per call.

    The producer is synchronous, so each call drives the asyncpg coroutine on a private loop.
    """
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(_dsn(target)))
    try:
        queries = Queries(AsyncpgDriver(conn))

        def submit(payload: dict) -> None:
            loop.run_until_complete(queries.enqueue("noop", _encode(payload)))

        yield submit
    finally:
        loop.run_until_complete(conn.close())
        loop.close()


def enqueue_bulk(target: Any, payloads: list[dict]) -> None:
    """Enqueue every payload with one list-form ``Queries.enqueue`` call."""

    async def run() -> None:
        conn = await asyncpg.connect(_dsn(target))
        try:
            await Queries(AsyncpgDriver(conn)).enqueue(
                ["noop"] * len(payloads), [_encode(p) for p in payloads], [0] * len(payloads)
            )
        finally:
            await conn.close()

    asyncio.run(run())


def _count(target: Any, sql: str) -> int:
    return harness.scalar(target, sql)


release = harness.release_counter


def _queue_manager(conn: Any, handler: Callable[[dict], None] | None) -> QueueManager:
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: Any) -> None:
        if handler is not None:
            handler(json.loads(job.payload))

    return qm


def serve(
    target: Any, setting: dict, mode: str, out: str | None, ready: Callable[[], None]
) -> None:
    """Run one QueueManager until SIGTERM, which sets its shutdown event (graceful stop)."""
    sink = open(out, "a", buffering=1) if mode == "latency" else None  # noqa: SIM115
    try:
        handler = None
        if sink is not None:

            def handler(payload: dict) -> None:
                sink.write(f"{time.time() - payload['t']}\n")

        uvloop.run(_serve(_dsn(target), setting, handler, ready))
    finally:
        if sink is not None:
            sink.close()


async def _serve(
    dsn: str,
    setting: dict,
    handler: Callable[[dict], None] | None,
    ready: Callable[[], None],
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        qm = _queue_manager(conn, handler)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, qm.shutdown.set)
        ready()
        await qm.run(**setting)
    finally:
        await conn.close()


def latency_inprocess(target: Any, n: int, interval: float, setting: dict) -> list[float]:
    """S3 in one event loop: the QueueManager runs as a task beside the code that enqueues."""
    return uvloop.run(_latency(_dsn(target), n, interval, setting))


async def _latency(dsn: str, n: int, interval: float, setting: dict) -> list[float]:
    delays: list[float] = []
    warm = asyncio.Event()
    done = asyncio.Event()

    def handler(payload: dict) -> None:
        if payload.get("warmup"):
            warm.set()
            return
        if "t" not in payload:
            return  # a job some earlier run left behind
        delays.append(time.time() - payload["t"])
        if len(delays) >= n:
            done.set()

    # The consumer keeps its own connection, as pgqueuer advises; producing uses another.
    consumer_conn = await asyncpg.connect(dsn)
    producer_conn = await asyncpg.connect(dsn)
    try:
        qm = _queue_manager(consumer_conn, handler)
        queries = Queries(AsyncpgDriver(producer_conn))
        worker = asyncio.create_task(qm.run(**setting))
        try:
            # One job through the whole path proves the worker is listening before timing.
            await queries.enqueue("noop", _encode({"t": time.time(), "warmup": True}))
            await asyncio.wait_for(warm.wait(), 30)
            start = time.monotonic()
            for i in range(n):
                pause = start + i * interval - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                await queries.enqueue("noop", _encode({"t": time.time()}))
            await asyncio.wait_for(done.wait(), 30 + n * interval)
        finally:
            qm.shutdown.set()
            await asyncio.wait_for(worker, 30)
    finally:
        await producer_conn.close()
        await consumer_conn.close()
    return delays[:n]


def done_count(target: Any) -> int:
    """Successful outcomes in ``pgqueuer_log`` (the queue table forgets finished jobs)."""
    return _count(target, _COUNT_SQL)


def remaining(target: Any) -> int:
    """Jobs not finished yet; pgqueuer deletes a job from its queue table when it finishes."""
    return _count(target, "SELECT count(*) FROM pgqueuer")

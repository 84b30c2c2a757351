"""procrastinate on PostgreSQL through psycopg 3, the connector its docs recommend.

One of the benchmark's system modules (the interface every ``bench/sys_*.py`` exposes: prepare,
producer, enqueue_bulk, done_count, serve, latency_inprocess). Imports only in the peers venv
(``bench/peers-requirements.txt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any

import procrastinate
import procrastinate.worker
import psycopg
import psycopg_pool

import harness

NAME = "procrastinate"
BACKENDS = ("postgres",)
SCENARIOS = frozenset({"S1", "S2", "S3"})

# Its docs size the pool at concurrency + 1 for short jobs, so sub-workers never wait for a
# connection; the cap keeps a few worker processes under PostgreSQL's max_connections (100).
POOL_CAP = 20

SETTINGS = (
    "async task (its docs reserve worker concurrency for async tasks), LISTEN/NOTIFY, polling "
    "fallback 5 s, finished jobs kept; defaults: `run_worker_async()` with every option at its "
    "default (concurrency 1) on `PsycopgConnector(conninfo=...)` (psycopg_pool's default of 4 "
    f"connections); the sweep sets concurrency N with a pool of min(N+1, {POOL_CAP}) connections "
    "where that exceeds the default, as its docs advise for short jobs (capped for "
    "max_connections); producers defer through `SyncPsycopgConnector(conninfo=...)`"
)

DEFAULTS: dict = {}


def _default_concurrency() -> int:
    return inspect.signature(procrastinate.worker.Worker).parameters["concurrency"].default


def _default_pool() -> int:
    return inspect.signature(psycopg_pool.AsyncConnectionPool).parameters["min_size"].default


def sweep(concurrencies) -> list[dict]:
    """Worker concurrency N, with the pool its docs advise (N+1, capped) when the default is
    smaller."""
    settings = []
    for concurrency in concurrencies:
        setting = {"concurrency": concurrency}
        size = min(concurrency + 1, POOL_CAP)
        if size > _default_pool():
            setting["pool"] = size
        settings.append(setting)
    return settings


def describe(setting: dict) -> str:
    concurrency = setting.get("concurrency", _default_concurrency())
    return f"concurrency {concurrency}, pool {setting.get('pool', _default_pool())}"


_COUNT_SQL = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"


def _dsn(target: Any) -> str:
    return target.dsn


def _make_app(connector: Any, handler: Callable[[dict], None] | None = None) -> Any:
    app = procrastinate.App(connector=connector)

    # Async, because its docs reserve worker concurrency for async tasks.
    async def noop(**payload: Any) -> None:
        if handler is not None:
            handler(payload)

    app.task(name="noop")(noop)
    return app


def _sync_app(dsn: str) -> Any:
    return _make_app(procrastinate.SyncPsycopgConnector(conninfo=dsn))


def _worker_app(dsn: str, setting: dict, handler: Callable[[dict], None] | None) -> Any:
    pool = {}
    if "pool" in setting:
        size = setting["pool"]
        pool = {"min_size": min(_default_pool(), size), "max_size": size}
    return _make_app(procrastinate.PsycopgConnector(conninfo=dsn, **pool), handler)


def _worker_options(setting: dict) -> dict:
    return {name: value for name, value in setting.items() if name != "pool"}


def prepare(target: Any) -> None:
    """Make an empty queue: drop the ``public`` schema and apply procrastinate's schema."""
    release(target)
    with psycopg.connect(_dsn(target), autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
        conn.execute("CREATE SCHEMA public")
    app = _sync_app(_dsn(target))
    with app.open():
        app.schema_manager.apply_schema()


@contextlib.contextmanager
def producer(target: Any) -> Iterator[Callable[[dict], None]]:
    """Yield ``submit(payload)``, one ``Task.defer`` of the no-op task per call."""
    app = _sync_app(_dsn(target))
    task = app.tasks["noop"]
    with app.open():

        def submit(payload: dict) -> None:
            task.defer(**payload)

        yield submit


def enqueue_bulk(target: Any, payloads: list[dict]) -> None:
    """Enqueue every payload with one ``Task.batch_defer`` call."""
    app = _sync_app(_dsn(target))
    with app.open():
        app.tasks["noop"].batch_defer(*payloads)


def _count(target: Any, sql: str) -> int:
    return harness.scalar(target, sql)


release = harness.release_counter


def serve(
    target: Any, setting: dict, mode: str, out: str | None, ready: Callable[[], None]
) -> None:
    """Run one procrastinate worker until SIGTERM (its own handler stops it gracefully)."""
    sink = open(out, "a", buffering=1) if mode == "latency" else None  # noqa: SIM115
    try:
        handler = None
        if sink is not None:

            def handler(payload: dict) -> None:
                sink.write(f"{time.time() - payload['t']}\n")

        asyncio.run(_serve(_dsn(target), setting, handler, ready))
    finally:
        if sink is not None:
            sink.close()


async def _serve(
    dsn: str,
    setting: dict,
    handler: Callable[[dict], None] | None,
    ready: Callable[[], None],
) -> None:
    app = _worker_app(dsn, setting, handler)
    async with app.open_async():
        ready()
        await app.run_worker_async(**_worker_options(setting))


def latency_inprocess(target: Any, n: int, interval: float, setting: dict) -> list[float]:
    """S3 in one event loop: the worker runs as a task beside the code that defers the jobs."""
    return asyncio.run(_latency(_dsn(target), n, interval, setting))


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

    app = _worker_app(dsn, setting, handler)
    task = app.tasks["noop"]
    async with app.open_async():
        worker = asyncio.create_task(
            app.run_worker_async(**_worker_options(setting), install_signal_handlers=False)
        )
        try:
            # One job through the whole path proves the worker is listening before timing.
            await task.defer_async(t=time.time(), warmup=True)
            await asyncio.wait_for(warm.wait(), 30)
            start = time.monotonic()
            for i in range(n):
                pause = start + i * interval - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                await task.defer_async(t=time.time())
            await asyncio.wait_for(done.wait(), 30 + n * interval)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
    return delays[:n]


def done_count(target: Any) -> int:
    """Jobs in status ``succeeded`` (procrastinate keeps finished jobs by default)."""
    return _count(target, _COUNT_SQL)


def remaining(target: Any) -> int:
    """Jobs not finished yet (todo or doing)."""
    return _count(
        target, "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
    )

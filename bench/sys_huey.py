"""huey's SqliteHuey on the SQLite disk, at its default (durable) settings.

One of the benchmark's system modules (the interface every ``bench/sys_*.py`` exposes: prepare,
producer, enqueue_bulk, done_count, serve, latency_inprocess). Imports only in the peers venv
(``bench/peers-requirements.txt``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from huey import SqliteHuey
from huey.consumer import Consumer

import harness

NAME = "huey"
BACKENDS = ("sqlite",)
SCENARIOS = frozenset({"S1", "S2", "S3"})

# minflow's SQLite wake-up polls PRAGMA data_version every 5 ms; huey can poll its queue as
# often, which is what its latency waits on (its default waits 0.1 s after an empty poll).
FAST_POLL = {"initial_delay": 0.005, "backoff": 1.0, "max_delay": 0.005}

SETTINGS = (
    "SqliteHuey at its defaults (WAL, synchronous left at SQLite's FULL, 5 s busy timeout, one "
    "connection per process; the no-op returns None, so no result is stored); defaults: "
    "`create_consumer()` with every option at its default (one worker thread; after an empty "
    "poll it waits 0.1 s, backing off by 1.15x up to 10 s); the sweep sets the number of worker "
    "threads (-k thread -w N), each with that polling and with a poll every 5 ms (-d 0.005 -b 1 "
    "-m 0.005, as often as minflow's SQLite wake-up polls); bulk submits are `map()` (huey has "
    "no batch enqueue: one transaction per job)"
)

DEFAULTS: dict = {}


def sweep(concurrencies) -> list[dict]:
    """One thread-worker consumer per concurrency, polling at its default and every 5 ms."""
    return [{"workers": n, **poll} for n in concurrencies for poll in ({}, FAST_POLL)]


def describe(setting: dict) -> str:
    workers = setting.get("workers", inspect.signature(Consumer).parameters["workers"].default)
    text = f"{workers} worker thread" + ("s" if workers != 1 else "")
    fast = all(setting.get(name) == value for name, value in FAST_POLL.items())
    return text + (", 5 ms polling" if fast else "")


def _path(target: Any) -> str:
    return os.path.abspath(target.dsn)


def _make(path: str, handler: Callable[[dict], None] | None = None) -> tuple[Any, Any]:
    huey = SqliteHuey(name="bench", filename=path)

    @huey.task(name="noop")
    def noop(payload: dict) -> None:
        if handler is not None:
            handler(payload)

    return huey, noop


def _consumer(huey: Any, setting: dict) -> Any:
    return huey.create_consumer(**setting)


# huey deletes a task from its table when a worker dequeues it and keeps nothing for a no-op
# that returns None, so done_count is (jobs this process enqueued) - (rows still queued). It
# counts a dequeued task as done a few microseconds before the no-op returns, and assumes, as
# the harness does, that producing and polling happen in one process.
_enqueued: dict[str, int] = {}
_lock = threading.Lock()


def _count_enqueued(path: str, n: int) -> None:
    with _lock:
        _enqueued[path] = _enqueued.get(path, 0) + n


def prepare(target: Any) -> None:
    """Make an empty queue: delete the database file and let SqliteHuey create its tables."""
    path = _path(target)
    release(target)
    harness.remove_sqlite(path)
    huey, _ = _make(path)
    huey.storage.close()
    with _lock:
        _enqueued[path] = 0


@contextlib.contextmanager
def producer(target: Any) -> Iterator[Callable[[dict], None]]:
    """Yield ``submit(payload)``, one call of the task (one enqueue) per payload."""
    path = _path(target)
    huey, noop = _make(path)
    try:

        def submit(payload: dict) -> None:
            noop(payload)
            _count_enqueued(path, 1)

        yield submit
    finally:
        huey.storage.close()


def enqueue_bulk(target: Any, payloads: list[dict]) -> None:
    """Enqueue every payload with ``TaskWrapper.map``, huey's only multi-enqueue call.

    huey has no batch insert: map() enqueues the tasks one by one, one transaction each.
    """
    path = _path(target)
    huey, noop = _make(path)
    try:
        noop.map(payloads)
        _count_enqueued(path, len(payloads))
    finally:
        huey.storage.close()


def remaining(target: Any) -> int:
    """Jobs still in huey's task table (a dequeued job is running or done)."""
    return harness.scalar(target, "SELECT count(*) FROM task")


def done_count(target: Any) -> int:
    """Jobs enqueued from this process minus those still in huey's task table."""
    with _lock:
        enqueued = _enqueued.get(_path(target), 0)
    return enqueued - remaining(target)


release = harness.release_counter


def serve(
    target: Any, setting: dict, mode: str, out: str | None, ready: Callable[[], None]
) -> None:
    """Run huey's consumer until SIGTERM, which its own handler turns into a stop."""
    sink = open(out, "a", buffering=1) if mode == "latency" else None  # noqa: SIM115
    try:
        handler = None
        if sink is not None:

            def handler(payload: dict) -> None:
                sink.write(f"{time.time() - payload['t']}\n")

        huey, _ = _make(_path(target), handler)
        consumer = _consumer(huey, setting)
        ready()
        try:
            consumer.run()
        finally:
            huey.storage.close()
    finally:
        if sink is not None:
            sink.close()


def latency_inprocess(target: Any, n: int, interval: float, setting: dict) -> list[float]:
    """S3 in one process: the consumer's threads run beside the thread that enqueues.

    Consumer.start() installs process signal handlers, so this must run on the main thread;
    the previous handlers are put back afterwards.
    """
    delays: list[float] = []
    warm = threading.Event()
    done = threading.Event()
    delays_lock = threading.Lock()

    def handler(payload: dict) -> None:
        if payload.get("warmup"):
            warm.set()
            return
        if "t" not in payload:
            return  # a job some earlier run left behind
        with delays_lock:
            delays.append(time.time() - payload["t"])
            if len(delays) >= n:
                done.set()

    path = _path(target)
    huey, noop = _make(path, handler)
    consumer = _consumer(huey, setting)
    signals = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s]
    saved = {s: signal.getsignal(s) for s in signals}
    try:
        consumer.start()
        # One job through the whole path proves the workers are polling before timing.
        noop({"t": time.time(), "warmup": True})
        if not warm.wait(30):
            raise TimeoutError("huey consumer did not run the warm-up job within 30 s")
        start = time.monotonic()
        for i in range(n):
            pause = start + i * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            noop({"t": time.time()})
        _count_enqueued(path, n + 1)
        if not done.wait(30 + n * interval):
            raise TimeoutError(f"only {len(delays)} of {n} huey jobs started")
    finally:
        consumer.stop(graceful=True)
        for signum, previous in saved.items():
            signal.signal(signum, previous)
        huey.storage.close()
    with delays_lock:
        return delays[:n]

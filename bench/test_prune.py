"""P1 (make bench): a million finished runs pruned to zero while a worker drains new ones.

The table holds ``BENCH_PRUNE_RUNS`` finished runs (80% succeeded, 10% failed, 10% cancelled),
each with the four events a real run leaves, last updated in 2020. One worker process runs (the
harness's latency mode) while this process submits ``RATE`` new runs a second: for
``BASELINE`` seconds, then while ``Client.prune(older_than=1 day)`` deletes the history, then for
``BASELINE`` seconds more (on a shared machine the load moves; the two references bracket the
prune). Printed per phase: the claim's latency (p50 / p95 / p99), timed by a probe that claims
one run of its own type ``PROBE_RATE`` times a second through the worker's claim cycle on a
connection of its own (on SQLite the time includes waiting for the write lock); the new runs'
submit-to-start latency, which adds the submit (on SQLite also waiting for the lock) and the
wake-up; the submit call's own p99. Then the prune's time, and the tables' size before and
after (PostgreSQL: after VACUUM, and after VACUUM FULL for reference; SQLite: the file,
then after VACUUM). Asserted: the history and its events are gone, no new run was deleted,
every new run started.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import sys_minflow as mod
from harness import (
    drop_target,
    fresh_target,
    load_average,
    percentiles,
    wait_until,
    workers,
)

import minflow

HISTORY = int(os.environ.get("BENCH_PRUNE_RUNS", "1000000"))
RATE = 50  # new runs submitted per second (S3 submits every 20 ms too)
BASELINE = 10.0  # seconds of submits before the prune starts
CONCURRENCY = 10
PROBE_RATE = 20  # claims timed per second
PROBE_TYPE = "p1.probe"


def _fill(target, n: int) -> None:
    """``n`` finished runs of 2020 with their four events each, in one statement per table."""
    status = "CASE i % 10 WHEN 0 THEN 'failed' WHEN 1 THEN 'cancelled' ELSE 'succeeded' END"
    events = (  # (order, event type, data); the fourth is named for the run's status
        "(0, 'created', NULL), (1, 'leased', '{{\"worker_id\": \"w\", \"attempt\": 1}}'), "
        "(2, 'started', '{{\"worker_id\": \"w\"}}'), (3, '', NULL)"
    )
    if target.backend == "sqlite":
        rows = f"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n})"
        run_id = "printf('00000000-0000-4000-8000-%012d', i)"
        when = "strftime('%Y-%m-%d %H:%M:%f', '2020-01-01', printf('+%d seconds', i * 30))"
        source, event_data = "c", "e.column3"
        events_from = f"c, (VALUES {events}) AS e"
        order = "i, e.column1"
        event_type = f"CASE e.column1 WHEN 3 THEN {status} ELSE e.column2 END"
    else:
        rows = ""
        run_id = "CAST('00000000-0000-4000-8000-' || lpad(CAST(i AS text), 12, '0') AS uuid)"
        when = "TIMESTAMPTZ '2020-01-01' + make_interval(secs => i * 30)"
        source = f"generate_series(1, {n}) AS i"
        events_from = f"{source} CROSS JOIN (VALUES {events}) AS e(k, t, d)"
        order, event_data = "i, e.k", "CAST(e.d AS jsonb)"
        event_type = f"CASE e.k WHEN 3 THEN {status} ELSE e.t END"
    mod.query(
        target,
        f"{rows} INSERT INTO {{run}} (id, type, payload, status, priority, run_at, attempt, "
        f"max_attempts, created_at, updated_at) SELECT {run_id}, 'noop', '{{{{\"i\": 0}}}}', "
        f"{status}, 100, {when}, 1, 3, {when}, {when} FROM {source}",
    )
    mod.query(
        target,
        f"{rows} INSERT INTO {{event}} (workflow_id, event_type, data, created_at) "
        f"SELECT {run_id}, {event_type}, {event_data}, {when} FROM {events_from} ORDER BY {order}",
    )


def _sizes(target) -> dict[str, int]:
    """Bytes on disk: the database file (SQLite), or each table with its indexes."""
    if target.backend == "sqlite":
        wal = Path(target.dsn + "-wal")
        return {
            "file": os.path.getsize(target.dsn),
            "wal": wal.stat().st_size if wal.exists() else 0,
            "free pages": mod.query(target, "PRAGMA freelist_count")[0][0],
        }
    return {
        name: mod.query(target, f"SELECT pg_total_relation_size('{{{name}}}')")[0][0]
        for name in ("run", "event")
    }


def _vacuum(target, full: bool = False) -> float:
    started = time.monotonic()
    if target.backend == "sqlite":
        mod.query(target, "VACUUM")
    else:
        for name in ("run", "event"):
            mod.query(target, f"VACUUM {'FULL ' if full else ''}{{{name}}}")
    return time.monotonic() - started


def _mib(sizes: dict[str, int]) -> str:
    return ", ".join(
        f"{k} {v}" if k == "free pages" else f"{k} {v / 2**20:,.0f} MiB" for k, v in sizes.items()
    )


class _Producer(threading.Thread):
    """Submits ``RATE`` runs a second, each carrying its submit time, until stopped."""

    def __init__(self, target):
        super().__init__(daemon=True)
        self.target = target
        self.stop = threading.Event()
        self.sent = 0
        self.calls: list[float] = []  # seconds each submit call took

    def run(self) -> None:
        with mod.producer(self.target) as submit:
            start = time.monotonic()
            while not self.stop.is_set():
                due = int((time.monotonic() - start) * RATE)
                while self.sent < due and not self.stop.is_set():
                    began = time.monotonic()
                    submit({"t": time.time()})
                    self.calls.append(time.monotonic() - began)
                    self.sent += 1
                self.stop.wait(0.002)  # pacing, not synchronisation


class _ClaimProbe(threading.Thread):
    """Times claims as the worker makes them: submit one run of PROBE_TYPE, claim it with the
    worker's cycle (timed), record its outcome; PROBE_RATE times a second, until stopped."""

    def __init__(self, target):
        super().__init__(daemon=True)
        self.target = target
        self.stop = threading.Event()
        self.claims: list[float] = []  # seconds each claim took

    def run(self) -> None:
        app = minflow.App(mod.dsn(self.target))
        conn = app._connect()
        only = minflow._Filter((PROBE_TYPE,), (), frozenset({PROBE_TYPE}))
        try:
            while not self.stop.wait(1 / PROBE_RATE):  # pacing, not synchronisation
                app.submit(PROBE_TYPE)
                began = time.perf_counter()
                claimed, _ = app._cycle(conn, "p1-probe", [], 1, 30.0, only)
                self.claims.append(time.perf_counter() - began)
                done = [minflow._Completion(c.id, c.attempt, minflow._SUCCEEDED) for c in claimed]
                app._cycle(conn, "p1-probe", done, 0, 30.0, only)
        finally:
            conn.close()
            app.close()


def _started(out: Path) -> list[float]:
    path = Path(f"{out}.0")
    return [float(x) for x in path.read_text().split()] if path.exists() else []


def _phase(target, out: Path, until) -> tuple[_Producer, list[float], list[float]]:
    """Submit at RATE and probe claims until ``until()`` returns, then wait for every run to
    start; returns the producer, this phase's submit-to-start delays and claim times."""
    before = len(_started(out))
    producer, probe = _Producer(target), _ClaimProbe(target)
    producer.start()
    probe.start()
    try:
        until()
    finally:
        for thread in (producer, probe):
            thread.stop.set()
            thread.join()
    total = before + producer.sent
    wait_until(lambda: len(_started(out)) >= total, 120, "every new run to start")
    return producer, _started(out)[before:total], probe.claims


def _line(label: str, producer: _Producer, delays: list[float], claims: list[float]) -> str:
    claim = " / ".join(f"{v:.1f}" for v in percentiles(claims))
    start = " / ".join(f"{v:.1f}" for v in percentiles(delays))
    calls = statistics.quantiles([c * 1000 for c in producer.calls], n=100)[98]
    return (
        f"  {label}: claim p50/p95/p99 {claim} ms ({len(claims)} claims); submit-to-start "
        f"{start} ms ({producer.sent} runs); submit call p99 {calls:.1f} ms"
    )


def test_p1_prune_a_million(backend, workdir, report):
    target = fresh_target("minflow_p1", backend, workdir)
    try:
        mod.prepare(target)
        started = time.monotonic()
        _fill(target, HISTORY)
        filled = time.monotonic() - started
        if backend == "postgres":
            _vacuum(target)
            mod.query(target, "ANALYZE {run}")
            mod.query(target, "ANALYZE {event}")
        before = _sizes(target)
        events_before = mod.query(target, "SELECT COUNT(*) FROM {event}")[0][0]
        print(
            f"\n  P1 {backend}: {HISTORY:,} finished runs and {events_before:,} events added in "
            f"{filled:.0f} s; {_mib(before)}"
        )
        out = workdir / f"p1-{backend}-{time.monotonic_ns()}"
        timing: dict[str, float] = {}
        with (
            workers(mod.__name__, target, 1, CONCURRENCY, mode="latency", out=out) as go,
            minflow.Client(mod.dsn(target)) as client,
        ):
            go()
            time.sleep(0.5)  # an idle worker, as S3 measures it
            base, base_delays, base_claims = _phase(target, out, lambda: time.sleep(BASELINE))

            def prune() -> None:
                began = time.monotonic()
                timing["deleted"] = client.prune(older_than=86400)
                timing["seconds"] = time.monotonic() - began
                timing["load"] = float(load_average())

            during, delays, claims = _phase(target, out, prune)
            later, later_delays, later_claims = _phase(target, out, lambda: time.sleep(BASELINE))
        remaining = mod.query(target, "SELECT COUNT(*) FROM {run} WHERE created_at < '2021-01-01'")[
            0
        ][0]
        orphans = mod.query(
            target,
            "SELECT COUNT(*) FROM {event} e WHERE NOT EXISTS "
            "(SELECT 1 FROM {run} r WHERE r.id = e.workflow_id)",
        )[0][0]
        new_runs = mod.query(target, f"SELECT COUNT(*) FROM {{run}} WHERE type <> '{PROBE_TYPE}'")[
            0
        ][0]
        after = _sizes(target)  # with the new runs of the three phases
        vacuumed = _vacuum(target)
        after_vacuum = _sizes(target)
        full = ""
        if backend == "postgres":
            full_seconds = _vacuum(target, full=True)
            full = f"; after VACUUM FULL ({full_seconds:.1f} s, exclusive lock): {_mib(_sizes(target))}"
        rate = timing["deleted"] / timing["seconds"]
        print(_line("before the prune", base, base_delays, base_claims))
        print(_line("during the prune", during, delays, claims))
        print(_line("after the prune", later, later_delays, later_claims))
        print(
            f"  prune: {timing['deleted']:,} runs (with their events) in {timing['seconds']:.1f} s, "
            f"{rate:,.0f} runs/s, load {timing['load']:.2f} at its end\n"
            f"  size before: {_mib(before)}\n  size after the prune: {_mib(after)}\n"
            f"  after VACUUM ({vacuumed:.1f} s): {_mib(after_vacuum)}{full}"
        )
        for phase, times in (("before", base_claims), ("during", claims), ("after", later_claims)):
            report.add(f"P1 claim, {phase} the prune", backend, mod, percentiles(times), "ms")
        report.add("P1 submit-to-start, during", backend, mod, percentiles(delays), "ms")
        report.add("P1 prune of 1M finished runs", backend, mod, rate, "runs/s")
        assert timing["deleted"] == HISTORY and remaining == 0
        assert orphans == 0
        assert new_runs == base.sent + during.sent + later.sent, "a new run was deleted"
    finally:
        drop_target(target, mod)

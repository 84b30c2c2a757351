"""minflow's own load benchmarks (make bench): S1-S3 at its defaults and over the sweep,
concurrent-claim stress (S4), scale (S5), handlers that wait (H1: async def against threads)
and timeout accuracy (H2).

Figures are printed (and tabulated at the end); S4 and S5 also assert what must hold under load:
no run executed twice or lost, no "database is locked", and claims that do not slow down with a
million finished runs in the table.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from pathlib import Path

import pytest
import sys_minflow as mod
from harness import (
    ALONE_TABLE,
    N_RUNS,
    drop_target,
    fresh_target,
    median_of,
    payloads,
    percentiles,
    repeats,
    run_scenarios,
    s2_drain,
    wait_until,
    workers,
)

import minflow

STRESS_RUNS = 20_000
STRESS_SHAPE = {"sqlite": (4, 8), "postgres": (8, 16)}  # processes x handler threads
HISTORY_ROWS = 1_000_000
S5_SETTING = {"concurrency": 100}  # many slots, so claims (what S5 is about) dominate


@pytest.mark.quick
def test_s1_s3(backend, workdir, report):
    run_scenarios(mod, backend, workdir, report)


def _executions(out: Path, processes: int) -> list[tuple[str, int, str]]:
    lines = []
    for number in range(processes):
        path = Path(f"{out}.{number}")
        if path.exists():
            lines += [line.split() for line in path.read_text().splitlines() if line]
    return [(run_id, int(attempt), worker) for run_id, attempt, worker, _ in lines]


def test_s4_concurrent_claim_stress(backend, workdir, report):
    processes, threads = STRESS_SHAPE[backend]
    target = fresh_target("minflow_s4", backend, workdir)
    try:
        mod.prepare(target)
        mod.enqueue_bulk(target, payloads(STRESS_RUNS))
        out, log = workdir / f"s4-{backend}", workdir / f"s4-{backend}.log"
        setting = {"concurrency": threads}
        with workers(mod.__name__, target, processes, setting, "record", out, log=log) as go:
            start = time.monotonic()
            go()
            end = wait_until(
                lambda: mod.done_count(target) >= STRESS_RUNS, 600, "the stress runs to finish"
            )
        executions = _executions(out, processes)
        by_lease = collections.Counter((run_id, attempt) for run_id, attempt, _ in executions)
        duplicates = [key for key, count in by_lease.items() if count > 1]
        every_id = {row[0] for row in mod.query(target, "SELECT id FROM {run}")}
        executed = {str(run_id) for run_id, _, _ in executions}
        states = dict(mod.query(target, "SELECT status, COUNT(*) FROM {run} GROUP BY status"))
        over = mod.query(target, "SELECT COUNT(*) FROM {run} WHERE attempt > max_attempts")[0][0]
        locked = log.read_text().count("database is locked")
        report.add(
            f"S4 stress, {processes}x{threads} threads",
            backend,
            mod,
            STRESS_RUNS / (end - start),
            "runs/s",
            table=ALONE_TABLE,
        )
        print(
            f"  S4 {backend}: {len(executions)} executions of {len(every_id)} runs by "
            f"{len({w for _, _, w in executions})} workers; duplicates {len(duplicates)}, "
            f"never executed {len({str(i) for i in every_id} - executed)}, states {states}, "
            f"attempt > max_attempts {over}, 'database is locked' {locked}"
        )
        assert duplicates == [], f"executed twice within one lease: {duplicates[:5]}"
        assert {str(i) for i in every_id} == executed, "runs never executed"
        assert states == {"succeeded": STRESS_RUNS}
        assert over == 0
        assert locked == 0, log.read_text()[-2000:]
    finally:
        drop_target(target, mod)


def test_s5_scale(backend, workdir, report):
    """S2 with two processes at 100 slots, on an empty table and with a million finished runs."""
    target = fresh_target("minflow_s5", backend, workdir)
    k = repeats()

    def drain() -> float:
        mod.clear_recent(target)
        return s2_drain(
            mod,
            target,
            N_RUNS,
            2,
            S5_SETTING,
            fresh=False,
            finished=lambda: mod.remaining(target) == 0,
        )

    try:
        mod.prepare(target)
        empty = median_of(k, drain)
        plan_empty = mod.explain_claim(target)
        mod.clear_recent(target)
        started = time.monotonic()
        mod.add_history(target, HISTORY_ROWS)
        print(
            f"\n  S5 {backend}: {HISTORY_ROWS:,} finished runs added in "
            f"{time.monotonic() - started:.1f} s"
        )
        full = median_of(k, drain)
        plan = mod.explain_claim(target)
        where = {"table": ALONE_TABLE, "setting": mod.describe(S5_SETTING)}
        report.add("S5 drain, 2 processes, empty table", backend, mod, empty, "runs/s", **where)
        report.add("S5 same, 1M finished runs", backend, mod, full, "runs/s", **where)
        print(
            f"  S5 {backend}: {full / empty:.0%} of the empty-table figure; claim plan "
            f"(empty table):\n    "
            + plan_empty.replace("\n", "\n    ")
            + "\n  claim plan with 1M finished runs:\n    "
            + plan.replace("\n", "\n    ")
        )
        assert "minflow_run_claim" in plan, plan
        assert full >= 0.8 * empty, f"{full:.0f}/s is under 80% of {empty:.0f}/s"
    finally:
        drop_target(target, mod)


WAITING_RUNS, WAITING_CONCURRENCY, WAITING_SECONDS = 1_000, 100, 0.05
TIMEOUT_RUNS, TIMEOUT = 200, 0.2


def _app(target, kind: str, seconds: float, **policy) -> minflow.App:
    """An App whose one handler waits ``seconds``: ``await asyncio.sleep`` or ``time.sleep``."""
    app = minflow.App(mod.dsn(target))
    if kind == "async":

        async def wait(run):
            await asyncio.sleep(seconds)

    else:

        def wait(run):
            time.sleep(seconds)

    app.handler("wait", **policy)(wait)
    return app


def _waiting_throughput(target, kind: str) -> float:
    """Runs/s of WAITING_RUNS handlers that each wait WAITING_SECONDS, from worker start."""
    mod.prepare(target)
    app = _app(target, kind, WAITING_SECONDS)
    try:
        app.submit_many(minflow.Job("wait") for _ in range(WAITING_RUNS))
        worker = minflow.Worker(app, concurrency=WAITING_CONCURRENCY, schedules=False)
        start = time.monotonic()
        assert worker.run(burst=True) == WAITING_RUNS
        return WAITING_RUNS / (time.monotonic() - start)
    finally:
        app.close()


def test_h1_waiting_handlers(backend, workdir, report):
    """1,000 handlers that each wait 50 ms with concurrency 100 (at most 2,000 runs/s):
    ``async def`` handlers on the worker's event loop against plain ones on 100 threads."""
    target = fresh_target("minflow_h1", backend, workdir)
    try:
        for kind, label in (
            ("async", "async def, asyncio.sleep"),
            ("thread", "threads, time.sleep"),
        ):
            figure = median_of(repeats(), lambda kind=kind: _waiting_throughput(target, kind))
            report.add(f"H1 1k x 50 ms waits, c=100, {label}", backend, mod, figure, "runs/s")
    finally:
        drop_target(target, mod)


def _timeout_lateness(target, kind: str) -> list[float]:
    """Seconds from each run's deadline (its claim + TIMEOUT) to its recorded failure, both
    by the database clock, for TIMEOUT_RUNS handlers that overrun."""
    mod.prepare(target)
    # The plain handler returns soon after its timeout, so stuck threads do not pile up.
    app = _app(target, kind, 30 if kind == "async" else TIMEOUT * 2, timeout=TIMEOUT)
    try:
        ids = app.submit_many(minflow.Job("wait", max_attempts=1) for _ in range(TIMEOUT_RUNS))
        minflow.Worker(app, concurrency=20, schedules=False).run(burst=True)
        late = []
        for run_id in ids:
            events = {e.event_type: e.created_at for e in app.events(run_id)}
            assert app.get(run_id).status == "failed", run_id
            late.append((events["failed"] - events["leased"]).total_seconds() - TIMEOUT)
        return late
    finally:
        app.close()


def test_h2_timeout_accuracy(backend, workdir, report):
    """How late a timeout is recorded: 200 overrunning handlers, timeout 0.2 s, concurrency 20."""
    target = fresh_target("minflow_h2", backend, workdir)
    try:
        for kind, label in (("async", "async def (cancelled)"), ("thread", "thread (abandoned)")):
            late = _timeout_lateness(target, kind)
            report.add(
                f"H2 timeout to recorded failure, {label}", backend, mod, percentiles(late), "ms"
            )
            print(
                f"  H2 {backend} {kind}: median {statistics.median(late) * 1000:.1f} ms, "
                f"max {max(late) * 1000:.1f} ms"
            )
    finally:
        drop_target(target, mod)

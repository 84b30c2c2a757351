"""S7 soak (make bench-soak): mixed traffic while worker processes are restarted one at a time.

Three worker processes of 8 handler threads (``python -m minflow worker rolling_app:app``, each
with its metrics port) and one ``minflow serve`` process run while this process submits 100
runs/s, each working 20-180 ms (so about ten are mid-execution at any moment): a tenth of the
runs fail their first attempt (retried a second later), 1% are submitted a minute ahead and
cancelled at once, 1% are delayed by 5-20 s, and a per-minute schedule adds one run a minute.
Every 30 s one worker process is restarted, alternately stopped with SIGTERM (it finishes what
it holds) and killed with SIGKILL (its leases, 10 s, expire and other workers rescue its runs).
``/metrics`` of serve and of every worker is scraped every few seconds.

The handlers append every execution to a ledger (see rolling_app.py), which is checked against
the database at the end:
- lost: a submitted run not in its expected final state (succeeded, or cancelled), or recorded
  as succeeded without a successful execution in the ledger: must be 0;
- duplicates: executions beyond what a run needs (1, or 2 for the runs that fail once): each
  must belong to a run the killed worker held at a SIGKILL, and there are no more of them than
  the runs so held (a SIGTERM lets the worker finish, so it causes none);
- ``attempt <= max_attempts`` on every sample and in the ledger; cancelled runs never executed;
  every schedule run executed once, one per minute (give or take one at the ends);
- the metrics equal the database: serve's queue depth per status with the database's counts,
  each surviving worker's succeeded counter with the runs the database says it finished.

BENCH_SOAK_SECONDS shortens it (default 600 s per backend).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import os
import random
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import sys_minflow as mod
from harness import ALONE_TABLE, BENCH, ROOT, drop_target, fresh_target, load_now, pg_connect

import minflow

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("BENCH_SOAK_SECONDS", "600"))
RATE = 100  # runs submitted per second
WORKERS = 3  # worker processes
CONCURRENCY = 8  # handler threads per worker process
LEASE = 10.0  # seconds: a SIGKILLed worker's runs are rescued about this long after its death
MAX_ATTEMPTS = 5  # a run killed twice mid-execution still has attempts left
RESTART_EVERY = 30.0
SCRAPE_EVERY = 3.0
PROCESS_SAMPLES = 20  # RSS/threads/fds/connections rows over the run
DRAIN_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample of a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = _SAMPLE.match(line)
        if match:
            labels = dict(_LABEL.findall(match[2] or ""))
            samples.append((match[1], labels, float(match[3])))
    return samples


def _metric_sum(samples, name: str, **want: str) -> float:
    return sum(
        value
        for metric, labels, value in samples
        if metric == name and all(labels.get(k) == v for k, v in want.items())
    )


def _proc(pid: int) -> dict[str, int]:
    """RSS (KiB), threads, sockets and open files of one process (zeros once gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {"rss": 0, "threads": 0, "sockets": 0, "fds": 0}
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # a zombie: killed, not reaped yet
        return {"rss": 0, "threads": 0, "sockets": 0, "fds": 0}
    sockets = 0
    for fd in fds:
        with contextlib.suppress(OSError):
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return {
        "rss": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"]),
        "sockets": sockets,
        "fds": len(fds),
    }


class Fleet:
    """The worker processes: ``WORKERS`` slots, each restarted as a new generation."""

    def __init__(self, dsn: str, workdir: Path, log: Path):
        self.dsn = dsn
        self.workdir = workdir
        self.log = open(log, "a")  # noqa: SIM115 - closed in stop()
        self.slots: list[dict] = []
        self.generations = 0
        self.ledgers: list[Path] = []

    def start(self, slot: int) -> dict:
        self.generations += 1
        worker_id = f"s7-w{slot}-g{self.generations}"
        port = _free_port()
        ledger = self.workdir / f"ledger-{worker_id}"
        self.ledgers.append(ledger)
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(ROOT), str(BENCH)]),
            ROLLING_LEDGER=str(ledger),
        )
        command = [
            sys.executable, "-m", "minflow", "worker", "rolling_app:app", "--dsn", self.dsn,
            "--concurrency", str(CONCURRENCY), "--lease", str(LEASE), "--backoff", "fixed:1s",
            "--worker-id", worker_id, "--metrics-port", str(port),
        ]  # fmt: skip
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.log,
                                stderr=self.log, env=env)  # fmt: skip
        entry = {"slot": slot, "id": worker_id, "proc": proc, "port": port, "started": time.time()}
        if slot < len(self.slots):
            self.slots[slot] = entry
        else:
            self.slots.append(entry)
        return entry

    def wait_ready(self, entry: dict, timeout: float = 60.0) -> float:
        """Seconds until the worker's /healthz answers (its claim loop is running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if entry["proc"].poll() is not None:
                raise RuntimeError(f"worker {entry['id']} exited with {entry['proc'].returncode}")
            with contextlib.suppress(OSError):
                _get(f"http://127.0.0.1:{entry['port']}/healthz", timeout=2)
                return time.time() - entry["started"]
            time.sleep(0.05)
        raise TimeoutError(f"worker {entry['id']} not ready after {timeout:.0f} s")

    def stop(self) -> None:
        for entry in self.slots:
            if entry["proc"].poll() is None:
                entry["proc"].send_signal(signal.SIGTERM)
        for entry in self.slots:
            try:
                entry["proc"].wait(timeout=40)
            except subprocess.TimeoutExpired:
                entry["proc"].kill()
                entry["proc"].wait()
        self.log.close()


def _kind(i: int) -> str:
    if i % 100 == 0:
        return "cancel"
    if i % 100 == 1:
        return "delay"
    if i % 10 == 5:
        return "fail"
    return "ok"


def _read_ledgers(paths: list[Path]) -> tuple[dict, dict, list[int]]:
    """Executions per run id: starts (list of attempts), successful ends; every attempt seen."""
    starts: dict[str, list[int]] = collections.defaultdict(list)
    oks: dict[str, int] = collections.Counter()
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 4:
                continue  # cannot happen with single appends; counted as nothing
            mark, run_id, attempt, what = parts
            if mark == "S":
                starts[run_id].append(int(attempt))
            elif what == "ok":
                oks[run_id] += 1
    return starts, oks, [a for attempts in starts.values() for a in attempts]


class Raw:
    """One connection of this process's own for the samplers' and the final checks' SQL
    (``:name`` parameters; ``{run}`` names the runs table)."""

    def __init__(self, target):
        self.target = target
        self.run = mod.table(target, "workflow_run")
        self.lock = threading.Lock()
        if target.backend == "sqlite":
            self.conn = sqlite3.connect(
                target.dsn, timeout=30, isolation_level=None, check_same_thread=False
            )
        else:
            self.conn = pg_connect(target.dsn)

    def rows(self, sql: str, **params) -> list:
        sql = sql.format(run=self.run)
        with self.lock:
            if isinstance(self.conn, sqlite3.Connection):
                return self.conn.execute(sql, params).fetchall()
            return self.conn.run(sql, **params) or []

    def connections(self) -> int:
        """PostgreSQL backends on the target's database other than this one."""
        return self.rows(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )[0][0]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def _db_files(pids: list[int], path: str) -> int:
    """Open file descriptors of ``pids`` on the SQLite database file (not its WAL or -shm)."""
    count = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    count += os.readlink(f"/proc/{pid}/fd/{fd}") == path
    return count


def _restart(fleet: Fleet, raw: Raw, slot: int, kill: bool, elapsed) -> dict:
    """Stop the slot's worker (SIGKILL or SIGTERM), note the runs it still held, start anew."""
    old = fleet.slots[slot]
    record = {"t": elapsed(), "wall": time.time(), "signal": "SIGKILL" if kill else "SIGTERM"}
    old["proc"].send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    old["proc"].wait(timeout=60)
    record["stopped_s"] = elapsed() - record["t"]
    # Its leases stay as they are until they expire (LEASE), so this is what it held.
    held = raw.rows(
        "SELECT id FROM {run} WHERE status = 'leased' AND leased_by = :worker", worker=old["id"]
    )
    record.update(old=old["id"], held={str(r[0]) for r in held})
    new = fleet.start(slot)
    record["new"] = new
    record["ready_s"] = fleet.wait_ready(new) + (new["started"] - record["wall"])
    return record


def _recovery(restarts: list[dict], backlog: list[tuple[float, int, int]], raw: Raw) -> None:
    """Per restart: throughput in the 10 s before and after, seconds until the backlog is back
    at its level before the signal, and (SIGKILL) until the runs it held were finished."""
    for record in restarts:
        t = record["t"]
        before = [row for row in backlog if t - 10 <= row[0] < t]
        after = [row for row in backlog if t <= row[0] <= t + 10]

        def rate(rows) -> float:
            if len(rows) < 2:
                return float("nan")
            return (rows[-1][2] - rows[0][2]) / (rows[-1][0] - rows[0][0])

        record["rate_before"] = rate(before)
        record["rate_after"] = rate(after)
        base = statistics.median(row[1] for row in before) if before else 0
        # The backlog is disturbed while above this; recovered once back below it for good
        # (within the interval up to the next restart).
        limit = max(base * 1.5, base + 20)
        window = [row for row in backlog if t <= row[0] < t + RESTART_EVERY]
        record["backlog_base"] = base
        record["backlog_peak"] = max((row[1] for row in window), default=0)
        above = [n for n, row in enumerate(window) if row[1] > limit]
        record["recovered_s"] = 0.0
        if above:
            calm = window[above[-1] + 1 : above[-1] + 2]
            record["recovered_s"] = calm[0][0] - t if calm else None
        record["held_done_s"] = None
        if record["held"]:
            ids = sorted(record["held"])
            if raw.target.backend == "sqlite":
                marks = ", ".join(f":i{n}" for n in range(len(ids)))
                (last,) = raw.rows(
                    f"SELECT MAX(updated_at) FROM {{run}} WHERE id IN ({marks})",
                    **{f"i{n}": i for n, i in enumerate(ids)},
                )[0]
                finished = dt.datetime.fromisoformat(last).replace(tzinfo=dt.timezone.utc)
            else:
                finished = raw.rows(
                    "SELECT MAX(updated_at) FROM {run} WHERE id = ANY(CAST(:ids AS uuid[]))",
                    ids="{" + ",".join(ids) + "}",
                )[0][0]
            record["held_done_s"] = finished.timestamp() - record["wall"]


def _fmt(value, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:.{digits}f}"


def _print_report(backend, restarts, backlog, metric_rows, process_rows, scrape_errors) -> None:
    print(f"\n  S7 {backend}: backlog (pending + leased) and finished runs over time, every 15 s")
    print(f"  {'t':>6} {'backlog':>8} {'finished':>9} {'m.pend':>7} {'m.lease':>7} {'m.alive':>7}")
    step = 15.0
    mark = 0.0
    for t, due, finished in backlog:
        if t >= mark:
            mark += step
            near = min(metric_rows, key=lambda row: abs(row[0] - t), default=None)
            m = ("-", "-", "-") if near is None else tuple(f"{v:.0f}" for v in near[1:])
            print(f"  {t:6.0f} {due:8} {finished:9} {m[0]:>7} {m[1]:>7} {m[2]:>7}")
    print(f"\n  S7 {backend}: worker processes (RSS max KiB; threads, fds, sockets summed), "
          "serve, database connections")  # fmt: skip
    keys = list(process_rows[0]) if process_rows else []
    print("  " + " ".join(f"{k:>9}" for k in keys))
    for row in process_rows:
        print("  " + " ".join(f"{row[k]!s:>9}" for k in keys))
    print(f"\n  S7 {backend}: restarts (rate = finished runs/s over 10 s; recovered s = backlog "
          "back under max(1.5 x, + 20) its median of the 10 s before; held = runs the killed "
          "worker held; held done s = all of them finished by others)")  # fmt: skip
    print(f"  {'t':>6} {'signal':>7} {'stop s':>6} {'ready s':>7} {'held':>5} {'rate -':>7} "
          f"{'rate +':>7} {'base':>5} {'peak':>5} {'recov s':>7} {'held done s':>11}")  # fmt: skip
    for r in restarts:
        print(f"  {r['t']:6.0f} {r['signal']:>7} {_fmt(r['stopped_s']):>6} {_fmt(r['ready_s']):>7} "
              f"{len(r['held']):5} {_fmt(r['rate_before'], 0):>7} {_fmt(r['rate_after'], 0):>7} "
              f"{r['backlog_base']:5.0f} {r['backlog_peak']:5} {_fmt(r['recovered_s']):>7} "
              f"{_fmt(r['held_done_s']):>11}")  # fmt: skip
    if scrape_errors:
        print(f"  scrape/sample errors: {dict(scrape_errors)}")


def test_s7_rolling_restarts(backend, workdir, report):
    target = fresh_target("minflow_s7", backend, workdir)
    mod.prepare(target)
    dsn = mod.dsn(target)
    here = workdir / f"s7-{backend}-{time.monotonic_ns()}"
    here.mkdir()
    stop = threading.Event()
    lock = threading.Lock()
    backlog_rows: list[tuple[float, int, int]] = []  # (t, pending + leased, finished)
    metric_rows: list[tuple[float, float, float, float]] = []  # (t, pending, leased, alive)
    process_rows: list[dict] = []
    violations: list[str] = []
    failures: list[BaseException] = []
    scrape_errors: collections.Counter = collections.Counter()
    restarts: list[dict] = []
    submitted: dict[str, str] = {}

    serve_port = _free_port()
    serve_log = open(here / "serve.log", "a")  # noqa: SIM115 - closed below
    serve = subprocess.Popen(
        [sys.executable, "-m", "minflow", "serve", "--dsn", dsn, "--port", str(serve_port)],
        stdin=subprocess.DEVNULL, stdout=serve_log, stderr=serve_log,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    fleet = Fleet(dsn, here, here / "workers.log")
    sampler, checker = Raw(target), Raw(target)  # the samplers' connection, the restarter's
    client = minflow.Client(dsn)  # the producer's
    threads: list[threading.Thread] = []
    try:
        schedule_id = client.schedule("minute", {"from": "S7"}, cron="* * * * *", name="s7")
        for slot in range(WORKERS):
            fleet.wait_ready(fleet.start(slot))
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                _get(f"http://127.0.0.1:{serve_port}/healthz")
                break
            if time.monotonic() > deadline or serve.poll() is not None:
                raise RuntimeError("minflow serve did not start")
            time.sleep(0.05)
        start = time.monotonic()

        def elapsed() -> float:
            return time.monotonic() - start

        def guarded(fn):
            def loop() -> None:
                try:
                    fn()
                except BaseException as exc:  # reported by the main thread
                    failures.append(exc)
                    stop.set()

            return loop

        def sample_backlog() -> None:
            while not stop.wait(1.0):
                ((left, finished, over),) = sampler.rows(
                    "SELECT COALESCE(SUM(CASE WHEN status IN ('pending', 'leased') THEN 1 END), 0),"
                    " COALESCE(SUM(CASE WHEN status IN ('succeeded', 'failed', 'cancelled')"
                    " THEN 1 END), 0), COALESCE(SUM(CASE WHEN attempt > max_attempts THEN 1 END),"
                    " 0) FROM {run}"
                )
                with lock:
                    backlog_rows.append((elapsed(), left, finished))
                if over:
                    violations.append(f"{over} runs with attempt > max_attempts at {elapsed():.0f}")

        def scrape() -> None:
            while not stop.wait(SCRAPE_EVERY):
                try:
                    samples = _parse_metrics(_get(f"http://127.0.0.1:{serve_port}/metrics"))
                except OSError:
                    scrape_errors["serve /metrics"] += 1
                    continue
                pending, leased = (
                    _metric_sum(samples, "workflow_run_queue_depth", status=status)
                    for status in ("pending", "leased")
                )
                alive = _metric_sum(samples, "workflow_workers_alive")
                with lock:
                    metric_rows.append((elapsed(), pending, leased, alive))
                for entry in list(fleet.slots):
                    try:
                        _get(f"http://127.0.0.1:{entry['port']}/metrics", timeout=2)
                    except OSError:
                        scrape_errors["worker /metrics while it restarts"] += 1

        def sample_processes() -> None:
            every = max(SECONDS / PROCESS_SAMPLES, 5.0)
            # Midway between restarts: a sample at a restart would catch a process starting.
            due = RESTART_EVERY / 2
            while not stop.wait(max(0.0, due - elapsed())):
                due += every
                pids = [entry["proc"].pid for entry in list(fleet.slots)]
                stats = [_proc(pid) for pid in pids]
                serve_stats = _proc(serve.pid)
                if backend == "sqlite":
                    conns = _db_files([*pids, serve.pid], target.dsn)
                else:
                    conns = sampler.connections()
                row = {
                    "t": round(elapsed()),
                    "rss_max": max(s["rss"] for s in stats),
                    "threads": sum(s["threads"] for s in stats),
                    "fds": sum(s["fds"] for s in stats),
                    "sockets": sum(s["sockets"] for s in stats),
                    "serve_rss": serve_stats["rss"],
                    "serve_fds": serve_stats["fds"],
                    "db_conns": conns,
                    "load": _fmt(load_now(), 2),
                }
                with lock:
                    process_rows.append(row)

        def restarter() -> None:
            kill = False  # the first restart is a SIGTERM
            slot = 0
            while not stop.wait(max(0.0, (len(restarts) + 1) * RESTART_EVERY - elapsed())):
                if elapsed() >= SECONDS:
                    return
                restarts.append(_restart(fleet, checker, slot, kill, elapsed))
                slot = (slot + 1) % WORKERS
                kill = not kill

        for fn in (sample_backlog, scrape, sample_processes, restarter):
            threads.append(threading.Thread(target=guarded(fn), daemon=True))
            threads[-1].start()

        sent = 0
        while (now := elapsed()) < SECONDS and not stop.is_set():
            due = int(now * RATE)
            while sent < due:
                kind = _kind(sent)
                payload = {"i": sent, "kind": kind, "ms": random.randint(20, 180)}
                run_in = {"cancel": 60.0, "delay": random.uniform(5, 20)}.get(kind)
                run_id = client.submit("soak", payload, run_in=run_in, max_attempts=MAX_ATTEMPTS)
                if kind == "cancel":
                    client.cancel(run_id)
                submitted[run_id] = kind
                sent += 1
            time.sleep(0.002)  # pacing the producer, not synchronisation
        produced_for = elapsed()
        threads[-1].join(timeout=120)  # a restart under way completes
        if failures:
            raise failures[0]

        # Drain: the delayed runs are due within 20 s; nothing left pending or leased.
        client.pause_schedule(schedule_id)
        drain_start = time.monotonic()
        while True:
            ((left,),) = checker.rows(
                "SELECT COUNT(*) FROM {run} WHERE status IN ('pending', 'leased')"
            )
            if left == 0:
                break
            if time.monotonic() - drain_start > DRAIN_TIMEOUT:
                raise AssertionError(f"{left} runs unfinished {DRAIN_TIMEOUT:.0f} s after the end")
            time.sleep(0.2)
        drained_after = time.monotonic() - drain_start
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        if failures:
            raise failures[0]

        # Metrics against the database, with the queue empty and the schedule paused.
        samples = _parse_metrics(_get(f"http://127.0.0.1:{serve_port}/metrics"))
        depth = dict(
            checker.rows(
                "SELECT status, COUNT(*) FROM {run} WHERE status IN ('pending', 'leased') "
                "GROUP BY status"
            )
        )
        mismatches = []
        for status in ("pending", "leased"):
            scraped = _metric_sum(samples, "workflow_run_queue_depth", status=status)
            if scraped != depth.get(status, 0):
                mismatches.append(
                    f"queue depth {status}: metrics {scraped}, db {depth.get(status)}"
                )
        survivors = []
        for entry in fleet.slots:
            worker_samples = _parse_metrics(_get(f"http://127.0.0.1:{entry['port']}/metrics"))
            scraped = _metric_sum(
                worker_samples, "workflow_run_completed_total", status="succeeded"
            )
            ((in_db,),) = checker.rows(
                "SELECT COUNT(*) FROM {run} WHERE status = 'succeeded' AND leased_by = :worker",
                worker=entry["id"],
            )
            survivors.append(f"{entry['id']} {scraped:.0f}/{in_db}")
            if scraped != in_db:
                mismatches.append(f"{entry['id']} succeeded: metrics {scraped}, db {in_db}")

        # The ledger against the database.
        starts, oks, attempts = _read_ledgers(fleet.ledgers)
        final = {
            str(run_id): (status, run_type)
            for run_id, status, run_type in checker.rows("SELECT id, status, type FROM {run}")
        }
        lost = []
        for run_id, kind in submitted.items():
            status = final.get(run_id, ("missing", ""))[0]
            wanted = "cancelled" if kind == "cancel" else "succeeded"
            if status != wanted or (wanted == "succeeded" and not oks.get(run_id)):
                lost.append((run_id, kind, status))
        minute_runs = [r for r, (_, run_type) in final.items() if run_type == "minute"]
        lost += [(r, "minute", final[r][0]) for r in minute_runs if final[r][0] != "succeeded"]
        cancelled_executed = [r for r, k in submitted.items() if k == "cancel" and starts.get(r)]
        kills = [r for r in restarts if r["signal"] == "SIGKILL"]
        held_at_kills = set().union(*(r["held"] for r in kills))
        in_flight_at_kills = sum(len(r["held"]) for r in kills)
        duplicates = {}
        for run_id, seen in starts.items():
            needed = 2 if submitted.get(run_id) == "fail" else 1
            if len(seen) > needed:
                duplicates[run_id] = len(seen) - needed
        unexplained = sorted(set(duplicates) - held_at_kills)
        over_attempts = [a for a in attempts if a > MAX_ATTEMPTS]
        executions = sum(len(seen) for seen in starts.values())

        _recovery(restarts, backlog_rows, checker)
        _print_report(backend, restarts, backlog_rows, metric_rows, process_rows, scrape_errors)
        recovered = [r["recovered_s"] for r in restarts if r["recovered_s"] is not None]
        held_done = [r["held_done_s"] for r in kills if r["held_done_s"] is not None]
        print(
            f"\n  S7 {backend} summary: {produced_for:.0f} s at {RATE} runs/s, {sent} runs "
            f"submitted + {len(minute_runs)} schedule runs, {executions} executions; "
            f"{len(restarts)} restarts ({len(kills)} SIGKILL); lost {len(lost)}; duplicates "
            f"{sum(duplicates.values())} (runs held by the killed workers at the SIGKILLs: "
            f"{in_flight_at_kills}; duplicates outside them: {len(unexplained)}); max attempt "
            f"{max(attempts, default=0)} (max_attempts {MAX_ATTEMPTS}, {len(violations)} "
            f"violating samples); metrics == database: {not mismatches} (serve queue depth, "
            f"succeeded per surviving worker {', '.join(survivors)}); backlog back to its level "
            f"after a restart: max {_fmt(max(recovered, default=None))} s; killed workers' runs "
            f"finished by others within {_fmt(max(held_done, default=None))} s (lease {LEASE:g} "
            f"s); drained {drained_after:.1f} s after the producer stopped; load {_fmt(load_now(), 2)}"
        )
        report.add(
            "S7 rolling restarts, submitted", backend, mod, sent / produced_for, "runs/s",
            table=ALONE_TABLE,
        )  # fmt: skip

        assert not lost, f"{len(lost)} runs lost, e.g. {lost[:5]}"
        assert not cancelled_executed, f"cancelled runs executed: {cancelled_executed[:5]}"
        assert not unexplained, f"duplicates of runs no killed worker held: {unexplained[:5]}"
        assert sum(duplicates.values()) <= in_flight_at_kills
        assert not violations and not over_attempts, (violations[:5], over_attempts[:5])
        assert not mismatches, mismatches
        assert len(minute_runs) >= int(produced_for // 60) - 1, "the schedule missed minutes"
        assert len(restarts) >= int(SECONDS // RESTART_EVERY) - 1
    finally:
        stop.set()
        fleet.stop()
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        serve_log.close()
        sampler.close()
        checker.close()
        client.close()
        drop_target(target, mod)

"""The benchmark harness: targets, worker subprocesses, the scenarios S1-S3 and the results tables.

Every system (minflow, its peers, the raw ceilings) is a ``sys_*.py`` module with the same small
interface, so each scenario is written once and measures all of them the same way: connections
are opened and worker processes are started and ready before the clock starts.

A system module defines ``NAME``, ``BACKENDS``, ``SCENARIOS``, ``SETTINGS`` (prose for the notes),
``DEFAULTS`` (the setting a user gets without tuning, almost always ``{}``), ``sweep(concurrencies)``
(the settings the tuned table tries), ``describe(setting)`` (a short label, equal for equivalent
settings), and ``prepare``, ``producer``, ``enqueue_bulk``, ``done_count``, ``remaining``,
``serve(target, setting, mode, out, ready)``, ``latency_inprocess(target, n, interval, setting)``
and ``release``. A setting is a JSON-able dict the module alone interprets.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime as dt
import importlib
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def pg_admin_dsn() -> str:
    """The server to benchmark on: MINFLOW_BENCH_PG_DSN, else the tests' server, else localhost."""
    return (
        os.environ.get("MINFLOW_BENCH_PG_DSN")
        or os.environ.get("MINFLOW_TEST_PG_DSN")
        or DEFAULT_PG
    )


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a system runs: ``backend`` is "postgres" or "sqlite"; ``dsn`` a URL or a file path."""

    backend: str
    dsn: str


def pg_connect(dsn: str):
    import urllib.parse

    import pg8000.native

    url = urllib.parse.urlsplit(dsn)
    return pg8000.native.Connection(
        user=urllib.parse.unquote(url.username or "postgres"),
        password=urllib.parse.unquote(url.password) if url.password else None,
        host=url.hostname or "127.0.0.1",
        port=url.port or 5432,
        database=(url.path or "/postgres").lstrip("/") or "postgres",
    )


def remove_sqlite(path: str) -> None:
    """Delete a SQLite database file with its WAL and shared-memory files, if present."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


def time_ordered_id() -> str:
    """A random id in the UUID version 7 layout (milliseconds first), as minflow makes them, so a
    hand-written insert lands at the end of the primary key's index as minflow's do."""
    bits = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    bits = bits & ~(0xF << 76) | 0x7 << 76  # version 7
    bits = bits & ~(0x3 << 62) | 0x2 << 62  # the RFC 4122 variant
    return str(uuid.UUID(int=bits))


def _with_database(dsn: str, database: str) -> str:
    import urllib.parse

    url = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit((url.scheme, url.netloc, "/" + database, url.query, ""))


def fresh_target(system: str, backend: str, workdir: Path) -> Target:
    """An empty database of its own for one system: a new PostgreSQL database, or a new file."""
    slug = "".join(c if c.isalnum() else "_" for c in system.lower())
    if backend == "sqlite":
        directory = workdir / f"{slug}-{time.monotonic_ns()}"
        directory.mkdir(parents=True)
        return Target("sqlite", str(directory / "bench.db"))
    admin = pg_admin_dsn()
    name = f"minflow_bench_{slug}"
    conn = pg_connect(admin)
    try:
        conn.run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.run(f"CREATE DATABASE {name}")
    finally:
        conn.close()
    return Target("postgres", _with_database(admin, name))


def analyze(target: Target) -> None:
    """Statistics for a freshly filled PostgreSQL queue, as autovacuum would soon gather: without
    them the planner expects a handful of rows and some systems sort the whole queue per fetch."""
    if target.backend == "postgres":
        conn = pg_connect(target.dsn)
        try:
            conn.run("ANALYZE")
        finally:
            conn.close()


def drop_target(target: Target, mod=None) -> None:
    """Give the disk space back once a system's scenarios are measured."""
    release = getattr(mod, "release", None)
    if release is not None:
        release(target)
    if target.backend == "postgres":
        import urllib.parse

        name = urllib.parse.urlsplit(target.dsn).path.lstrip("/")
        conn = pg_connect(pg_admin_dsn())
        try:
            conn.run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            conn.close()


def load(module: str):
    """Import a ``sys_*`` module from bench/ (the harness and the worker processes agree on it)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(module)


# -- the machine ---------------------------------------------------------------------------------


def machine_line() -> str:
    """CPU, cores, memory, OS, Python, SQLite and PostgreSQL versions and the date, on one line."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB RAM"
    pg = "unavailable"
    with contextlib.suppress(Exception):
        conn = pg_connect(pg_admin_dsn())
        try:
            pg = conn.run("SHOW server_version")[0][0].split()[0]
        finally:
            conn.close()
    disk = ""
    with contextlib.suppress(OSError):
        stat = os.statvfs(BENCH)
        disk = f", disk {stat.f_bavail * stat.f_frsize / 2**30:.0f} GiB free"
    return (
        f"{cpu}, {os.cpu_count()} cores{memory}{disk}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; SQLite {sqlite3.sqlite_version}; "
        f"PostgreSQL {pg}; {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    )


def load_now() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    with contextlib.suppress(OSError):
        return os.getloadavg()[0]
    return None


def load_average() -> str:
    """The 1-minute load average as text, printed beside figures so a noisy run can be seen."""
    value = load_now()
    return "?" if value is None else f"{value:.2f}"


# -- counting while a scenario runs --------------------------------------------------------------
# Completion checks poll every 10 ms; a connection per poll would cost PostgreSQL a backend
# process each time, inside the measurement, so one stays open per target until released.

_counters: dict[Target, Any] = {}
_counters_lock = threading.Lock()


def scalar(target: Target, sql: str, connect: Callable[[], Any] | None = None) -> Any:
    """The first column of the first row of ``sql``, on the target's kept-open connection
    (``connect`` makes it, by default a plain connection to ``target.dsn``)."""
    with _counters_lock:
        conn = _counters.get(target)
        if conn is None:
            if connect is not None:
                conn = connect()
            elif target.backend == "sqlite":
                conn = sqlite3.connect(target.dsn, check_same_thread=False)
            else:
                conn = pg_connect(target.dsn)
            _counters[target] = conn
        try:
            if isinstance(conn, sqlite3.Connection):
                return conn.execute(sql).fetchone()[0]
            return conn.run(sql)[0][0]
        except Exception:
            del _counters[target]
            with contextlib.suppress(Exception):
                conn.close()
            raise


def release_counter(target: Target) -> None:
    """Close the connection ``scalar`` keeps for ``target`` (before dropping its database)."""
    with _counters_lock:
        conn = _counters.pop(target, None)
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


@atexit.register
def _release_counters() -> None:
    for target in list(_counters):
        release_counter(target)


# -- waiting and worker processes ----------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval=0.01) -> float:
    """Poll ``predicate`` until true; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def workers(
    module: str,
    target: Target,
    processes: int,
    setting: dict,
    mode: str = "drain",
    out: Path | None = None,
    timeout: float = 120.0,
    log: Path | None = None,
) -> Iterator[Callable[[], None]]:
    """Start ``processes`` worker processes with ``setting``, wait until all are ready, and yield
    ``go()``.

    Each process prints "ready" once imported and connected, then blocks until it reads "go", so
    interpreter start-up and connecting are never inside a measurement. On exit every process
    gets SIGTERM, then SIGKILL if it has not exited after 10 seconds. ``log``: where the
    processes' stderr goes (default: this process's).
    """
    procs: list[subprocess.Popen] = []
    stderr = open(log, "a") if log is not None else None  # noqa: SIM115 - closed below
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(BENCH)]))
    try:
        for number in range(processes):
            command = [
                sys.executable,
                str(BENCH / "worker.py"),
                module,
                target.backend,
                target.dsn,
                "--setting",
                json.dumps(setting),
                "--mode",
                mode,
            ]
            if out is not None:
                command += ["--out", f"{out}.{number}"]
            procs.append(
                subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                    env=env,
                )
            )
        deadline = time.monotonic() + timeout
        for proc in procs:
            # readline blocks; a process that dies before "ready" gives EOF, which is reported.
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"{module} worker (pid {proc.pid}) did not start: {line!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{module} workers took over {timeout:.0f} s to start")

        def go() -> None:
            for proc in procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()

        go.pids = [proc.pid for proc in procs]  # for scenarios that watch the processes
        yield go
    finally:
        stop_processes(procs)
        if stderr is not None:
            stderr.close()


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process still running, then SIGKILL those not gone after 10 seconds."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the scenarios -------------------------------------------------------------------------------


def payloads(n: int) -> list[dict]:
    """The S1/S2 payloads: small JSON objects, distinct so nothing can be deduplicated."""
    return [{"i": i} for i in range(n)]


def s1_single(mod, target: Target, n: int) -> float:
    """S1: ``n`` single enqueue calls from one thread; returns enqueues per second."""
    mod.prepare(target)
    items = payloads(n)
    with mod.producer(target) as submit:
        start = time.perf_counter()
        for payload in items:
            submit(payload)
        elapsed = time.perf_counter() - start
    return n / elapsed


def s1_bulk(mod, target: Target, n: int) -> float:
    """S1 bulk: the same ``n`` runs through the system's batch enqueue; enqueues per second."""
    mod.prepare(target)
    items = payloads(n)
    start = time.perf_counter()
    mod.enqueue_bulk(target, items)
    elapsed = time.perf_counter() - start
    return n / elapsed


def s2_drain(
    mod,
    target: Target,
    n: int,
    processes: int,
    setting: dict,
    fresh: bool = True,
    finished: Callable[[], bool] | None = None,
) -> float:
    """S2: ``n`` runs queued, then ``processes`` worker processes until all are done; runs/s.

    ``fresh=False`` keeps what the database holds (S5's history); ``finished`` replaces the
    default completion check: nothing ``remaining()``, a count that shrinks as the queue drains
    and so costs little while polled, or else ``done_count() >= n``.
    """
    if fresh:
        mod.prepare(target)
    mod.enqueue_bulk(target, payloads(n))
    analyze(target)
    if finished is None:
        remaining = getattr(mod, "remaining", None)
        if remaining is not None:
            finished = lambda: remaining(target) == 0  # noqa: E731
        else:
            finished = lambda: mod.done_count(target) >= n  # noqa: E731
    with workers(mod.__name__, target, processes, setting) as go:
        start = time.monotonic()
        go()
        end = wait_until(finished, 600, f"{n} runs to finish")
    return n / (end - start)


def s3_latency(
    mod, target: Target, n: int, interval: float, setting: dict, workdir: Path, separate: bool
) -> tuple[float, float, float]:
    """S3: idle workers, ``n`` submits ``interval`` apart; submit-to-start p50/p95/p99 in ms."""
    mod.prepare(target)
    if not separate:
        delays = mod.latency_inprocess(target, n, interval, setting)
    else:
        out = workdir / f"latency-{mod.__name__}-{time.monotonic_ns()}"
        with workers(mod.__name__, target, 1, setting, mode="latency", out=out) as go:
            go()
            with mod.producer(target) as submit:
                # Let the worker settle into its idle wait: a real idle worker, not a busy one.
                time.sleep(0.5)
                for _ in range(n):
                    submit({"t": time.time()})
                    time.sleep(interval)

            def collected() -> list[float]:
                path = Path(f"{out}.0")
                if not path.exists():
                    return []
                return [float(x) for x in path.read_text().split()]

            wait_until(lambda: len(collected()) >= n, 60, f"{n} handlers to start")
            delays = collected()
    if len(delays) != n:
        raise AssertionError(f"expected {n} handler starts, got {len(delays)}")
    return percentiles(delays)


def percentiles(delays: list[float]) -> tuple[float, float, float]:
    """p50, p95 and p99 of ``delays`` (seconds), in milliseconds."""
    cuts = statistics.quantiles([d * 1000 for d in delays], n=100, method="inclusive")
    return cuts[49], cuts[94], cuts[98]


def median_of(repeats: int, measure: Callable[[], float | tuple]) -> float | tuple:
    """Run ``measure`` ``repeats`` times; the median (element-wise for tuples)."""
    values = [measure() for _ in range(repeats)]
    if isinstance(values[0], tuple):
        return tuple(statistics.median(column) for column in zip(*values, strict=True))
    return statistics.median(values)


def repeats() -> int:
    """How many times each figure is measured (BENCH_REPEAT, default 3: the median is reported)."""
    return max(1, int(os.environ.get("BENCH_REPEAT", "3")))


def sweep_concurrencies() -> tuple[int, ...]:
    """The concurrencies the tuned table tries (BENCH_SWEEP, comma-separated; default
    1,4,16,64,100)."""
    text = os.environ.get("BENCH_SWEEP", "1,4,16,64,100")
    values = tuple(int(part) for part in text.split(",") if part.strip())
    if not values or min(values) < 1:
        raise ValueError(f"BENCH_SWEEP must list positive concurrencies, got {text!r}")
    return values


# -- the results tables --------------------------------------------------------------------------

# The tables a figure can go to.
DEFAULTS_TABLE = "defaults"  # each system at its own defaults
TUNED_TABLE = "tuned"  # each system at its best over the sweep
ALONE_TABLE = "alone"  # minflow-only scenarios (S4-S6)
FOOTPRINT_TABLE = "footprint"  # import time and idle memory


@dataclasses.dataclass
class Figure:
    """One measured figure: throughput (higher is better) or latency percentiles (lower is).

    ``table``: which table it belongs to; ``setting``: the winning setting of a tuned figure;
    ``sweep``: every setting the sweep tried with its one-shot figure; ``target``: the goal a
    footprint figure is read against.
    """

    scenario: str
    backend: str
    system: str
    value: float | tuple[float, ...]
    unit: str
    table: str = DEFAULTS_TABLE
    setting: str = ""
    sweep: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    target: str = ""
    load: float | None = None

    @property
    def headline(self) -> float:
        """The number ratios use: the value, or p50 for latency."""
        return self.value[0] if isinstance(self.value, tuple) else self.value

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.unit)

    def text(self) -> str:
        return format_value(self.value, self.unit)


def lower_is_better(unit: str) -> bool:
    return unit in ("ms", "MiB")


def format_value(value: float | tuple[float, ...], unit: str) -> str:
    if isinstance(value, tuple):
        return " / ".join(f"{v:.1f}" for v in value)
    if unit in ("ms", "MiB"):
        return f"{value:.1f}"
    return f"{value:,.0f}"


_TITLES = {"sqlite": "SQLite (a file on the local disk)", "postgres": "PostgreSQL"}


class Report:
    """Figures of one benchmark session, printed as Markdown tables at the end: per backend, each
    system at its own defaults and each at its best over the sweep (then minflow-only figures),
    and minflow's footprint."""

    def __init__(self) -> None:
        self.figures: list[Figure] = []
        self.settings: dict[str, str] = {}
        self.concurrencies: tuple[int, ...] = ()
        self.details: list[str] = []

    def detail(self, text: str) -> None:
        """A line printed now and again under the footprint table (what explains a figure)."""
        print(f"  {text}", flush=True)
        self.details.append(text)

    def add(self, scenario: str, backend: str, mod, value, unit: str, **extra: Any) -> Figure:
        figure = Figure(scenario, backend, mod.NAME, value, unit, load=load_now(), **extra)
        self.figures.append(figure)
        self.settings[mod.NAME] = mod.SETTINGS
        where = f" ({figure.setting})" if figure.setting else ""
        print(
            f"\n  {backend:8} {figure.table:9} {scenario:34} {mod.NAME:14} {figure.text():>22} "
            f"{unit}{where}   (load {load_average()})",
            flush=True,
        )
        return figure

    def table(self, backend: str, table: str, reference: str = "minflow") -> str:
        """One backend's scenario x system table, with the reference system's ratio to each."""
        figures = [f for f in self.figures if f.backend == backend and f.table == table]
        systems = list(dict.fromkeys(f.system for f in figures))
        scenarios = list(dict.fromkeys(f.scenario for f in figures))
        cell = {(f.scenario, f.system): f for f in figures}
        others = [s for s in systems if s != reference and reference in systems]
        header = ["scenario", *systems] + [f"{reference} vs {s}" for s in others]
        lines = ["| " + " | ".join(header) + " |", "|---" + "|--:" * (len(header) - 1) + "|"]
        for scenario in scenarios:
            ours = cell.get((scenario, reference))
            unit = next(f.unit for f in figures if f.scenario == scenario)
            values = []
            for system in systems:
                figure = cell.get((scenario, system))
                text = "" if figure is None else figure.text()
                if figure is not None and figure.setting:
                    text += f" ({figure.setting})"
                values.append(text)
            ratios = []
            for system in others:
                theirs = cell.get((scenario, system))
                if ours is None or theirs is None or not ours.headline or not theirs.headline:
                    ratios.append("")
                elif ours.lower_is_better:
                    ratios.append(f"{theirs.headline / ours.headline:.2f}x")
                else:
                    ratios.append(f"{ours.headline / theirs.headline:.2f}x")
            lines.append("| " + " | ".join([f"{scenario} ({unit})", *values, *ratios]) + " |")
        return "\n".join(lines)

    def footprint(self) -> str:
        figures = [f for f in self.figures if f.table == FOOTPRINT_TABLE]
        lines = ["| measure | minflow | target |", "|---|--:|--:|"]
        for f in figures:
            where = "" if f.backend == "-" else f", {f.backend}"
            lines.append(f"| {f.scenario}{where} ({f.unit}) | {f.text()} | {f.target} |")
        return "\n".join(lines)

    def sweeps(self, backend: str) -> list[str]:
        """What every tried setting gave, one line per tuned figure that had a choice."""
        lines = []
        for f in self.figures:
            if f.backend == backend and f.table == TUNED_TABLE and len(f.sweep) > 1:
                tried = "; ".join(f"{label}: {text}" for label, text in f.sweep)
                lines.append(f"- {f.scenario}, {f.system}: {tried}")
        return lines

    def render(self) -> str:
        """The tables, what each system ran with, how to read them, versions and the machine."""
        parts = []
        concurrencies = ", ".join(str(c) for c in self.concurrencies)
        for backend in dict.fromkeys(f.backend for f in self.figures if f.backend != "-"):
            title = _TITLES.get(backend, backend)
            tables = {f.table for f in self.figures if f.backend == backend}
            if DEFAULTS_TABLE in tables:
                parts += [f"**{title}: each system at its own defaults**", ""]
                parts += [self.table(backend, DEFAULTS_TABLE), ""]
            if TUNED_TABLE in tables:
                parts += [
                    f"**{title}: each system at its best over the sweep (concurrency "
                    f"{concurrencies}; winning setting in brackets)**",
                    "",
                    self.table(backend, TUNED_TABLE),
                    "",
                ]
                sweeps = self.sweeps(backend)
                if sweeps:
                    parts += ["Every setting tried (one run each):", "", *sweeps, ""]
            if ALONE_TABLE in tables:
                parts += [f"**{title}: minflow alone**", "", self.table(backend, ALONE_TABLE), ""]
        if any(f.table == FOOTPRINT_TABLE for f in self.figures):
            parts += ["**minflow's footprint**", "", self.footprint(), ""]
            parts += [*(f"- {line}" for line in self.details), ""] if self.details else []
        notes = [f"- **{name}**: {text}" for name, text in self.settings.items()]
        loads = [f.load for f in self.figures if f.load is not None]
        spread = f"{min(loads):.2f}-{max(loads):.2f}" if loads else "?"
        return "\n".join(
            [
                *parts,
                "Ratios are minflow's advantage: its throughput divided by the other system's, or "
                "the other system's p50 latency divided by minflow's (above 1 = minflow ahead). "
                "Latency cells are p50 / p95 / p99. "
                f"Each figure is the median of {repeats()} runs (S4, S6 and the idle memory: one "
                "run; the import time: the median of 21 pairs of runs). A tuned "
                "figure is the median of fresh runs at the setting that won a one-run screening "
                "of every setting (throughput: highest; latency: lowest p50), or the defaults' "
                "median where that is better; submits take no worker setting, so they appear in "
                "the defaults table only.",
                "",
                *notes,
                "",
                f"Versions: {versions()}",
                "",
                f"Machine: {machine_line()}; 1-minute load average {spread} while measuring",
            ]
        )


def versions() -> str:
    """Installed versions of minflow, its driver and the peers (those present)."""
    from importlib import metadata

    found = []
    names = ("minflow", "pg8000", "procrastinate", "psycopg", "psycopg-pool", "pgqueuer")
    for dist in (*names, "asyncpg", "uvloop", "huey"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{dist} {metadata.version(dist)}")
    return ", ".join(found)


# -- one system through S1-S3, at its defaults and at its best ----------------------------------

N_RUNS = int(os.environ.get("BENCH_RUNS", "10000"))
S3_SUBMITS = int(os.environ.get("BENCH_S3_SUBMITS", "200"))
S3_INTERVAL = 0.020
# A one-run screening of a latency setting needs fewer samples than a reported figure: its p50
# only has to rank the settings.
S3_SCREEN_SUBMITS = max(20, S3_SUBMITS // 4)


@dataclasses.dataclass
class Scenario:
    """One row of the tables: ``measure(setting, screening)`` gives one figure; ``tunable``:
    whether worker settings change it (submits take none)."""

    label: str
    unit: str
    measure: Callable[[dict, bool], Any]
    tunable: bool


def scenarios(mod, target: Target, workdir: Path) -> list[Scenario]:
    """S1 single and bulk, S2 with one and two processes, S3 in and across processes (those the
    system takes part in)."""
    rows = []
    if "S1" in mod.SCENARIOS:
        rows += [
            Scenario(
                "S1 submit, single", "runs/s", lambda s, _: s1_single(mod, target, N_RUNS), False
            ),
            Scenario("S1 submit, bulk", "runs/s", lambda s, _: s1_bulk(mod, target, N_RUNS), False),
        ]
    if "S2" in mod.SCENARIOS:
        for processes in (1, 2):
            label = f"S2 drain, {processes} process" + ("es" if processes > 1 else "")
            rows.append(
                Scenario(
                    label,
                    "runs/s",
                    lambda s, _, p=processes: s2_drain(mod, target, N_RUNS, p, s),
                    True,
                )
            )
    if "S3" in mod.SCENARIOS:
        for separate in (False, True):
            where = "separate processes" if separate else "same process"

            def latency(setting: dict, screening: bool, separate=separate):
                n = S3_SCREEN_SUBMITS if screening else S3_SUBMITS
                return s3_latency(mod, target, n, S3_INTERVAL, setting, workdir, separate)

            rows.append(Scenario(f"S3 latency, {where}", "ms", latency, True))
    return rows


def candidates(mod, concurrencies: tuple[int, ...]) -> list[dict]:
    """The settings the sweep tries, without repeats of equivalent settings."""
    seen: dict[str, dict] = {}
    for setting in mod.sweep(concurrencies):
        seen.setdefault(mod.describe(setting), setting)
    return list(seen.values())


def _better(unit: str, a: Any, b: Any) -> bool:
    """Whether figure ``a`` beats ``b`` (p50 ranks latency)."""
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    return a < b if lower_is_better(unit) else a > b


def tune(
    mod, scenario: Scenario, settings: list[dict], k: int, known: dict[str, Any]
) -> tuple[dict, Any, list[tuple[str, str]]]:
    """The best of ``settings`` for ``scenario``: (setting, median of ``k`` fresh runs at it,
    [(setting label, one-run figure)]). ``known``: medians already measured, by label (the
    defaults'), reused rather than measured again, and kept when they beat the winner's: one
    lucky screening run must not put a system's tuned figure below its defaults."""
    tried: list[tuple[str, str]] = []
    if len(settings) == 1:
        best = settings[0]
    else:
        best, best_value = None, None
        for setting in settings:
            value = scenario.measure(setting, True)
            tried.append((mod.describe(setting), format_value(value, scenario.unit)))
            print(
                f"    sweep {mod.NAME} {scenario.label}: {mod.describe(setting)} -> "
                f"{format_value(value, scenario.unit)} {scenario.unit}",
                flush=True,
            )
            if best is None or _better(scenario.unit, value, best_value):
                best, best_value = setting, value
    label = mod.describe(best)
    if label in known:
        value = known[label]
    else:
        value = median_of(k, lambda: scenario.measure(best, False))
    for setting in settings:
        other = mod.describe(setting)
        if other in known and _better(scenario.unit, known[other], value):
            best, value = setting, known[other]
    return best, value, tried


def tuning() -> bool:
    """Whether the tuned table is measured too (BENCH_TUNED=0: the defaults table alone)."""
    return os.environ.get("BENCH_TUNED", "1") != "0"


def run_scenarios(
    mod,
    backend: str,
    workdir: Path,
    report: Report,
    concurrencies: tuple[int, ...] | None = None,
) -> None:
    """Every scenario of ``mod`` on ``backend``: at the system's defaults, then (for those worker
    settings change) at its best over ``mod.sweep(concurrencies)``."""
    concurrencies = concurrencies or sweep_concurrencies()
    report.concurrencies = concurrencies
    settings = candidates(mod, concurrencies)
    target = fresh_target(mod.NAME, backend, workdir)
    k = repeats()
    default_label = mod.describe(mod.DEFAULTS)
    try:
        for scenario in scenarios(mod, target, workdir):
            value = median_of(k, lambda s=scenario: s.measure(mod.DEFAULTS, False))
            report.add(scenario.label, backend, mod, value, scenario.unit, table=DEFAULTS_TABLE)
            if not scenario.tunable or not tuning():
                continue
            best, value, tried = tune(mod, scenario, settings, k, {default_label: value})
            report.add(
                scenario.label,
                backend,
                mod,
                value,
                scenario.unit,
                table=TUNED_TABLE,
                setting=mod.describe(best),
                sweep=tried,
            )
    finally:
        drop_target(target, mod)

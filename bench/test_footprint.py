"""minflow's footprint (make bench, make bench-quick): what ``import minflow`` adds to an
interpreter's start, and the memory of an idle worker process.

Both are whole processes timed or read from outside, as a service would see them: the import is
``python -c 'import minflow'`` against ``python -c pass`` in the same environment, in alternating
pairs so drift on a shared machine hits both, with minflow's bytecode compiled beforehand. The
memory is VmRSS of ``bench/idle_worker.py`` (minflow alone, two handlers, a default Worker)
after it has idled for a few seconds. Neither is asserted: the targets are printed beside them.
"""

from __future__ import annotations

import collections
import os
import py_compile
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sys_minflow as mod
from harness import BENCH, FOOTPRINT_TABLE, ROOT, drop_target, fresh_target, stop_processes

pytestmark = pytest.mark.quick

IMPORT_PAIRS = 21
IMPORT_WARMUP = 3
IMPORTTIME_RUNS = 5
OFFENDERS = 12
IDLE_SECONDS = float(os.environ.get("BENCH_IDLE_SECONDS", "5"))
IMPORT_TARGET_MS = 15
IDLE_TARGET_MIB = 30


def _environment() -> dict[str, str]:
    """This interpreter's environment, minus what would change how it starts or imports."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


def _elapsed(code: str, *options: str) -> tuple[float, float]:
    """Seconds of wall-clock time and of CPU time (user + system) of ``python -c code``."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *options, "-c", code],
        cwd=ROOT,  # -c puts the working directory first on sys.path: this checkout's minflow.py
        env=_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, f"python -c {code!r} exited with {proc.returncode}"
    return elapsed, usage.ru_utime + usage.ru_stime


def _added(*options: str) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(wall, CPU) of ``python -c pass`` and of ``python -c 'import minflow'``, alternating."""
    for _ in range(IMPORT_WARMUP):
        _elapsed("pass", *options)
        _elapsed("import minflow", *options)
    bare, with_minflow = [], []
    for _ in range(IMPORT_PAIRS):
        bare.append(_elapsed("pass", *options))
        with_minflow.append(_elapsed("import minflow", *options))
    return bare, with_minflow


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def _difference_ms(
    bare: list[tuple[float, float]], other: list[tuple[float, float]], i: int
) -> float:
    return _median_ms([b[i] - a[i] for a, b in zip(bare, other, strict=True)])


def _importtime() -> list[tuple[int, int, int, str]]:
    """One ``-X importtime`` run: (depth, self us, cumulative us, module) in the order printed."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import minflow"],
        cwd=ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        own, cumulative, name = line[len("import time:") :].split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        rows.append((depth, int(own), int(cumulative), name.strip()))
    return rows


def _offenders() -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """minflow's direct imports by median cumulative time, and every module it brings in by
    median self time (milliseconds, most expensive first)."""
    direct: dict[str, list[int]] = collections.defaultdict(list)
    own: dict[str, list[int]] = collections.defaultdict(list)
    for _ in range(IMPORTTIME_RUNS):
        rows = _importtime()
        # Printed children first: minflow's subtree is the run of rows before it at depth >= 1.
        end = next(i for i, row in enumerate(rows) if row[0] == 0 and row[3] == "minflow")
        begin = end
        while begin > 0 and rows[begin - 1][0] >= 1:
            begin -= 1
        for depth, self_us, cumulative_us, name in rows[begin : end + 1]:
            own[name].append(self_us)
            if depth == 1:
                direct[name].append(cumulative_us)

    def ranked(table: dict[str, list[int]]) -> list[tuple[str, float]]:
        medians = {name: statistics.median(values) / 1000 for name, values in table.items()}
        return sorted(medians.items(), key=lambda item: -item[1])[:OFFENDERS]

    return ranked(direct), ranked(own)


def test_import_time(report):
    py_compile.compile(str(ROOT / "minflow.py"), doraise=True)
    bare, with_minflow = _added()
    added = _difference_ms(bare, with_minflow, 0)
    report.add(
        "import minflow, over python -c pass",
        "-",
        mod,
        added,
        "ms",
        table=FOOTPRINT_TABLE,
        target=f"<= {IMPORT_TARGET_MS} ms",
    )
    direct, own = _offenders()
    report.detail(
        f"python -c pass {_median_ms([b[0] for b in bare]):.1f} ms, python -c 'import minflow' "
        f"{_median_ms([w[0] for w in with_minflow]):.1f} ms (medians of {IMPORT_PAIRS}); CPU "
        f"time (user + system, less affected by other processes) added by the import "
        f"{_difference_ms(bare, with_minflow, 1):.1f} ms"
    )
    # The environment's site may import modules minflow needs too (an editable install's
    # finder imports re, enum and pathlib): without site, the import pays for all of them.
    bare_s, with_minflow_s = _added("-S")
    report.detail(
        f"with python -S (no site, so nothing imported before minflow): import minflow adds "
        f"{_difference_ms(bare_s, with_minflow_s, 0):.1f} ms, CPU "
        f"{_difference_ms(bare_s, with_minflow_s, 1):.1f} ms"
    )
    report.detail(
        f"-X importtime, medians of {IMPORTTIME_RUNS} runs: minflow's direct imports by "
        "cumulative ms: " + ", ".join(f"{name} {ms:.1f}" for name, ms in direct)
    )
    report.detail(
        "every module importing minflow loads, by self ms (minflow: its own body): "
        + ", ".join(f"{name} {ms:.1f}" for name, ms in own)
    )


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def test_idle_worker_memory(backend, workdir, report):
    target = fresh_target("minflow_idle", backend, workdir)
    try:
        mod.prepare(target)
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / "idle_worker.py"), mod.dsn(target)],
            cwd=ROOT,
            env=dict(_environment(), PYTHONPATH=str(ROOT)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = proc.stdout.readline().strip()
            assert line == "ready", f"idle worker did not start: {line!r}"
            time.sleep(IDLE_SECONDS)  # the idle period being measured, not synchronisation
            status = _status(proc.pid)
        finally:
            proc.stdin.close()  # its signal to stop
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_processes([proc])
        rss = int(status["VmRSS"].split()[0]) / 1024
        report.add(
            "idle worker RSS",
            backend,
            mod,
            rss,
            "MiB",
            table=FOOTPRINT_TABLE,
            target=f"<= {IDLE_TARGET_MIB} MiB" if backend == "sqlite" else "",
        )
        report.detail(
            f"idle worker on {backend} after {IDLE_SECONDS:g} s: VmRSS {rss:.1f} MiB, peak "
            f"{int(status['VmHWM'].split()[0]) / 1024:.1f} MiB, {status['Threads'].strip()} threads"
        )
    finally:
        drop_target(target, mod)

"""S6 soak (make bench-soak): mixed submit/process/retry at a steady rate for 10 minutes.

One worker process runs while this process submits at a fixed rate, a tenth of the runs failing
their first attempt; every interval the worker's RSS, threads, sockets and open files, the
SQLite WAL size and the backlog are sampled. After a warm-up they must stay flat.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import sys_minflow as mod
from harness import ALONE_TABLE, drop_target, fresh_target, load_average, workers

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("BENCH_SOAK_SECONDS", "600"))
RATE = 200  # runs submitted per second
SAMPLES = 20


def _process(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue  # closed while listing
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"]),
        "sockets": sum(link.startswith("socket:") for link in links),
        "db_files": sum(".db" in link for link in links),
    }


def test_s6_soak(backend, workdir, report):
    target = fresh_target("minflow_s6", backend, workdir)
    mod.prepare(target)
    samples: list[dict] = []
    interval = SECONDS / SAMPLES
    try:
        with (
            workers(mod.__name__, target, 1, {"concurrency": 10}, mode="soak") as go,
            mod.producer(target) as submit,
        ):
            go()
            (pid,) = go.pids
            start = time.monotonic()
            next_sample = start + interval
            sent = 0
            while (now := time.monotonic()) - start < SECONDS:
                due = int((now - start) * RATE)
                while sent < due:
                    submit({"i": sent, "fail": sent % 10 == 0})
                    sent += 1
                if now >= next_sample:
                    next_sample += interval
                    wal = Path(target.dsn + "-wal")
                    samples.append(
                        {
                            "t": round(now - start),
                            **_process(pid),
                            "wal_kib": wal.stat().st_size // 1024 if wal.exists() else 0,
                            "backlog": mod.remaining(target),
                            "done": mod.done_count(target),
                            "load": load_average(),
                        }
                    )
                time.sleep(0.005)  # pacing the producer, not synchronisation
        keys = list(samples[0])
        print(f"\n  S6 {backend}: {sent} runs submitted in {SECONDS:.0f} s ({RATE}/s)")
        print("  " + " ".join(f"{k:>9}" for k in keys))
        for sample in samples:
            print("  " + " ".join(f"{sample[k]!s:>9}" for k in keys))
        report.add("S6 soak, submitted", backend, mod, sent / SECONDS, "runs/s", table=ALONE_TABLE)
        settled = samples[SAMPLES // 4 :]  # after a warm-up quarter
        first, last = settled[0], settled[-1]
        assert last["rss_kib"] <= first["rss_kib"] * 1.25 + 4096, "worker memory keeps growing"
        assert max(s["threads"] for s in settled) == min(s["threads"] for s in settled)
        assert max(s["sockets"] for s in settled) <= first["sockets"]
        assert max(s["db_files"] for s in settled) <= first["db_files"]
        assert max(s["wal_kib"] for s in settled) <= max(first["wal_kib"] * 2, 8192)
        assert max(s["backlog"] for s in settled) < RATE * 5, "the worker fell behind"
    finally:
        drop_target(target, mod)

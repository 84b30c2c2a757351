"""The examples run as their docstrings say, through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import minflow
from conftest import ROOT


def minflow_cli(*args: str, dsn: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MINFLOW_DSN": dsn}
    return subprocess.run(
        [sys.executable, "-m", "minflow", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_produce_then_worker_burst(dsn):
    produced = subprocess.run(
        [sys.executable, "examples/produce.py", dsn],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    ids = produced.stdout.split()
    assert len(ids) == 8
    done = minflow_cli("worker", "examples.jobs", "--burst", "--no-schedules", dsn=dsn)
    assert done.returncode == 0, done.stderr
    with minflow.Client(dsn) as client:
        runs = {i: client.get(i) for i in ids}
        statuses = [runs[i].status for i in ids]
        # The large invoice asked to be retried (1 s later), so one burst leaves it pending.
        assert statuses[:5] == ["succeeded"] * 5
        assert statuses[5] == "pending" and runs[ids[5]].attempt == 0
        assert statuses[6] == "succeeded" and runs[ids[6]].result == {"pages": 3}
        assert runs[ids[7]].status == "pending" and "mail server refused" in runs[ids[7]].last_error
    listed = minflow_cli("list", "--status", "pending", "--json", dsn=dsn)
    assert {r["id"] for r in json.loads(listed.stdout)} == {ids[5], ids[7]}


def test_scheduled_report_declares_one_schedule_however_often_it_starts(dsn):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import scheduled_report
    finally:
        sys.path.remove(str(ROOT / "examples"))
    with minflow.Client(dsn) as client:
        client.migrate()
        first = scheduled_report.declare_schedules(client)
        assert scheduled_report.declare_schedules(client) == first
        assert [s.name for s in client.schedules()] == ["weekly-report"]

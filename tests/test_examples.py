"""The examples run as their docstrings say, through the real command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import minflow
from conftest import ROOT, db, wait_for


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


def produce(dsn: str) -> list[str]:
    """Run examples/produce.py; the ids it prints."""
    produced = subprocess.run(
        [sys.executable, "examples/produce.py", dsn],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return produced.stdout.split()


def test_produce_then_worker_burst(dsn):
    ids = produce(dsn)
    assert len(ids) == 9
    done = minflow_cli("worker", "examples.jobs", "--burst", "--no-schedules", dsn=dsn)
    assert done.returncode == 0, done.stderr
    with minflow.Client(dsn) as client:
        runs = {i: client.get(i) for i in ids}
        statuses = [runs[i].status for i in ids]
        # The large invoice asked to be retried (1 s later), so one burst leaves it pending.
        assert statuses[:5] == ["succeeded"] * 5
        assert statuses[5] == "pending" and runs[ids[5]].attempt == 0
        assert statuses[6] == "succeeded" and runs[ids[6]].result == {"pages": 3}
        assert statuses[7] == "succeeded" and runs[ids[7]].result == {"sent": 1}  # async def
        assert runs[ids[8]].status == "pending" and "mail server refused" in runs[ids[8]].last_error
    listed = minflow_cli("list", "--status", "pending", "--json", dsn=dsn)
    assert {r["id"] for r in json.loads(listed.stdout)} == {ids[5], ids[8]}


def test_examples_settle_without_burst(dsn):
    """The README's `python examples/produce.py && python -m minflow worker examples.jobs`:
    every run ends, the snoozed invoice after one snooze (it once snoozed forever)."""
    ids = produce(dsn)
    worker = subprocess.Popen(
        [sys.executable, "-m", "minflow", "worker", "examples.jobs", "--no-schedules"],
        cwd=ROOT,
        env={**os.environ, "MINFLOW_DSN": dsn},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with minflow.Client(dsn) as client:
        try:
            runs = wait_for(
                lambda: (
                    all(r.status in ("succeeded", "failed") for r in rs) and rs
                    if (rs := [client.get(i) for i in ids])
                    else None
                ),
                timeout=30,
                message="every example run to finish",
            )
        finally:
            worker.send_signal(signal.SIGTERM)  # by pid
            _, err = worker.communicate(timeout=30)
        assert worker.returncode == 0, err
        assert [r.status for r in runs] == ["succeeded"] * 8 + ["failed"]
        big = runs[5]
        assert big.result == {"order": 99, "charged": 25000} and big.attempt == 1
        assert [e.event_type for e in client.events(big.id)] == [
            "created",
            *("leased", "started", "retried"),
            *("leased", "started", "succeeded"),
        ]
        [(snoozes,)] = db(
            client, "SELECT snoozes FROM workflow_run WHERE id = {uuid:id}", id=big.id
        )
        assert snoozes == 1
        assert runs[8].attempt == 2 and "mail server refused" in runs[8].last_error


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

"""Operating a queue through its surfaces (design §8): prune, bulk retry and cancel and the
worker registry over the REST API, in the metrics and on the command line, on both dialects."""

from __future__ import annotations

import datetime as dt
import os
import pty
import select
import subprocess
import sys
import time

import minflow
from conftest import ROOT, wait_for
from test_cli import cli, ok, ok_json, one_line_error
from test_http import API, Api
from test_operate import finish

UTC = dt.timezone.utc


# -- metrics -----------------------------------------------------------------------------------


def test_alive_workers_gauge(app):
    app.handler("g.v1")(lambda run: None)
    api = Api(app)
    try:

        def gauge() -> float | None:
            text = api.call("GET", "/metrics")[2].decode()
            lines = [
                line for line in text.splitlines() if line.startswith("workflow_workers_alive ")
            ]
            return float(lines[0].split()[1]) if lines else None

        assert gauge() == 0
        worker = minflow.Worker(app, lease=0.6, schedules=False).start()
        try:
            wait_for(lambda: gauge() == 1, message="the gauge to count the worker")
        finally:
            worker.stop(10)
        assert gauge() == 0
    finally:
        api.close()


# -- REST --------------------------------------------------------------------------------------


def test_rest_prune_retry_cancel_and_workers(client):
    api = Api(client)
    try:
        old = client.submit_many([minflow.Job("r.v1", idempotency_key=f"k{i}") for i in range(4)])
        finish(client, old[:2], "failed")
        finish(client, old[2:], "succeeded")
        call = lambda path, body: api.call("POST", f"{API}{path}", body)[::2]  # noqa: E731
        assert call("/prune", {"older_than": "7d", "dry_run": True}) == (
            200,
            {"count": 4, "dry_run": True},
        )
        assert call("/prune", {"older_than": 86400, "statuses": "succeeded"}) == (
            200,
            {"count": 2, "dry_run": False},
        )
        assert call("/workflows/retry", {"status": ["failed"], "key_prefix": "k0"}) == (
            200,
            {"count": 1, "dry_run": False},
        )
        assert call("/workflows/cancel", {"created_after": "2000-01-01T00:00:00Z"}) == (
            200,
            {"count": 1, "dry_run": False},
        )
        assert call("/workflows/retry", {"dry_run": True}) == (200, {"count": 2, "dry_run": True})
        for path, body, needle in (
            ("/prune", {}, "older_than is required"),
            ("/prune", {"older_than": "0d"}, "older_than must be seconds or a duration"),
            ("/prune", {"older_than": "1.5h"}, "a duration such as"),
            ("/prune", {"older_than": 0}, "older_than must be more than 0"),
            ("/prune", {"older_than": "7d", "statuses": ["leased"]}, "statuses for prune"),
            ("/prune", {"older_than": "7d", "dry_run": "yes"}, "dry_run must be true or false"),
            ("/workflows/retry", {"status": "pending"}, "status for a bulk retry"),
            ("/workflows/cancel", {"created_before": "yesterday"}, "RFC 3339"),
            ("/workflows/cancel", {"type": "a", "limit": 5}, "unknown field(s): limit"),
        ):
            status, body = call(path, body)
            assert status == 400 and needle in body["error"], (path, body)
        assert api.call("GET", f"{API}/workers")[::2] == (200, [])
        assert {r.status for r in client.list()} == {"failed", "cancelled"}
    finally:
        api.close()


# -- the command line --------------------------------------------------------------------------


def test_cli_prune_workers_and_stats(dsn, client, tmp_path):
    ids = client.submit_many([minflow.Job("c.v1") for _ in range(3)])
    finish(client, ids[:2], "succeeded")
    out = ok(cli(tmp_path, "prune", "--older-than", "7d", "--dry-run", "--dsn", dsn))
    assert out.strip() == (
        "2 runs (succeeded, failed, cancelled) last updated over 7d ago would be deleted, "
        "with their events"
    )
    result = ok_json(
        cli(
            tmp_path, "prune", "--older-than", "1d", "--status", "succeeded", "--json", "--dsn", dsn
        )
    )
    assert result == {"count": 2, "dry_run": False} and client.get(ids[0]) is None
    one_line_error(cli(tmp_path, "prune", "--older-than", "0", "--dsn", dsn), 2, "older_than")
    stats = ok_json(cli(tmp_path, "stats", "--json", "--dsn", dsn))
    assert stats["c.v1"]["pending"] == 1 and 0 <= stats["c.v1"]["oldest_due_pending_seconds"] < 60
    assert ok(cli(tmp_path, "workers", "--dsn", dsn)).strip() == "no workers recorded"
    assert ok_json(cli(tmp_path, "workers", "--json", "--dsn", dsn)) == []
    assert (
        minflow._build_parser().parse_args(["worker", "m", "--retention", "7d"]).retention == 604800
    )


def test_cli_bulk_retry_needs_yes_without_a_terminal(dsn, client, tmp_path):
    ids = client.submit_many([minflow.Job("c.v1") for _ in range(3)])
    finish(client, ids, "failed", dt.datetime.now(UTC))
    refused = cli(tmp_path, "retry", "--all", "--status", "failed", "--dsn", dsn)
    one_line_error(refused, 2, "retry 3 runs (status failed): not on a terminal, so pass --yes")
    assert (
        ok(cli(tmp_path, "retry", "--all", "--dry-run", "--dsn", dsn)).strip()
        == "3 runs would be retried"
    )
    assert ok_json(
        cli(tmp_path, "retry", "--all", "--yes", "--type", "c.v1", "--json", "--dsn", dsn)
    ) == {
        "count": 3,
        "dry_run": False,
    }
    assert {client.get(i).status for i in ids} == {"pending"}
    one_line_error(cli(tmp_path, "cancel", "--dsn", dsn), 2, "give a RUN_ID, or --all")
    one_line_error(
        cli(tmp_path, "cancel", ids[0], "--type", "x", "--dsn", dsn), 2, "--type only go with --all"
    )
    one_line_error(cli(tmp_path, "cancel", ids[0], "--all", "--dsn", dsn), 2, "not both")
    assert ok(cli(tmp_path, "cancel", ids[0], "--dsn", dsn)).strip() == f"cancelled {ids[0]}"


def _on_terminal(cwd, args: list[str], answer: str) -> tuple[int, str]:
    """Run the CLI with a pty as its terminal, answer its question, return (status, output)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "minflow", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    output = b""
    try:
        deadline = time.monotonic() + 30
        while b"[y/N]" not in output and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                output += os.read(leader, 4096)
        os.write(leader, answer.encode() + b"\n")
        proc.wait(30)
        with_rest = output
        while select.select([leader], [], [], 0.2)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            with_rest += chunk
        return proc.returncode, with_rest.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(leader)


def test_cli_bulk_cancel_asks_on_a_terminal(dsn, client, tmp_path):
    ids = client.submit_many([minflow.Job("c.v1", idempotency_key=f"imp-{i}") for i in range(3)])
    args = ["cancel", "--all", "--key-prefix", "imp-", "--dsn", dsn]
    status, output = _on_terminal(tmp_path, args, "n")
    assert "cancel 3 runs (key prefix imp-)? [y/N]" in output
    assert status == 1 and "not confirmed; nothing changed" in output
    assert {client.get(i).status for i in ids} == {"pending"}
    status, output = _on_terminal(tmp_path, args, "y")
    assert status == 0 and "3 runs cancelled" in output
    assert {client.get(i).status for i in ids} == {"cancelled"}

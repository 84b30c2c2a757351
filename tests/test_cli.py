"""The command line, run as users run it: ``python -m minflow ...`` in a subprocess."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import uuid

import pytest
from conftest import ROOT, free_port, wait_for

import minflow

UTC = dt.timezone.utc


def cli(cwd, *args, input=None, env=None):
    """Run the CLI; MINFLOW_DSN is removed unless ``env`` sets it."""
    base = {k: v for k, v in os.environ.items() if k != "MINFLOW_DSN"}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "minflow", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def ok_json(result):
    return json.loads(ok(result))


def one_line_error(result, status: int, needle: str) -> None:
    """A user mistake: the given exit status and one clear line on stderr, no traceback."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    if not result.stderr.startswith("usage:"):  # argparse prints usage, then its one line
        assert result.stderr.startswith("minflow: error: ") and result.stderr.count("\n") == 1
    assert needle in result.stderr, result.stderr


def test_runs_from_submit_to_stats(dsn, tmp_path):
    assert ok_json(cli(tmp_path, "migrate", "--json", "--dsn", dsn))["schema_version"] >= 1
    run_id = ok_json(
        cli(
            tmp_path,
            "submit",
            "billing.v1",
            '{"order": 42}',
            "--key",
            "order-42",
            "--priority",
            "5",
            "--max-attempts",
            "4",
            "--json",
            "--dsn",
            dsn,
        )
    )["id"]
    again = cli(tmp_path, "submit", "billing.v1", "{}", "--key", "order-42", "--dsn", dsn)
    assert ok(again).strip() == run_id and "exists" in again.stderr
    later = ok(cli(tmp_path, "submit", "later.v1", "--run-in", "1h", "--dsn", dsn)).strip()
    piped = ok_json(
        cli(tmp_path, "submit", "stdin.v1", "-", "--json", "--dsn", dsn, input='{"a": [1, 2]}')
    )["id"]

    runs = ok_json(cli(tmp_path, "list", "--json", "--dsn", dsn))
    assert [r["id"] for r in runs] == [piped, later, run_id]  # newest first
    assert runs[0]["payload"] == {"a": [1, 2]}
    filtered = cli(
        tmp_path, "list", "--type", "billing.v1", "--status", "pending", "--json", "--dsn", dsn
    )
    assert [r["id"] for r in ok_json(filtered)] == [run_id]
    table = ok(cli(tmp_path, "list", "--dsn", dsn))
    assert table.splitlines()[0].split()[:3] == ["ID", "TYPE", "STATUS"] and later in table

    shown = ok_json(cli(tmp_path, "show", run_id, "--json", "--dsn", dsn))
    assert shown["payload"] == {"order": 42} and shown["priority"] == 5
    assert shown["max_attempts"] == 4 and [e["event_type"] for e in shown["events"]] == ["created"]

    assert ok(cli(tmp_path, "cancel", run_id, "--dsn", dsn)).strip() == f"cancelled {run_id}"
    one_line_error(cli(tmp_path, "cancel", run_id, "--dsn", dsn), 1, "cancelled")
    retried = ok_json(cli(tmp_path, "retry", run_id, "--json", "--dsn", dsn))
    assert retried == {"id": run_id, "status": "pending"}
    one_line_error(cli(tmp_path, "retry", run_id, "--dsn", dsn), 1, "pending")
    timeline = ok(cli(tmp_path, "show", run_id, "--dsn", dsn))
    assert "events (3" in timeline and "cancelled" in timeline and "retried" in timeline

    with minflow.Client(dsn) as client:
        # Each type's counts, and beside them how long its oldest due run has waited.
        stats = ok_json(cli(tmp_path, "stats", "--json", "--dsn", dsn))
        ages = {t: counts.pop("oldest_due_pending_seconds") for t, counts in stats.items()}
        assert stats == client.stats()
        assert ages.pop("later.v1") is None and all(0 <= age < 60 for age in ages.values())
        delay = (client.get(later).run_at - client.get(later).created_at).total_seconds()
        assert 3590 < delay < 3610
    stats = ok(cli(tmp_path, "stats", "--dsn", dsn)).splitlines()
    assert "OLDEST DUE PENDING" in stats[0] and stats[-1].split()[:2] == ["TOTAL", "3"]


def test_schedules(dsn, tmp_path):
    ok(cli(tmp_path, "migrate", "--dsn", dsn))
    add = ["schedule", "add", "reports.daily.v1", '{"format": "pdf"}', "--cron", "0 6 * * *"]
    named = [*add, "--timezone", "Europe/Berlin", "--name", "daily", "--dsn", dsn]
    sched_id = ok_json(cli(tmp_path, *named, "--json"))["id"]
    assert ok(cli(tmp_path, *named)).strip() == sched_id  # same name: same schedule
    listed = ok_json(cli(tmp_path, "schedule", "list", "--json", "--dsn", dsn))
    assert [(s["id"], s["name"], s["payload"]) for s in listed] == [
        (sched_id, "daily", {"format": "pdf"})
    ]
    assert ok_json(cli(tmp_path, "schedule", "show", sched_id, "--json", "--dsn", dsn)) == listed[0]
    with minflow.Client(dsn) as client:
        paused = cli(tmp_path, "schedule", "pause", sched_id, "--json", "--dsn", dsn)
        assert ok_json(paused) == {"id": sched_id, "status": "paused"}
        assert client.get_schedule(sched_id).enabled is False
        ok(cli(tmp_path, "schedule", "resume", sched_id, "--dsn", dsn))
        assert client.get_schedule(sched_id).enabled is True
        table = ok(cli(tmp_path, "schedule", "list", "--dsn", dsn))
        assert "daily" in table and "active" in table and "Europe/Berlin" in table
        ok(cli(tmp_path, "schedule", "delete", sched_id, "--dsn", dsn))
        assert client.schedules() == []
    one_line_error(cli(tmp_path, "schedule", "show", sched_id, "--dsn", dsn), 1, "not found")


def test_user_mistakes_are_one_line_errors(tmp_path):
    dsn = f"sqlite:///{tmp_path / 'cli.db'}"
    # Not migrated yet: reading says what to do.
    one_line_error(cli(tmp_path, "list", "--dsn", dsn), 1, "minflow migrate")
    ok(cli(tmp_path, "migrate", "--dsn", dsn))
    for args, status, needle in (
        (["submit", "t", "{bad"], 2, "PAYLOAD_JSON is not valid JSON"),
        (["submit", "t", "--run-at", "2030-01-01"], 2, "RFC 3339"),
        (["submit", "t", "--run-in", "soon"], 2, "duration"),
        (["submit", "   "], 2, "type must not be empty"),
        (["submit", "t", "--max-attempts", "0"], 2, "max_attempts"),
        (["list", "--status", "nope"], 2, "invalid choice"),
        (["list", "--limit", "0"], 2, "limit"),
        (["show", str(uuid.uuid4())], 1, "not found"),
        (["cancel", "not-a-uuid"], 1, "not found"),
        (["schedule", "add", "t", "--cron", "every day"], 2, "cron"),
        (["schedule", "add", "t", "--cron", "@daily", "--timezone", "Mars/Base"], 2, "timezone"),
        (["worker", "no_such_module_here"], 2, "cannot import"),
    ):
        one_line_error(cli(tmp_path, *args, "--dsn", dsn), status, needle)
    one_line_error(cli(tmp_path, "list", "--dsn", "mysql://x"), 2, "unsupported DSN scheme")
    one_line_error(cli(tmp_path, "serve", "--port", "70000", "--dsn", dsn), 2, "65535")
    with socket.socket() as taken:  # a port someone else listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        one_line_error(cli(tmp_path, "serve", "--port", busy, "--dsn", dsn), 1, "cannot listen")
    one_line_error(cli(tmp_path), 2, "required: COMMAND")
    with minflow.Client(dsn) as client:
        assert client.list() == []  # none of the mistakes wrote anything


def test_dsn_defaults_env_then_minflow_db(tmp_path):
    ok(cli(tmp_path, "migrate"))  # no --dsn, no MINFLOW_DSN: ./minflow.db
    assert (tmp_path / "minflow.db").exists()
    env = {"MINFLOW_DSN": f"sqlite:///{tmp_path / 'env.db'}"}
    run_id = ok(cli(tmp_path, "submit", "t.v1", env=env)).strip()
    with minflow.Client(env["MINFLOW_DSN"]) as client:
        assert client.get(run_id).type == "t.v1"
    # --dsn is also accepted before the command.
    listed = cli(tmp_path, "--dsn", env["MINFLOW_DSN"], "list", "--json")
    assert [r["id"] for r in ok_json(listed)] == [run_id]
    assert ok_json(cli(tmp_path, "list", "--json")) == []  # ./minflow.db is still empty


def test_help_on_every_command(capsys):
    parser = minflow._build_parser()
    commands = parser._subparsers._group_actions[0].choices
    paths = [[name] for name in commands] + [
        ["schedule", action]
        for action in commands["schedule"]._subparsers._group_actions[0].choices
    ]
    assert {"migrate", "submit", "list", "show", "cancel", "retry", "stats", "schedule"} <= set(
        commands
    ) and {"worker", "ticker", "demo", "serve"} <= set(commands)
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            minflow.main([*path, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert (
            text.startswith(f"usage: minflow {' '.join(path)}")
            and "--dsn" in text
            or (path == ["schedule"] and "ACTION" in text)
        ), path
    top = subprocess.run(
        [sys.executable, "-m", "minflow", "--help"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert top.returncode == 0 and "examples:" in top.stdout and "serve" in top.stdout


WORKER_MODULE = """
import minflow

app = minflow.App()


@app.handler("cli.echo.v1")
def echo(run):
    return run.payload
"""


def test_worker_command_serves_metrics_and_stops_on_sigterm(dsn, tmp_path):
    (tmp_path / "jobs.py").write_text(WORKER_MODULE)
    with minflow.Client(dsn) as client:
        client.migrate()
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "minflow",
                "worker",
                "jobs",
                "--dsn",
                dsn,
                "--worker-id",
                "cli-worker",
                "--no-schedules",
                "--metrics-port",
                str(port),
            ],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            run_id = client.submit("cli.echo.v1", {"hello": "world"})
            wait_for(lambda: client.get(run_id).status == "succeeded", message="the run")
            assert client.get(run_id).result == {"hello": "world"}

            def scrape():
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/metrics")
                    response = conn.getresponse()
                    return response.status == 200 and response.read().decode()
                except OSError:
                    return False

            line = (
                'workflow_run_claimed_total{workflow_type="cli.echo.v1",worker_id="cli-worker"} 1'
            )
            text = wait_for(lambda: (t := scrape()) and line in t and t, message="metrics")
            assert (
                'workflow_run_queue_depth{workflow_type="cli.echo.v1",status="pending"} 0' in text
            )
        finally:
            proc.terminate()  # SIGTERM, by pid
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "worker metrics on http://127.0.0.1:" in err and "cli-worker stopped" in err


def test_readme_command_lines_parse():
    """Every `python -m minflow ...` in the README's code blocks is accepted by the parser."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    blocks = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.S))
    lines = [line for line in blocks.splitlines() if "python -m minflow " in line]
    assert len(lines) >= 10
    parser = minflow._build_parser()
    for line in lines:
        command = line.split("python -m minflow ", 1)[1].split("|")[0]
        argv = shlex.split(command, comments=True)
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command line rejected: {line.strip()}")

"""The command line, run as users run it: ``python -m minflow ...`` in a subprocess."""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from conftest import ROOT, db, free_port, wait_for

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


# -- a vendored copy, a missing croniter, commands that must not create or migrate ----------


def test_a_vendored_copy_runs_its_own_cli(tmp_path):
    """python -m proj._vendor.minflow runs that copy, even with minflow installed beside it,
    and its worker command finds the App the user's module built with that copy."""
    vendor = tmp_path / "proj" / "_vendor"
    vendor.mkdir(parents=True)
    for package in (tmp_path / "proj", vendor):
        (package / "__init__.py").write_text("")
    source = (ROOT / "minflow.py").read_text()
    (vendor / "minflow.py").write_text(source.replace('"0.1.0"', '"0.1.0+vendored"', 1))
    (tmp_path / "proj" / "jobs.py").write_text(
        "from proj._vendor import minflow\n\napp = minflow.App()\n"
        "app.handler('t')(lambda run: 'vendored')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the installed minflow stays importable

    def vendored(*args):
        return subprocess.run(
            [sys.executable, "-m", "proj._vendor.minflow", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert ok(vendored("--version")).strip() == "minflow 0.1.0+vendored"
    run_id = ok(vendored("submit", "t")).strip()
    assert ok(vendored("worker", "proj.jobs", "--burst", "--no-schedules")) == "1 runs executed\n"
    assert ok_json(vendored("show", run_id, "--json"))["result"] == "vendored"


HIDE_CRONITER = """
import runpy, sys

class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "croniter":
            raise ImportError("No module named 'croniter'")

sys.meta_path.insert(0, Hide())
sys.argv[0] = "minflow"
runpy.run_module("minflow", run_name="__main__", alter_sys=True)
"""


def test_a_worker_without_croniter_switches_its_ticker_off_once(tmp_path):
    dsn = f"sqlite://{tmp_path / 'cron.db'}"
    with minflow.Client(dsn) as client:
        client.migrate()
        client.schedule("proc.record", cron="* * * * *")
        db(client, "UPDATE workflow_schedule SET next_run_at = '2000-01-01 00:00:00'")
        run_id = client.submit("proc.record")
    (tmp_path / "hide_croniter.py").write_text(HIDE_CRONITER)
    log = tmp_path / "worker.stderr"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINFLOW_TEST_RECORD_DIR": str(tmp_path)}
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "hide_croniter.py"), "worker", "tests.proc_app:app"]
            + ["--dsn", dsn],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        with minflow.Client(dsn) as client:
            wait_for(lambda: client.get(run_id).status == "succeeded", 30, 0.05, "the run")
        time.sleep(1.5)  # the ticker ticks every second: it would have complained again by now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
    text = log.read_text()
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "pip install croniter" in errors[0], text
    assert "housekeeping" not in text and "Traceback" not in text, text


INSPECTING = [
    ["list"],
    ["stats"],
    ["show", "01a2320c-3fe1-7a17-aa8f-abbadefd1042"],
    ["cancel", "01a2320c-3fe1-7a17-aa8f-abbadefd1042"],
    ["retry", "01a2320c-3fe1-7a17-aa8f-abbadefd1042"],
    ["schedule", "list"],
    ["schedule", "show", "01a2320c-3fe1-7a17-aa8f-abbadefd1042"],
    ["schedule", "pause", "01a2320c-3fe1-7a17-aa8f-abbadefd1042"],
    ["workers"],
    ["prune", "--older-than", "7d"],
    ["retry", "--all", "--yes"],
    ["cancel", "--all", "--yes"],
]


@pytest.mark.parametrize("args", INSPECTING, ids=lambda args: "-".join(args[:2]))
def test_inspecting_commands_never_create_a_database(tmp_path, args):
    one_line_error(cli(tmp_path, *args, "--dsn", "sqlite://typo.db"), 1, "typo.db does not exist")
    assert os.listdir(tmp_path) == []


def test_a_missing_three_slash_database_is_explained(tmp_path):
    missing = tmp_path / "nowhere.db"
    result = cli(tmp_path, "list", "--dsn", f"sqlite://{missing}")
    one_line_error(result, 1, "does not exist")
    assert f"sqlite://{str(missing).lstrip('/')}" in result.stderr  # the relative form
    assert not missing.exists()


def test_serve_binds_its_port_before_touching_the_database(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        result = cli(tmp_path, "serve", "--port", busy, "--dsn", "sqlite://fresh.db")
    one_line_error(result, 1, "cannot listen")
    assert os.listdir(tmp_path) == []  # nothing created, nothing migrated


def test_the_readme_example_and_the_cli_share_one_database(tmp_path):
    """The fifteen-line example saved as jobs.py: importing it does nothing, and the CLI's
    submit and worker use the same database as the example."""
    readme = (ROOT / "README.md").read_text()
    example = readme.split("## In fifteen lines", 1)[1].split("```python\n", 1)[1].split("```")[0]
    (tmp_path / "jobs.py").write_text(example)
    imported = subprocess.run(
        [sys.executable, "-c", "import jobs"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr
    assert not (tmp_path / "minflow.db").exists()  # importing submitted and ran nothing
    ok(cli(tmp_path, "migrate"))
    run_id = ok(cli(tmp_path, "submit", "billing.invoice.v1", '{"order": 43}')).strip()
    assert ok(cli(tmp_path, "worker", "jobs", "--burst")) == "1 runs executed\n"
    assert ok_json(cli(tmp_path, "show", run_id, "--json"))["result"] == {"invoiced": 43}


LOGGING_MODULE = """
import minflow

app = minflow.App()


@app.handler("cli.ok.v1")
def ok(run):
    return run.payload


@app.handler("cli.flaky.v1")
def flaky(run):
    raise ConnectionError("refused")
"""


def test_worker_logs_json_lines_naming_its_database(dsn, tmp_path):
    (tmp_path / "jobs.py").write_text(LOGGING_MODULE)
    secret_dsn = dsn.replace("postgres@", "postgres:s3cret@", 1)  # trust auth ignores it
    with minflow.Client(dsn) as client:
        client.migrate()
        ok_id = client.submit("cli.ok.v1", {"n": 1})
        flaky_id = client.submit("cli.flaky.v1", max_attempts=2)
    # Global options after the command (they were refused there once), and --backoff.
    result = cli(
        tmp_path,
        *("worker", "jobs", "--burst", "--no-schedules", "--worker-id", "cli-json"),
        *("--backoff", "fixed:0s", "--log-level", "debug", "--log-format", "json"),
        *("--dsn", secret_dsn),
    )
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    assert {"time", "level", "logger", "message"} <= set(records[0])
    started = next(r for r in records if " started on " in r["message"])
    if dsn.startswith("sqlite"):
        assert f"started on SQLite {tmp_path / 'minflow.db'}:" in started["message"]
    else:
        assert "started on PostgreSQL postgres://postgres:***@" in started["message"]
        assert "(schema t_" in started["message"]
    assert started["worker_id"] == "cli-json"
    finished = sorted((r["run_id"], r["attempt"], r["outcome"]) for r in records if "outcome" in r)
    assert finished == sorted(
        [(ok_id, 1, "succeeded"), (flaky_id, 1, "retrying"), (flaky_id, 2, "failed")]
    )
    line = next(r for r in records if r.get("outcome") == "succeeded")
    assert (line["type"], line["worker_id"], line["level"]) == ("cli.ok.v1", "cli-json", "INFO")
    with minflow.Client(dsn) as client:
        assert client.get(flaky_id).status == "failed"  # two attempts in one burst: fixed:0s


def test_global_options_before_or_after_the_command(tmp_path):
    dsn = f"sqlite:///{tmp_path / 'g.db'}"
    ok(cli(tmp_path, "migrate", "--dsn", dsn))
    for argv in (
        ["--log-level", "debug", "--log-format", "json", "list", "--dsn", dsn],
        ["list", "--log-level", "debug", "--log-format", "json", "--dsn", dsn],
        ["--dsn", dsn, "--log-format", "text", "stats", "--log-level", "error"],
    ):
        assert cli(tmp_path, *argv).returncode == 0, argv
    one_line_error(cli(tmp_path, "list", "--log-format", "xml", "--dsn", dsn), 2, "invalid choice")
    one_line_error(
        cli(tmp_path, "worker", "jobs", "--backoff", "linear:1s", "--dsn", dsn), 2, "fixed:DURATION"
    )


def test_backoff_specs_of_the_command_line():
    spec = minflow._backoff_arg
    assert spec("seed") is minflow.seed_backoff
    assert [spec("fixed:5s")(n) for n in (1, 2, 10)] == [5.0, 5.0, 5.0]
    exponential = spec("exponential:1s:10m")
    for attempt, full in ((1, 1.0), (2, 2.0), (4, 8.0), (11, 600.0), (10**6, 600.0)):
        samples = [exponential(attempt) for _ in range(100)]
        assert all(0.9 * full <= s <= full for s in samples), attempt
        assert min(samples) < full  # the jitter is there
    for bad in ("", "fixed", "fixed:soon", "exponential:1s", "exponential:10m:1s", "linear:1s"):
        with pytest.raises(argparse.ArgumentTypeError, match="fixed:DURATION"):
            spec(bad)

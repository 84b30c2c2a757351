"""Prometheus metrics: the exposition format, promtool, and values checked against the database."""

from __future__ import annotations

import datetime as dt
import http.client
import math
import re
import shutil
import subprocess
import threading
import time

import pytest
from conftest import REQUIRE_PG, db, wait_for

import minflow

UTC = dt.timezone.utc
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict:
    """Exposition text -> {(name, frozenset of (label, value)): float}; duplicates fail."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        pairs = frozenset(
            (k, re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), v))
            for k, v in _LABEL.findall(labels or "")
        )
        key = (name, pairs)
        assert key not in samples, f"duplicate series {line!r}"
        samples[key] = float(value)
    return samples


def value(samples: dict, name: str, **labels) -> float:
    """One series' value, 0 when absent (as a counter that never moved)."""
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        # .ci/run installs it (Debian package prometheus) and sets MINFLOW_REQUIRE_PG=1.
        if REQUIRE_PG:
            pytest.fail("promtool not installed (apt-get install prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and not result.stdout + result.stderr, (
        result.stdout + result.stderr
    )


def scrape(port: int) -> tuple[str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        return response.getheader("Content-Type"), response.read().decode()
    finally:
        conn.close()


def test_exposition_format_escapes_and_promtool_accepts_it():
    metrics = minflow._Metrics()
    tricky = 'a\\b"c\nd{e}=f,g'
    metrics.inc("workflow_run_claimed_total", workflow_type=tricky, worker_id="w")
    metrics.inc("workflow_run_claimed_total", 2, workflow_type="plain", worker_id="w")
    metrics.observe(
        "workflow_run_execution_duration_seconds",
        0.7,
        workflow_type=tricky,
        worker_id="w",
        status="succeeded",
    )
    metrics.set("workflow_worker_last_poll_timestamp", 1717171717.25, worker_id="w")
    text = metrics.render(
        {"workflow_run_queue_depth": {(("workflow_type", "x"), ("status", "pending")): math.nan}}
    )
    samples = parse(text)
    assert value(samples, "workflow_run_claimed_total", workflow_type=tricky, worker_id="w") == 1
    assert value(samples, "workflow_run_claimed_total", workflow_type="plain", worker_id="w") == 2
    assert 'workflow_worker_last_poll_timestamp{worker_id="w"} 1717171717.25\n' in text
    assert 'workflow_run_queue_depth{workflow_type="x",status="pending"} NaN\n' in text
    bucket = dict(
        workflow_type=tricky, worker_id="w", status="succeeded"
    )  # le="0.5" excludes 0.7, le="1" includes it, buckets are cumulative
    name = "workflow_run_execution_duration_seconds"
    assert value(samples, f"{name}_bucket", le="0.5", **bucket) == 0
    assert value(samples, f"{name}_bucket", le="1", **bucket) == 1
    assert value(samples, f"{name}_bucket", le="+Inf", **bucket) == 1
    assert value(samples, f"{name}_sum", **bucket) == 0.7
    # Every family has HELP and TYPE once, before its samples.
    assert text.count("# TYPE workflow_run_claimed_total counter\n") == 1
    assert text.index("# TYPE workflow_run_claimed_total") < text.index(
        "workflow_run_claimed_total{"
    )
    promtool_check(text)
    with pytest.raises(KeyError):
        metrics.inc("workflow_run_claimd_total")  # a typo fails loudly instead of vanishing
    with pytest.raises(KeyError):
        metrics.inc("workflow_run_claimed_total", workflow_type="t")  # so does a missing label
    # Labels come in the seed's declaration order, histograms' le last.
    assert 'workflow_run_claimed_total{workflow_type="plain",worker_id="w"} 2\n' in text
    assert 'status="succeeded",le="+Inf"} 1\n' in text
    assert minflow._Metrics().render() == ""


def test_worker_metrics_match_the_database_and_pass_promtool(app):
    release = threading.Event()
    started = threading.Event()
    app.handler("ok.v1")(lambda run: "done")

    @app.handler("flaky.v1")
    def flaky(run):
        if run.attempt == 1:
            raise ConnectionError("first attempt fails")
        return "second time lucky"

    @app.handler("bad.v1")
    def bad(run):
        raise ValueError("always fails")

    snoozed = set()

    @app.handler("snooze.v1")
    def snooze(run):
        if run.id not in snoozed:  # Retry gives the attempt back, so run.attempt stays 1
            snoozed.add(run.id)
            raise minflow.Retry(0)  # a requested retry: completed as pending, not a failure
        return "woke up"

    @app.handler("slow.v1")
    def slow(run):
        started.set()
        release.wait(30)

    worker = minflow.Worker(
        app, worker_id="w-metrics", backoff=lambda attempt: 0.0, schedules=False, poll_interval=0.05
    )
    server = minflow._serve_metrics(worker, "127.0.0.1", 0)
    port = server.server_address[1]
    worker.start()
    try:
        ids = app.submit_many(
            [minflow.Job("ok.v1") for _ in range(3)]
            + [minflow.Job("flaky.v1") for _ in range(2)]
            + [minflow.Job("bad.v1", max_attempts=2), minflow.Job("snooze.v1")]
        )
        wait_for(
            lambda: all(app.get(i).status in ("succeeded", "failed") for i in ids),
            message="the workload to finish",
        )
        # The database's audit trail is the truth the counters must agree with.
        events = {i: [e.event_type for e in app.events(i)] for i in ids}
        runs = {i: app.get(i) for i in ids}

        def expected():
            want = {}
            for run_id, kinds in events.items():
                run_type = runs[run_id].type
                labels = (("worker_id", "w-metrics"), ("workflow_type", run_type))
                for name, kind in (
                    ("workflow_run_claimed_total", "leased"),
                    (("workflow_run_completed_total", "succeeded"), "succeeded"),
                    (("workflow_run_completed_total", "pending"), "retried"),
                    (("workflow_run_completed_total", "failed"), "failed"),
                ):
                    if isinstance(name, tuple):
                        key = (name[0], frozenset((*labels, ("status", name[1]))))
                    else:
                        key = (name, frozenset(labels))
                    want[key] = want.get(key, 0.0) + kinds.count(kind)
                if runs[run_id].status == "failed":
                    key = ("workflow_run_failed_total", frozenset(labels))
                    want[key] = want.get(key, 0.0) + 1
            return {k: v for k, v in want.items() if v}

        want = expected()
        assert (
            want[
                (
                    "workflow_run_claimed_total",
                    frozenset({("worker_id", "w-metrics"), ("workflow_type", "flaky.v1")}),
                )
            ]
            == 4
        )  # a sanity check on the workload itself
        # Counters are updated just after the outcome commits: poll until they agree.
        wait_for(
            lambda: all(parse(scrape(port)[1]).get(k) == v for k, v in want.items()),
            message="counters equal to the event counts",
        )

        # Now a queue: two due runs nobody handles, one delayed run, one running handler.
        app.submit("other.v1")
        app.submit("other.v1")
        app.submit("ok.v1", run_in=3600)
        slow_id = app.submit("slow.v1")
        assert started.wait(15)
        content_type, text = scrape(port)
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        samples = parse(text)
        stats = app.stats()
        for run_type, by_status in stats.items():
            for status in ("pending", "leased"):
                got = value(
                    samples, "workflow_run_queue_depth", workflow_type=run_type, status=status
                )
                assert got == by_status.get(status, 0), (run_type, status)
        assert (
            value(samples, "workflow_run_queue_depth", workflow_type="other.v1", status="pending")
            == 2
        )
        assert (
            value(samples, "workflow_run_queue_depth", workflow_type="slow.v1", status="leased")
            == 1
        )
        # Handled types with an empty queue still have a series (0), so alerts see a value.
        assert (
            "workflow_run_queue_depth",
            frozenset({("workflow_type", "bad.v1"), ("status", "pending")}),
        ) in samples
        age = "workflow_run_oldest_pending_age_seconds"
        assert value(samples, age, workflow_type="ok.v1") == 0  # pending but not due yet
        assert 0 <= value(samples, age, workflow_type="other.v1") < 60
        assert value(samples, "workflow_worker_running", worker_id="w-metrics") == 1
        assert value(samples, "workflow_database_up") == 1
        assert value(samples, "workflow_worker_uptime_seconds", worker_id="w-metrics") > 0
        last_poll = value(samples, "workflow_worker_last_poll_timestamp", worker_id="w-metrics")
        assert abs(last_poll - time.time()) < 60
        assert value(samples, "workflow_worker_poll_cycle_total", worker_id="w-metrics") > 0
        for failures, attempt in ((2, "1"), (0, "2")):
            assert (
                value(
                    samples,
                    "workflow_run_failed_attempts_total",
                    workflow_type="flaky.v1",
                    worker_id="w-metrics",
                    attempt=attempt,
                )
                == failures
            )
        assert (
            value(
                samples,
                "workflow_run_failed_attempts_total",
                workflow_type="bad.v1",
                worker_id="w-metrics",
                attempt="2",
            )
            == 1
        )
        histogram = dict(workflow_type="ok.v1", worker_id="w-metrics", status="succeeded")
        assert value(samples, "workflow_run_execution_duration_seconds_count", **histogram) == 3
        promtool_check(text)
    finally:
        release.set()
        worker.stop(timeout=15)
        server.shutdown()
        server.server_close()
    assert app.get(slow_id).status == "succeeded"


def test_poll_errors_and_rescues_are_counted(app):
    app.handler("t")(lambda run: run.attempt)
    stranded = app.submit("t")
    # A run whose worker died while holding it: the new worker's sweep rescues it.
    db(
        app,
        "UPDATE workflow_run SET status = 'leased', attempt = 1, leased_by = 'dead', "
        "lease_until = {time:t} WHERE id = {uuid:id}",
        id=stranded,
        t=dt.datetime.now(UTC) - dt.timedelta(seconds=5),
    )
    worker = minflow.Worker(app, worker_id="w-err", schedules=False, poll_interval=0.02)
    worker.start()
    try:
        wait_for(lambda: app.get(stranded).status == "succeeded", message="the rescued run")
        assert (
            worker.metrics.value("workflow_run_rescued_total", worker_id="w-err", status="pending")
            == 1
        )
        # The table disappears under the worker: every poll fails, and is counted.
        db(app, "ALTER TABLE workflow_run RENAME TO workflow_run_gone")
        try:
            wait_for(
                lambda: "workflow_worker_poll_errors_total" in worker.metrics.render(),
                message="a poll error to be counted",
            )
        finally:
            db(app, "ALTER TABLE workflow_run_gone RENAME TO workflow_run")
        errors = parse(worker.metrics.render())
        assert (
            sum(v for (n, _), v in errors.items() if n == "workflow_worker_poll_errors_total") >= 1
        )
        # ...and the worker carries on once the database is back.
        after = app.submit("t")
        wait_for(lambda: app.get(after).status == "succeeded", message="recovery")
    finally:
        worker.stop(timeout=15)

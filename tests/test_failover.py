"""PostgreSQL that refuses writes (a failover's leftover, a standby) and links that go silent
without closing (a pulled cable, a frozen VM): workers, the client and the HTTP server treat
both as unavailability, log it once per outage, and recover by themselves.

Each test has its own cluster (``private_pg``) and, for the half-open link, a TCP proxy that
stops forwarding without closing anything (``tcp_proxy``).
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import socket
import threading
import time

import pytest
from conftest import PG_DSN, require_pg, wait_for, with_query

import minflow

pytestmark = pytest.mark.slow


class Api:
    """``_Server`` on a free port against ``client``, and a tiny HTTP client for it."""

    def __init__(self, client: minflow.Client):
        self.server = minflow._Server("127.0.0.1", 0, client)
        self.thread = minflow._start_server(self.server, poll_interval=0.02)

    def call(self, method: str, path: str, body=None) -> tuple[int, dict, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.server_address[1], timeout=30)
        try:
            conn.request(method, path, None if body is None else json.dumps(body))
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), json.loads(response.read())
        finally:
            conn.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def gauge(worker: minflow.Worker, name: str) -> float:
    return worker.metrics.value(name, worker_id=worker.worker_id)


def poll_errors(worker: minflow.Worker) -> float:
    return worker.metrics.value(
        "workflow_worker_poll_errors_total", worker_id=worker.worker_id, error_type="unavailable"
    )


def outage_lines(records, component: str) -> tuple[list[str], list[str]]:
    """(warnings, recoveries) minflow logged about ``component``'s database."""
    mine = [r for r in records if r.getMessage().startswith(f"{component}: database")]
    return (
        [r.getMessage() for r in mine if r.levelno == logging.WARNING],
        [r.getMessage() for r in mine if "available again" in r.getMessage()],
    )


def test_read_only_database_mid_drain(private_pg, caplog):
    """The database turns read-only (as a demoted primary) while two workers drain: every
    write path answers Unavailable, /healthz and the REST API say 503, each worker logs the
    outage once and its end once, and the drain resumes when writes work: nothing lost,
    nothing run twice."""
    caplog.set_level(logging.INFO, logger="minflow")
    # Enough that the drain is still under way when the gate closes, with each worker
    # claiming up to concurrency + prefetch runs per round trip.
    total = 3000
    app = minflow.App(private_pg.dsn + "?schema=ro")
    app.migrate()
    lock, executions = threading.Lock(), collections.Counter()
    gate = threading.Event()
    gate.set()

    @app.handler("t")
    def handler(run):
        with lock:
            executions[run.id] += 1
        if not gate.wait(30):
            raise TimeoutError("gate never reopened")

    ids = app.submit_many([minflow.Job("t", {"n": n}) for n in range(total)])
    workers = [
        minflow.Worker(app, concurrency=4, worker_id=f"ro-{n}", schedules=False) for n in (1, 2)
    ]
    api = Api(app)

    def succeeded() -> int:
        return app.stats().get("t", {}).get("succeeded", 0)

    try:
        for worker in workers:
            worker.start()
        wait_for(lambda: succeeded() >= 40, 30, message="the drain to be under way")
        gate.clear()  # handlers in flight now finish only once the database refuses writes
        private_pg.read_only(True)
        refused = time.monotonic()
        gate.set()
        wait_for(
            lambda: all(gauge(w, "workflow_worker_database_up") == 0 for w in workers),
            30,
            message="both workers to notice",
        )
        status, headers, body = api.call("GET", "/healthz")
        assert (status, headers["Retry-After"]) == (503, "1")
        assert body == {
            "error": "database read-only: the server refuses writes "
            "(default_transaction_read_only is on)"
        }
        status, headers, body = api.call("POST", "/api/v1/workflows", {"type": "t"})
        assert (status, headers["Retry-After"], body) == (
            503,
            "1",
            {"error": "database unavailable"},
        )
        with pytest.raises(minflow.Unavailable, match="read-only"):
            app.submit("t")
        # Several failed attempts each (backoff), still one warning each.
        wait_for(lambda: all(poll_errors(w) >= 6 for w in workers), 30, message="retries")
        stalled = succeeded()
        private_pg.read_only(False)
        writable = time.monotonic()
        outage = writable - refused
        wait_for(lambda: succeeded() > stalled, 30, 0.01, "the drain to resume")
        resumed = time.monotonic() - writable
        wait_for(lambda: succeeded() == total, 60, 0.05, "every run to succeed")
        assert api.call("GET", "/healthz")[::2] == (200, {"status": "ok"})
        wait_for(lambda: all(gauge(w, "workflow_worker_database_up") == 1 for w in workers), 30)
    finally:
        gate.set()
        for worker in workers:
            worker.stop(timeout=30)
        api.close()
        private_pg.read_only(False)
    assert app.stats() == {"t": {"succeeded": total}}
    assert set(executions) == set(ids) and set(executions.values()) == {1}  # nothing run twice
    for worker in workers:
        warnings, recoveries = outage_lines(caplog.records, worker.worker_id)
        assert len(warnings) == 1 and "read-only (25006)" in warnings[0], warnings
        assert len(recoveries) == 1, recoveries
        assert (
            worker.metrics.value(
                "workflow_worker_database_outages_total", worker_id=worker.worker_id
            )
            == 1
        )
    http_warnings = [
        r for r in caplog.records if r.name == "minflow.http" and r.levelno >= logging.WARNING
    ]
    assert len(http_warnings) == 1, [r.getMessage() for r in http_warnings]
    print(
        f"\n  read-only for {outage:.1f}s: drain resumed {resumed:.2f}s after writes returned; "
        f"{poll_errors(workers[0]):.0f} and {poll_errors(workers[1]):.0f} failed polls, "
        "1 warning + 1 recovery line per worker"
    )
    app.close()


def test_a_silent_link_is_given_up_within_the_socket_timeout(private_pg, tcp_proxy):
    """Nothing moves on the link and nothing closes it: a call fails with Unavailable after
    the DSN's timeout, as does a new connection through it, and the client works again once
    the link does."""
    proxy = tcp_proxy(private_pg.port)
    with minflow.Client(proxy.dsn(private_pg.dsn) + "?schema=silent&timeout=1") as client:
        client.migrate()
        run_id = client.submit("t")
        proxy.freeze()
        for _ in range(2):  # the pooled connection's read, then a new connection's start-up
            started = time.monotonic()
            with pytest.raises(minflow.Unavailable):
                client.get(run_id)
            assert 0.9 < time.monotonic() - started < 5
        proxy.thaw()
        assert client.get(run_id).status == "pending"


def test_keepalive_on_every_postgres_socket():
    """Links that only TCP can see die are noticed in seconds, not after the OS's two hours."""
    require_pg()
    client = minflow.Client(with_query(PG_DSN, timeout=7))
    with client._pool.connection() as conn:
        sock = conn.raw._usock
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            idle, interval, probes = minflow.PG_KEEPALIVE
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == idle
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == interval
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == probes
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7000
        assert sock.gettimeout() == 7
    client.close()


def test_half_open_link_runs_taken_over_and_late_outcomes_fenced(private_pg, tcp_proxy, caplog):
    """Worker A reaches the database through a link that freezes mid-run; worker B is direct.
    B takes A's runs over once their leases expire, A's outcomes arriving after the thaw change
    nothing, and A is back to claiming within its documented bound (socket timeout + 5 s
    backoff after the link returns)."""
    caplog.set_level(logging.INFO, logger="minflow")
    lease, timeout, runs = 2.0, 2.0, 4
    proxy = tcp_proxy(private_pg.port)
    direct = private_pg.dsn + "?schema=halfopen"
    app_a = minflow.App(proxy.dsn(private_pg.dsn) + f"?schema=halfopen&timeout={timeout:g}")
    app_b = minflow.App(direct)
    app_a.migrate()
    started_a, gate_a = threading.Semaphore(0), threading.Event()

    @app_a.handler("t")
    def slow(run):
        started_a.release()
        if not gate_a.wait(60):
            raise TimeoutError("gate never opened")
        return {"by": "A"}

    @app_b.handler("t")
    def quick(run):
        return {"by": "B"}

    ids = app_b.submit_many([minflow.Job("t", {"n": n}) for n in range(runs)])
    worker_a = minflow.Worker(app_a, concurrency=runs, lease=lease, worker_id="A", schedules=False)
    worker_b = minflow.Worker(app_b, lease=lease, worker_id="B", schedules=False)
    try:
        worker_a.start()
        for _ in range(runs):
            assert started_a.acquire(timeout=30), "A did not claim every run"
        proxy.freeze()
        frozen = time.monotonic()
        worker_b.start()
        wait_for(lambda: app_b.stats() == {"t": {"succeeded": runs}}, 30, 0.05, "B to take over")
        takeover = time.monotonic() - frozen
        # A sees the link dead through its deadlines alone (heartbeat, claim, LISTEN probe).
        wait_for(lambda: gauge(worker_a, "workflow_worker_database_up") == 0, timeout + 5)
        noticed = time.monotonic() - frozen
        gate_a.set()  # A's handlers finish; their outcomes wait for the link
        wait_for(lambda: worker_a.running == 0, 10, message="A's handlers to return")
        polled = worker_a.metrics.value("workflow_worker_last_poll_timestamp", worker_id="A")
        proxy.thaw()
        thawed = time.monotonic()
        lost = {"workflow_type": "t", "worker_id": "A", "status": "lost"}
        wait_for(
            lambda: worker_a.metrics.value("workflow_run_completed_total", **lost) == runs,
            timeout + 10,
            0.05,
            "A's late outcomes to be fenced off",
        )
        wait_for(
            lambda: (
                worker_a.metrics.value("workflow_worker_last_poll_timestamp", worker_id="A")
                > max(polled, time.time() - 1)
            ),
            timeout + 10,
            0.05,
            "A to poll again",
        )
        recovered = time.monotonic() - thawed
    finally:
        gate_a.set()
        proxy.thaw()
        worker_a.stop(timeout=30)
        worker_b.stop(timeout=30)
    for run_id in ids:
        run = app_b.get(run_id)
        assert run.status == "succeeded" and run.result == {"by": "B"}
        kinds = [e.event_type for e in app_b.events(run_id)]
        assert kinds.count("succeeded") == 1 and kinds.count("retried") == 1, kinds
    assert takeover < lease + max(0.5, lease / 2) + 5  # lease + rescue sweep, with slack
    assert noticed < lease / 3 + timeout + 3  # a heartbeat's deadline, with slack
    assert recovered < timeout + 5 + 3
    warnings, _ = outage_lines(caplog.records, "A")
    assert len(warnings) == 1, warnings
    print(
        f"\n  half-open: A noticed {noticed:.1f}s and B took over {takeover:.1f}s after the "
        f"freeze (lease {lease:g}s, socket timeout {timeout:g}s); A polled again "
        f"{recovered:.1f}s after the thaw"
    )
    app_a.close()
    app_b.close()

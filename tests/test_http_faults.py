"""The HTTP server under hostile or broken clients: slow senders, floods of idle connections,
ambiguous framing and requests that are not HTTP/1.x, all over real sockets.

Most tests run the server in-process (as in ``test_http.py``); the slow-client attack runs
``python -m minflow serve`` in a child process, so that its threads and file descriptors can be
counted from ``/proc`` apart from the test's own.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, free_port, wait_for
from infra import stop_process
from test_http import Api, raw_exchange

import minflow

API = "/api/v1"


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    """Read until the server closes: (status, JSON body)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# -- slow clients ------------------------------------------------------------------------------


@contextlib.contextmanager
def stalled(port: int, count: int, data: bytes):
    """``count`` connections that send ``data`` and then nothing more."""
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            socks[-1].sendall(data)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_slow_heads_take_no_thread_and_get_408(sqlite_client):
    api = Api(sqlite_client, threads=2, request_timeout=3.0)
    # Five clients that stop halfway through the request line: with two handler threads, they
    # used to take both and leave everyone else a 503 for the whole time limit.
    try:
        with stalled(api.port, 5, b"GET /healthz HT") as slow:
            started = time.monotonic()
            for _ in range(5):
                assert api.call("GET", "/healthz")[::2] == (200, {"status": "ok"})
            assert time.monotonic() - started < 3.0  # all before the slow ones' deadline
            # At the deadline each slow client is told why it is cut off.
            for sock in slow:
                status, body = read_answer(sock)
                assert status == 408 and "time limit" in body["error"]
            assert time.monotonic() - started < 8.0
    finally:
        api.close()


def test_all_threads_busy_answers_503_at_once(sqlite_client):
    api = Api(sqlite_client, threads=2, request_timeout=1.5)
    # A complete head takes a thread, which then waits for a body that never comes.
    head = b"POST /api/v1/workflows HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"
    try:
        with stalled(api.port, 2, head) as slow:
            wait_for(lambda: api.call("GET", "/healthz")[0] == 503, message="threads taken")
            started = time.monotonic()
            status, headers, body = api.call("GET", "/healthz")
            assert status == 503 and headers["Retry-After"] == "1" and "busy" in body["error"]
            assert time.monotonic() - started < 1.0  # at once, not after the slow ones' deadline
            # The body's deadline frees both threads, with a 408 to each slow client.
            for sock in slow:
                status, body = read_answer(sock)
                assert status == 408 and "time limit" in body["error"]
        wait_for(lambda: api.call("GET", "/healthz")[0] == 200, message="threads freed")
    finally:
        api.close()
    assert sqlite_client.list() == []


def test_pending_connections_are_bounded_oldest_dropped_first(sqlite_client):
    api = Api(sqlite_client, pending=4)
    try:
        with stalled(api.port, 6, b"") as idle:
            # Accepting the fifth and sixth pushed out the first two, closed without an answer.
            for sock in idle[:2]:
                assert sock.recv(1024) == b""
            # A normal request is still served (pushing out the next oldest in turn).
            assert api.call("GET", "/healthz")[0] == 200
            assert idle[2].recv(1024) == b""
            for sock in idle[3:]:
                sock.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    sock.recv(1024)  # still held, waiting for its head
    finally:
        api.close()


class Trickle(threading.Thread):
    """``count`` connections that each send one more byte of a never-ending request head every
    ``interval`` seconds, all driven by this one thread; one the server closes is replaced."""

    HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "

    def __init__(self, port: int, count: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.port, self.count, self.interval = port, count, interval
        self.stop = threading.Event()
        self.sockets: dict[socket.socket, int] = {}  # -> bytes sent
        self.replaced = 0

    def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))
        self.sockets[sock] = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for sock, sent in list(self.sockets.items()):
                try:
                    sock.recv(1024)
                except BlockingIOError:  # nothing from the server: still held
                    try:
                        self.sockets[sock] = sent + sock.send(self.HEAD[sent : sent + 1] or b"a")
                    except BlockingIOError:
                        pass  # still connecting
                    except OSError:
                        self.replace(sock)
                except OSError:
                    self.replace(sock)
                else:  # an answer, or the end of the connection: the server let go of it
                    self.replace(sock)
            while len(self.sockets) < self.count:
                self.connect()
            self.stop.wait(self.interval)
        for sock in self.sockets:
            sock.close()

    def replace(self, sock: socket.socket) -> None:
        sock.close()
        del self.sockets[sock]
        self.replaced += 1


def timed_call(port: int, method: str, path: str, body: str | None = None) -> tuple[int, float]:
    """(status, seconds) of one request on a new connection."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        response.read()
        return response.status, time.monotonic() - started
    finally:
        conn.close()


def test_trickling_clients_do_not_delay_normal_requests(tmp_path):
    """A slowloris attack (300 heads sent one byte per 100 ms) on ``minflow serve`` with its
    defaults: 100 normal requests meanwhile are each answered 2xx within 1 s, and the server's
    threads and file descriptors stay within the bounds the README states."""
    dsn = f"sqlite:///{tmp_path / 'slow.db'}?synchronous=normal"
    port = free_port()
    trickle = Trickle(port, 300)

    def healthy() -> bool:
        try:
            return timed_call(port, "GET", "/healthz")[0] == 200
        except OSError:
            return False

    # A log file, not a pipe: a pipe nobody reads would fill up and block the server.
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minflow", "serve", "--dsn", dsn, "--port", str(port)],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=log,
        )

        def count(what: str) -> int:
            return len(os.listdir(f"/proc/{proc.pid}/{what}"))

        try:
            wait_for(healthy, message="the server to answer")
            for _ in range(5):  # warm up: database connections open, code paths run once
                assert timed_call(port, "POST", f"{API}/workflows", '{"type": "warm.v1"}')[0] == 201
            threads, fds = count("task"), count("fd")

            trickle.start()
            wait_for(lambda: count("fd") >= fds + 250, message="the server to hold them")
            answers, peak_threads, peak_fds = [], threads, fds
            for i in range(100):
                if i % 2:
                    body = '{"type": "normal.v1"}'
                    answers.append(timed_call(port, "POST", f"{API}/workflows", body))
                else:
                    answers.append(timed_call(port, "GET", "/healthz"))
                peak_threads = max(peak_threads, count("task"))
                peak_fds = max(peak_fds, count("fd"))
        finally:
            trickle.stop.set()
            trickle.join(10)
            stop_process(proc)
    latencies = sorted(seconds for _, seconds in answers)
    print(
        f"\nnormal requests during the attack: max {latencies[-1] * 1000:.1f} ms, "
        f"p99 {latencies[98] * 1000:.1f} ms; threads {threads} -> peak {peak_threads}; "
        f"fds {fds} -> peak {peak_fds}; slow connections replaced {trickle.replaced}"
    )
    assert all(200 <= status < 300 for status, _ in answers), answers
    assert latencies[-1] < 1.0, latencies[-10:]
    # The README's bounds at the defaults: 32 handler threads and, in sockets, 256 connections
    # still sending their head plus 32 in flight.
    assert peak_threads <= threads + minflow.DEFAULT_HTTP_THREADS
    assert peak_fds <= fds + 256 + minflow.DEFAULT_HTTP_THREADS
    assert trickle.replaced > 0  # 300 > 256: the oldest were pushed out, and came back
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    with minflow.Client(dsn) as client:
        assert len(client.list(type="normal.v1")) == 50


# -- framing and protocol errors ---------------------------------------------------------------

SUBMIT = b'{"type": "t"}'
POST = b"POST /api/v1/workflows HTTP/1.1\r\nHost: x\r\n"
BAD_REQUESTS = [
    # Two lengths: a proxy in front may frame the body by the other one (request smuggling).
    (POST + b"Content-Length: 13\r\nContent-Length: 14\r\n\r\n" + SUBMIT, 400, "conflicting"),
    (POST + b"Content-Length: 13, 1\r\n\r\n" + SUBMIT, 400, "conflicting"),
    (POST + b"Content-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n" + SUBMIT, 400, "Transfer"),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, "chunked"),
    # http.server's parser would drop this header, and every header after it.
    (POST + b"Content-Length : 13\r\n\r\n" + SUBMIT, 400, "malformed header"),
    (POST + b"Content-Length: 13\r\n 0\r\n\r\n" + SUBMIT, 400, "malformed header"),
    (POST + "Content-Length: ²\r\n\r\n".encode("latin-1"), 400, "Content-Length"),  # was a 500
    (POST + b"Content-Length:\r\n\r\n", 400, "Content-Length"),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request line"),
    (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "request head"),
    (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", 505, "HTTP version"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00", 505, "HTTP version"),
    (b"GET /healthz HTTP/x\r\nHost: x\r\n\r\n", 400, "version"),
    (b"HELLO\r\n\r\n", 400, "syntax"),
    (b"GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "request target"),
]


def test_framing_and_protocol_errors_get_json_answers_without_tracebacks(sqlite_client, caplog):
    api = Api(sqlite_client)
    try:
        with caplog.at_level(logging.DEBUG, logger="minflow.http"):
            for raw, expected, needle in BAD_REQUESTS:
                status, body = raw_exchange(api.port, raw)
                assert (status, needle in body["error"]) == (expected, True), (raw[:60], body)
            # The same length twice, as two headers or as a list, is one length.
            for lengths in (
                b"Content-Length: 13\r\nContent-Length: 13\r\n",
                b"Content-Length: 13, 13\r\n",
            ):
                status, body = raw_exchange(api.port, POST + lengths + b"\r\n" + SUBMIT)
                assert status == 201, body
    finally:
        api.close()
    assert [r.type for r in sqlite_client.list()] == ["t", "t"]  # nothing from the bad ones
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not problems, [r.getMessage() for r in problems]
    logged = [r.getMessage() for r in caplog.records if r.name == "minflow.http"]
    assert any('"PRI * HTTP/2.0" 505' in line for line in logged), logged
    assert all(len(line) < 1000 for line in logged)  # the 70,000-byte line is cut

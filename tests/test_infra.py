"""The test suite's own infrastructure works against the real components: the environment scrub,
pgbouncer, the TCP proxy, the read-only switch and the browser (see ``infra.py``).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pg8000.exceptions
import pytest

import infra
from conftest import ROOT

slow = pytest.mark.slow


def sqlstate(exc: BaseException) -> str | None:
    args = getattr(exc, "args", ())
    return args[0].get("C") if args and isinstance(args[0], dict) else None


# -- the developer's environment ----------------------------------------------------------------


def test_scrub_keeps_only_the_suites_own_settings():
    environ = {
        "MINFLOW_API_KEY": "secret",
        "MINFLOW_DSN": "sqlite://somewhere.db",
        "MINFLOW_ANYTHING_NEW": "1",
        "MINFLOW_TEST_PG_DSN": "postgres://postgres@127.0.0.1:5432/test",
        "MINFLOW_REQUIRE_PG": "1",
        "MINFLOW_REQUIRE_BROWSER": "1",
        "PATH": "/usr/bin",
    }
    removed = infra.scrub_environment(environ)
    assert removed == ["MINFLOW_ANYTHING_NEW", "MINFLOW_API_KEY", "MINFLOW_DSN"]
    assert set(environ) == {
        "MINFLOW_TEST_PG_DSN",
        "MINFLOW_REQUIRE_PG",
        "MINFLOW_REQUIRE_BROWSER",
        "PATH",
    }


def test_no_developer_minflow_variable_reaches_a_test():
    leaked = [
        name
        for name in os.environ
        if name.startswith("MINFLOW_") and not name.startswith(infra.KEPT_PREFIXES)
    ]
    assert leaked == []


@slow
def test_exported_minflow_settings_do_not_change_the_suite():
    # Both tests below failed with MINFLOW_API_KEY exported (the worker's /metrics answered 401).
    tests = [
        "tests/test_cli.py::test_worker_command_serves_metrics_and_stops_on_sigterm[sqlite]",
        "tests/test_metrics.py::test_worker_metrics_match_the_database_and_pass_promtool[sqlite]",
        "tests/test_infra.py::test_no_developer_minflow_variable_reaches_a_test",
    ]
    env = {
        **os.environ,
        "MINFLOW_API_KEY": "x",
        "MINFLOW_DSN": "sqlite://nonexistent/dir/x.db",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Without promtool the metrics test skips (outside CI); it must never fail.
    expected = "3 passed" if shutil.which("promtool") else "2 passed, 1 skipped"
    assert result.returncode == 0 and expected in result.stdout, result.stdout + result.stderr


# -- pgbouncer ------------------------------------------------------------------------------------


@slow
def test_pgbouncer_pools_transactions_onto_few_server_connections(pgbouncer):
    bouncer = pgbouncer(default_pool_size=1)
    assert bouncer.dsn == f"postgres://postgres@127.0.0.1:{bouncer.port}/postgres"
    first, second = infra.pg_connect(bouncer.dsn), infra.pg_connect(bouncer.dsn)
    try:
        first.run("CREATE TABLE t (n int)")
        backends = set()
        for conn, n in ((first, 1), (second, 2), (first, 3), (second, 4)):
            conn.run("BEGIN")
            conn.run("INSERT INTO t VALUES (:n)", n=n)
            backends.add(conn.run("SELECT pg_backend_pid()")[0][0])
            conn.run("COMMIT")
        assert second.run("SELECT array_agg(n ORDER BY n) FROM t") == [[[1, 2, 3, 4]]]
        # Two clients, one server connection: the pool size bounds what the server sees.
        assert len(backends) == 1
        assert bouncer.server_connections() == 1
        pool = next(p for p in bouncer.show("POOLS") if p["database"] == "postgres")
        assert pool["pool_mode"] == "transaction" and pool["cl_active"] == 2
    finally:
        first.close()
        second.close()


@slow
def test_pgbouncer_refuses_a_search_path_startup_parameter(pgbouncer):
    bouncer = pgbouncer()
    with pytest.raises(pg8000.exceptions.DatabaseError) as caught:
        infra.pg_connect(bouncer.dsn, startup_params={"search_path": "app"})
    assert sqlstate(caught.value) == "08P01"
    assert "unsupported startup parameter: search_path" in str(caught.value)
    # With the parameter ignored, as some users configure it, the same connection gets in.
    lenient = pgbouncer(ignore_startup_parameters="search_path")
    conn = infra.pg_connect(lenient.dsn, startup_params={"search_path": "app"})
    try:
        assert conn.run("SELECT 1") == [[1]]
    finally:
        conn.close()


def test_pgbouncer_stops_by_pid_and_removes_its_directory(pgbouncer):
    bouncer = pgbouncer()
    pid, base = bouncer.pid, bouncer.base
    assert (base / "pgbouncer.ini").exists()
    assert "pool_mode = transaction" in (base / "pgbouncer.ini").read_text()
    assert "ignore_startup_parameters" not in (base / "pgbouncer.ini").read_text()
    bouncer.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not base.exists()


# -- TCP proxy ------------------------------------------------------------------------------------


@slow
def test_proxy_forwards_postgres(private_pg, tcp_proxy):
    proxy = tcp_proxy(private_pg.port)
    conn = infra.pg_connect(proxy.dsn(private_pg.dsn))
    try:
        big = "x" * 300_000  # more than one socket buffer, both ways
        assert conn.run("SELECT :s::text = :s::text, length(:s::text)", s=big) == [[True, 300_000]]
        assert conn.run("SELECT :s::text", s=big) == [[big]]
        assert proxy.open_connections == 1 and proxy.accepted == 1
    finally:
        conn.close()
    infra.wait_for(lambda: proxy.open_connections == 0, timeout=5, message="the link to close")


def test_proxy_delivers_last_words_before_a_close_in_either_direction(tcp_proxy):
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        peer, _ = listener.accept()
        with peer:
            request = b""
            while chunk := peer.recv(1024):  # until the client's half-close
                request += chunk
            peer.sendall(b"got " + request)  # then answer, and close

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    proxy = tcp_proxy(listener.getsockname()[1])
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            client.sendall(b"ping")
            client.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := client.recv(1024):
                reply += chunk
        assert reply == b"got ping"  # the answer, then a clean end of stream
    finally:
        thread.join(5)
        listener.close()


@slow
def test_frozen_proxy_is_silence_until_thawed(private_pg, tcp_proxy):
    proxy = tcp_proxy(private_pg.port)
    conn = infra.pg_connect(proxy.dsn(private_pg.dsn), timeout=1)
    assert conn.run("SELECT 1") == [[1]]
    proxy.freeze()
    started = time.monotonic()
    # pg8000 lets the socket's TimeoutError through (some versions wrap it in InterfaceError).
    with pytest.raises((TimeoutError, pg8000.exceptions.InterfaceError)) as caught:
        conn.run("SELECT 2")
    waited = time.monotonic() - started
    assert isinstance(caught.value, TimeoutError) or isinstance(
        caught.value.__cause__, TimeoutError
    )
    assert 0.9 <= waited < 5, waited  # the socket timeout, not an error and not a hang
    assert proxy.open_connections == 1  # still open: half-open, not closed
    # A new connection's handshake completes but its start-up gets no answer either.
    with pytest.raises((TimeoutError, pg8000.exceptions.InterfaceError)):
        infra.pg_connect(proxy.dsn(private_pg.dsn), timeout=1)
    proxy.thaw()
    fresh = infra.pg_connect(proxy.dsn(private_pg.dsn), timeout=5)
    try:
        assert fresh.run("SELECT 3") == [[3]]
    finally:
        fresh.close()


@slow
@pytest.mark.parametrize("reset", [True, False], ids=["rst", "fin"])
def test_cut_breaks_existing_connections_and_keeps_listening(private_pg, tcp_proxy, reset):
    proxy = tcp_proxy(private_pg.port)
    conns = [infra.pg_connect(proxy.dsn(private_pg.dsn), timeout=5) for _ in range(2)]
    assert [c.run("SELECT 1") for c in conns] == [[[1]], [[1]]]
    assert proxy.cut(reset=reset) == 2
    for conn in conns:
        started = time.monotonic()
        with pytest.raises(pg8000.exceptions.InterfaceError):
            conn.run("SELECT 1")
        assert time.monotonic() - started < 1  # broken at once, no timeout needed
    after = infra.pg_connect(proxy.dsn(private_pg.dsn), timeout=5)
    try:
        assert after.run("SELECT 4") == [[4]]
    finally:
        after.close()


def test_proxy_dsn_keeps_everything_but_the_address(tcp_proxy):
    proxy = tcp_proxy(5432)
    assert (
        proxy.dsn("postgres://app:s3cret@db.internal:6543/jobs?schema=acc")
        == f"postgres://app:s3cret@127.0.0.1:{proxy.port}/jobs?schema=acc"
    )


# -- read-only primary ----------------------------------------------------------------------------


@slow
def test_read_only_refuses_writes_with_25006_until_switched_off(private_pg):
    existing = infra.pg_connect(private_pg.dsn)
    try:
        existing.run("CREATE TABLE t (n int)")
        private_pg.read_only(True)
        for conn in (existing, infra.pg_connect(private_pg.dsn)):
            with pytest.raises(pg8000.exceptions.DatabaseError) as caught:
                conn.run("INSERT INTO t VALUES (1)")
            assert sqlstate(caught.value) == "25006"
            assert conn.run("SELECT count(*) FROM t") == [[0]]  # reads still work
        private_pg.read_only(False)
        existing.run("INSERT INTO t VALUES (2)")
        assert infra.pg_connect(private_pg.dsn).run("SELECT count(*) FROM t") == [[1]]
        # terminate=True also ends the sessions already open, as a failover does.
        private_pg.read_only(True, terminate=True)
        # 57P01, or (pg8000 reading the reset) InterfaceError or a bare ConnectionResetError.
        with pytest.raises((pg8000.exceptions.Error, OSError)):
            existing.run("SELECT 1")
        with pytest.raises(pg8000.exceptions.DatabaseError) as caught:
            infra.pg_connect(private_pg.dsn).run("INSERT INTO t VALUES (3)")
        assert sqlstate(caught.value) == "25006"
    finally:
        with contextlib.suppress(pg8000.exceptions.InterfaceError, OSError):  # terminated above
            existing.close()


# -- browser --------------------------------------------------------------------------------------

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>probe</title></head>
<body><p id="out">static</p>
<script>document.getElementById("out").textContent = "rendered " + (6 * 7);</script>
</body></html>
"""


@pytest.fixture
def static_site(tmp_path):
    """A local http.server on 127.0.0.1 serving ``PAGE`` as /index.html."""
    (tmp_path / "index.html").write_bytes(PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


@slow
def test_browser_renders_javascript_and_takes_a_screenshot(browser, static_site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(static_site + "/index.html")
    out = browser.find_element(By.ID, "out")
    WebDriverWait(browser, 10).until(lambda _: out.text != "static")
    assert out.text == "rendered 42"  # written by the page's script, not in the HTML
    png = browser.get_screenshot_as_png()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert width > 200 and height > 200

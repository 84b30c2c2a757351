"""Real components that tests start, break and stop themselves.

Fixtures in ``conftest.py`` wrap these; tests use the fixtures. Everything listens on 127.0.0.1
only, on a free port, and whatever is started here is stopped by its own pid.

- ``scrub_environment``: drop the developer's ``MINFLOW_*`` settings before any test runs.
- ``Pgbouncer``: Debian's pgbouncer in transaction pooling mode in front of a private cluster.
- ``TcpProxy``: a forwarder that can freeze (a half-open link), thaw and cut its connections.
- ``set_read_only``: make a cluster refuse writes the way a demoted primary does.
- ``start_chromium``: headless Chromium driven through selenium and chromedriver.
"""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

# Variables that configure the test suite itself; every other MINFLOW_* is the developer's.
KEPT_PREFIXES = ("MINFLOW_TEST_", "MINFLOW_REQUIRE_")


def scrub_environment(environ=os.environ) -> list[str]:
    """Remove every ``MINFLOW_*`` variable but the suite's own settings; returns the names removed.

    minflow reads ``MINFLOW_DSN``, ``MINFLOW_API_KEY`` and friends as defaults, so a developer who
    exports them for daily use would otherwise change what the tests exercise. Scrubbing
    ``os.environ`` also cleans the environment every subprocess inherits.
    """
    removed = sorted(
        name
        for name in environ
        if name.startswith("MINFLOW_") and not name.startswith(KEPT_PREFIXES)
    )
    for name in removed:
        del environ[name]
    return removed


def wait_for(predicate, timeout=15.0, interval=0.01, message="condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_params(dsn: str) -> dict:
    """pg8000 connection keywords for a ``postgres://user@host:port/db`` DSN."""
    parts = urlsplit(dsn)
    return {
        "user": parts.username or "postgres",
        "password": parts.password,
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
        "database": (parts.path or "/postgres").lstrip("/") or "postgres",
    }


def pg_connect(dsn: str, **kwargs):
    """A raw pg8000 connection for test set-up and inspection (never used by minflow itself)."""
    import pg8000.native

    return pg8000.native.Connection(**{"timeout": 10, **pg_params(dsn), **kwargs})


AS_POSTGRES = os.geteuid() == 0


def postgres_dir(prefix: str) -> Path:
    """A fresh temporary directory the ``postgres`` OS user owns (when we run as root).

    Not under pytest's ``tmp_path``: pytest keeps that in a 0700 directory of the user running
    the tests, which the postgres user cannot enter.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if AS_POSTGRES:
        shutil.chown(path, "postgres", "postgres")
    return path


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal a child by its pid, wait for it, and SIGKILL it if it outlives ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def replace_address(dsn: str, host: str, port: int) -> str:
    """``dsn`` with its host and port replaced, user, path and query kept."""
    parts = urlsplit(dsn)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{port}"))


# -- PgBouncer -------------------------------------------------------------------------------------


def pgbouncer_binary() -> str | None:
    """Debian's pgbouncer binary, or None when it is not installed."""
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )


class Pgbouncer:
    """Debian's ``pgbouncer`` in ``pool_mode = transaction`` in front of a PostgreSQL server.

    Configured as users run it: no ``ignore_startup_parameters``, so a client that sends
    start-up parameters other than the few pgbouncer knows is refused. ``settings`` are written
    into the ``[pgbouncer]`` section as given and override the defaults below (for example
    ``default_pool_size=10`` or ``ignore_startup_parameters="search_path"``).

    Attributes: ``port``, ``dsn`` (clients: ``postgres://postgres@127.0.0.1:PORT/postgres``),
    ``admin_dsn`` (the admin console, database ``pgbouncer``), ``pid``, ``base`` (config, log,
    socket), ``settings`` (as written).
    """

    DEFAULTS = {
        "pool_mode": "transaction",
        "default_pool_size": 5,
        "max_client_conn": 100,
        # After a failed server login pgbouncer waits this long before trying again (default
        # 15 s); tests that stop the server would mostly wait.
        "server_login_retry": 1,
    }

    def __init__(self, server_port: int, server_host: str = "127.0.0.1", **settings):
        self.server_host = server_host
        self.server_port = server_port
        self.port = free_port()
        self.settings = {**self.DEFAULTS, **settings}
        self.dsn = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        self.admin_dsn = f"postgres://postgres@127.0.0.1:{self.port}/pgbouncer"
        self.base: Path | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log(self) -> str:
        """What pgbouncer has logged so far."""
        path = self.base / "pgbouncer.log" if self.base else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def start(self) -> Pgbouncer:
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError("pgbouncer not installed (apt-get install pgbouncer)")
        self.base = postgres_dir("minflow-pgbouncer-")
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": str(self.base),
            "auth_type": "trust",
            # trust still looks the user up in auth_file.
            "auth_file": str(self.base / "userlist.txt"),
            "admin_users": "postgres",
            "stats_users": "postgres",
            "pidfile": str(self.base / "pgbouncer.pid"),
            **self.settings,
        }
        lines = [
            "[databases]",
            f"* = host={self.server_host} port={self.server_port}",
            "[pgbouncer]",
            *(f"{name} = {value}" for name, value in settings.items()),
        ]
        (self.base / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        (self.base / "userlist.txt").write_text('"postgres" ""\n')
        with open(self.base / "pgbouncer.log", "wb") as log:
            # pgbouncer refuses to run as root. Dropping to postgres in the child itself (not via
            # runuser, which stays as the parent) keeps the pid we hold pgbouncer's own.
            self._proc = subprocess.Popen(
                [binary, str(self.base / "pgbouncer.ini")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                **(
                    {"user": "postgres", "group": "postgres", "extra_groups": []}
                    if AS_POSTGRES
                    else {}
                ),
            )
        try:
            wait_for(self._answers, timeout=15, message=f"pgbouncer on port {self.port}")
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        if self._proc.poll() is not None:
            pytest.fail(f"pgbouncer exited with {self._proc.returncode}:\n{self.log}")
        try:
            self.show("VERSION")
            return True
        except Exception:  # not listening yet
            return False

    def admin(self, command: str) -> list[dict]:
        """Run one admin-console command (``SHOW POOLS``, ``PAUSE``, ``RELOAD``...); rows as dicts."""
        conn = pg_connect(self.admin_dsn, timeout=5)
        try:
            rows = conn.run(command)
            names = [c["name"] for c in conn.columns or ()]
            return [dict(zip(names, row, strict=True)) for row in rows or ()]
        finally:
            conn.close()

    def show(self, what: str) -> list[dict]:
        """``SHOW <what>`` on the admin console: POOLS, SERVERS, CLIENTS, STATS, CONFIG..."""
        return self.admin(f"SHOW {what}")

    def server_connections(self) -> int:
        """How many connections pgbouncer holds to the server right now (``SHOW SERVERS`` rows)."""
        return len(self.show("SERVERS"))

    def stop(self) -> None:
        """SIGTERM (immediate shutdown) by pid, then remove the config directory."""
        if self._proc is not None:
            stop_process(self._proc)
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)


# -- TCP proxy -------------------------------------------------------------------------------------


class _Link:
    """One proxied connection: the client's socket, the upstream one, and bytes in flight."""

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client = client
        self.upstream = upstream
        # Bytes read from one side and not yet written to the other, keyed by the writer.
        self.pending = {client: bytearray(), upstream: bytearray()}
        self.eof = {client: False, upstream: False}  # the reader's side sent FIN
        self.shut = {client: False, upstream: False}  # we passed that FIN on

    def other(self, sock: socket.socket) -> socket.socket:
        return self.upstream if sock is self.client else self.client

    def sockets(self) -> tuple[socket.socket, socket.socket]:
        return self.client, self.upstream

    def close(self, reset: bool) -> None:
        for sock in self.sockets():
            if reset:
                # A zero linger makes close() send RST instead of FIN.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.close()


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 in front of ``upstream_host:upstream_port``.

    ``freeze()`` stops moving bytes in both directions and keeps every connection open: each side
    sees silence, as across a pulled cable or a frozen VM. The proxy's own kernel still
    acknowledges what it is sent, so TCP keepalives and ``TCP_USER_TIMEOUT`` see a live peer;
    only application deadlines (a socket timeout) notice. New connections complete their TCP
    handshake into the listen backlog but are not served until ``thaw()``, which forwards again,
    held bytes included. ``cut()`` closes every current connection (RST by default, FIN with
    ``reset=False``) and keeps listening. One thread does all the forwarding.
    """

    BUFFER_LIMIT = 1 << 20  # stop reading from a side while this much waits for the other

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self._listener = socket.create_server((self.host, 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._interest: dict[socket.socket, int] = {}
        self._links: dict[socket.socket, _Link] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._frozen = False
        self._stopping = False
        self.accepted = 0  # connections accepted since start
        self._thread = threading.Thread(
            target=self._loop, name=f"tcp-proxy-{self.port}", daemon=True
        )

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def dsn(self, dsn: str) -> str:
        """``dsn`` pointed at this proxy instead of its own host and port."""
        return replace_address(dsn, self.host, self.port)

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def open_connections(self) -> int:
        """Connections currently forwarded (or held, when frozen)."""
        return self._call(lambda: len({id(link) for link in self._links.values()}))

    def freeze(self) -> None:
        """Stop forwarding in both directions without closing anything; returns once in force."""
        self._call(lambda: setattr(self, "_frozen", True))

    def thaw(self) -> None:
        """Forward again, what was held first."""
        self._call(lambda: setattr(self, "_frozen", False))

    def cut(self, reset: bool = True) -> int:
        """Close every current connection on both sides (RST, or FIN); returns how many."""
        return self._call(lambda: self._close_all(reset))

    def stop(self) -> None:
        """Close everything and end the forwarding thread."""
        if self._thread.is_alive():
            self._call(lambda: setattr(self, "_stopping", True))
            self._thread.join(10)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    # The forwarding thread owns every socket and all state; other threads only send it commands.

    def _call(self, fn, timeout: float = 10.0):
        if not self._thread.is_alive():
            raise RuntimeError("the proxy is not running")
        done = threading.Event()
        box: list = []
        self._commands.put((fn, box, done))
        self._wake_w.send(b"\0")
        if not done.wait(timeout):
            raise RuntimeError("the proxy thread did not answer")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _loop(self) -> None:
        self._want(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                self._update_interest()
                for key, mask in self._selector.select(timeout=1.0):
                    sock = key.fileobj
                    if sock is self._wake_r:
                        self._run_commands()
                    elif sock is self._listener:
                        self._accept()
                    elif sock in self._links:  # a link closed earlier in this batch is gone
                        self._pump(sock, mask)
                self._run_commands()
        finally:
            self._close_all(reset=False)
            self._run_commands()  # answer a stop() that raced with an exception

    def _run_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while True:
            try:
                fn, box, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                box.append(fn())
            except BaseException as exc:  # handed to the caller
                box.append(exc)
            done.set()

    def _want(self, sock: socket.socket, events: int) -> None:
        current = self._interest.get(sock, 0)
        if events == current:
            return
        if not events:
            self._selector.unregister(sock)
            del self._interest[sock]
        elif not current:
            self._selector.register(sock, events)
            self._interest[sock] = events
        else:
            self._selector.modify(sock, events)
            self._interest[sock] = events

    def _update_interest(self) -> None:
        live = not self._frozen
        self._want(self._listener, selectors.EVENT_READ if live else 0)
        for sock, link in self._links.items():
            other = link.other(sock)
            events = 0
            if live and not link.eof[sock] and len(link.pending[other]) < self.BUFFER_LIMIT:
                events |= selectors.EVENT_READ
            if live and link.pending[sock]:
                events |= selectors.EVENT_WRITE
            self._want(sock, events)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()  # nothing to forward to: the client sees the connection closed
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, upstream)
        self._links[client] = self._links[upstream] = link
        self.accepted += 1

    def _pump(self, sock: socket.socket, mask: int) -> None:
        link = self._links[sock]
        other = link.other(sock)
        try:
            if mask & selectors.EVENT_READ:
                data = sock.recv(65536)
                if data:
                    link.pending[other] += data
                else:
                    link.eof[sock] = True
            for writer in link.sockets():
                pending = link.pending[writer]
                if pending:
                    with contextlib.suppress(BlockingIOError):
                        del pending[: writer.send(pending)]
            # Pass a FIN on once everything before it has been delivered.
            for reader in link.sockets():
                writer = link.other(reader)
                if link.eof[reader] and not link.pending[writer] and not link.shut[writer]:
                    writer.shutdown(socket.SHUT_WR)
                    link.shut[writer] = True
            if all(link.shut.values()):
                self._drop(link, reset=False)
        except OSError:  # a reset on either side is passed on as a reset
            self._drop(link, reset=True)

    def _drop(self, link: _Link, reset: bool) -> None:
        for sock in link.sockets():
            self._want(sock, 0)
            self._links.pop(sock, None)
        link.close(reset)

    def _close_all(self, reset: bool) -> int:
        links = list({id(link): link for link in self._links.values()}.values())
        for link in links:
            self._drop(link, reset)
        return len(links)


# -- Read-only primary -----------------------------------------------------------------------------


def set_read_only(dsn: str, on: bool, terminate: bool = False) -> None:
    """Make the server at ``dsn`` refuse writes (SQLSTATE 25006) or accept them again.

    Sets ``default_transaction_read_only`` server-wide (ALTER SYSTEM + pg_reload_conf), as a
    primary demoted by a failover behaves, and returns once a new session sees the change. By
    then every existing session has the reload signal pending, so its next transaction sees it
    too; a transaction already open keeps its mode until it ends. ``terminate=True`` also ends
    every other client session (as a failover does), waiting until they are gone. The setting
    is stored with ALTER SYSTEM, so it survives a restart of the cluster until switched off.
    ``dsn`` must reach the server directly as a superuser (not through a pooler).
    """
    conn = pg_connect(dsn)
    try:
        # This session's own override, so switching back works while the server is read-only.
        conn.run("SET default_transaction_read_only = off")
        if on:
            conn.run("ALTER SYSTEM SET default_transaction_read_only = on")
        else:
            conn.run("ALTER SYSTEM RESET default_transaction_read_only")
        conn.run("SELECT pg_reload_conf()")
        expected = "on" if on else "off"

        def seen_by_a_new_session() -> bool:
            probe = pg_connect(dsn)
            try:
                return probe.run("SHOW default_transaction_read_only")[0][0] == expected
            finally:
                probe.close()

        wait_for(seen_by_a_new_session, timeout=10, interval=0.02, message="the reloaded setting")
        if terminate:
            others = (
                "SELECT pid FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
            conn.run(f"SELECT pg_terminate_backend(pid) FROM ({others}) AS s")
            wait_for(lambda: not conn.run(others), timeout=10, message="sessions to end")
    finally:
        conn.close()


# -- Headless Chromium -----------------------------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless=new",
    # The suite runs as root in a container without user namespaces: no sandbox is possible.
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    # Nothing but the page under test may touch the network.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
)


def chromium_paths() -> tuple[str | None, str | None]:
    """Debian's chromium and chromedriver, or None for what is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.access("/usr/bin/chromedriver", os.X_OK) else None
    )
    return browser, driver


def start_chromium(user_data_dir: Path, window_size: tuple[int, int] = (1280, 800)):
    """A selenium ``webdriver.Chrome`` on Debian's headless chromium with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.add_argument(f"--window-size={window_size[0]},{window_size[1]}")
    # An explicit driver path keeps selenium from looking for (and downloading) one itself.
    service = Service(executable_path=driver, port=free_port())
    chrome = webdriver.Chrome(options=options, service=service)
    chrome.set_page_load_timeout(15)
    chrome.set_script_timeout(15)
    return chrome


def pids_using(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (a directory only we created)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:  # gone meanwhile
                continue
            if marker.encode() in cmdline:
                found.append(int(entry.name))
    return found


def stop_chromium(chrome, user_data_dir: Path) -> None:
    """Quit the browser and its driver; kill, by pid, any process still using our profile."""
    try:
        chrome.quit()
    finally:
        for pid in pids_using(str(user_data_dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

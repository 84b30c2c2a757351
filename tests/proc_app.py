"""Handlers and process entry points for the multi-process tests.

Loaded in child processes, either by the CLI (``python -m minflow worker tests.proc_app:app``) or
by ``multiprocessing`` with the spawn method, so it imports nothing from the test suite. The
environment tells it where to leave its side records:

- ``MINFLOW_TEST_RECORD_DIR``: each process appends one line per handler step to
  ``<dir>/<pid>.log``; the tests compare these records with the event log.
- ``MINFLOW_TEST_BARRIER``: ``"<dir>:<n>"``; at import, wait until ``n`` processes are ready, so
  that workers start claiming together instead of in the order they happened to boot.
"""

from __future__ import annotations

import os
import time

import minflow

CRASH_EXIT = 17  # what proc.crash exits with, so a test can tell it from other deaths

# --dsn on the command line replaces this; the environment is only the fallback.
app = minflow.App(os.environ.get("MINFLOW_DSN"))


def _record_dir() -> str:
    return os.environ["MINFLOW_TEST_RECORD_DIR"]


def record(line: str) -> None:
    """Append one line to this process's record file.

    One ``write`` on an ``O_APPEND`` descriptor per line: the kernel appends it whole, so lines
    from the handler threads of one process never interleave.
    """
    path = os.path.join(_record_dir(), f"{os.getpid()}.log")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_records(directory) -> dict[int, list[list[str]]]:
    """Every process's records, split into fields: ``{pid: [[field, ...], ...]}``."""
    out: dict[int, list[list[str]]] = {}
    for name in os.listdir(directory):
        if name.endswith(".log"):
            with open(os.path.join(directory, name)) as f:
                out[int(name[:-4])] = [line.split() for line in f.read().splitlines()]
    return out


def _wait_for_file(path: str, timeout: float) -> bool:
    # Polling a file is how a test talks to handlers in another process; the deadline keeps a
    # forgotten gate from hanging the suite.
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _barrier() -> None:
    spec = os.environ.get("MINFLOW_TEST_BARRIER")
    if not spec:
        return
    directory, _, count = spec.rpartition(":")
    open(os.path.join(directory, f"ready-{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 60
    while sum(name.startswith("ready-") for name in os.listdir(directory)) < int(count):
        if time.monotonic() > deadline:
            raise SystemExit("barrier: the other processes never arrived")
        time.sleep(0.002)


@app.handler("proc.record")
def record_run(run: minflow.RunContext):
    """Record the execution and succeed."""
    record(f"ran {run.id} {run.attempt}")
    return {"pid": os.getpid()}


@app.handler("proc.gate")
def gated(run: minflow.RunContext):
    """Record the start, wait until the test creates ``<record dir>/gate``, record the end."""
    record(f"start {run.id} {run.attempt}")
    if not _wait_for_file(os.path.join(_record_dir(), "gate"), 60):
        raise TimeoutError("the test never opened the gate")
    record(f"done {run.id} {run.attempt}")
    return {"pid": os.getpid()}


@app.handler("proc.crash")
def crash(run: minflow.RunContext):
    """Kill the whole worker process in the middle of the run, like a segfault or OOM kill."""
    record(f"crash {run.id} {run.attempt}")
    os._exit(CRASH_EXIT)


# -- multiprocessing (spawn) targets -------------------------------------------------------


def submit_same_key(dsn: str, key: str, n: int, ready, go, results) -> None:
    """Submit one run with ``key`` the moment ``go`` is set; report the id (or the error)."""
    try:
        with minflow.Client(dsn) as client:
            client.stats()  # connect now, so the barrier lines up the inserts, not the connects
            ready.put(n)
            if not go.wait(60):
                raise TimeoutError("never told to go")
            results.put((n, "ok", client.submit("idem.proc", {"n": n}, idempotency_key=key)))
    except BaseException as exc:
        results.put((n, "error", repr(exc)))


def migrate_at_once(dsn: str, n: int, ready, go, results) -> None:
    """Call ``Client.migrate()`` the moment ``go`` is set; report (applied, version) or the error."""
    try:
        # Constructing a Client only parses the DSN: the database stays untouched (and, for
        # SQLite, the file absent) until migrate(), so all ten race on a truly fresh database.
        with minflow.Client(dsn) as client:
            ready.put(n)
            if not go.wait(60):
                raise TimeoutError("never told to go")
            applied = client.migrate()
            results.put((n, "ok", (applied, client.schema_version())))
    except BaseException as exc:
        results.put((n, "error", repr(exc)))


_barrier()

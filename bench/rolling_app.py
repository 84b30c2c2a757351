"""The application S7's worker processes run: ``python -m minflow worker rolling_app:app``.

Every execution appends a start line and, when the handler returns or raises, an end line to
the file ``$ROLLING_LEDGER`` names (one per worker process), with one ``write`` on a file opened
for appending, so a line is either wholly there or absent even after SIGKILL. S7 counts
executions from these lines, not from the database it checks them against.

``soak`` runs: payload ``{"i": n, "kind": ..., "ms": ...}``: the handler works (sleeps) that many
milliseconds, so a worker killed at any moment holds runs mid-execution; kind "fail" raises on
its first attempt.
``minute``: the per-minute schedule's runs.
"""

from __future__ import annotations

import os
import time

import minflow

app = minflow.App()  # the DSN comes from $MINFLOW_DSN or --dsn
_ledger = os.open(os.environ["ROLLING_LEDGER"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def _note(*fields: object) -> None:
    os.write(_ledger, (" ".join(map(str, fields)) + "\n").encode())


@app.handler("soak")
def soak(run: minflow.RunContext) -> None:
    _note("S", run.id, run.attempt, run.type)
    time.sleep(run.payload.get("ms", 0) / 1000)  # the handler's work
    if run.payload.get("kind") == "fail" and run.attempt == 1:
        _note("E", run.id, run.attempt, "fail")
        raise RuntimeError("S7: the first attempt fails")
    _note("E", run.id, run.attempt, "ok")


@app.handler("minute")
def minute(run: minflow.RunContext) -> None:
    _note("S", run.id, run.attempt, run.type)
    _note("E", run.id, run.attempt, "ok")

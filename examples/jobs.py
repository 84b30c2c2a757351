"""Handlers for a small billing service.

Run a worker for them from the repository root:

    python -m minflow worker examples.jobs --concurrency 8

The database comes from $MINFLOW_DSN (default: sqlite://minflow.db); submit work with
examples/produce.py or `python -m minflow submit billing.invoice.v1 '{"order": 1, "amount": 90}'`.
"""

from __future__ import annotations

import asyncio
import time

import minflow

app = minflow.App()

# Stands in for the payment provider: "charging" the same order twice must not double-charge.
_charged: dict[int, float] = {}


# The payment provider accepts two requests at a time: more would only be refused.
@app.handler("billing.invoice.v1", concurrency=2)
def invoice(run: minflow.RunContext) -> dict:
    """Charge an order. Idempotent: a second execution of the same order charges nothing."""
    order, amount = run.payload["order"], run.payload["amount"]
    if amount > 10_000 and run.snoozes == 0:
        # A provider that rate-limits large charges: ask to be run again later without using
        # up an attempt or recording an error. A snooze does not count as an attempt, so
        # run.snoozes (not run.attempt) tells that this already happened.
        raise minflow.Retry(delay=1)
    _charged.setdefault(order, amount)
    return {"order": order, "charged": _charged[order]}


@app.handler("billing.statement.v1")
def statement(run: minflow.RunContext) -> dict | None:
    """A long job: checks for cancellation between steps and asks for a longer lease up front."""
    run.heartbeat(120)  # the automatic heartbeat would do too; this documents the expectation
    pages = []
    for page in range(run.payload.get("pages", 3)):
        if run.is_cancelled():
            return None  # stop early; the run stays cancelled
        time.sleep(0.01)  # render one page
        pages.append(page)
    return {"pages": len(pages)}


@app.handler("billing.receipt.v1", timeout=10)
async def receipt(run: minflow.RunContext) -> dict:
    """An async handler, awaited on the worker's event loop; cancelled if it takes over 10 s."""
    await asyncio.sleep(0.01)  # e.g. a request through an async HTTP client
    return {"sent": run.payload["order"]}


# The mail server's refusals are brief: retry after a second, not the default minutes.
@app.handler("billing.reminder.v1", backoff=lambda attempt: 1.0)
def reminder(run: minflow.RunContext) -> None:
    """Always fails: after max_attempts the run is `failed`, visible with `minflow list --status failed`."""
    raise ConnectionError(f"mail server refused {run.payload['to']}")

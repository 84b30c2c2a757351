"""An application module written like the README's examples, with annotations throughout.

``make lint`` type-checks it with ``mypy --strict`` (minflow on the path, its own code not
reported); ``test_typing.py`` also runs it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sqlite3

import minflow

app = minflow.App(os.environ.get("JOBS_DSN", "sqlite://jobs.db"))


@app.handler("billing.invoice.v1")
def invoice(run: minflow.RunContext) -> dict[str, int]:
    order: int = run.payload["order"]
    if run.attempt > 1 and run.is_cancelled():
        raise minflow.Retry(delay=30)
    return {"invoiced": order}


@app.handler("email.send.v1", timeout=30.0, concurrency=5, backoff=lambda attempt: 2.0**attempt)
async def send_email(run: minflow.RunContext) -> None:
    await asyncio.sleep(0)


@app.handler("reports.nightly.v1")
def nightly(run: minflow.RunContext) -> str:
    run.heartbeat(120)
    return f"report for {run.payload}"


def invoiced(run: minflow.RunContext) -> int:
    # The decorator returned invoice itself: its result is dict[str, int] here, not Any.
    return invoice(run)["invoiced"]


def produce(db: sqlite3.Connection) -> list[str]:
    first = app.submit(
        "billing.invoice.v1",
        {"order": 42},
        idempotency_key="invoice-42",
        priority=10,
        run_in=dt.timedelta(seconds=0),
    )
    with db:
        db.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY)")
        db.execute("INSERT OR IGNORE INTO orders (id) VALUES (43)")
        more = app.submit_many(
            [minflow.Job("billing.invoice.v1", {"order": 43}, idempotency_key="invoice-43")],
            connection=db,
        )
    return [first, *more]


def inspect(run_id: str) -> tuple[str, list[str], int]:
    run = app.get(run_id)
    status = run.status if run is not None else "missing"
    events = [event.event_type for event in app.events(run_id)]
    failed: list[minflow.Run] = app.list(status="failed", limit=10)
    counts: dict[str, dict[str, int]] = app.stats()
    return status, events, len(failed) + sum(counts.get("billing.invoice.v1", {}).values())


# A FastAPI route would carry @api.post("/orders/{order}/invoice") on this function.
async def request_invoice(order: int) -> dict[str, str]:
    run_id = await app.asubmit("billing.invoice.v1", {"order": order})
    run = await app.aget(run_id)
    recent = await app.alist(type="billing.invoice.v1", limit=5)
    return {"run": run_id, "status": run.status if run else "missing", "recent": str(len(recent))}


def operate() -> list[str]:
    alive = [worker.id for worker in app.workers() if worker.alive]
    paused = [schedule.id for schedule in app.schedules() if not schedule.enabled]
    pruned: int = app.prune(older_than=7 * 86400)
    return [*alive, *paused, str(pruned)]


def work() -> int:
    return app.run_worker(burst=True, types=["billing.invoice.v1"], backoff=lambda attempt: 0)

"""The asyncio facades (asubmit, asubmit_many, aget, alist, acancel, aretry) on both dialects."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid

import pytest

import minflow
from conftest import PG_DSN, pg_connect


def test_facades_round_trip(client):
    async def scenario():
        first = await client.asubmit("email.send.v1", {"to": "ada"}, idempotency_key="ada")
        again = await client.asubmit("email.send.v1", {"to": "ada"}, idempotency_key="ada")
        batch = await client.asubmit_many(minflow.Job("email.send.v1", n) for n in range(3))
        run = await client.aget(first)
        pending = await client.alist(type="email.send.v1", status="pending", limit=10)
        await client.acancel(batch[0])
        with pytest.raises(minflow.AlreadyComplete):
            await client.acancel(batch[0])
        await client.aretry(batch[0])
        missing = await client.aget(str(uuid.uuid4()))
        return first, again, batch, run, pending, missing

    first, again, batch, run, pending, missing = asyncio.run(scenario())
    assert again == first and again.deduplicated and not first.deduplicated
    assert run.payload == {"to": "ada"} and missing is None
    assert {r.id for r in pending} == {first, *batch}
    assert client.get(batch[0]).status == "pending"
    assert [e.event_type for e in client.events(batch[0])] == ["created", "cancelled", "retried"]


def test_invalid_input_is_raised_in_the_coroutine(client):
    with pytest.raises(minflow.InvalidInput, match="max_attempts"):
        asyncio.run(client.asubmit("t", max_attempts=0))
    with pytest.raises(minflow.InvalidInput, match="Job"):
        asyncio.run(client.asubmit_many(["t"]))


def test_a_waiting_submit_does_not_block_the_loop(client):
    # Another transaction makes the submit wait (SQLite's write lock; on PostgreSQL an
    # uncommitted row with the same idempotency key); the loop must go on meanwhile.
    if client.dialect == "sqlite":
        other = sqlite3.connect(client._dsn.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        release = other.rollback
    else:
        other = pg_connect(PG_DSN)
        other.run("BEGIN")
        other.run(
            f'INSERT INTO "{client._dsn.schema}".workflow_run (id, type, payload, '
            "idempotency_key) VALUES (CAST(:id AS uuid), 't', '{}', 'k')",
            id=str(uuid.uuid4()),
        )

        def release():
            other.run("ROLLBACK")

    async def scenario():
        task = asyncio.create_task(client.asubmit("t", idempotency_key="k"))
        ticks = 0
        while ticks < 20:  # 0.2 s of the loop running while the submit waits
            await asyncio.sleep(0.01)
            ticks += 1
        waiting = not task.done()
        release()
        return waiting, await asyncio.wait_for(task, 10)

    try:
        waiting, run_id = asyncio.run(scenario())
    finally:
        other.close()
    assert waiting
    assert client.get(run_id).idempotency_key == "k" and not run_id.deduplicated

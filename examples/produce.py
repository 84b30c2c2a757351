"""Submit some work for examples/jobs.py: python examples/produce.py [DSN]."""

from __future__ import annotations

import sys

import minflow


def main(dsn: str | None = None) -> list[str]:
    with minflow.Client(dsn) as client:
        client.migrate()
        ids = client.submit_many(
            [
                minflow.Job(
                    "billing.invoice.v1",
                    {"order": n, "amount": 50 * n},
                    idempotency_key=f"invoice-{n}",
                )
                for n in range(1, 6)
            ]
            + [minflow.Job("billing.invoice.v1", {"order": 99, "amount": 25_000}, priority=10)]
            + [minflow.Job("billing.statement.v1", {"pages": 3})]
            + [minflow.Job("billing.receipt.v1", {"order": 1})]
            + [minflow.Job("billing.reminder.v1", {"to": "ada@example.com"}, max_attempts=2)]
        )
        # Submitting the same invoice again returns the existing run instead of a duplicate.
        assert (
            client.submit(
                "billing.invoice.v1", {"order": 1, "amount": 50}, idempotency_key="invoice-1"
            )
            == ids[0]
        )
        for run_id in ids:
            print(run_id)
        return ids


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)

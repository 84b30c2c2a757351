"""Operating a queue for months (design §8): the oldest-due age and run_at bounds, through the
Client, on both dialects."""

from __future__ import annotations

import datetime as dt

import pytest

import minflow

UTC = dt.timezone.utc


# -- the oldest-due age and run_at bounds ------------------------------------------------------


def test_oldest_due_age_counts_from_creation_when_run_at_is_older(client):
    client.submit("late.v1", run_at=dt.datetime(2000, 1, 1, tzinfo=UTC))
    (row,) = minflow._queue_snapshot(client)
    assert row[:3] == ("late.v1", "pending", 1) and 0 <= row[3] < 60


@pytest.mark.parametrize(
    "run_at",
    [
        dt.datetime(2, 1, 1, tzinfo=UTC),
        dt.datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC),
        dt.datetime.now(UTC) + dt.timedelta(days=365.25 * 100 + 2),
    ],
)
def test_run_at_out_of_range_is_invalid_input(client, run_at):
    with pytest.raises(minflow.InvalidInput, match="between 1970-01-01 and 100 years from now"):
        client.submit("t", run_at=run_at)
    assert client.list() == []
    assert client.get(client.submit("t", run_at=dt.datetime(1970, 1, 1, tzinfo=UTC)))

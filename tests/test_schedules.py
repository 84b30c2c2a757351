"""Cron schedules: slot arithmetic (pure), the schedule API and the ticker on both dialects."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
import zoneinfo

import pytest

import minflow
from conftest import ROOT, db, event_types, wait_for

UTC = dt.timezone.utc
NY = "America/New_York"
BERLIN = "Europe/Berlin"
# Matches only on 29 February: its latest slot is months or years back, so a planned time a few
# minutes ago is "off the grid and later than the latest slot" and becomes the slot itself.
RARE = "0 0 29 2 *"


def utc(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def stamp(moment: dt.datetime) -> str:
    return moment.astimezone(UTC).strftime("%m-%d %H:%M")


def chain(cron: str, zone: str, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    out, moment = [], start
    while True:
        moment = minflow._cron_next(cron, zone, moment)
        if moment >= end:
            return out
        out.append(moment)


# -- slot arithmetic, checked against hand-computed instants ---------------------------------
# 2024 changes: New York 10 March 02:00 EST -> 03:00 EDT (07:00Z), 3 November 02:00 EDT ->
# 01:00 EST (06:00Z); Berlin 31 March 02:00 CET -> 03:00 CEST (01:00Z), 27 October 03:00 CEST ->
# 02:00 CET (01:00Z).
DST_CASES = [
    # A daily time that does not exist on the spring day fires once, when the gap ends.
    ("30 2 * * *", NY, utc(2024, 3, 9), ["03-09 07:30", "03-10 07:00", "03-11 06:30"]),
    ("30 2 * * *", BERLIN, utc(2024, 3, 30), ["03-30 01:30", "03-31 01:00", "04-01 00:30"]),
    # A daily time that exists twice on the autumn day fires once (its first occurrence).
    ("30 1 * * *", NY, utc(2024, 11, 2), ["11-02 05:30", "11-03 05:30", "11-04 06:30"]),
    ("30 2 * * *", BERLIN, utc(2024, 10, 26), ["10-26 00:30", "10-27 00:30", "10-28 01:30"]),
    # Hourly: 02:00 New York time is skipped in spring; 01:00 fires once in autumn.
    (
        "0 * * * *",
        NY,
        utc(2024, 3, 10, 5),
        ["03-10 06:00", "03-10 07:00", "03-10 08:00"],
    ),
    (
        "0 * * * *",
        NY,
        utc(2024, 11, 3, 4),
        ["11-03 05:00", "11-03 07:00", "11-03 08:00"],
    ),
    (
        "0 * * * *",
        BERLIN,
        utc(2024, 10, 26, 23, 30),
        ["10-27 00:00", "10-27 02:00", "10-27 03:00"],
    ),
    # Several skipped times collapse into the one slot at the end of the gap.
    (
        "*/30 1-3 * * *",
        NY,
        utc(2024, 3, 10, 5),
        ["03-10 06:00", "03-10 06:30", "03-10 07:00", "03-10 07:30", "03-11 05:00"],
    ),
    (
        "*/30 1-3 * * *",
        BERLIN,
        utc(2024, 3, 30, 23),
        ["03-31 00:00", "03-31 00:30", "03-31 01:00", "03-31 01:30", "03-31 23:00"],
    ),
    # The repeated hour's times fire once each.
    (
        "*/30 1-3 * * *",
        NY,
        utc(2024, 11, 3, 4),
        ["11-03 05:00", "11-03 05:30", "11-03 07:00", "11-03 07:30", "11-03 08:00"],
    ),
    (
        "*/30 1-3 * * *",
        BERLIN,
        utc(2024, 10, 26, 22),
        ["10-26 23:00", "10-26 23:30", "10-27 00:00", "10-27 00:30", "10-27 02:00"],
    ),
]


@pytest.mark.parametrize(("cron", "zone", "start", "expected"), DST_CASES)
def test_slots_across_dst_changes(cron, zone, start, expected):
    moment, got = start, []
    for _ in expected:
        moment = minflow._cron_next(cron, zone, moment)
        got.append(stamp(moment))
    assert got == expected


def oracle(cron: str, zone_name: str, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """The policy by brute force over every UTC minute, using croniter only to match fields.

    A minute is a slot when its wall time matches and is the first occurrence of that wall time,
    or when a wall time skipped by the gap that ends at this minute matches.
    """
    from croniter import croniter

    zone = zoneinfo.ZoneInfo(zone_name)
    out, minute = [], start + dt.timedelta(minutes=1)
    while minute < end:
        local = minute.astimezone(zone)
        wall = local.replace(tzinfo=None)
        hit = local.fold == 0 and croniter.match(cron, wall)
        jump = local.utcoffset() - (minute - dt.timedelta(minutes=1)).astimezone(zone).utcoffset()
        if not hit and jump > dt.timedelta(0):
            skipped = wall - jump
            while skipped < wall and not hit:
                hit = croniter.match(cron, skipped)
                skipped += dt.timedelta(minutes=1)
        if hit:
            out.append(minute)
        minute += dt.timedelta(minutes=1)
    return out


@pytest.mark.parametrize(
    ("zone", "start"),
    [
        (NY, utc(2024, 3, 10, 3)),
        (NY, utc(2024, 11, 3, 2)),
        (BERLIN, utc(2024, 3, 30, 22)),
        (BERLIN, utc(2024, 10, 26, 21)),
    ],
)
@pytest.mark.parametrize(
    "cron", ["30 2 * * *", "0 * * * *", "*/30 1-3 * * *", "*/7 * * * *", "59 1 * * *"]
)
def test_slots_agree_with_a_brute_force_oracle(cron, zone, start):
    end = start + dt.timedelta(hours=8)
    assert chain(cron, zone, start, end) == oracle(cron, zone, start, end)


def test_croniter_wall_clock_iteration_is_calendar_arithmetic():
    # minflow relies on this: croniter given wall times labelled UTC steps through them without
    # any zone logic, also across the days the real zone changes its offset.
    from croniter import croniter

    it = croniter("*/30 1-3 * * *", utc(2024, 11, 3, 0, 59))
    walls = [it.get_next(dt.datetime).strftime("%H:%M") for _ in range(7)]
    assert walls == ["01:00", "01:30", "02:00", "02:30", "03:00", "03:30", "01:00"]
    back = croniter("30 2 * * *", utc(2024, 3, 10, 2, 30))
    assert back.get_prev(dt.datetime) == utc(2024, 3, 9, 2, 30)  # strictly before


@pytest.mark.parametrize(
    ("cron", "zone", "at", "expected"),
    [
        ("30 2 * * *", "UTC", utc(2024, 3, 10, 2, 30), utc(2024, 3, 10, 2, 30)),  # inclusive
        ("30 2 * * *", "UTC", utc(2024, 3, 10, 2, 29, 59), utc(2024, 3, 9, 2, 30)),
        ("30 2 * * *", NY, utc(2024, 3, 10, 7, 10), utc(2024, 3, 10, 7)),  # gap end
        ("30 1 * * *", NY, utc(2024, 11, 3, 6, 45), utc(2024, 11, 3, 5, 30)),  # not the repeat
        ("* * * * *", NY, utc(2024, 11, 3, 6, 45), utc(2024, 11, 3, 5, 59)),
        ("0 * * * *", BERLIN, utc(2024, 10, 27, 1, 30), utc(2024, 10, 27, 0)),
    ],
)
def test_latest_slot(cron, zone, at, expected):
    assert minflow._cron_latest(cron, zone, at) == expected


def test_due_slot_policies():
    due = minflow._due_slot
    # On time: the planned slot fires and the next one follows it.
    assert due("*/5 * * * *", "UTC", utc(2024, 1, 1, 12), utc(2024, 1, 1, 12, 0, 1)) == (
        utc(2024, 1, 1, 12),
        utc(2024, 1, 1, 12, 5),
    )
    # Three days of missed slots fire once, as the latest, then the cadence continues.
    assert due("*/5 * * * *", "UTC", utc(2024, 1, 1, 12), utc(2024, 1, 4, 9, 7)) == (
        utc(2024, 1, 4, 9, 5),
        utc(2024, 1, 4, 9, 10),
    )
    # A planned time off the grid (the Go ticker computes from "now") keeps its own key.
    assert due(RARE, "UTC", utc(2025, 6, 1, 8, 0, 17), utc(2025, 6, 1, 8, 1)) == (
        utc(2025, 6, 1, 8, 0, 17),
        utc(2028, 2, 29),
    )
    # Down across the New York spring change: the gap slot fires, next is the normal 02:30.
    assert due("30 2 * * *", NY, utc(2024, 3, 9, 7, 30), utc(2024, 3, 10, 9)) == (
        utc(2024, 3, 10, 7),
        utc(2024, 3, 11, 6, 30),
    )
    # Ticking inside the repeated hour does not fire 01:30 again.
    assert due("30 1 * * *", NY, utc(2024, 11, 3, 5, 30), utc(2024, 11, 3, 6, 31)) == (
        utc(2024, 11, 3, 5, 30),
        utc(2024, 11, 4, 6, 30),
    )


def test_go_timezone_prefix_is_read():
    # Rows written by the Go library may carry the zone in the expression.
    assert minflow._cron_next("CRON_TZ=Europe/Berlin 0 9 * * *", "UTC", utc(2024, 7, 1)) == utc(
        2024, 7, 1, 7
    )
    assert minflow._cron_next("TZ=America/New_York 0 9 * * *", "", utc(2024, 1, 1)) == utc(
        2024, 1, 1, 14
    )


# -- the schedule API, both dialects -----------------------------------------------------------


def schedule_count(client) -> int:
    return db(client, "SELECT COUNT(*) FROM workflow_schedule")[0][0]


def run_count(client) -> int:
    return db(client, "SELECT COUNT(*) FROM workflow_run")[0][0]


def make_due(client, schedule_id: str, when: dt.datetime) -> None:
    db(
        client,
        "UPDATE workflow_schedule SET next_run_at = {time:t} WHERE id = {uuid:id}",
        t=when,
        id=schedule_id,
    )


def db_now(client) -> dt.datetime:
    with client._pool.connection() as conn:
        return client._db_now(conn)


def scheduled_runs(client) -> list[minflow.Run]:
    return [r for r in client.list(limit=1000) if (r.idempotency_key or "").startswith("schedule:")]


def test_schedule_defaults_and_first_slot(client):
    before = db_now(client)
    sid = client.schedule("report.daily.v1", {"to": "ops"}, cron="0 9 * * *", timezone=BERLIN)
    after = db_now(client)
    s = client.get_schedule(sid)
    assert isinstance(s, minflow.Schedule)
    assert (s.id, s.type, s.payload, s.cron, s.timezone) == (
        sid,
        "report.daily.v1",
        {"to": "ops"},
        "0 9 * * *",
        BERLIN,
    )
    assert (s.enabled, s.priority, s.max_attempts, s.name, s.last_run_at) == (
        True,
        100,
        3,
        None,
        None,
    )
    assert s.next_run_at in {
        minflow._cron_next("0 9 * * *", BERLIN, before),
        minflow._cron_next("0 9 * * *", BERLIN, after),
    }
    assert s.next_run_at.astimezone(zoneinfo.ZoneInfo(BERLIN)).hour == 9
    assert [x.id for x in client.schedules()] == [sid]


ALIASES = [
    ("@hourly", "0 * * * *"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@weekly", "0 0 * * 0"),
    ("@monthly", "0 0 1 * *"),
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@DAILY", "0 0 * * *"),
    ("  */15   9-17 * * MON-FRI ", "*/15 9-17 * * MON-FRI"),
]


def test_aliases_are_stored_in_five_field_form(client):
    # The Go ticker sharing the schema cannot parse @-aliases; the 5-field form it can.
    for alias, stored in ALIASES:
        schedule = client.get_schedule(client.schedule("t", cron=alias))
        assert schedule.cron == stored, alias
        assert schedule.next_run_at == minflow._cron_next(stored, "UTC", schedule.created_at)


@pytest.mark.parametrize(
    "cron, needle",
    [("* * *", "2 missing"), ("* * * *", "1 missing"), ("0 * * * * *", "seconds field"),
     ("* * * * * * *", "2 too many")],
)  # fmt: skip
def test_a_wrong_field_count_says_what_is_wrong(client, cron, needle):
    with pytest.raises(minflow.InvalidInput) as error:
        client.schedule("t", cron=cron)
    message = str(error.value)
    assert message.startswith("cron:") and needle in message, message
    assert ("seconds" in message) == (cron.count(" ") == 5)


INVALID = [
    ({"cron": ""}, "cron:"),
    ({"cron": None}, "cron:"),
    ({"cron": 5}, "cron:"),
    ({"cron": "* * * *"}, "cron:"),
    ({"cron": "0 * * * * *"}, "cron:"),  # croniter's seconds field
    ({"cron": "@reboot"}, "cron:"),
    ({"cron": "@every 5m"}, "cron:"),
    ({"cron": "60 * * * *"}, "cron:"),
    ({"cron": "0 24 * * *"}, "cron:"),
    ({"cron": "0 0 0 * *"}, "cron:"),
    ({"cron": "0 0 * 13 *"}, "cron:"),
    ({"cron": "0 0 * * 7"}, "cron:"),  # the Go parser rejects 7 for Sunday
    ({"cron": "*/0 * * * *"}, "cron:"),
    ({"cron": "0 5-1 * * *"}, "cron:"),
    ({"cron": "? * * * *"}, "cron:"),
    ({"cron": "0 0 L * *"}, "cron:"),
    ({"cron": "0 0 1W * *"}, "cron:"),
    ({"cron": "0 0 * * 5#2"}, "cron:"),
    ({"cron": "R * * * *"}, "cron:"),
    ({"cron": "H * * * *"}, "cron:"),
    ({"cron": "0 0 30 2 *"}, "cron:"),  # never matches
    ({"cron": "TZ=UTC 0 0 * * *"}, "cron:"),
    ({"timezone": "Mars/Olympus_Mons"}, "timezone:"),
    ({"timezone": ""}, "timezone:"),
    ({"timezone": None}, "timezone:"),
    ({"timezone": "../../etc/passwd"}, "timezone:"),
    ({"type": ""}, "type"),
    ({"payload": float("nan")}, "payload"),
    ({"payload": {1, 2}}, "payload"),
    ({"priority": "high"}, "priority"),
    ({"max_attempts": 0}, "max_attempts"),
    ({"name": ""}, "name"),
]


def test_invalid_input_names_the_field_and_writes_nothing(client):
    for change, field in INVALID:
        kwargs = {"type": "t", "payload": None, "cron": "*/5 * * * *", "timezone": "UTC", **change}
        with pytest.raises(minflow.InvalidInput) as info:
            client.schedule(kwargs.pop("type"), kwargs.pop("payload"), **kwargs)
        assert str(info.value).startswith(field), (change, str(info.value))
    assert schedule_count(client) == 0


@pytest.mark.parametrize(
    ("cron", "hint"),
    [
        ("0 0 * * 7", "Sunday is 0"),
        ("TZ=UTC 0 0 * * *", "timezone="),
        ("0 0 30 2 *", "never matches"),
        ("0 * * * * *", "seconds"),
        ("@reboot", "@reboot"),
        ("0 0 L * *", "not a valid day of month"),
        ("0 0 * * 5#2", "not standard cron"),
    ],
)
def test_cron_errors_explain_themselves(cron, hint):
    with pytest.raises(minflow.InvalidInput, match=hint):
        minflow._check_cron(cron, "UTC")


@pytest.mark.parametrize("cron", ["R * * * *", "0 0 * * * *", "*/5 * * *", "", "@reboot"])
def test_stored_rows_the_ticker_cannot_use(cron):
    # Random terms would differ between tickers; six fields would mean seconds to croniter.
    with pytest.raises(minflow.InvalidInput, match="cron"):
        minflow._cron_next(cron, "UTC", utc(2024, 1, 1))


def test_stored_rows_may_use_croniter_extensions():
    # The seed's Python client wrote croniter syntax; the ticker still honours it.
    assert minflow._cron_next("0 0 L * *", "UTC", utc(2024, 2, 10)) == utc(2024, 2, 29)
    assert minflow._cron_next("@daily", "UTC", utc(2024, 2, 10, 5)) == utc(2024, 2, 11)


def test_unknown_and_deleted_ids_raise_not_found(client):
    sid = client.schedule("t", cron="@hourly")
    client.delete_schedule(sid)
    for bad in (str(uuid.uuid4()), "not-a-uuid", "", sid):
        with pytest.raises(minflow.NotFound):
            client.get_schedule(bad)
        for method in (client.pause_schedule, client.resume_schedule, client.delete_schedule):
            with pytest.raises(minflow.NotFound):
                method(bad)
    assert client.schedules() == []


def test_name_makes_schedule_an_upsert(client):
    first = client.schedule("t", {"v": 1}, cron="0 6 * * *", name="nightly")
    planned = client.get_schedule(first).next_run_at
    make_due(client, first, planned + dt.timedelta(days=30))  # a marker to see if it is kept
    again = client.schedule("t2", {"v": 2}, cron="0 6 * * *", priority=5, name="nightly")
    assert again == first
    s = client.get_schedule(first)
    assert (s.type, s.payload, s.priority, s.name) == ("t2", {"v": 2}, 5, "nightly")
    assert s.next_run_at == planned + dt.timedelta(days=30)  # same cron and zone: slot kept
    client.pause_schedule(first)
    client.schedule("t2", {"v": 3}, cron="30 7 * * *", timezone=NY, name="nightly")
    s = client.get_schedule(first)
    assert (s.cron, s.timezone, s.payload, s.enabled) == ("30 7 * * *", NY, {"v": 3}, False)
    assert s.next_run_at.astimezone(zoneinfo.ZoneInfo(NY)).strftime("%H:%M") == "07:30"
    assert client.schedule("t", cron="@daily", name="other") != first
    assert schedule_count(client) == 2
    client.delete_schedule(first)
    assert client.schedule("t", cron="@daily", name="nightly") != first  # the name is free again


def test_concurrent_upserts_of_one_name_make_one_schedule(dsn, client):
    ids, errors = [], []
    barrier = threading.Barrier(8)

    def declare(n):
        with minflow.Client(dsn) as c:
            try:
                barrier.wait()
                ids.append(c.schedule("t", {"n": n}, cron="@hourly", name="declared"))
            except Exception as exc:  # collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=declare, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(ids)) == 1 and schedule_count(client) == 1


# -- the tick ----------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [None, 0, "text", [1, None], {"nested": {"ok": [True, 1.5]}}])
def test_due_slot_becomes_one_run(client, payload):
    sid = client.schedule("report.v1", payload, cron=RARE, priority=7, max_attempts=2)
    planned = db_now(client).replace(microsecond=0) - dt.timedelta(seconds=30)
    make_due(client, sid, planned)
    assert client.tick() == 1
    assert client.tick() == 0
    # The same slot due again (a second ticker that read the row before this one advanced it,
    # or a Go ticker) creates nothing and does not fail.
    make_due(client, sid, planned)
    assert client.tick() == 0
    (run,) = scheduled_runs(client)
    assert run.idempotency_key == f"schedule:{sid}:{int(planned.timestamp())}"
    assert (run.type, run.payload, run.priority, run.max_attempts, run.status) == (
        "report.v1",
        payload,
        7,
        2,
        "pending",
    )
    (created,) = client.events(run.id)
    assert created.event_type == "created"
    assert created.data == {
        "schedule_id": sid,
        "slot": planned.isoformat().replace("+00:00", "Z"),
    }
    s = client.get_schedule(sid)
    assert s.next_run_at == minflow._cron_next(RARE, "UTC", planned)
    assert s.last_run_at is not None and s.last_run_at >= planned


def test_missed_slots_fire_once_then_continue(client):
    sid = client.schedule("t", cron="*/5 * * * *")
    make_due(client, sid, db_now(client) - dt.timedelta(days=3))
    before = db_now(client)
    assert client.tick() == 1
    after = db_now(client)
    (run,) = scheduled_runs(client)
    slot = int(run.idempotency_key.rsplit(":", 1)[1])
    latest = {minflow._cron_latest("*/5 * * * *", "UTC", t).timestamp() for t in (before, after)}
    assert slot in latest
    following = client.get_schedule(sid).next_run_at
    assert following.timestamp() == slot + 300 and following > after
    assert client.tick() == 0


def test_pause_stops_firing_and_resume_does_not_burst(client):
    sid = client.schedule("t", cron="* * * * *")
    client.pause_schedule(sid)
    client.pause_schedule(sid)  # idempotent
    stale = db_now(client) - dt.timedelta(hours=2)
    make_due(client, sid, stale)
    assert client.tick() == 0
    assert client.get_schedule(sid).enabled is False
    assert [s.enabled for s in client.schedules()] == [False]  # paused ones are listed
    client.resume_schedule(sid)
    resumed = client.get_schedule(sid)
    assert resumed.enabled is True and resumed.next_run_at > db_now(client) - dt.timedelta(
        seconds=1
    )
    assert client.tick() == 0  # the stale slots do not fire
    # Resuming a running schedule leaves its planned slot alone.
    make_due(client, sid, stale)
    client.resume_schedule(sid)
    assert client.get_schedule(sid).next_run_at == stale
    assert client.tick() == 1


def test_delete_is_final(client):
    sid = client.schedule("t", cron="* * * * *")
    make_due(client, sid, db_now(client) - dt.timedelta(minutes=5))
    assert client.tick() == 1
    client.delete_schedule(sid)
    make_due(client, sid, db_now(client) - dt.timedelta(minutes=5))
    assert client.tick() == 0
    with pytest.raises(minflow.NotFound):
        client.resume_schedule(sid)
    assert len(scheduled_runs(client)) == 1  # runs it created stay


def test_due_schedules_fire_oldest_first_in_batches(client, monkeypatch):
    ids = [client.schedule("t", {"n": n}, cron=RARE) for n in range(5)]
    base = db_now(client).replace(microsecond=0) - dt.timedelta(minutes=10)
    for n, sid in enumerate(reversed(ids)):  # the last created is the most overdue
        make_due(client, sid, base + dt.timedelta(seconds=n))
    tick = minflow._tick
    with client._pool.connection() as conn:
        monkeypatch.setattr(minflow, "_TICK_BATCHES", 1)
        assert tick(client._dialect, conn, limit=2) == 2  # one batch: the two oldest slots
        assert sorted(r.payload["n"] for r in scheduled_runs(client)) == [3, 4]
        monkeypatch.undo()
        assert tick(client._dialect, conn, limit=2) == 3  # batches until none is due
    assert sorted(r.payload["n"] for r in scheduled_runs(client)) == [0, 1, 2, 3, 4]


def test_unusable_rows_warn_once_and_do_not_block_others(client, caplog):
    good = client.schedule("good", cron=RARE)
    broken = []
    for cron, zone in [("not a cron", "UTC"), ("0 9 * * *", "Mars/Base"), ("0 0 30 2 *", "UTC")]:
        sid = client.schedule("bad", cron="@daily")
        db(
            client,
            "UPDATE workflow_schedule SET schedule = :c, timezone = :z WHERE id = {uuid:id}",
            c=cron,
            z=zone,
            id=sid,
        )
        broken.append(sid)
    past = db_now(client) - dt.timedelta(hours=1)
    for sid in broken:
        make_due(client, sid, past - dt.timedelta(days=1))  # older than the good one: first
    make_due(client, good, past)
    caplog.set_level(logging.WARNING, logger="minflow.ticker")
    with client._pool.connection() as conn:
        assert minflow._tick(client._dialect, conn, limit=2) == 1
    assert [r.type for r in scheduled_runs(client)] == ["good"]
    now = db_now(client)
    for sid in broken:
        s = client.get_schedule(sid)
        assert now + dt.timedelta(minutes=59) < s.next_run_at < now + dt.timedelta(minutes=61)
        assert s.last_run_at is None  # it never fired
        make_due(client, sid, past)
    assert client.tick() == 0
    warned = [r for r in caplog.records if r.name == "minflow.ticker"]
    assert sorted(sum(sid in r.getMessage() for sid in broken) for r in warned) == [1, 1, 1]


# -- several tickers at once -------------------------------------------------------------------


SCHEDULES, ROUNDS = 150, 3  # more than one tick batch (100), so tickers interleave


def fire_rounds(client, start_tickers, stop_tickers, schedules=SCHEDULES, rounds=ROUNDS):
    """Make every schedule due at a new slot, ``rounds`` times, while the tickers run."""
    ids = [client.schedule("t", {"n": n}, cron=RARE) for n in range(schedules)]
    base = db_now(client).replace(microsecond=0) - dt.timedelta(minutes=30)
    expected = set()
    start_tickers()
    try:
        for r in range(rounds):
            planned = base + dt.timedelta(seconds=r)
            db(client, "UPDATE workflow_schedule SET next_run_at = {time:t}", t=planned)
            expected |= {f"schedule:{sid}:{int(planned.timestamp())}" for sid in ids}
            wait_for(
                lambda: (
                    not db(client, "SELECT id FROM workflow_schedule WHERE next_run_at <= {now}")
                ),
                message=f"round {r} to be ticked",
            )
    finally:
        stop_tickers()
    keys = [r.idempotency_key for r in scheduled_runs(client)]
    assert sorted(keys) == sorted(expected)  # each slot once, none missed
    for run in scheduled_runs(client):
        assert event_types(client, run.id) == ["created"]


def test_three_ticker_threads_fire_each_slot_once(dsn, client):
    stop = threading.Event()
    errors: list[Exception] = []
    fired: list[int] = []

    def tick_loop():
        with minflow.Client(dsn) as c:
            total = 0
            while not stop.is_set():
                try:
                    total += c.tick()
                except Exception as exc:  # collected and asserted below
                    errors.append(exc)
                    return
            fired.append(total)

    threads = [threading.Thread(target=tick_loop) for _ in range(3)]

    def start():
        for t in threads:
            t.start()

    def stop_all():
        stop.set()
        for t in threads:
            t.join(30)

    fire_rounds(client, start, stop_all)
    assert errors == []
    assert sum(fired) == SCHEDULES * ROUNDS  # what the tickers report is what they wrote


@pytest.mark.slow
def test_three_ticker_processes_fire_each_slot_once(dsn, client, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / f"ticker{n}.log" for n in range(3)]

    def start():
        for log in logs:
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "minflow", "ticker", "--dsn", dsn]
                        + ["--interval", "0.02"],
                        env=env,
                        cwd=tmp_path,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        for log in logs:
            wait_for(lambda log=log: "ticker started" in log.read_text(), message=f"{log.name}")

    def stop_all():
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)

    fire_rounds(client, start, stop_all)
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert all("Traceback" not in log.read_text() for log in logs)


# -- schedules written by the Go library --------------------------------------------------------


def insert_seed_schedules(client, planned: dt.datetime) -> dict[str, object]:
    """Rows as the Go library (or raw SQL following seed-spec §1.5) writes them; -> id: payload."""
    if client.dialect == "sqlite":
        text_time = planned.strftime("%Y-%m-%d %H:%M:%S")  # the Go format, no fraction
        rows = {
            str(uuid.uuid4()): ("CAST(:p AS BLOB)", '{"as":"blob"}', {"as": "blob"}),  # Go []byte
            str(uuid.uuid4()): (":p", '{"as":"text"}', {"as": "text"}),
            str(uuid.uuid4()): ("DEFAULT", None, {}),  # relies on the '{}' default
            str(uuid.uuid4()): ("CAST(:p AS BLOB)", "null", None),  # Go Schedule(type, nil)
        }
        for sid, (expr, body, _) in rows.items():
            columns = "id, type, schedule, timezone, next_run_at, enabled, priority, max_attempts"
            values = ":id, 'seed.v1', :cron, 'UTC', :t, 1, 100, 3"
            if expr != "DEFAULT":
                columns, values = columns + ", payload", values + f", {expr}"
            db(
                client,
                f"INSERT INTO workflow_schedule ({columns}) VALUES ({values})",
                id=sid,
                cron=RARE,
                t=text_time,
                **({"p": body} if body is not None else {}),
            )
        paused = str(uuid.uuid4())
        db(
            client,
            "INSERT INTO workflow_schedule (id, type, schedule, next_run_at, enabled) "
            "VALUES (:id, 'seed.v1', :cron, :t, 0)",
            id=paused,
            cron=RARE,
            t=text_time,
        )
        return {sid: payload for sid, (_, _, payload) in rows.items()}
    out = {}
    for body, payload in (('\'{"as": "jsonb"}\'', {"as": "jsonb"}), ("'null'", None)):
        (row,) = db(
            client,
            "INSERT INTO workflow_schedule (type, payload, schedule, timezone, next_run_at) "
            f"VALUES ('seed.v1', {body}, :cron, 'UTC', {{time:t}}) RETURNING id",
            cron=RARE,
            t=planned,
        )
        out[str(row[0])] = payload
    (row,) = db(
        client,
        "INSERT INTO workflow_schedule (type, schedule, next_run_at) "
        "VALUES ('seed.v1', :cron, {time:t}) RETURNING id",
        cron=RARE,
        t=planned,
    )
    out[str(row[0])] = {}
    db(
        client,
        "INSERT INTO workflow_schedule (type, schedule, next_run_at, enabled) "
        "VALUES ('seed.v1', :cron, {time:t}, false)",
        cron=RARE,
        t=planned,
    )
    return out


def test_schedule_rows_written_by_the_seed_fire(client):
    planned = db_now(client).replace(microsecond=0) - dt.timedelta(seconds=30)
    expected = insert_seed_schedules(client, planned)
    assert client.tick() == len(expected)  # the paused row does not fire
    runs = {r.idempotency_key: r for r in scheduled_runs(client)}
    # The key is the one a Go ticker derives from next_run_at, so the two never double-fire.
    assert set(runs) == {f"schedule:{sid}:{int(planned.timestamp())}" for sid in expected}
    for sid, payload in expected.items():
        run = runs[f"schedule:{sid}:{int(planned.timestamp())}"]
        assert (run.type, run.payload) == ("seed.v1", payload)
        assert client.get_schedule(sid).next_run_at == minflow._cron_next(RARE, "UTC", planned)
    assert len(client.schedules()) == len(expected) + 1


def test_go_zero_time_row_is_deferred_not_fired(client):
    # The Go library stores a never-matching expression's next time as the year-1 zero time.
    sid = client.schedule("t", cron="@daily")
    db(
        client,
        "UPDATE workflow_schedule SET schedule = '0 0 31 2 *', next_run_at = {time:t} "
        "WHERE id = {uuid:id}",
        t=utc(1, 1, 1),
        id=sid,
    )
    assert client.tick() == 0
    assert client.get_schedule(sid).next_run_at > db_now(client) + dt.timedelta(minutes=59)


# -- cost of an idle tick ------------------------------------------------------------------------


def test_idle_tick_is_one_indexed_query(client):
    for n in range(300):
        client.schedule("t", {"n": n}, cron="0 0 1 1 *")
    statement = client._dialect.sql["schedules_due"]
    if client.dialect == "sqlite":
        db(client, "ANALYZE")
        plan = " ".join(str(row[-1]) for row in db(client, "EXPLAIN QUERY PLAN " + statement))
        assert "USING COVERING INDEX minflow_schedule_due" in plan or "USING INDEX" in plan, plan
    else:
        db(client, "ANALYZE workflow_schedule")
        plan = " ".join(row[0] for row in db(client, "EXPLAIN " + statement))
        assert "Index" in plan and "Seq Scan" not in plan, plan
    assert client.tick() == 0


# -- the worker runs the ticker ------------------------------------------------------------------


def test_worker_fires_and_executes_a_due_slot_within_two_seconds(app):
    seen = []

    @app.handler("report.v1")
    def report(run):
        seen.append(run.payload)
        return {"done": True}

    sid = app.schedule("report.v1", {"r": 1}, cron=RARE)
    worker = app.worker(concurrency=2, poll_interval=0.2).start()
    try:
        planned = db_now(app).replace(microsecond=0) + dt.timedelta(seconds=2)
        make_due(app, sid, planned)  # a slot 2 s from now; the default tick interval is 1 s
        run = wait_for(lambda: next(iter(scheduled_runs(app)), None), message="the slot's run")
        assert run.created_at - planned < dt.timedelta(seconds=2)
        assert run.idempotency_key == f"schedule:{sid}:{int(planned.timestamp())}"
        wait_for(lambda: app.get(run.id).status == "succeeded", message="the run to succeed")
    finally:
        worker.stop()
    assert seen == [{"r": 1}]
    assert app.get(run.id).result == {"done": True}
    assert event_types(app, run.id)[0] == "created"


def test_ticker_cli_rejects_a_bad_interval(dsn, capsys):
    assert minflow.main(["ticker", "--dsn", dsn, "--interval", "0"]) == 2
    assert "--interval" in capsys.readouterr().err

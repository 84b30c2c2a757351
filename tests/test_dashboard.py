"""The dashboard at /ui: the page as served (self-contained, under a strict Content-Security-
Policy), the read-only endpoints it draws on (stats, throughput), and the page itself driven in a
real headless Chromium against a real server and database.

One browser serves the whole module; each test starts its own server on a free port, so each
test's page has an origin, and so a sessionStorage, of its own. With MINFLOW_TEST_SCREENSHOT=path
the overview test on SQLite saves the README's screenshot there.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import re
import uuid
from urllib.parse import quote

import pytest

import minflow
from conftest import chromium_session, db, event_types, wait_for
from test_cli import cli, ok_json
from test_http import API, Api
from test_operate import finish

UTC = dt.timezone.utc
SCREENSHOT = os.environ.get("MINFLOW_TEST_SCREENSHOT")


@pytest.fixture(scope="module")
def chrome():
    with chromium_session() as driver:
        yield driver


@pytest.fixture
def served(client):
    """The API on a fresh database (both dialects), without a key."""
    api = Api(client)
    yield api
    api.close()


class Page:
    """The dashboard of one server in the module's browser."""

    def __init__(self, chrome, api: Api):
        self.chrome = chrome
        self.url = f"http://127.0.0.1:{api.port}/ui"

    def open(self, fragment: str = "") -> None:
        self.chrome.get(self.url + fragment)

    def js(self, script: str, *args):
        return self.chrome.execute_script(script, *args)

    def until(self, predicate, message: str, timeout: float = 10):
        from selenium.webdriver.support.ui import WebDriverWait

        # An index error: the table is not drawn yet.
        wait = WebDriverWait(self.chrome, timeout, 0.05, ignored_exceptions=(IndexError,))
        return wait.until(lambda _: predicate(), message)

    def text(self, css: str) -> str:
        return self.js(
            "const e = document.querySelector(arguments[0]); return e && e.innerText;", css
        )

    def rows(self, tbody: str) -> list[list[str]]:
        """The cells' text of a table body's rows."""
        return self.js(
            "return [...document.querySelectorAll(arguments[0] + ' tr')]"
            ".map((tr) => [...tr.cells].map((c) => c.innerText.trim()));",
            f"#{tbody}",
        )

    def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        self.chrome.find_element(By.CSS_SELECTOR, css).click()

    def type_into(self, css: str, text: str) -> None:
        from selenium.webdriver.common.by import By

        field = self.chrome.find_element(By.CSS_SELECTOR, css)
        field.clear()
        field.send_keys(text)

    def dialog_open(self, name: str) -> bool:
        return self.js("return document.getElementById(arguments[0]).open", name)

    def confirm(self, ok: bool = True) -> str:
        """Answer the confirmation dialog; returns its question."""
        self.until(lambda: self.dialog_open("confirm-dialog"), "a confirmation")
        question = self.text("#confirm-text")
        self.click("#confirm-ok" if ok else "#confirm-back")
        self.until(lambda: not self.dialog_open("confirm-dialog"), "the confirmation closed")
        return question

    def loaded(self) -> None:
        """Wait until the first view has been drawn with the server's data."""
        self.until(
            lambda: self.js("return performance.getEntriesByName('minflow-data').length"),
            "the first view drawn",
        )


# -- the page as served ------------------------------------------------------------------------


def test_page_is_public_self_contained_and_allows_only_itself(sqlite_client):
    api = Api(sqlite_client, api_key="k-" + uuid.uuid4().hex)
    try:
        pages = []
        for path in ("/ui", "/ui/"):
            status, headers, body = api.call("GET", path)  # no key: the page is public
            assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
            assert headers["X-Content-Type-Options"] == "nosniff"
            pages.append((headers["Content-Security-Policy"], body.decode()))
        assert pages[0] == pages[1]
        policy, page = pages[0]
        # The only URL in the page is the SVG namespace, which is a name, not a request.
        assert re.findall(r"\w+://[^\s\"'<>)]*", page) == ["http://www.w3.org/2000/svg"]
        assert not re.search(r"\s(src|srcset|action|formaction)=", page)
        assert page.count("<script>") == page.count("<style>") == 1  # inline, not fetched

        def digest(text: str) -> str:
            return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()

        script = re.search(r"<script>(.*?)</script>", page, re.S)[1]
        style = re.search(r"<style>(.*?)</style>", page, re.S)[1]
        directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
        assert directives == {
            "default-src": "'none'",
            "script-src": f"'sha256-{digest(script)}'",
            "style-src": f"'sha256-{digest(style)}'",
            "connect-src": "'self'",
            "img-src": "data:",
            "base-uri": "'none'",
            "form-action": "'none'",
            "frame-ancestors": "'none'",
        }
        # Only the page itself is public.
        assert api.call("GET", "/ui/x")[0] == 401
        assert api.call("GET", f"{API}/stats")[0] == 401
        assert api.call("POST", "/ui")[0] == 405
    finally:
        api.close()


# -- the endpoints it draws on -----------------------------------------------------------------


def test_stats_answers_what_stats_json_prints(served, client, dsn, tmp_path):
    client.submit_many([minflow.Job("a.v1"), minflow.Job("a.v1", run_in=3600)])
    client.submit("b.v1", run_in=3600)  # pending, but not due: no age
    done = client.submit_many([minflow.Job("a.v1") for _ in range(3)])
    finish(client, done[:2], "succeeded")
    finish(client, done[2:], "failed")
    status, _, answer = served.call("GET", f"{API}/stats")
    printed = ok_json(cli(tmp_path, "stats", "--json", "--dsn", dsn))
    assert status == 200 and answer.keys() == printed.keys() == {"a.v1", "b.v1"}
    for document in (answer, printed):
        waited = document["a.v1"].pop("oldest_due_pending_seconds")
        assert 0 <= waited < 60
    assert answer == printed
    assert answer == {
        "a.v1": {"pending": 2, "succeeded": 2, "failed": 1},
        "b.v1": {"pending": 1, "oldest_due_pending_seconds": None},
    }


def test_throughput_counts_finished_runs_per_minute_of_the_database_clock(served, client):
    run_id = client.submit("t.v1")
    with client._pool.connection() as conn:
        now = client._db_now(conn)
    minute = now.replace(second=0, microsecond=0)
    events = [
        ("succeeded", minute - dt.timedelta(minutes=2, seconds=-5)),
        ("succeeded", minute - dt.timedelta(minutes=2, seconds=-50)),
        ("failed", minute - dt.timedelta(minutes=2, seconds=-30)),
        ("retried", minute - dt.timedelta(minutes=2, seconds=-30)),  # not finished: not counted
        ("failed", minute - dt.timedelta(minutes=7)),
        ("succeeded", minute - dt.timedelta(minutes=60)),  # before the hour's first minute
    ]
    for event_type, when in events:
        db(
            client,
            "INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at) "
            "VALUES ({uuid:id}, :event_type, NULL, {time:when})",
            id=run_id,
            event_type=event_type,
            when=when,
        )
    status, _, answer = served.call("GET", f"{API}/throughput")
    assert status == 200 and answer["minutes"] == 60
    per_minute = answer["per_minute"]
    starts = [minflow._parse_time(m["minute"]) for m in per_minute]
    assert len(starts) == 60 and starts == sorted(starts)
    assert {b - a for a, b in itertools.pairwise(starts)} == {dt.timedelta(minutes=1)}
    # The last minute is the current one (the clock may have moved on to the next meanwhile).
    assert starts[-1] - minute in (dt.timedelta(0), dt.timedelta(minutes=1))

    def counted(answer: dict) -> dict:
        return {
            minflow._parse_time(m["minute"]): (m["succeeded"], m["failed"])
            for m in answer["per_minute"]
            if m["succeeded"] or m["failed"]
        }

    expected = {
        minute - dt.timedelta(minutes=2): (2, 1),
        minute - dt.timedelta(minutes=7): (0, 1),
    }
    assert counted(answer) == expected
    status, _, answer = served.call("GET", f"{API}/throughput?minutes=3")
    first = minflow._parse_time(answer["per_minute"][0]["minute"])
    assert status == 200 and len(answer["per_minute"]) == 3
    assert counted(answer) == {k: v for k, v in expected.items() if k >= first}
    assert first <= minute - dt.timedelta(minutes=1)  # 3 minutes back: never the 7th
    for query, needle in (
        ("0", "minutes must be 1 to 1440"),
        ("1441", "got 1441"),
        ("x", "integer"),
    ):
        status, _, answer = served.call("GET", f"{API}/throughput?minutes={query}")
        assert status == 400 and needle in answer["error"], answer


def test_throughput_reads_the_event_type_index(client):
    """With a long history, the last hour is a range of the index, not a scan of the table;
    on PostgreSQL also in the generic plan, which knows no cut-off (a prepared statement may
    get it)."""
    run_id = client.submit("t.v1")
    statement = client._dialect.sql["throughput"]
    since = dt.datetime.now(UTC) - dt.timedelta(hours=1)
    if client.dialect == "sqlite":
        plan = " ".join(
            str(row[-1]) for row in db(client, "EXPLAIN QUERY PLAN " + statement, since=since)
        )
        assert "idx_workflow_event_type" in plan and "SCAN workflow_event" not in plan, plan
        return
    db(
        client,
        "INSERT INTO {workflow_event} (workflow_id, event_type, created_at) "
        "SELECT {uuid:id}, (ARRAY['created', 'succeeded', 'failed'])[1 + i % 3], "
        "TIMESTAMPTZ '2020-01-01' + make_interval(secs => i) FROM generate_series(1, 30000) AS i",
        id=run_id,
    )
    db(client, "ANALYZE {workflow_event}")
    numbered = statement.replace(":since", "$1")
    with client._pool.connection() as conn:
        conn.query("SET plan_cache_mode = force_generic_plan")
        conn.query(f"PREPARE throughput_plan AS {numbered}")
        explained = conn.query(f"EXPLAIN EXECUTE throughput_plan('{since.isoformat()}')")
        conn.query("DEALLOCATE throughput_plan")
        conn.query("RESET plan_cache_mode")
    plan = "\n".join(row[0] for row in explained)
    assert "idx_workflow_event_type" in plan and "Seq Scan" not in plan, plan


# -- in the browser ----------------------------------------------------------------------------


def backdate(client, run_id: str, event_type: str, minutes: float) -> None:
    """Move a run's event back in time (a history for the per-minute chart)."""
    db(
        client,
        "UPDATE {workflow_event} SET created_at = {later:seconds} "
        "WHERE workflow_id = {uuid:id} AND event_type = :event_type",
        seconds=-60 * minutes,
        id=run_id,
        event_type=event_type,
    )


def test_overview_then_a_failed_run_its_error_timeline_and_retry(app, chrome, dialect):
    @app.handler("billing.invoice.v1")
    def invoice(run):
        return {"invoice": f"INV-{run.payload['order']}", "total": 12.5}

    @app.handler("email.send.v1")
    def send(run):
        raise RuntimeError(f"SMTP 554: mailbox unavailable for {run.payload['to']}")

    invoices = app.submit_many(
        [
            minflow.Job("billing.invoice.v1", {"order": n}, idempotency_key=f"invoice-{n}")
            for n in range(120)
        ]
    )
    emails = app.submit_many(
        [
            minflow.Job("email.send.v1", {"to": f"user{n}@example.com"}, max_attempts=1)
            for n in range(3)
        ]
    )
    app.submit("report.render.v1", {"month": "2030-01"})  # no handler here: stays pending
    workers = [
        minflow.Worker(app, worker_id=name, types=[run_type], lease=3, schedules=False).start()
        for name, run_type in (("billing-1", "billing.invoice.v1"), ("mailer-1", "email.send.v1"))
    ]
    api = Api(app)
    try:
        wait_for(
            lambda: (
                app.stats().get("billing.invoice.v1", {}).get("succeeded") == 120
                and app.stats().get("email.send.v1", {}).get("failed") == 3
            ),
            message="the runs finished",
        )
        # Most of an hour of history, busier lately (none near the hour's start, which moves on
        # with the clock).
        for n, run_id in enumerate(invoices):
            backdate(app, run_id, "succeeded", 2 + 47 * (n * 0.618034 % 1) ** 1.6)

        page = Page(chrome, api)
        page.open()
        page.loaded()
        stats = {row[0]: row[1:] for row in page.rows("stats")}
        assert stats["billing.invoice.v1"][:5] == ["0", "0", "120", "0", "0"]
        assert stats["email.send.v1"][:5] == ["0", "0", "0", "3", "0"]
        assert stats["report.render.v1"][0] == "1" and re.fullmatch(
            r"\d+s", stats["report.render.v1"][5]
        )
        assert page.rows("stats-total")[0][:6] == ["Total", "1", "0", "120", "3", "0"]
        assert page.text("#chart-text") == (
            "123 runs finished in the last 60 minutes: 120 succeeded, 3 failed."
        )
        # Each bar is one minute the API counted (as a multiset: the minutes move on).
        titles = page.js(
            "return [...document.querySelectorAll('#chart title')].map((t) => t.textContent)"
        )
        bars = [
            tuple(map(int, re.findall(r": (\d+) succeeded, (\d+) failed", t)[0])) for t in titles
        ]
        counted = [
            (m["succeeded"], m["failed"])
            for m in api.call("GET", f"{API}/throughput")[2]["per_minute"]
        ]
        assert len(bars) == 60 and sorted(b for b in bars if any(b)) == sorted(
            c for c in counted if any(c)
        )
        assert len([b for b in bars if any(b)]) > 30
        shown = {row[0]: (row[3], row[-1]) for row in page.rows("workers")}
        assert shown == {
            "billing-1": ("billing.invoice.v1", "alive"),
            "mailer-1": ("email.send.v1", "alive"),
        }
        if SCREENSHOT and dialect == "sqlite":
            chrome.save_screenshot(SCREENSHOT)
        for worker in workers:  # the revived run must stay pending for the check below
            worker.stop(10)

        page.click('#stats a[href="#runs?type=email.send.v1&status=failed"]')
        page.until(lambda: len(page.rows("runs")) == 3, "the three failed runs listed")
        assert {row[2] for row in page.rows("runs")} == {"failed"}
        assert (
            page.js("return document.querySelector('#filter [name=type]').value") == "email.send.v1"
        )
        failed = emails[0]
        page.click(f'#runs a[href="#run/{failed}"]')
        page.until(lambda: page.text("#run-error"), "the run's last error")
        assert page.text("#run-error") == (
            "RuntimeError: SMTP 554: mailbox unavailable for user0@example.com"
        )
        assert json.loads(page.text("#run-payload")) == {"to": "user0@example.com"}
        timeline = page.js(
            "return [...document.querySelectorAll('#run-events .st')].map((e) => e.textContent)"
        )
        assert timeline == event_types(app, failed) == ["created", "leased", "started", "failed"]
        assert "mailbox unavailable" in page.text("#run-events li:last-child")

        page.click("#run-retry")
        page.until(lambda: "Retried" in page.text("#run-note"), "the retry's answer")
        run = app.get(failed)
        assert (run.status, run.attempt) == ("pending", 0)
        assert event_types(app, failed)[-1] == "retried"
        page.until(lambda: "pending" in page.text("#run-title"), "the run shown pending")
        assert page.js("return document.getElementById('run-retry').disabled")
        assert {app.get(i).status for i in emails[1:]} == {"failed"}  # only that one
    finally:
        for worker in workers:
            worker.stop(10)
        api.close()


# Markup in every text the dashboard shows from the database; none of it may become an element
# or run (the page's policy would stop a script, so the checks are on the document itself).
HOSTILE_TYPE = '<img src=x onerror="window.__xss = 1">'
HOSTILE_PAYLOAD = {"note": "<script>window.__xss = 2</script>", "html": "</pre><b id=x1>b</b>"}
HOSTILE_KEY = '<svg onload="window.__xss = 3">'
HOSTILE_ERROR = '<img src=x onerror="alert(4)"><i id=x2>i</i>'
HOSTILE_NAME = "<b id=x3>daily</b>"
HOSTILE_WORKER = "<i id=x4>w</i>"
INJECTED = "#x1, #x2, #x3, #x4, main img, main script, main b, main i, main svg:not(.chart)"


def test_text_from_the_database_is_shown_as_text(tmp_path, chrome):
    app = minflow.App(f"sqlite:///{tmp_path / 'xss.db'}")
    app.migrate()
    app.handler(HOSTILE_TYPE)(lambda run: None)
    run_id = app.submit(HOSTILE_TYPE, HOSTILE_PAYLOAD, idempotency_key=HOSTILE_KEY)
    db(
        app,
        "UPDATE {workflow_run} SET status = 'failed', last_error = :error WHERE id = {uuid:id}",
        error=HOSTILE_ERROR,
        id=run_id,
    )
    db(
        app,
        "INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at) "
        "VALUES ({uuid:id}, 'failed', :data, {now})",
        id=run_id,
        data=json.dumps({"error": HOSTILE_ERROR}),
    )
    app.schedule("report.v1", cron="@daily", name=HOSTILE_NAME)
    worker = minflow.Worker(app, worker_id=HOSTILE_WORKER, schedules=False).start()
    api = Api(app)
    page = Page(chrome, api)
    try:
        wait_for(app.workers, message="the worker's entry")

        def harmless() -> None:
            assert page.js("return window.__xss") is None
            assert page.js("return document.querySelectorAll(arguments[0]).length", INJECTED) == 0

        page.open()
        page.loaded()
        page.until(lambda: page.rows("workers")[0][0] == HOSTILE_WORKER, "the worker listed")
        assert page.rows("stats")[0][0] == HOSTILE_TYPE
        assert page.rows("workers")[0][3] == HOSTILE_TYPE
        harmless()
        page.open("#runs")
        page.until(lambda: page.rows("runs")[0][1] == HOSTILE_TYPE, "the run listed")
        listed = page.rows("runs")[0]
        assert (listed[5], listed[8]) == (HOSTILE_KEY, HOSTILE_ERROR)
        harmless()
        page.open(f"#run/{run_id}")
        page.until(lambda: page.text("#run-error") == HOSTILE_ERROR, "the error shown")
        assert json.loads(page.text("#run-payload")) == HOSTILE_PAYLOAD
        assert HOSTILE_PAYLOAD["note"] in page.text("#run-payload")
        assert json.dumps({"error": HOSTILE_ERROR}, separators=(",", ":")) in page.text(
            "#run-events"
        )
        assert HOSTILE_KEY in page.text("#run-body")
        harmless()
        page.open("#schedules")
        page.until(lambda: page.rows("schedules")[0][0] == HOSTILE_NAME, "the schedule listed")
        harmless()
    finally:
        worker.stop(10)
        api.close()
        app.close()


def test_api_key_asked_once_kept_in_the_tab_and_never_in_a_url(sqlite_client, chrome, caplog):
    key = "s3cret-é-" + uuid.uuid4().hex  # beyond ASCII: sent as its UTF-8 bytes
    sqlite_client.submit("keyed.v1")
    api = Api(sqlite_client, api_key=key)
    page = Page(chrome, api)
    try:
        with caplog.at_level(logging.INFO, logger="minflow.http"):
            page.open()
            page.until(lambda: page.dialog_open("key-dialog"), "the key asked for")
            assert "requires an API key" in page.text("#key-msg")
            page.type_into("#key-input", "wrong-" + key + "\n")
            page.until(lambda: "did not accept" in page.text("#key-msg"), "the key refused")
            assert page.dialog_open("key-dialog")
            page.type_into("#key-input", key + "\n")
            page.until(lambda: page.rows("stats")[0][0] == "keyed.v1", "the data with the key")
            assert not page.dialog_open("key-dialog")
            assert page.js("return document.getElementById('banner').hidden")
            urls = page.js("return performance.getEntries().map((e) => e.name)")
            page.open("#runs")  # a new document in the same tab: the key is not asked again
            page.until(lambda: page.rows("runs")[0][1] == "keyed.v1", "the runs with the key")
            assert not page.dialog_open("key-dialog")
            urls += page.js("return performance.getEntries().map((e) => e.name)")
            stored = page.js(
                "return [document.cookie, localStorage.length, sessionStorage.length,"
                " sessionStorage.getItem('minflow.api-key')]"
            )
        assert stored == ["", 0, 1, key]
        assert any(f"{API}/stats" in url for url in urls) and any(
            "/workflows?" in url for url in urls
        )
        for text in (*urls, chrome.current_url, *(r.getMessage() for r in caplog.records)):
            assert key not in text and quote(key) not in text and "s3cret" not in text
        assert any('"GET /api/v1/stats HTTP/1.1" 401' in r.getMessage() for r in caplog.records)
    finally:
        api.close()


def test_bulk_retry_and_cancel_show_the_count_and_ask_first(sqlite_client, chrome):
    client = sqlite_client
    failed = client.submit_many([minflow.Job("import.row.v1", {"n": n}) for n in range(3)])
    finish(client, failed, "failed")
    other = client.submit("other.v1")
    finish(client, [other], "failed")
    waiting = client.submit_many(
        [minflow.Job("import.row.v1", idempotency_key=f"imp-7-{n}") for n in range(2)]
    )
    api = Api(client)
    page = Page(chrome, api)
    try:
        page.open("#runs?type=import.row.v1&status=failed")
        page.until(lambda: len(page.rows("runs")) == 3, "the failed imports listed")
        assert page.js("return document.getElementById('bulk-cancel').disabled")  # not pending
        page.click("#bulk-retry")
        assert page.confirm() == "Retry 3 runs (type import.row.v1, status failed)?"
        page.until(lambda: page.text("#runs-note") == "Retried 3 runs.", "the retry's count")
        assert {client.get(i).status for i in failed} == {"pending"}
        assert client.get(other).status == "failed"

        page.open("#actions")
        page.until(lambda: page.text("#bulk [name=status]"), "the bulk form")
        page.js(
            "const k = document.querySelector('#bulk [name=kind]'); k.value = 'cancel';"
            "k.dispatchEvent(new Event('change'));"
        )
        page.type_into("#bulk [name=key_prefix]", "imp-7-")
        page.click("#bulk button[type=submit]")
        assert page.confirm(ok=False) == "Cancel 2 runs (key_prefix imp-7-)?"
        page.until(lambda: page.text("#bulk-note") == "Nothing changed.", "the refusal noted")
        assert {client.get(i).status for i in waiting} == {"pending"}
        page.click("#bulk button[type=submit]")
        page.confirm()
        page.until(lambda: page.text("#bulk-note") == "Cancelled 2 runs.", "the cancel's count")
        assert {client.get(i).status for i in waiting} == {"cancelled"}
        assert {client.get(i).status for i in failed} == {"pending"}
        page.click("#bulk button[type=submit]")
        page.until(
            lambda: page.text("#bulk-note") == "No runs match (key_prefix imp-7-).", "none left"
        )
    finally:
        api.close()


def test_schedules_pause_resume_delete_and_prune_after_a_dry_run(sqlite_client, chrome):
    client = sqlite_client
    schedule_id = client.schedule("report.daily.v1", cron="0 6 * * *", name="daily-report")
    old = client.submit_many([minflow.Job("t.v1") for _ in range(4)])
    finish(client, old[:3], "succeeded")
    finish(client, old[3:], "failed")
    recent = client.submit("t.v1")
    finish(client, [recent], "succeeded", dt.datetime.now(UTC))
    api = Api(client)
    page = Page(chrome, api)
    try:
        page.open("#schedules")
        page.until(lambda: page.rows("schedules")[0][6] == "active", "the schedule listed")
        page.click('#schedules button[aria-label="Pause daily-report"]')
        page.until(lambda: page.rows("schedules")[0][6] == "paused", "the schedule paused")
        assert client.get_schedule(schedule_id).enabled is False
        page.click('#schedules button[aria-label="Resume daily-report"]')
        page.until(lambda: page.rows("schedules")[0][6] == "active", "the schedule resumed")
        assert client.get_schedule(schedule_id).enabled is True
        page.click('#schedules button[aria-label="Delete daily-report"]')
        assert page.confirm() == "Delete schedule daily-report? Runs it already created stay."
        page.until(lambda: page.rows("schedules") == [["No schedules."]], "the schedule gone")
        with pytest.raises(minflow.NotFound):
            client.get_schedule(schedule_id)

        page.open("#actions")
        page.until(lambda: page.text("#prune-hint"), "the prune form")
        page.click("#prune [value=failed]")  # keep the failed one
        page.type_into("#prune [name=older_than]", "7d")
        page.click("#prune button[type=submit]")
        assert page.confirm(ok=False) == (
            "Delete 3 runs (succeeded, cancelled, last updated more than 7d ago) and their "
            "events? This cannot be undone."
        )
        page.until(lambda: page.text("#prune-note") == "Nothing deleted.", "the refusal noted")
        assert len(client.list()) == 5
        page.click("#prune button[type=submit]")
        page.confirm()
        page.until(lambda: page.text("#prune-note") == "Deleted 3 runs.", "the prune's count")
        assert sorted(r.id for r in client.list()) == sorted([old[3], recent])
        page.type_into("#prune [name=older_than]", "0d")
        page.click("#prune button[type=submit]")
        page.until(lambda: "older_than must be" in page.text("#prune-note"), "the server's error")
        assert page.js("return document.getElementById('prune-note').classList.contains('bad')")
    finally:
        api.close()


def test_refresh_picks_up_changes_and_can_be_turned_off(sqlite_client, chrome):
    from selenium.common.exceptions import TimeoutException

    client = sqlite_client
    api = Api(client)
    page = Page(chrome, api)
    try:
        page.open("#runs")
        page.until(lambda: page.rows("runs") == [["No runs match."]], "an empty list")
        page.js(
            "const e = document.getElementById('every'); e.value = '2';"
            "e.dispatchEvent(new Event('change'));"
        )
        run_id = client.submit("later.v1")
        page.until(lambda: page.rows("runs")[0][1] == "later.v1", "the new run, unasked", 6)
        page.js(
            "const e = document.getElementById('every'); e.value = '0';"
            "e.dispatchEvent(new Event('change'));"
        )
        assert page.text("#updated") == "paused"
        loads = "return performance.getEntriesByType('resource').filter((e) => e.name.includes('/workflows?')).length"
        before = page.js(loads)
        client.cancel(run_id)
        # Off for longer than the interval was: no request, and the list stays as it was.
        with pytest.raises(TimeoutException):
            page.until(lambda: page.js(loads) > before, "refreshed", 3)
        assert page.rows("runs")[0][2] == "pending"
        page.click("#filter button[type=submit]")  # asking still works
        page.until(lambda: page.rows("runs")[0][2] == "cancelled", "the list on request")
    finally:
        api.close()


def test_layout_fits_1280_and_narrow_windows(sqlite_client, chrome):
    client = sqlite_client
    for n in range(3):
        run_id = client.submit(
            f"billing.invoice.v{n}", {"order": n}, idempotency_key=f"invoice-{n:06d}"
        )
        finish(client, [run_id], "failed")
        db(
            client,
            "UPDATE {workflow_run} SET last_error = :e WHERE id = {uuid:id}",
            e="x" * 500,
            id=run_id,
        )
    api = Api(client)
    page = Page(chrome, api)
    fits = "return document.documentElement.scrollWidth <= window.innerWidth"
    try:
        for width in (1280, 420):
            chrome.set_window_size(width, 800)
            for fragment in ("#overview", "#runs", "#schedules", "#actions"):
                page.open(fragment)
                page.loaded()
                assert page.js(fits), (width, fragment)
            # At 1280 the runs table fits as well (long errors are cut, whole in the tooltip);
            # narrower, it scrolls in a box of its own.
            page.open("#runs")
            page.until(lambda: len(page.rows("runs")) == 3, "the runs listed")
            table_fits = page.js(
                "const t = document.querySelector('#v-runs table');"
                "return t.scrollWidth <= t.parentElement.clientWidth;"
            )
            assert table_fits == (width == 1280)
    finally:
        chrome.set_window_size(1280, 800)
        api.close()

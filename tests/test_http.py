"""The REST API over a real socket: every route, every status code, auth, limits, OpenAPI.

Each test starts the server in-process on port 0 (a thread running ``serve_forever``) against a
real database, talks to it with ``http.client`` and shuts it down at teardown.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import uuid

import pytest
from conftest import ROOT, free_port, wait_for

import minflow

API = "/api/v1"


class Api:
    """A running server plus a tiny HTTP client for it."""

    def __init__(self, client: minflow.Client, **options):
        self.server = minflow._Server("127.0.0.1", 0, client, **options)
        self.port = self.server.server_address[1]
        # A short poll interval makes shutdown() at teardown quick.
        self.thread = minflow._start_server(self.server, poll_interval=0.02)

    def call(self, method, path, body=None, headers=None, raw=None):
        """(status, headers, decoded body); ``raw`` sends bytes as they are."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            data = raw if raw is not None else None if body is None else json.dumps(body)
            conn.request(method, path, body=data, headers=headers or {})
            response = conn.getresponse()
            payload = response.read()
            kind = response.getheader("Content-Type", "")
            decoded = json.loads(payload) if kind.startswith("application/json") else payload
            return response.status, dict(response.getheaders()), decoded
        finally:
            conn.close()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def api(client):
    """The API without authentication on a fresh database (both dialects)."""
    server = Api(client)
    yield server
    server.close()


def submit(api, **body):
    status, _, data = api.call("POST", f"{API}/workflows", {"type": "t.v1", **body})
    assert status == 201, data
    return data["id"]


# -- runs ----------------------------------------------------------------------------------


def test_submit_get_list_and_events_use_clean_json(api, client):
    run_id = submit(api, payload={"order": 42, "tags": ["a"]}, priority=0, max_attempts=5)
    other = submit(api, type="u.v1")

    status, headers, run = api.call("GET", f"{API}/workflows/{run_id}")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert run["payload"] == {"order": 42, "tags": ["a"]}  # a JSON value, not base64
    assert (run["status"], run["priority"], run["max_attempts"]) == ("pending", 0, 5)
    assert set(run) == set(minflow.Run.__match_args__)  # every field, in the JSON as in Python
    assert run["result"] is None and run["created_at"].endswith("Z")
    assert client.get(run_id).payload == {"order": 42, "tags": ["a"]}

    status, _, runs = api.call("GET", f"{API}/workflows")
    assert status == 200 and [r["id"] for r in runs] == [other, run_id]  # newest first
    assert [r["id"] for r in api.call("GET", f"{API}/workflows?type=u.v1")[2]] == [other]
    assert api.call("GET", f"{API}/workflows?status=succeeded")[2] == []
    assert len(api.call("GET", f"{API}/workflows?limit=1&offset=1")[2]) == 1
    assert api.call("GET", f"{API}/workflows?type=&status=")[2] == runs  # empty = no filter

    status, _, events = api.call("GET", f"{API}/workflows/{run_id}/events")
    assert status == 200 and [e["event_type"] for e in events] == ["created"]
    assert events[0]["workflow_id"] == run_id and isinstance(events[0]["id"], int)


def test_run_after_and_idempotency_conflict(api, client):
    key_body = {"idempotency_key": "order-7", "run_after": "2031-05-06T07:08:09.5+02:00"}
    run_id = submit(api, **key_body)
    assert client.get(run_id).run_at.isoformat() == "2031-05-06T05:08:09.500000+00:00"

    status, _, body = api.call("POST", f"{API}/workflows", {"type": "t.v1", **key_body})
    assert status == 409 and body["id"] == run_id and "idempotency" in body["error"]
    assert len(client.list()) == 1

    # The seed treats an empty key as no key: two submits, two runs.
    assert submit(api, idempotency_key="") != submit(api, idempotency_key="")
    delayed = submit(api, run_in=3600)
    assert client.get(delayed).run_at > client.get(run_id).created_at


BAD_SUBMITS = [
    (b"{not json", "invalid JSON"),
    (b"", "empty"),
    (b"[1, 2]", "expected an object"),
    (b'{"type": "t", "payload": NaN}', "NaN"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),  # nesting deeper than the parser allows
    (b'{"type": "t", "payload": "\\ud800"}', "surrogate"),
    (b"\xff\xfe\x00", "invalid JSON"),
    (json.dumps({"payload": 1}).encode(), "type is required"),
    (json.dumps({"type": ""}).encode(), "type is required"),
    (json.dumps({"type": "   "}).encode(), "type"),
    (json.dumps({"type": 5}).encode(), "type"),
    (json.dumps({"type": "x" * 256}).encode(), "255"),
    (json.dumps({"type": "t", "priority": "high"}).encode(), "priority"),
    (json.dumps({"type": "t", "priority": 10.5}).encode(), "priority"),
    (json.dumps({"type": "t", "priority": 2**40}).encode(), "priority"),
    (json.dumps({"type": "t", "max_attempts": 0}).encode(), "max_attempts"),
    (json.dumps({"type": "t", "run_after": "2030-01-01 10:00:00"}).encode(), "RFC 3339"),
    (json.dumps({"type": "t", "run_after": "2030-02-30T10:00:00Z"}).encode(), "run_after"),
    (
        json.dumps({"type": "t", "run_after": "2030-01-01T10:00:00Z", "run_in": 5}).encode(),
        "not both",
    ),
    (
        json.dumps(
            {"type": "t", "run_after": "2030-01-01T10:00:00Z", "run_at": "2030-01-01T10:00:00Z"}
        ).encode(),
        "not both",
    ),
    (json.dumps({"type": "t", "run_in": -1}).encode(), "run_in"),
    (json.dumps({"type": "t", "run_in": 1e300}).encode(), "run_in"),
    (json.dumps({"type": "t", "payload": "a\u0000b"}).encode(), "NUL"),
    (json.dumps({"type": "t", "idempotency_key": 7}).encode(), "idempotency_key"),
    (json.dumps({"type": "t", "max_attempt": 3}).encode(), "unknown field"),
]


def test_submit_rejects_bad_bodies_with_400(api, client):
    for raw, needle in BAD_SUBMITS:
        status, _, body = api.call("POST", f"{API}/workflows", raw=raw)
        assert status == 400, (raw[:80], body)
        assert needle in body["error"], (raw[:80], body)
    assert client.list() == []  # nothing half-written


def test_list_rejects_bad_parameters_with_400(api):
    for query in (
        "limit=abc",
        "limit=0",
        "limit=1001",
        "offset=-1",
        "offset=1.5",
        "status=bogus",
        "type=%20",
        "type=a&type=b",
    ):
        status, _, body = api.call("GET", f"{API}/workflows?{query}")
        assert status == 400 and body["error"], query


def test_unknown_and_malformed_ids_are_404(api):
    for run_id in (str(uuid.uuid4()), "not-a-uuid", "%20", "12345678-1234-1234-1234-1234567890zz"):
        for method, path in (
            ("GET", f"{API}/workflows/{run_id}"),
            ("GET", f"{API}/workflows/{run_id}/events"),
            ("DELETE", f"{API}/workflows/{run_id}"),
            ("POST", f"{API}/workflows/{run_id}/retry"),
            ("GET", f"{API}/schedules/{run_id}"),
            ("PATCH", f"{API}/schedules/{run_id}/pause"),
            ("PATCH", f"{API}/schedules/{run_id}/resume"),
            ("DELETE", f"{API}/schedules/{run_id}"),
        ):
            status, _, body = api.call(method, path)
            assert status == 404 and "not found" in body["error"], (method, path, body)


def test_cancel_and_retry_answer_409_in_the_wrong_state(api, client):
    run_id = submit(api)
    assert api.call("POST", f"{API}/workflows/{run_id}/retry")[:1] == (409,)  # pending
    assert api.call("DELETE", f"{API}/workflows/{run_id}")[2] == {"status": "cancelled"}
    status, _, body = api.call("DELETE", f"{API}/workflows/{run_id}")
    assert status == 409 and "cancelled" in body["error"]
    assert api.call("POST", f"{API}/workflows/{run_id}/retry")[2] == {"status": "pending"}
    assert client.get(run_id).status == "pending"
    events = [e["event_type"] for e in api.call("GET", f"{API}/workflows/{run_id}/events")[2]]
    assert events == ["created", "cancelled", "retried"]


# -- schedules -----------------------------------------------------------------------------


def test_a_bad_time_is_named_as_the_field_sent(api):
    for field in ("run_at", "run_after"):
        status, _, error = api.call(
            "POST", f"{API}/workflows", {"type": "t", field: "2030-02-30T10:00:00Z"}
        )
        assert status == 400 and error["error"].startswith(f"{field}:"), error
        other = "run_after" if field == "run_at" else "run_at"
        assert other not in error["error"]


def test_schedule_upsert_answers_201_for_a_create_and_200_for_an_update(api, client):
    body = {"type": "r.v1", "cron": "0 6 * * *", "name": "daily"}
    status, _, created = api.call("POST", f"{API}/schedules", body)
    assert status == 201
    status, _, updated = api.call("POST", f"{API}/schedules", {**body, "cron": "0 7 * * *"})
    assert (status, updated["id"]) == (200, created["id"])
    assert client.get_schedule(created["id"]).cron == "0 7 * * *"
    status, _, again = api.call("POST", f"{API}/schedules", {**body, "name": "other"})
    assert status == 201 and again["id"] != created["id"]
    document = api.call("GET", f"{API}/openapi.json")[2]
    responses = document["paths"][f"{API}/schedules"]["post"]["responses"]
    assert {"200", "201"} <= set(responses)


def test_schedule_routes(api, client):
    status, _, body = api.call(
        "POST",
        f"{API}/schedules",
        {"type": "r.v1", "cron": "0 6 * * *", "timezone": "Europe/Berlin", "payload": {"a": 1}},
    )
    assert status == 201
    sched_id = body["id"]
    for bad, needle in (
        ({"type": "r.v1"}, "cron are required"),
        ({"cron": "* * * * *"}, "cron are required"),
        ({"type": "r.v1", "cron": "61 * * * *"}, "cron"),
        ({"type": "r.v1", "cron": "* * *"}, "5 fields"),
        ({"type": "r.v1", "cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone"),
        ({"type": "r.v1", "cron": "* * * * *", "max_attempts": 0}, "max_attempts"),
        ({"type": "r.v1", "cron": "* * * * *", "every": 5}, "unknown field"),
    ):
        status, _, error = api.call("POST", f"{API}/schedules", bad)
        assert status == 400 and needle in error["error"], (bad, error)

    status, _, listed = api.call("GET", f"{API}/schedules")
    assert status == 200 and [s["id"] for s in listed] == [sched_id]
    assert set(listed[0]) >= {"id", "type", "payload", "cron", "timezone", "next_run_at"}
    assert listed[0]["payload"] == {"a": 1} and listed[0]["enabled"] is True

    assert api.call("GET", f"{API}/schedules/{sched_id}")[2] == listed[0]
    assert api.call("PATCH", f"{API}/schedules/{sched_id}/pause")[2] == {"status": "paused"}
    assert client.get_schedule(sched_id).enabled is False
    assert api.call("PATCH", f"{API}/schedules/{sched_id}/resume")[2] == {"status": "resumed"}
    assert client.get_schedule(sched_id).enabled is True
    assert api.call("DELETE", f"{API}/schedules/{sched_id}")[2] == {"status": "deleted"}
    assert api.call("GET", f"{API}/schedules/{sched_id}")[0] == 404
    assert api.call("GET", f"{API}/schedules")[2] == []


# -- health, metrics, routing ----------------------------------------------------------------


def test_health_metrics_and_routing(api):
    assert api.call("GET", "/healthz")[::2] == (200, {"status": "ok"})
    assert api.call("GET", f"{API}/health")[::2] == (200, {"status": "ok"})
    submit(api)
    status, headers, text = api.call("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b'workflow_run_queue_depth{workflow_type="t.v1",status="pending"} 1\n' in text
    assert b"workflow_database_up 1\n" in text

    status, _, body = api.call("GET", f"{API}/nowhere")
    assert status == 404 and "no such endpoint" in body["error"]
    status, headers, body = api.call("PUT", f"{API}/workflows")
    assert status == 405 and headers["Allow"] == "POST, GET"
    assert api.call("BREW", "/healthz")[0] == 405  # any method: 405, never http.server's 501


def test_database_unavailable_is_503(dialect, tmp_path):
    # A SQLite file in a directory that does not exist, or a PostgreSQL port nobody listens on.
    dsn = (
        f"sqlite:///{tmp_path / 'missing' / 'x.db'}"
        if dialect == "sqlite"
        else f"postgres://postgres@127.0.0.1:{free_port()}/test?timeout=2"
    )
    with minflow.Client(dsn) as client:
        api = Api(client)
        try:
            for method, path in (("GET", f"{API}/workflows"), ("POST", f"{API}/workflows")):
                status, headers, body = api.call(method, path, {"type": "t"})
                assert status == 503 and body == {"error": "database unavailable"}
                assert headers["Retry-After"] == "1"
            assert api.call("GET", "/healthz")[::2] == (503, {"error": "database unhealthy"})
            status, _, text = api.call("GET", "/metrics")
            assert status == 200 and b"workflow_database_up 0\n" in text
        finally:
            api.close()


def test_unexpected_errors_are_500_without_details(tmp_path, caplog):
    # An unmigrated database: a server-side problem, reported without the database's words.
    with minflow.Client(f"sqlite:///{tmp_path / 'empty.db'}") as client:
        api = Api(client)
        try:
            with caplog.at_level(logging.ERROR, logger="minflow.http"):
                status, _, body = api.call("GET", f"{API}/workflows")
        finally:
            api.close()
    assert status == 500 and body == {"error": "internal server error; see the server log"}
    assert any("no such table" in r.getMessage() or r.exc_info for r in caplog.records)


# -- limits: body size, deadlines, threads ---------------------------------------------------


def test_body_limits(sqlite_client):
    api = Api(sqlite_client)
    try:
        big = json.dumps({"type": "t", "payload": "x" * minflow.DEFAULT_MAX_BODY}).encode()
        status, _, body = api.call("POST", f"{API}/workflows", raw=big)
        assert status == 413 and "larger than 1048576" in body["error"]
        # Exactly at the limit is fine.
        fits = json.dumps({"type": "t", "payload": ""}).encode()
        fits = fits[:-2] + b" " * (minflow.DEFAULT_MAX_BODY - len(fits)) + fits[-2:]
        assert len(fits) == minflow.DEFAULT_MAX_BODY
        assert api.call("POST", f"{API}/workflows", raw=fits)[0] == 201

        # A huge declared length is refused before anything is read.
        status, body = raw_exchange(
            api.port,
            b"POST /api/v1/workflows HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n",
        )
        assert status == 413
        status, body = raw_exchange(
            api.port,
            b"POST /api/v1/workflows HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
        )
        assert status == 411
        status, body = raw_exchange(
            api.port, b"POST /api/v1/workflows HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"
        )
        assert status == 400 and "Content-Length" in body["error"]
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        status, body = raw_exchange(api.port, b"GET /healthz HTTP/1.1\r\n" + many + b"\r\n")
        assert status == 431 and "error" in body  # http.server's own errors are JSON too
    finally:
        api.close()
    assert [r.type for r in sqlite_client.list()] == ["t"]


def raw_exchange(port, data):
    """Send bytes, read the whole response; (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# -- authentication ----------------------------------------------------------------------------


def test_api_key(sqlite_client, caplog):
    key = "s3cret-Key-" + uuid.uuid4().hex
    api = Api(sqlite_client, api_key=key)
    try:
        with caplog.at_level(logging.DEBUG, logger="minflow.http"):
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": f"Basic {key}"}):
                for path in (f"{API}/workflows", "/metrics", f"{API}/openapi.json", "/nowhere"):
                    status, response_headers, body = api.call("GET", path, headers=headers)
                    assert status == 401 and body == {"error": "invalid or missing API key"}
                    assert "WWW-Authenticate" in response_headers
            assert api.call("GET", "/healthz")[0] == 200  # health stays open for probes
            assert api.call("GET", f"{API}/workflows", headers={"X-API-Key": key})[0] == 200
            bearer = {"Authorization": f"Bearer {key}"}
            assert api.call("GET", f"{API}/workflows", headers=bearer)[0] == 200
            assert api.call("POST", f"{API}/workflows", {"type": "t"}, headers=bearer)[0] == 201
        assert caplog.records and all(key not in r.getMessage() for r in caplog.records)
        assert any('"GET /api/v1/workflows HTTP/1.1" 200' in r.getMessage() for r in caplog.records)
    finally:
        api.close()


# -- the OpenAPI document ----------------------------------------------------------------------


def test_openapi_document_validates_and_matches_routes(sqlite_client):
    from openapi_spec_validator import validate

    documents = {}
    for key in (None, "k-" + uuid.uuid4().hex):
        api = Api(sqlite_client, api_key=key)
        try:
            headers = {"X-API-Key": key} if key else {}
            status, _, documents[bool(key)] = api.call(
                "GET", f"{API}/openapi.json", headers=headers
            )
        finally:
            api.close()
        assert status == 200
    routes = {(method, pattern) for method, pattern, _ in minflow._API_ROUTES}
    for secured, document in documents.items():
        validate(document)
        operations = {
            (method.upper(), path): operation
            for path, item in document["paths"].items()
            for method, operation in item.items()
        }
        assert set(operations) == routes
        # A server without a key declares no security and no 401 (schemathesis' ST401).
        assert ("security" in document) == secured
        assert ("securitySchemes" in document["components"]) == secured
        for (_, path), operation in operations.items():
            public = path in ("/healthz", "/ui", "/ui/")
            assert ("401" in operation["responses"]) == (secured and not public), path
            assert ("security" in operation) == (secured and public), path
    assert documents[False]["components"] == {"schemas": documents[True]["components"]["schemas"]}


def body_schema_checker(name):
    """A validator of one request body schema of the OpenAPI document, with its references."""
    from jsonschema import Draft202012Validator

    document = minflow._openapi_document(False)
    return Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    )


# (body schema, route, body): the schema allows exactly what the server accepts (2xx), in the
# corners where the Client's checks are easy to misdescribe.
SCHEMA_CORNERS = [
    ("SubmitRequest", "workflows", {"type": "t", "payload": {"a": ["b", 1, None, {"c": ""}]}}),
    ("SubmitRequest", "workflows", {"type": "t", "payload": {"k\u0000": 1}}),
    ("SubmitRequest", "workflows", {"type": "t", "payload": ["x", {"k": ["a\u0000b"]}]}),
    ("SubmitRequest", "workflows", {"type": "t", "payload": "\u0000"}),
    ("SubmitRequest", "workflows", {"type": "\x1c"}),  # blank to Python, not to JSON Schema's \s
    ("SubmitRequest", "workflows", {"type": "\u2003\x85"}),
    ("SubmitRequest", "workflows", {"type": "\ufeff"}),  # the other way round
    ("SubmitRequest", "workflows", {"type": "t", "idempotency_key": "\t"}),
    ("SubmitRequest", "workflows", {"type": "t", "idempotency_key": "a\u0000"}),
    ("ScheduleRequest", "schedules", {"type": "r", "cron": "0 6 * * *", "timezone": "Asia/Tokyo"}),
    ("ScheduleRequest", "schedules", {"type": "r", "cron": "@daily", "timezone": "Etc/GMT+5"}),
    ("ScheduleRequest", "schedules", {"type": "r", "cron": "@daily", "timezone": "UTC\u0000"}),
    ("ScheduleRequest", "schedules", {"type": "r", "cron": "@daily", "timezone": " "}),
    ("ScheduleRequest", "schedules", {"type": "r", "cron": "@daily", "timezone": "../UTC"}),
    ("ScheduleRequest", "schedules", {"type": "r", "cron": "@daily", "timezone": "/etc/UTC"}),
    ("ScheduleRequest", "schedules", {"type": "r", "cron": "\x1f"}),
    ("ScheduleRequest", "schedules", {"type": "r", "cron": "@daily", "name": "\x1d"}),
    ("ScheduleRequest", "schedules", {"type": "r", "cron": "@daily", "payload": {"\u0000": 0}}),
]


def test_openapi_schemas_allow_what_the_server_accepts(api):
    for name, route, body in SCHEMA_CORNERS:
        status, _, answer = api.call("POST", f"{API}/{route}", body)
        assert status in (200, 201, 400), (body, answer)
        assert body_schema_checker(name).is_valid(body) == (status != 400), (body, answer)


SCHEMATHESIS_CONFIG = """
# The schema cannot say which cron expressions are valid, nor which zone names the server's tz
# database holds.
[[operations]]
include-operation-id = "createSchedule"
checks.positive_data_acceptance.enabled = false

# DELETE on a run cancels it (the seed's meaning); the run stays readable afterwards.
[[operations]]
include-operation-id = ["cancelRun", "getRun", "runEvents", "retryRun"]
checks.use_after_free.enabled = false
"""


def run_schemathesis(dsn, tmp_path, key, phases):
    """Run schemathesis against a server on ``dsn`` requiring ``key`` (None: no key); assert
    it found nothing and that the server answered no 5xx."""
    # Hundreds of small writes: on SQLite, skip the fsync per commit (durability is not what
    # this test is about, and a busy disk would make it slow).
    client = minflow.Client(dsn + ("?synchronous=normal" if dsn.startswith("sqlite") else ""))
    client.migrate()
    statuses = []

    class Collect(logging.Handler):
        def emit(self, record):
            if isinstance(record.args, tuple) and len(record.args) == 5:  # the access log
                statuses.append(record.args[2])

    handler = Collect(level=logging.DEBUG)
    http_log = logging.getLogger("minflow.http")
    http_log.addHandler(handler)
    old_level = http_log.level
    http_log.setLevel(logging.DEBUG)
    api = Api(client, api_key=key)
    try:
        (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG)
        st = os.path.join(os.path.dirname(sys.executable), "st")
        result = subprocess.run(
            [
                st,
                "--no-color",
                "--config-file",
                str(tmp_path / "schemathesis.toml"),
                "run",
                f"http://127.0.0.1:{api.port}{API}/openapi.json",
                *(["--header", f"X-API-Key: {key}"] if key else []),
                "--max-examples",
                "4",  # per operation and phase; the coverage phase adds its boundary cases
                "--seed",
                "20240601",
                "--workers",
                "1",  # hypothesis' lambda introspection is not thread-safe on every Python
                "--phases",
                phases,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    finally:
        api.close()
        client.close()
        http_log.removeHandler(handler)
        http_log.setLevel(old_level)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    served = [s for s in statuses if isinstance(s, int)]
    assert len(served) > 50  # it really exercised the API
    assert not [s for s in served if s >= 500 and s != 503]
    assert 503 not in served  # the database stayed up, so no 503 either
    return served


def test_schemathesis_finds_no_server_errors(dsn, tmp_path):
    # The coverage phase's boundary values exercise validation, which is the same code on both
    # dialects; once (on PostgreSQL, where ids are UUIDs) is enough.
    phases = "examples,fuzzing,stateful"
    if dsn.startswith("postgres"):
        phases = "examples,coverage,fuzzing,stateful"
    served = run_schemathesis(dsn, tmp_path, "st-" + uuid.uuid4().hex, phases)
    assert 401 in served  # its authentication checks ran (ST401)


def test_schemathesis_on_a_server_without_an_api_key(tmp_path):
    # Its document declares no security: one that did failed schemathesis' ST401 on every route.
    served = run_schemathesis(
        f"sqlite:///{tmp_path / 'st.db'}", tmp_path, None, "examples,fuzzing,stateful"
    )
    assert 401 not in served


def test_serve_command_runs_until_sigterm(tmp_path):
    dsn = f"sqlite:///{tmp_path / 'serve.db'}"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINFLOW_API_KEY": "k-123"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "minflow", "serve", "--dsn", dsn, "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def healthy():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/healthz")
                return conn.getresponse().status == 200
            except OSError:
                return False

        wait_for(healthy, message="the server to answer")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request(
            "POST", f"{API}/workflows", body='{"type": "a.v1"}', headers={"X-API-Key": "k-123"}
        )
        assert conn.getresponse().status == 201
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", f"{API}/workflows")
        assert conn.getresponse().status == 401
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "serving the API" in err and "API key required" in err and "k-123" not in err
    assert '"POST /api/v1/workflows HTTP/1.1" 201' in err
    with minflow.Client(dsn) as c:
        assert [r.type for r in c.list()] == ["a.v1"]


def test_readme_curl_session_works(sqlite_client):
    """The README's curl examples, run as written against a live server."""
    if not shutil.which("curl"):
        pytest.skip("curl not installed")
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## HTTP API") : text.index("## Metrics")]
    script = [b for b in re.findall(r"```sh\n(.*?)```", section, re.S) if "curl" in b][0]
    key = "readme-" + uuid.uuid4().hex
    api = Api(sqlite_client, api_key=key)
    try:
        result = subprocess.run(
            [
                "bash",
                "-euo",
                "pipefail",
                "-c",
                script.replace("localhost:8080", f"127.0.0.1:{api.port}"),
            ],
            env={**os.environ, "MINFLOW_API_KEY": key},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        api.close()
    assert result.returncode == 0, result.stderr
    for expected in (
        "idempotency conflict",
        '"payload": {"order": 42}',
        '"event_type": "created"',
        '{"status": "cancelled"}',
        '{"status": "pending"}',
        '{"status": "paused"}',
        '{"status": "resumed"}',
        '"name": "daily-report"',
        '{"status": "deleted"}',
        '{"status": "ok"}',
        "# TYPE workflow_run_queue_depth gauge",
        '"openapi": "3.1.0"',
    ):
        assert expected in result.stdout, expected
    assert "invalid or missing API key" not in result.stdout
    (run,) = sqlite_client.list()
    assert (run.type, run.priority, run.status) == ("billing.invoice.v1", 10, "pending")
    assert sqlite_client.schedules() == []


def test_shutdown_drains_requests_in_flight(tmp_path):
    path = tmp_path / "drain.db"
    with minflow.Client(f"sqlite:///{path}") as client:
        client.migrate()
        api = Api(client)
        # Another connection holds the write lock, so a submit waits inside the server.
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        result = {}
        caller = threading.Thread(
            target=lambda: result.update(answer=api.call("POST", f"{API}/workflows", {"type": "t"}))
        )
        caller.start()
        try:
            wait_for(lambda: not api.server.drain(0), message="the request to be in flight")
            api.server.shutdown()  # no new connections from here on
            assert not api.server.drain(0.1)  # the request is still running
            blocker.execute("ROLLBACK")
            assert api.server.drain(10)
            caller.join(10)
            assert result["answer"][0] == 201
        finally:
            blocker.close()
            api.close()
        assert [r.type for r in client.list()] == ["t"]

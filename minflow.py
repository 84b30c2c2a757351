"""minflow: a durable job and workflow-run queue in one Python file.

Producers record intent as rows in a ``workflow_run`` table; workers claim rows under a lease, run
a handler and record the outcome. The database is the only coordination point: SQLite (stdlib
``sqlite3``) by default, PostgreSQL (pure-Python ``pg8000``) when many machines share one queue.
The schema is the one of the Go library ``simple-workflow``, so both can share a database.

    import minflow

    app = minflow.App("sqlite:///jobs.db")

    @app.handler("billing.invoice.v1")
    def invoice(run):
        return {"invoiced": run.payload["order"]}

    app.migrate()
    app.submit("billing.invoice.v1", {"order": 42}, idempotency_key="order-42")
    app.run_worker(burst=True)          # or: python -m minflow worker myjobs

Execution is at-least-once: handlers must be idempotent.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = [
    "AlreadyComplete",
    "App",
    "Client",
    "Event",
    "InvalidInput",
    "InvalidState",
    "Job",
    "LeaseLost",
    "MinflowError",
    "NotFound",
    "Retry",
    "Run",
    "RunContext",
    "Schedule",
    "Unavailable",
    "Worker",
    "WorkerInfo",
    "main",
]

import argparse
import collections
import contextlib
import dataclasses
import datetime as _dt
import hmac
import http.server
import importlib
import io
import json
import logging
import math
import os
import queue
import random
import re
import select
import signal
import socket
import socketserver
import sqlite3
import sys
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

log = logging.getLogger("minflow")
log.addHandler(logging.NullHandler())
_worker_log = logging.getLogger("minflow.worker")
_ticker_log = logging.getLogger("minflow.ticker")

UTC = _dt.timezone.utc

# ---------------------------------------------------------------------------------------------
# Defaults (the seed's, unless a comment says why not)
# ---------------------------------------------------------------------------------------------

DEFAULT_DSN = "sqlite:///minflow.db"
DEFAULT_SCHEMA = "workflow"
DEFAULT_PRIORITY = 100  # lower runs first
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LEASE = 30.0  # seconds
# Wake-ups come from LISTEN/NOTIFY or PRAGMA data_version; this poll only catches runs whose
# run_at has just become due (retries, delayed submits), hence shorter than the seed's 2 s.
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_CONCURRENCY = 4
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_TICK_INTERVAL = 1.0  # a due schedule becomes a run within about a second
DEFAULT_HTTP_HOST = "127.0.0.1"  # loopback unless the operator decides otherwise
DEFAULT_HTTP_PORT = 8080
DEFAULT_MAX_BODY = 1 << 20  # bytes (the seed sets no limit)
DEFAULT_REQUEST_TIMEOUT = 10.0  # seconds to receive a whole request (the seed's read timeout)
DEFAULT_HTTP_THREADS = 32  # requests handled at once; beyond that, an immediate 503
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000
MAX_TYPE_LENGTH = 255
MAX_DELAY = (
    100 * 365.25 * 86400
)  # seconds; beyond this a delay is a bug, and overflows SQLite's clock
RESCUE_BATCH = 500
TICK_BATCH = 100
# Runs per transaction of prune() and the bulk changes: each batch is a short write of its own,
# so workers' claims interleave with a large clean-up.
CHANGE_BATCH = 1000
PRUNE_CHECK_INTERVAL = 60.0  # the longest a retention worker waits between two prune passes
WORKER_DEAD_AFTER = 3  # heartbeat periods without a sign of life before a worker counts as dead
WORKER_FORGET_AFTER = 86400.0  # seconds after which a dead worker's entry is deleted
SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_WATCH_INTERVAL = 0.005  # PRAGMA data_version costs microseconds; 5 ms keeps latency low
PG_TIMEOUT = 30.0  # socket timeout for PostgreSQL connections
POOL_SIZE = 16

RUN_STATUSES = ("pending", "leased", "succeeded", "failed", "cancelled")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")
EVENT_TYPES = (
    "created",
    "leased",
    "started",
    "heartbeat",
    "succeeded",
    "failed",
    "retried",
    "cancelled",
)

# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class MinflowError(Exception):
    """Root of every error minflow raises."""


class NotFound(MinflowError, LookupError):
    """The run or schedule does not exist (or was deleted)."""


class AlreadyComplete(MinflowError):
    """The run is already succeeded, failed or cancelled, so it cannot be cancelled."""


class InvalidState(MinflowError):
    """The run is not in a state that allows the operation (e.g. retrying a pending run)."""


class InvalidInput(MinflowError, ValueError):
    """An argument is malformed; nothing was written."""


class LeaseLost(MinflowError):
    """This worker no longer holds the run's lease (cancelled, rescued or taken over)."""


class Unavailable(MinflowError):
    """The database cannot be reached or is busy; the operation may be retried."""


class Retry(Exception):  # noqa: N818 - named for what the handler asks for
    """Raised by a handler to run again later without counting the attempt as a failure.

    ``delay`` is in seconds (``None``: the worker's backoff for this attempt). The attempt is
    given back, so ``max_attempts`` is not consumed, and ``last_error`` is left alone.
    """

    def __init__(self, delay: float | None = None):
        # A finite number >= 0 (NaN fails the comparison); bool is an int but no delay.
        number = isinstance(delay, (int, float)) and not isinstance(delay, bool)
        if delay is not None and not (number and 0 <= delay < math.inf):
            raise InvalidInput(
                f"Retry delay must be a non-negative number of seconds, got {delay!r}"
            )
        super().__init__(f"retry requested (delay={delay!r})")
        self.delay = delay


# ---------------------------------------------------------------------------------------------
# Small utilities: validation, JSON, ids, time, backoff
# ---------------------------------------------------------------------------------------------

_INT32 = (-(2**31), 2**31 - 1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check_text(
    name: str, value: Any, *, max_length: int | None = None, empty: bool = False
) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string, got {type(value).__name__}")
    if not empty and not value.strip():
        raise InvalidInput(f"{name} must not be empty")
    if max_length is not None and len(value) > max_length:
        raise InvalidInput(f"{name} must be at most {max_length} characters, got {len(value)}")
    if "\x00" in value:
        raise InvalidInput(f"{name} must not contain NUL characters")
    _check_utf8(name, value)
    return value


def _check_utf8(name: str, text: str) -> None:
    # Lone surrogates ('\ud800') are valid in a Python str but not in UTF-8; without this the
    # driver would raise a bare UnicodeEncodeError.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{name} is not valid Unicode (lone surrogate)") from None


def _check_int(name: str, value: Any, *, minimum: int = _INT32[0]) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"{name} must be an integer, got {value!r}")
    if not minimum <= value <= _INT32[1]:
        raise InvalidInput(f"{name} must be between {minimum} and {_INT32[1]}, got {value}")
    return value


def _check_type(value: Any) -> str:
    return _check_text("type", value, max_length=MAX_TYPE_LENGTH)


def _dumps(value: Any, what: str = "payload") -> str:
    """Serialise to compact JSON, rejecting what JSON (or PostgreSQL's jsonb) cannot hold."""
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not JSON-serialisable: {exc}") from None
    # jsonb rejects \u0000; refusing it on every dialect keeps databases interchangeable.
    if "\\u0000" in text:
        raise InvalidInput(f"{what} contains a NUL character (\\u0000), which jsonb cannot store")
    _check_utf8(what, text)
    return text


def _new_id() -> str:
    """A UUID in the version 7 layout: 48 bits of Unix milliseconds, then 74 random bits.

    Time-ordered ids land at the right edge of the primary-key index instead of on random
    pages, which keeps inserts cheap once the table is large; they remain valid UUIDs for the
    Go library and PostgreSQL's uuid type.
    """
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (time.time_ns() // 1_000_000) << 80
        | 0x7 << 76
        | (rand >> 68) << 64
        | 0b10 << 62
        | rand & ((1 << 62) - 1)
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


_GO_TIME = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?"
    r"\s*(Z|[+-]\d{2}(?::?\d{2})?)?(?:\s+[A-Za-z][A-Za-z0-9+-]*)?(?:\s+m=[+-][\d.]+)?$"
)
_unparsed_warned: set[str] = set()


def _parse_time(value: Any) -> _dt.datetime | None:
    """Read a timestamp as stored by either library (UTC text on SQLite, aware on PostgreSQL).

    Besides minflow's own ``YYYY-MM-DD HH:MM:SS.fff``, this accepts what the Go library writes,
    including ``time.Time.String()`` with zone name and monotonic suffix.
    """
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    match = _GO_TIME.match(str(value).strip())
    if not match:
        if value not in _unparsed_warned:
            _unparsed_warned.add(value)
            log.warning("unparseable timestamp %r in the database; shown as None", value)
        return None
    day, clock, frac, zone = match.groups()
    micros = int((frac or "0")[:6].ljust(6, "0"))
    stamp = _dt.datetime.fromisoformat(f"{day}T{clock}").replace(microsecond=micros)
    offset = _dt.timedelta(0)
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = sign * _dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
    return (stamp - offset).replace(tzinfo=UTC)


def _sqlite_time(moment: _dt.datetime) -> str:
    """The SQLite storage form: UTC text that sorts correctly and the Go reader parses."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S") + f".{moment.microsecond // 1000:03d}"


def _check_moment(name: str, value: Any) -> _dt.datetime:
    """An aware datetime, in UTC."""
    if not isinstance(value, _dt.datetime):
        raise InvalidInput(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{name} must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return value.astimezone(UTC)


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=UTC)


def _check_run_at(run_at: Any, run_in: Any) -> tuple[_dt.datetime | None, float]:
    """Return (absolute time or None, delay in seconds) for a submit."""
    if run_at is not None and run_in is not None:
        raise InvalidInput("give run_at or run_in, not both")
    if run_at is not None:
        run_at = _check_moment("run_at", run_at)
        # Earlier than 1970 is a bug (year 2 would pass otherwise and report an age of two
        # millennia); later than run_in allows is one too.
        latest = _dt.datetime.now(UTC) + _dt.timedelta(seconds=MAX_DELAY)
        if not _EPOCH <= run_at <= latest:
            raise InvalidInput(
                f"run_at must be between 1970-01-01 and 100 years from now, got {run_at.isoformat()}"
            )
        return run_at, 0.0
    if run_in is None:
        return None, 0.0
    if isinstance(run_in, _dt.timedelta):
        run_in = run_in.total_seconds()
    if not _is_number(run_in) or math.isinf(run_in) or run_in < 0 or run_in > MAX_DELAY:
        raise InvalidInput(
            f"run_in must be 0 to {MAX_DELAY:.0f} seconds (100 years) or a timedelta, got {run_in!r}"
        )
    return None, float(run_in)


def _check_age(name: str, value: Any) -> float:
    """A positive age in seconds (a number or a timedelta) of at most 100 years."""
    if isinstance(value, _dt.timedelta):
        value = value.total_seconds()
    if not _is_number(value) or not 0 < value <= MAX_DELAY:
        raise InvalidInput(
            f"{name} must be more than 0 and at most {MAX_DELAY:.0f} seconds (100 years), "
            f"or a timedelta, got {value!r}"
        )
    return float(value)


def _check_statuses(
    name: str, value: str | Iterable[str] | None, allowed: Sequence[str], what: str
) -> tuple[str, ...]:
    """Run statuses out of ``allowed`` (None: all of them; one status may be a plain str),
    without repeats, in the order given."""
    if value is None:
        return tuple(allowed)
    given = [value] if isinstance(value, str) else _as_strings(name, value)
    wrong = ", ".join(repr(s) for s in given if s not in allowed)
    if wrong or not given:
        raise InvalidInput(
            f"{name} for {what} must be among {', '.join(allowed)}, got {wrong or 'none'}"
        )
    return tuple(dict.fromkeys(given))


def _as_strings(name: str, value: Any) -> list[str]:
    try:
        if isinstance(value, dict):
            raise TypeError("a mapping")
        items = list(value)
    except TypeError:
        raise InvalidInput(f"{name} must be a string or a list of strings, got {value!r}") from None
    if not all(isinstance(item, str) for item in items):
        raise InvalidInput(f"{name} must be a string or a list of strings, got {value!r}")
    return items


def _json_strings(text: Any) -> tuple[str, ...]:
    """A JSON array of strings as stored in a TEXT column; () for anything else."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return ()
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _fmt_duration(seconds: float) -> str:
    """A duration as ``_parse_duration`` reads it, in the largest unit that fits: ``7d``."""
    for unit in ("d", "h", "m", "s"):
        count = seconds / _UNIT_SECONDS[unit]
        if count >= 1 and count.is_integer():
            return f"{count:g}{unit}"
    return f"{seconds:g}s"


def _parse_duration(text: str, what: str = "duration") -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``2h``, ``7d`` (or ``250ms``); at most 100 years.
    Shared by the command line and the HTTP API."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise InvalidInput(f"{what}: expected a duration such as 90, 90s, 5m, 2h or 1d: {text!r}")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    if seconds > MAX_DELAY:
        raise InvalidInput(f"{what}: at most 100 years, got {text!r}")
    return seconds


def seed_backoff(attempt: int) -> float:
    """The seed's retry delay after failed attempt ``attempt``: attempt² minutes + [0, 10%) jitter."""
    base = 60.0 * attempt * attempt
    return base + base * 0.1 * random.random()


# ---------------------------------------------------------------------------------------------
# Public value types
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One run to submit with ``Client.submit_many``; the fields mirror ``Client.submit``."""

    type: str
    payload: Any = None
    priority: int = DEFAULT_PRIORITY
    idempotency_key: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    run_at: _dt.datetime | None = None
    run_in: float | _dt.timedelta | None = None


class _RunId(str):
    """A run id as ``submit`` returns it: a plain ``str`` with a ``deduplicated`` flag, True
    when the idempotency key existed and the id is that existing run's."""

    deduplicated: bool

    def __new__(cls, run_id: str, deduplicated: bool = False) -> _RunId:
        self = super().__new__(cls, run_id)
        self.deduplicated = deduplicated
        return self


def _json_value(value: Any) -> Any:
    if isinstance(value, _dt.datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, tuple):  # WorkerInfo's types and prefixes
        return list(value)
    return value


class _Record:
    """JSON rendering shared by the read models."""

    def to_json(self) -> dict:
        """A JSON-ready dict: snake_case keys, times as RFC 3339 UTC text, JSON values as is."""
        return {k: _json_value(v) for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]


@dataclasses.dataclass(frozen=True)
class Run(_Record):
    """A run as stored (the seed's read model). Times are aware UTC; payload/result decoded JSON.

    ``attempt`` counts how many times the run has been claimed (1 while its first execution runs).
    """

    id: str
    type: str
    payload: Any
    status: str
    priority: int
    run_at: _dt.datetime | None
    idempotency_key: str | None
    attempt: int
    max_attempts: int
    leased_by: str | None
    lease_until: _dt.datetime | None
    last_error: str | None
    result: Any
    created_at: _dt.datetime | None
    updated_at: _dt.datetime | None


@dataclasses.dataclass(frozen=True)
class Event(_Record):
    """One entry of a run's audit trail (``workflow_event``)."""

    id: int
    workflow_id: str
    event_type: str
    data: Any
    created_at: _dt.datetime | None


@dataclasses.dataclass(frozen=True)
class Schedule(_Record):
    """A cron schedule (``workflow_schedule``); ``cron`` is the seed's ``schedule`` column."""

    id: str
    type: str
    payload: Any
    cron: str
    timezone: str
    next_run_at: _dt.datetime | None
    last_run_at: _dt.datetime | None
    enabled: bool
    priority: int
    max_attempts: int
    name: str | None = None
    created_at: _dt.datetime | None = None


@dataclasses.dataclass(frozen=True)
class WorkerInfo(_Record):
    """A worker as it records itself in ``minflow_worker`` (see ``Client.workers``).

    ``last_seen_at`` is renewed every ``heartbeat_interval`` seconds; ``alive`` is False once
    it is older than three of them (by the database clock): the process died or lost its
    database. ``running`` is how many handlers it was executing then.
    """

    id: str
    host: str
    pid: int
    types: tuple[str, ...]
    prefixes: tuple[str, ...]
    concurrency: int
    running: int
    heartbeat_interval: float
    version: str
    started_at: _dt.datetime | None
    last_seen_at: _dt.datetime | None
    alive: bool


# ---------------------------------------------------------------------------------------------
# Connection strings
# ---------------------------------------------------------------------------------------------

_SQLITE_OPTIONS = {"synchronous": ("full", "normal", "extra"), "busy_timeout": None}
_PG_OPTIONS = {
    "schema",
    "search_path",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "connect_timeout",
    "timeout",
    "application_name",
}
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclasses.dataclass(frozen=True)
class _DSN:
    """A parsed connection string. ``key`` names the database for in-process wake-ups."""

    kind: str  # "sqlite" | "postgres"
    text: str  # for messages, password masked
    path: str = ""
    memory: bool = False
    synchronous: str = "full"
    busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS
    host: str = "localhost"
    port: int = 5432
    user: str = "postgres"
    password: str | None = dataclasses.field(default=None, repr=False)  # never in logs
    database: str | None = None
    unix_sock: str | None = None
    search_path: tuple[str, ...] = (DEFAULT_SCHEMA,)
    sslmode: str = "disable"
    ssl_files: tuple[str | None, str | None, str | None] = (None, None, None)
    timeout: float = PG_TIMEOUT
    application_name: str | None = "minflow"

    @property
    def schema(self) -> str:
        return self.search_path[0]

    @property
    def key(self) -> str:
        if self.kind == "sqlite":
            return "sqlite:" + (f":memory:{id(self)}" if self.memory else self.path)
        return f"pg:{self.unix_sock or self.host}:{self.port}/{self.database}/{self.schema}"


def _parse_dsn(text: str | None) -> _DSN:
    """Parse ``sqlite:///file``, ``postgres://...`` or libpq ``key=value`` text (``None``:
    ``$MINFLOW_DSN``, else ``DEFAULT_DSN``); ``InvalidInput`` names what is wrong."""
    if text is None:
        text = os.environ.get("MINFLOW_DSN") or DEFAULT_DSN
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("DSN must be a non-empty string")
    text = text.strip()
    scheme, sep, _ = text.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme in ("sqlite", "sqlite3"):
        return _parse_sqlite_dsn(text)
    if scheme in ("postgres", "postgresql"):
        return _parse_pg_url(text)
    if sep:
        raise InvalidInput(f"unsupported DSN scheme {scheme!r}: use sqlite:// or postgres://")
    if "=" in text:
        return _parse_pg_keywords(text)
    raise InvalidInput(
        f"unrecognised DSN {text!r}: expected sqlite:///file.db, postgres://... or key=value pairs"
    )


def _parse_sqlite_dsn(text: str) -> _DSN:
    rest = text.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    options = _query_options(query, _SQLITE_OPTIONS.keys(), "sqlite")
    # sqlite:///rel.db -> "/rel.db" after the scheme: one leading slash separates the (empty)
    # host from a relative path; sqlite:////abs.db keeps the absolute path.
    path = unquote(rest[1:] if rest.startswith("/") else rest)
    memory = path in ("", ":memory:")
    synchronous = options.get("synchronous", "full").lower()
    if synchronous not in _SQLITE_OPTIONS["synchronous"]:
        raise InvalidInput(
            f"sqlite synchronous must be one of {', '.join(_SQLITE_OPTIONS['synchronous'])}"
        )
    busy = options.get("busy_timeout", str(SQLITE_BUSY_TIMEOUT_MS))
    if not busy.isdigit():
        raise InvalidInput(f"sqlite busy_timeout must be milliseconds, got {busy!r}")
    if not memory:
        path = os.path.abspath(path)
    return _DSN(
        "sqlite",
        text,
        path=":memory:" if memory else path,
        memory=memory,
        synchronous=synchronous,
        busy_timeout_ms=int(busy),
    )


def _query_options(query: str, allowed: Iterable[str], what: str) -> dict[str, str]:
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise InvalidInput(f"malformed {what} DSN query string {query!r}") from None
    for key, value in pairs:
        if key not in allowed:
            raise InvalidInput(
                f"unsupported {what} DSN parameter {key!r}; supported: {', '.join(sorted(allowed))}"
            )
        if key in options:
            raise InvalidInput(f"{what} DSN parameter {key!r} given twice")
        options[key] = value
    return options


def _parse_pg_url(text: str) -> _DSN:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"malformed PostgreSQL DSN: {exc}") from None
    options = _query_options(parts.query, _PG_OPTIONS, "postgres")
    host = unquote(parts.hostname or "") or "localhost"
    return _pg_dsn(
        _mask_url(text, parts),
        host=host,
        port=port or 5432,
        user=unquote(parts.username) if parts.username else "postgres",
        password=unquote(parts.password) if parts.password is not None else None,
        database=unquote(parts.path.lstrip("/")) or None,
        options=options,
    )


_KEYWORD = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('((?:[^'\\]|\\.)*)'|[^\s']*)")


def _parse_pg_keywords(text: str) -> _DSN:
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _KEYWORD.match(text, pos)
        if not match:
            raise InvalidInput(f"malformed key=value DSN near {text[pos : pos + 20]!r}")
        value = match.group(3) if match.group(3) is not None else match.group(2)
        fields[match.group(1)] = re.sub(r"\\(.)", r"\1", value)
        pos = match.end()
    conn_keys = {"host", "hostaddr", "port", "user", "password", "dbname"}
    unknown = set(fields) - conn_keys - _PG_OPTIONS
    if unknown:
        raise InvalidInput(f"unsupported key=value DSN parameter(s): {', '.join(sorted(unknown))}")
    port = fields.get("port", "5432")
    if not port.isdigit():
        raise InvalidInput(f"port must be a number, got {port!r}")
    options = {k: v for k, v in fields.items() if k in _PG_OPTIONS}
    return _pg_dsn(
        _mask_keywords(text),
        host=fields.get("hostaddr") or fields.get("host") or "localhost",
        port=int(port),
        user=fields.get("user", "postgres"),
        password=fields.get("password"),
        database=fields.get("dbname"),
        options=options,
    )


def _mask_url(text: str, parts: Any) -> str:
    """The URL with the password of its user-info (as written, escapes and all) replaced."""
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return text
    user = userinfo.partition(":")[0]
    return text.replace(f"//{parts.netloc}", f"//{user}:***@{hostport}", 1)


def _mask_keywords(text: str) -> str:
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text)


def _valid_ident(name: str) -> bool:
    # PostgreSQL truncates identifiers to 63 bytes (not characters): two longer names sharing
    # a prefix would silently be one schema.
    return 0 < len(name.encode()) <= 63 and "\x00" not in name


def _pg_dsn(
    text: str,
    *,
    host: str,
    port: int,
    user: str,
    password: str | None,
    database: str | None,
    options: dict[str, str],
) -> _DSN:
    schema = options.get("schema")
    path = options.get("search_path")
    if schema is not None and path is not None and [schema] != _split_path(path)[:1]:
        raise InvalidInput("DSN gives both schema and search_path with different schemas; give one")
    search_path = (
        _split_path(path) if path is not None else [DEFAULT_SCHEMA if schema is None else schema]
    )
    if not search_path or not all(_valid_ident(s) for s in search_path):
        raise InvalidInput(f"invalid schema name(s) {search_path!r}: 1 to 63 bytes, no NUL")
    sslmode = options.get("sslmode", "disable")
    if sslmode not in _SSLMODES:
        raise InvalidInput(f"sslmode must be one of {', '.join(_SSLMODES)}, got {sslmode!r}")
    timeout = options.get("timeout") or options.get("connect_timeout") or str(PG_TIMEOUT)
    try:
        timeout_value = float(timeout)
        if timeout_value <= 0:
            raise ValueError
    except ValueError:
        raise InvalidInput(
            f"timeout must be a positive number of seconds, got {timeout!r}"
        ) from None
    unix_sock = None
    if host.startswith("/"):
        unix_sock = f"{host.rstrip('/')}/.s.PGSQL.{port}"
    return _DSN(
        "postgres",
        text,
        host=host,
        port=port,
        user=user,
        password=password,
        database=database,
        unix_sock=unix_sock,
        search_path=tuple(search_path),
        sslmode=sslmode,
        ssl_files=(options.get("sslrootcert"), options.get("sslcert"), options.get("sslkey")),
        timeout=timeout_value,
        application_name=options.get("application_name", "minflow"),
    )


def _split_path(value: str) -> list[str]:
    return [part.strip().strip('"') for part in value.split(",") if part.strip()]


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ---------------------------------------------------------------------------------------------
# SQL: every statement, and the one renderer they all pass through
# ---------------------------------------------------------------------------------------------
# Statements are data: the migrations, then _SQL (shared by both dialects), then _SQLITE_SQL and
# _PG_SQL, each dialect's own statements keyed alike (a dialect's table is _SQL plus its own).
# Values are always bound as :name parameters, never formatted in. Each dialect renders every
# statement once, when it is created, filling these slots from its fragments:
#   {now}                        the database clock, as the dialect stores time
#   {later:x}                    the database clock + :x seconds ({later:t.c}: + column t.c)
#   {json:x} {rawjson:x}         a JSON parameter (rawjson: one Go reads as json.RawMessage)
#   {uuid:x} {time:x} {bool:x}   an id, a timestamp, a boolean parameter
#   {tiebreak}                   orders rows whose created_at ties
#   {greatest}                   the larger of its arguments (a scalar function)
#   {startswith:x}               matches the pattern :x made by the dialect's prefix_pattern()
#   {schema} {channel}           the DSN's schema and its NOTIFY channel, quoted (PostgreSQL)
#   {event_type} {outcome_data} {rescue_data}   the audit-trail rule below, as SQL (PostgreSQL)
#   {workflow_run}...            a table, qualified with the DSN's schema on PostgreSQL (_TABLES)
#   {filters} {filter}           pieces composed at run time: list()'s filters, the SQLite claim's
#                                types (rendered once per distinct piece, see _Dialect.compose)

# -- the schema: numbered, additive migrations per dialect ------------------------------------
# Migration 1 is the seed's own DDL (every statement IF NOT EXISTS, so it only adds to a database
# the Go library created) plus the indexes minflow's queries need. Later migrations only add.

_SQLITE_MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "seed schema and minflow indexes",
        [
            """CREATE TABLE IF NOT EXISTS {workflow_run} (
            id TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            payload TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending','leased','succeeded','failed','cancelled')),
            priority INTEGER NOT NULL DEFAULT 100,
            run_at TEXT NOT NULL DEFAULT (datetime('now')),
            idempotency_key TEXT UNIQUE,
            attempt INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL DEFAULT 3,
            leased_by TEXT,
            lease_until TEXT,
            last_error TEXT,
            result TEXT,
            created_at TEXT NOT NULL DEFAULT (datetime('now')),
            updated_at TEXT NOT NULL DEFAULT (datetime('now')),
            deleted_at TEXT)""",
            "CREATE INDEX IF NOT EXISTS idx_workflow_run_claim ON {workflow_run} (status, run_at, priority, created_at)",
            "CREATE INDEX IF NOT EXISTS idx_workflow_run_type_prefix ON {workflow_run} (type, status, run_at)",
            "CREATE INDEX IF NOT EXISTS idx_workflow_run_idempotency ON {workflow_run} (idempotency_key)",
            "CREATE INDEX IF NOT EXISTS idx_workflow_run_type_status ON {workflow_run} (type, status, created_at)",
            "CREATE INDEX IF NOT EXISTS idx_workflow_run_deleted_at ON {workflow_run} (deleted_at)",
            """CREATE TABLE IF NOT EXISTS {workflow_event} (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            workflow_id TEXT NOT NULL REFERENCES {workflow_run}(id) ON DELETE CASCADE,
            event_type TEXT NOT NULL CHECK (event_type IN
                ('created','leased','started','heartbeat','succeeded','failed','retried','cancelled')),
            data TEXT,
            created_at TEXT NOT NULL DEFAULT (datetime('now')))""",
            "CREATE INDEX IF NOT EXISTS idx_workflow_event_workflow_id ON {workflow_event} (workflow_id, created_at)",
            "CREATE INDEX IF NOT EXISTS idx_workflow_event_type ON {workflow_event} (event_type, created_at)",
            """CREATE TABLE IF NOT EXISTS {workflow_registry} (
            id TEXT PRIMARY KEY,
            workflow_name TEXT NOT NULL UNIQUE,
            intent_type TEXT NOT NULL DEFAULT 'workflow',
            runtime TEXT NOT NULL,
            is_enabled INTEGER NOT NULL DEFAULT 1,
            description TEXT,
            created_at TEXT NOT NULL DEFAULT (datetime('now')),
            updated_at TEXT NOT NULL DEFAULT (datetime('now')),
            deleted_at TEXT)""",
            "CREATE INDEX IF NOT EXISTS idx_workflow_registry_runtime ON {workflow_registry} (runtime, is_enabled)",
            "CREATE INDEX IF NOT EXISTS idx_workflow_registry_deleted_at ON {workflow_registry} (deleted_at)",
            """CREATE TABLE IF NOT EXISTS {workflow_schedule} (
            id TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            payload TEXT NOT NULL DEFAULT '{}',
            schedule TEXT NOT NULL,
            timezone TEXT NOT NULL DEFAULT 'UTC',
            next_run_at TEXT NOT NULL,
            last_run_at TEXT,
            enabled INTEGER NOT NULL DEFAULT 1,
            priority INTEGER NOT NULL DEFAULT 100,
            max_attempts INTEGER NOT NULL DEFAULT 3,
            created_at TEXT NOT NULL DEFAULT (datetime('now')),
            updated_at TEXT NOT NULL DEFAULT (datetime('now')),
            deleted_at TEXT)""",
            "CREATE INDEX IF NOT EXISTS idx_workflow_schedule_next_run ON {workflow_schedule} (next_run_at)",
            "CREATE INDEX IF NOT EXISTS idx_workflow_schedule_type ON {workflow_schedule} (type)",
            # The claim walks this in claim order and stops after LIMIT rows, instead of sorting
            # every due run (the seed's indexes lead with status and cannot give that order).
            """CREATE INDEX IF NOT EXISTS minflow_run_claim ON {workflow_run} (priority, run_at, created_at)
            WHERE status = 'pending' AND deleted_at IS NULL""",
            # The rescue sweep finds expired leases without scanning finished runs.
            "CREATE INDEX IF NOT EXISTS minflow_run_lease ON {workflow_run} (lease_until) WHERE status = 'leased'",
            # list() is newest first; without this it sorts the whole table.
            "CREATE INDEX IF NOT EXISTS minflow_run_created ON {workflow_run} (created_at)",
        ],
    ),
    (
        2,
        "schedule names",
        [
            "ALTER TABLE {workflow_schedule} ADD COLUMN name TEXT",
            """CREATE UNIQUE INDEX IF NOT EXISTS minflow_schedule_name ON {workflow_schedule} (name)
            WHERE name IS NOT NULL AND deleted_at IS NULL""",
            """CREATE INDEX IF NOT EXISTS minflow_schedule_due ON {workflow_schedule} (next_run_at)
            WHERE enabled = 1 AND deleted_at IS NULL""",
        ],
    ),
    (
        3,
        "finished-run index and worker registry",
        [
            # prune() takes finished runs oldest first from here, whatever the statistics say
            # (the status is in it, so a prune of some statuses reads no other rows). Pending
            # and leased runs, which claims and heartbeats rewrite, stay out of it: only a
            # run's move to a finished status adds an entry.
            """CREATE INDEX IF NOT EXISTS minflow_run_finished ON {workflow_run} (updated_at, status)
            WHERE status IN ('succeeded', 'failed', 'cancelled')""",
            # Live workers (Client.workers); the Go library does not know this table.
            """CREATE TABLE IF NOT EXISTS {minflow_worker} (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            types TEXT NOT NULL,
            prefixes TEXT NOT NULL,
            concurrency INTEGER NOT NULL,
            running INTEGER NOT NULL DEFAULT 0,
            heartbeat_interval REAL NOT NULL,
            version TEXT NOT NULL,
            started_at TEXT NOT NULL,
            last_seen_at TEXT NOT NULL)""",
        ],
    ),
]

_PG_MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "seed schema and minflow indexes",
        [
            """CREATE TABLE IF NOT EXISTS {workflow_run} (
            id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
            type TEXT NOT NULL,
            payload JSONB NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending','leased','succeeded','failed','cancelled')),
            priority INT NOT NULL DEFAULT 100,
            run_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
            idempotency_key TEXT UNIQUE,
            attempt INT NOT NULL DEFAULT 0,
            max_attempts INT NOT NULL DEFAULT 3,
            leased_by TEXT,
            lease_until TIMESTAMPTZ,
            last_error TEXT,
            result JSONB,
            created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
            updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
            deleted_at TIMESTAMPTZ)""",
            """CREATE INDEX IF NOT EXISTS idx_workflow_run_claim ON {workflow_run} (status, run_at, priority, created_at)
            WHERE status = 'pending'""",
            """CREATE INDEX IF NOT EXISTS idx_workflow_run_type_prefix ON {workflow_run} (type text_pattern_ops, status, run_at)
            WHERE status = 'pending'""",
            """CREATE INDEX IF NOT EXISTS idx_workflow_run_idempotency ON {workflow_run} (idempotency_key)
            WHERE idempotency_key IS NOT NULL""",
            "CREATE INDEX IF NOT EXISTS idx_workflow_run_type_status ON {workflow_run} (type, status, created_at DESC)",
            "CREATE INDEX IF NOT EXISTS idx_workflow_run_deleted_at ON {workflow_run} (deleted_at) WHERE deleted_at IS NULL",
            """CREATE TABLE IF NOT EXISTS {workflow_event} (
            id BIGSERIAL PRIMARY KEY,
            workflow_id UUID NOT NULL REFERENCES {workflow_run}(id) ON DELETE CASCADE,
            event_type TEXT NOT NULL CHECK (event_type IN
                ('created','leased','started','heartbeat','succeeded','failed','retried','cancelled')),
            data JSONB,
            created_at TIMESTAMPTZ NOT NULL DEFAULT NOW())""",
            "CREATE INDEX IF NOT EXISTS idx_workflow_event_workflow_id ON {workflow_event} (workflow_id, created_at DESC)",
            "CREATE INDEX IF NOT EXISTS idx_workflow_event_type ON {workflow_event} (event_type, created_at DESC)",
            """CREATE TABLE IF NOT EXISTS {workflow_registry} (
            id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
            workflow_name TEXT NOT NULL UNIQUE,
            intent_type TEXT NOT NULL DEFAULT 'workflow',
            runtime TEXT NOT NULL,
            is_enabled BOOLEAN NOT NULL DEFAULT true,
            description TEXT,
            created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
            updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
            deleted_at TIMESTAMPTZ)""",
            "CREATE INDEX IF NOT EXISTS idx_workflow_registry_runtime ON {workflow_registry} (runtime, is_enabled)",
            """CREATE INDEX IF NOT EXISTS idx_workflow_registry_deleted_at ON {workflow_registry} (deleted_at)
            WHERE deleted_at IS NULL""",
            """CREATE TABLE IF NOT EXISTS {workflow_schedule} (
            id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
            type TEXT NOT NULL,
            payload JSONB NOT NULL DEFAULT '{}',
            schedule TEXT NOT NULL,
            timezone TEXT NOT NULL DEFAULT 'UTC',
            next_run_at TIMESTAMPTZ NOT NULL,
            last_run_at TIMESTAMPTZ,
            enabled BOOLEAN NOT NULL DEFAULT true,
            priority INT NOT NULL DEFAULT 100,
            max_attempts INT NOT NULL DEFAULT 3,
            created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
            updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
            deleted_at TIMESTAMPTZ)""",
            """CREATE INDEX IF NOT EXISTS idx_workflow_schedule_next_run ON {workflow_schedule} (next_run_at)
            WHERE enabled = true AND deleted_at IS NULL""",
            "CREATE INDEX IF NOT EXISTS idx_workflow_schedule_type ON {workflow_schedule} (type)",
            """CREATE INDEX IF NOT EXISTS minflow_run_claim ON {workflow_run} (priority, run_at, created_at)
            WHERE status = 'pending' AND deleted_at IS NULL""",
            "CREATE INDEX IF NOT EXISTS minflow_run_lease ON {workflow_run} (lease_until) WHERE status = 'leased'",
            "CREATE INDEX IF NOT EXISTS minflow_run_created ON {workflow_run} (created_at)",
        ],
    ),
    (
        2,
        "schedule names",
        [
            "ALTER TABLE {workflow_schedule} ADD COLUMN IF NOT EXISTS name TEXT",
            """CREATE UNIQUE INDEX IF NOT EXISTS minflow_schedule_name ON {workflow_schedule} (name)
            WHERE name IS NOT NULL AND deleted_at IS NULL""",
        ],
    ),
    (
        3,
        "finished-run index and worker registry",
        [
            """CREATE INDEX IF NOT EXISTS minflow_run_finished ON {workflow_run} (updated_at, status)
            WHERE status IN ('succeeded', 'failed', 'cancelled')""",
            # retry_many() finds failed and cancelled runs here (SQLite's seed index on status
            # serves it there); only a failure or a cancel adds an entry.
            """CREATE INDEX IF NOT EXISTS minflow_run_retryable ON {workflow_run} (created_at)
            WHERE status IN ('failed', 'cancelled')""",
            """CREATE TABLE IF NOT EXISTS {minflow_worker} (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INT NOT NULL,
            types TEXT NOT NULL,
            prefixes TEXT NOT NULL,
            concurrency INT NOT NULL,
            running INT NOT NULL DEFAULT 0,
            heartbeat_interval DOUBLE PRECISION NOT NULL,
            version TEXT NOT NULL,
            started_at TIMESTAMPTZ NOT NULL,
            last_seen_at TIMESTAMPTZ NOT NULL)""",
        ],
    ),
]

SCHEMA_VERSION = max(version for version, _, _ in _PG_MIGRATIONS)

# -- the renderer -----------------------------------------------------------------------------
# minflow's tables, written as slots ({workflow_run}...) wherever a statement names one as a
# table: on PostgreSQL the slot is "schema".workflow_run, so that no statement depends on the
# connection's search_path (a caller's own connection has its own, and PgBouncer in transaction
# mode cannot send minflow's); on SQLite it is the bare name. Not slots: column references
# (workflow_run.attempt resolves against the qualified table) and index names (PostgreSQL puts
# an index in its table's schema and rejects a schema on the index's name).
_TABLES = (
    "workflow_run",
    "workflow_event",
    "workflow_registry",
    "workflow_schedule",
    "minflow_migration",
    "minflow_worker",
)
_SLOT = re.compile(r"\{(\w+)(?::([\w.]+))?\}")


def _table_slots(schema: str | None) -> dict[str, str]:
    """The table slots for a quoted ``schema``, or for none (bare names)."""
    return {table: table if schema is None else f"{schema}.{table}" for table in _TABLES}


def _render(template: str, fragments: dict[str, str]) -> str:
    """A statement with its slots filled from a dialect's ``fragments``, in one pass (inserted
    text is never rendered again).

    A slot's argument ``x`` becomes the parameter ``:x``; a dotted one (``d.delay``) is a column.
    An unknown slot raises ``KeyError``: every statement is rendered when its dialect is created.
    """

    def fill(match: re.Match) -> str:
        slot, argument = match.groups()
        if argument is None:
            return fragments[slot]
        return fragments[slot].format(argument if "." in argument else ":" + argument)

    return _SLOT.sub(fill, template)


# -- the audit trail's rule for an execution's end --------------------------------------------
# Decided once, here. The SQLite path writes these events from Python (_outcome_event: its data
# is json.dumps text, as the Go reader has always seen it); PostgreSQL's statements get the same
# rule as CASE expressions through the {event_type}, {outcome_data} and {rescue_data} slots.

# How an execution ended: as its worker reports it, or rescued after its lease expired.
_SUCCEEDED, _FAILED, _SNOOZED, _RESCUED = "succeeded", "failed", "snoozed", "rescued"
# The event that follows is named for the run's new status.
_EVENT_AFTER = {"succeeded": "succeeded", "pending": "retried", "failed": "failed"}
# Its data per kind, in key order: (key, column the statement returns, or a 'quoted' literal);
# None for no data.
_EVENT_DATA: dict[str, tuple[tuple[str, str], ...] | None] = {
    _SUCCEEDED: None,
    _SNOOZED: (("attempt", "attempt"), ("reason", "'retry_requested'"), ("delay", "delay")),
    _FAILED: (("attempt", "attempt"), ("error", "error")),
    _RESCUED: (("reason", "'lease_expired'"), ("attempt", "attempt"), ("worker_id", "leased_by")),
}


def _outcome_event(kind: str, status: str, **columns: Any) -> tuple[str, str | None]:
    """(event type, data as JSON text) after an execution of ``kind`` left its run ``status``;
    ``columns`` are the values of the columns the rule names."""
    fields = _EVENT_DATA[kind]
    if fields is None:
        return _EVENT_AFTER[status], None
    data = {key: src[1:-1] if src[0] == "'" else columns[src] for key, src in fields}
    return _EVENT_AFTER[status], json.dumps(data)


# The event an operator's change writes: (event type, data as JSON text or None), for one run
# (Client.cancel, Client.retry) and for many (cancel_many, retry_many) alike.
_MANUAL_EVENTS: dict[str, tuple[str, str | None]] = {
    "cancel": ("cancelled", None),
    "retry": ("retried", json.dumps({"reason": "manual", "attempt": 0})),
}


def _event_slots(build_object: str) -> dict[str, str]:
    """The rule as SQL over a statement's status, kind and data columns; ``build_object`` is the
    dialect's JSON object constructor."""

    def data(kind: str) -> str:
        pairs = ", ".join(f"'{key}', {src}" for key, src in _EVENT_DATA[kind] or ())
        return f"{build_object}({pairs})"

    after = " ".join(f"WHEN '{status}' THEN '{event}'" for status, event in _EVENT_AFTER.items())
    outcomes = " ".join(
        f"WHEN '{kind}' THEN {data(kind)}"
        for kind, fields in _EVENT_DATA.items()
        if fields is not None and kind != _RESCUED  # without data: NULL
    )
    return {
        "event_type": f"CASE status {after} END",
        "outcome_data": f"CASE kind {outcomes} END",
        "rescue_data": data(_RESCUED),
    }


# -- statements shared by both dialects -------------------------------------------------------

_RUN_COLUMNS = (
    "id, type, payload, status, priority, run_at, idempotency_key, attempt, "
    "max_attempts, leased_by, lease_until, last_error, result, created_at, updated_at"
)
_SCHEDULE_COLUMNS = (
    "id, type, payload, schedule, timezone, next_run_at, last_run_at, enabled, "
    "priority, max_attempts, name, created_at"
)
# What the ticker reads of a due schedule (the payload as text on both dialects).
_SCHEDULE_COLUMNS_DUE = (
    "id, type, CAST(payload AS TEXT), schedule, timezone, next_run_at, priority, max_attempts"
)

_SQL: dict[str, str] = {
    # End a transaction (each dialect begins its own way: "begin").
    "commit": "COMMIT",
    # Undo a transaction that failed part way.
    "rollback": "ROLLBACK",
    # Is a pooled connection that sat idle still alive?
    "ping": "SELECT 1",
    # The database clock, as the dialect stores time.
    "now": "SELECT {now}",
    # Applied schema version (the table may be absent on a fresh database).
    "schema_version": "SELECT MAX(version) FROM {minflow_migration}",
    # Migrations already applied.
    "applied_migrations": "SELECT version FROM {minflow_migration}",
    # Record an applied migration.
    "record_migration": "INSERT INTO {minflow_migration} (version, name) VALUES (:version, :name)",
    # One run by id.
    "get_run": f"SELECT {_RUN_COLUMNS} FROM {{workflow_run}} WHERE id = {{uuid:id}} AND deleted_at IS NULL",
    # Existing run of an idempotency key (the key is unique forever, as in the seed).
    "run_by_key": "SELECT id FROM {workflow_run} WHERE idempotency_key = :key",
    # A run's status, for cancel/retry error messages and is_cancelled().
    "run_state": "SELECT status, leased_by, attempt FROM {workflow_run} WHERE id = {uuid:id} AND deleted_at IS NULL",
    # list(): live runs newest first, narrowed by any of _LIST_FILTERS in {filters}.
    "list_runs": (
        f"SELECT {_RUN_COLUMNS} FROM {{workflow_run}} WHERE deleted_at IS NULL{{filters}} "
        "ORDER BY created_at DESC, {tiebreak} DESC LIMIT :limit OFFSET :offset"
    ),
    # Audit trail, oldest first; id breaks ties between events of one transaction.
    "events": (
        "SELECT id, workflow_id, event_type, data, created_at FROM {workflow_event} "
        "WHERE workflow_id = {uuid:id} ORDER BY created_at, id"
    ),
    # Insert one audit event.
    "insert_event": (
        "INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at) "
        "VALUES ({uuid:id}, :event_type, {json:data}, {now})"
    ),
    # Cancel a run that is not finished; sticky: the worker's fenced writes no longer match.
    "cancel": (
        "UPDATE {workflow_run} SET status = 'cancelled', updated_at = {now} "
        "WHERE id = {uuid:id} AND status IN ('pending', 'leased') AND deleted_at IS NULL RETURNING id"
    ),
    # Revive a dead or cancelled run: pending now, attempts start again from zero.
    "retry": (
        "UPDATE {workflow_run} SET status = 'pending', attempt = 0, run_at = {now}, updated_at = {now} "
        "WHERE id = {uuid:id} AND status IN ('failed', 'cancelled') AND deleted_at IS NULL RETURNING id, type"
    ),
    # Counts by type and status.
    "stats": (
        "SELECT type, status, COUNT(*) FROM {workflow_run} WHERE deleted_at IS NULL "
        "GROUP BY type, status ORDER BY type, status"
    ),
    # Metrics at scrape time: live runs by type and status, when the oldest due run became due
    # (its run_at, or its creation when it was submitted with a run_at in the past), the clock.
    # Finished runs are left out, so the partial pending/leased indexes keep this cheap.
    "queue_snapshot": (
        "SELECT type, status, COUNT(*), MIN(CASE WHEN status = 'pending' AND run_at <= {now} "
        "THEN {greatest}(run_at, created_at) END), {now} FROM {workflow_run} "
        "WHERE status IN ('pending', 'leased') AND deleted_at IS NULL "
        "GROUP BY type, status ORDER BY type, status"
    ),
    # Extend the lease of one run this worker holds (explicit heartbeat).
    "heartbeat": (
        "UPDATE {workflow_run} SET lease_until = {later:seconds}, updated_at = {now} "
        "WHERE id = {uuid:id} AND status = 'leased' AND leased_by = :worker AND attempt = :attempt "
        "RETURNING id"
    ),
    # Live schedules (paused included), oldest first.
    "schedules": (
        f"SELECT {_SCHEDULE_COLUMNS} FROM {{workflow_schedule}} WHERE deleted_at IS NULL "
        "ORDER BY created_at, id"
    ),
    # One live schedule.
    "get_schedule": (
        f"SELECT {_SCHEDULE_COLUMNS} FROM {{workflow_schedule}} "
        "WHERE id = {uuid:id} AND deleted_at IS NULL"
    ),
    # Create a schedule, or update the live one of the same name in place (race-free); the
    # planned slot survives an update that keeps cron and timezone.
    "upsert_schedule": (
        "INSERT INTO {workflow_schedule} (id, type, payload, schedule, timezone, next_run_at, "
        "priority, max_attempts, name, created_at, updated_at) VALUES ({uuid:id}, :type, "
        "{rawjson:payload}, :cron, :timezone, {time:next_run_at}, :priority, :max_attempts, "
        ":name, {now}, {now}) "
        "ON CONFLICT (name) WHERE name IS NOT NULL AND deleted_at IS NULL DO UPDATE SET "
        "type = excluded.type, payload = excluded.payload, schedule = excluded.schedule, "
        "timezone = excluded.timezone, next_run_at = CASE WHEN workflow_schedule.schedule = "
        "excluded.schedule AND workflow_schedule.timezone = excluded.timezone THEN "
        "workflow_schedule.next_run_at ELSE excluded.next_run_at END, priority = excluded.priority, "
        "max_attempts = excluded.max_attempts, updated_at = excluded.updated_at RETURNING id"
    ),
    # Pause: the ticker's claim skips disabled rows; next_run_at is recomputed on resume.
    "pause_schedule": (
        "UPDATE {workflow_schedule} SET enabled = {bool:enabled}, updated_at = {now} "
        "WHERE id = {uuid:id} AND deleted_at IS NULL RETURNING id"
    ),
    # Resume at the first slot after now (no burst of stale slots); no-op when not paused.
    "resume_schedule": (
        "UPDATE {workflow_schedule} SET next_run_at = CASE WHEN enabled = {bool:enabled} "
        "THEN next_run_at ELSE COALESCE({time:next_run_at}, next_run_at) END, "
        "enabled = {bool:enabled}, updated_at = {now} "
        "WHERE id = {uuid:id} AND deleted_at IS NULL RETURNING id"
    ),
    # Soft delete, as the seed: final, runs already created stay.
    "delete_schedule": (
        "UPDATE {workflow_schedule} SET deleted_at = {now}, enabled = {bool:disabled}, "
        "updated_at = {now} WHERE id = {uuid:id} AND deleted_at IS NULL RETURNING id"
    ),
    # After firing a slot: the next slot, and when the ticker last processed the schedule.
    "advance_schedule": (
        "UPDATE {workflow_schedule} SET next_run_at = {time:next_run_at}, last_run_at = {now}, "
        "updated_at = {now} WHERE id = {uuid:id}"
    ),
    # Move a row the ticker cannot use out of the way for a while (see _BROKEN_RETRY_SECONDS).
    "defer_schedule": (
        "UPDATE {workflow_schedule} SET next_run_at = {later:seconds}, updated_at = {now} "
        "WHERE id = {uuid:id}"
    ),
    # Insert a run created by a schedule slot; the slot key makes several tickers fire it once.
    "insert_scheduled_run": (
        "INSERT INTO {workflow_run} (id, type, payload, priority, run_at, idempotency_key, "
        "max_attempts, created_at, updated_at) VALUES ({uuid:id}, :type, {json:payload}, "
        ":priority, {now}, :key, :max_attempts, {now}, {now}) "
        "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
    ),
    # -- retention, bulk changes, the worker registry --
    # The database clock :seconds from now (negative: ago), as the dialect stores time.
    "clock_offset": "SELECT {later:seconds}",
    # A worker's entry, written afresh when it starts (a restart under the same id included);
    # pg8000 reserves the parameter name "types".
    "register_worker": (
        "INSERT INTO {minflow_worker} (id, host, pid, types, prefixes, concurrency, running, "
        "heartbeat_interval, version, started_at, last_seen_at) VALUES (:id, :host, :pid, "
        ":type_list, :prefix_list, :concurrency, :running, :heartbeat_interval, :version, {now}, "
        "{now}) "
        "ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
        "types = excluded.types, prefixes = excluded.prefixes, concurrency = excluded.concurrency, "
        "running = excluded.running, heartbeat_interval = excluded.heartbeat_interval, "
        "version = excluded.version, started_at = excluded.started_at, "
        "last_seen_at = excluded.last_seen_at"
    ),
    # A worker's sign of life, every heartbeat period; no row: its entry was removed meanwhile.
    "worker_seen": (
        "UPDATE {minflow_worker} SET last_seen_at = {now}, running = :running WHERE id = :id "
        "RETURNING id"
    ),
    # A worker's entry, removed when it stops.
    "forget_worker": "DELETE FROM {minflow_worker} WHERE id = :id",
    # Entries of workers not seen since :seconds ago (negative), removed by any live worker.
    "forget_dead_workers": "DELETE FROM {minflow_worker} WHERE last_seen_at < {later:seconds}",
    # Every entry, with the clock to judge which are alive.
    "workers": (
        "SELECT id, host, pid, types, prefixes, concurrency, running, heartbeat_interval, "
        "version, started_at, last_seen_at, {now} FROM {minflow_worker} ORDER BY started_at, id"
    ),
}

# list()'s optional filters, each appended to "list_runs" in this order when given.
_LIST_FILTERS = {
    "type": " AND type = :type",
    "status": " AND status = :status",
    "idempotency_key": " AND idempotency_key = :idempotency_key",
}

# The bulk changes' optional filters, in this order when given; statuses follow as
# _status_filter() writes them.
_BULK_FILTERS = {
    "type": " AND type = :type",
    "created_before": " AND created_at < {time:created_before}",
    "created_after": " AND created_at >= {time:created_after}",
    "key_prefix": " AND idempotency_key {startswith:key_prefix}",
}


def _status_filter(count: int) -> str:
    """The {filters} piece for ``count`` statuses, bound as ``:status0``...: few distinct
    counts, so few distinct statements."""
    return " AND status IN (" + ", ".join(f":status{i}" for i in range(count)) + ")"


# -- SQLite's own statements ------------------------------------------------------------------

_SQLITE_SQL: dict[str, str] = {
    # Connection set-up. A PRAGMA takes no parameters: {busy_timeout_ms} and {synchronous} are
    # the DSN's validated settings (digits; FULL, NORMAL or EXTRA).
    "busy_timeout": "PRAGMA busy_timeout = {busy_timeout_ms}",
    # Deleting a run deletes its events (the seed's ON DELETE CASCADE).
    "foreign_keys": "PRAGMA foreign_keys = ON",
    # Readers never block the writer, and a commit costs one fsync; the mode persists in the file.
    "journal_mode": "PRAGMA journal_mode = WAL",
    # How durable a commit is: FULL by default, so an acknowledged submit survives power loss.
    "synchronous": "PRAGMA synchronous = {synchronous}",
    # Changes when another connection commits: the cross-process wake-up, read every few ms.
    "data_version": "PRAGMA data_version",
    # IMMEDIATE takes the write lock up front: a deferred transaction that reads then writes
    # fails with SQLITE_BUSY without waiting for busy_timeout.
    "begin": "BEGIN IMMEDIATE",
    # The version table.
    "create_migration_table": """CREATE TABLE IF NOT EXISTS {minflow_migration} (
                version INTEGER PRIMARY KEY, name TEXT NOT NULL,
                applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')))""",
    # Insert one run unless its idempotency key exists.
    "insert_run": """
INSERT INTO {workflow_run} (id, type, payload, priority, run_at, idempotency_key, max_attempts, created_at, updated_at)
VALUES (:id, :type, :payload, :priority, COALESCE(:run_at, {later:delay}), :key,
        :max_attempts, {now}, {now})
ON CONFLICT (idempotency_key) DO NOTHING RETURNING id""",
    # Record a batch of outcomes (a JSON array of [id, attempt, kind, result, error, delay]),
    # each fenced by status, owner and attempt so a stale worker changes nothing.
    "complete": """
UPDATE {workflow_run} SET
  status = CASE WHEN d.kind = 'succeeded' THEN 'succeeded'
                WHEN d.kind = 'failed' AND workflow_run.attempt >= max_attempts THEN 'failed' ELSE 'pending' END,
  result = CASE WHEN d.kind = 'succeeded' THEN d.result ELSE workflow_run.result END,
  last_error = CASE WHEN d.kind = 'failed' THEN d.error ELSE last_error END,
  attempt = CASE WHEN d.kind = 'snoozed' THEN workflow_run.attempt - 1 ELSE workflow_run.attempt END,
  run_at = CASE WHEN d.kind = 'succeeded' THEN run_at
           ELSE {later:d.delay} END,
  updated_at = {now}
FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS attempt,
             json_extract(value, '$[2]') AS kind, json_extract(value, '$[3]') AS result,
             json_extract(value, '$[4]') AS error, json_extract(value, '$[5]') AS delay
      FROM json_each(:done)) AS d
-- The unary + keeps SQLite from scanning every leased run for each outcome: look each id up.
WHERE workflow_run.id = d.id AND +status = 'leased' AND +leased_by = :worker
  AND workflow_run.attempt = d.attempt
RETURNING id, status, attempt""",
    # Insert a batch of events (a JSON array of [run id, event type, data text or null]).
    "insert_events": """
INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       {now}
FROM json_each(:events)""",
    # Claim due runs of the worker's types ({filter}) in claim order; attempt counts claims.
    # Without statistics SQLite prefers the type index and sorts every due run on each claim;
    # walking the claim-order index stops after LIMIT rows (0.2 ms instead of 6 ms with 20,000
    # runs queued).
    "claim": """
UPDATE {workflow_run} SET status = 'leased', attempt = attempt + 1, leased_by = :worker,
  lease_until = {later:lease}, updated_at = {now}
WHERE id IN (SELECT id FROM {workflow_run} INDEXED BY minflow_run_claim
             WHERE status = 'pending' AND deleted_at IS NULL AND run_at <= {now} AND ({filter})
             ORDER BY priority, run_at, created_at, rowid LIMIT :limit)
RETURNING id, type, payload, attempt, max_attempts, priority,
  COALESCE(julianday(run_at), 0), COALESCE(julianday(created_at), 0)""",
    # Is anything claimable? (read-only pre-check)
    "has_work": """
SELECT 1 FROM {workflow_run} WHERE status = 'pending' AND deleted_at IS NULL AND run_at <= {now}
AND ({filter}) LIMIT 1""",
    # Expired leases go back to pending, or to failed once attempts are used up (crash loops end).
    "rescue": """
UPDATE {workflow_run} SET status = CASE WHEN attempt >= max_attempts THEN 'failed' ELSE 'pending' END,
  run_at = {now}, updated_at = {now},
  last_error = 'lease expired: worker ' || COALESCE(leased_by, '?') || ' stopped before finishing'
WHERE id IN (SELECT id FROM {workflow_run} WHERE status = 'leased' AND lease_until < {now}
             ORDER BY lease_until LIMIT :limit)
RETURNING id, type, status, attempt, leased_by""",
    # Automatic heartbeat: never shortens a longer lease a handler asked for explicitly.
    "extend_lease": """
UPDATE {workflow_run} SET lease_until = MAX(COALESCE(lease_until, ''), {later:lease}),
  updated_at = {now}
WHERE id = :id AND status = 'leased' AND leased_by = :worker AND attempt = :attempt RETURNING id""",
    # Is any schedule due? The whole cost of an idle tick. The literal `enabled` test lets the
    # planner use the partial index minflow_schedule_due.
    "schedules_due": (
        "SELECT 1 FROM {workflow_schedule} WHERE next_run_at <= {now} "
        "AND enabled = 1 AND deleted_at IS NULL LIMIT 1"
    ),
    # Due schedules, oldest slot first, with the database clock (BEGIN IMMEDIATE holds the
    # write lock, so tickers take turns).
    "claim_schedules": (
        f"SELECT {_SCHEDULE_COLUMNS_DUE}, {{now}} FROM {{workflow_schedule}} "
        "WHERE next_run_at <= {now} AND enabled = 1 AND deleted_at IS NULL "
        "ORDER BY next_run_at LIMIT :limit"
    ),
    # -- retention and bulk changes: a batch is picked, changed and given its events in one
    # BEGIN IMMEDIATE transaction, so nothing changes the rows in between. Without statistics
    # SQLite takes the seed's index on deleted_at for "deleted_at IS NULL", which every live
    # run matches; the unary + keeps that term out of the choice, so the status index serves.
    # How many finished runs a prune would delete ({filters}: the statuses).
    "count_prunable": """
SELECT COUNT(*) FROM {workflow_run} INDEXED BY minflow_run_finished
WHERE status IN ('succeeded', 'failed', 'cancelled') AND updated_at < {time:cutoff}{filters}""",
    # How many runs a bulk retry would revive ({filters}: _BULK_FILTERS and the statuses).
    "count_retry": """
SELECT COUNT(*) FROM {workflow_run} WHERE status IN ('failed', 'cancelled')
AND +deleted_at IS NULL{filters}""",
    # How many runs a bulk cancel would cancel.
    "count_cancel": """
SELECT COUNT(*) FROM {workflow_run} WHERE status IN ('pending', 'leased')
AND +deleted_at IS NULL{filters}""",
    # A batch of finished runs to prune, oldest first ({filters}: the statuses).
    "prune_pick": """
SELECT id FROM {workflow_run} INDEXED BY minflow_run_finished
WHERE status IN ('succeeded', 'failed', 'cancelled') AND updated_at < {time:cutoff}{filters}
ORDER BY updated_at LIMIT :limit""",
    # Their events (a JSON array of run ids), deleted explicitly: the foreign key's cascade
    # only acts on connections that enabled foreign_keys.
    "prune_events": "DELETE FROM {workflow_event} WHERE workflow_id IN (SELECT value FROM json_each(:ids))",
    # The runs themselves (the unary + keeps SQLite on the primary key: with the status index
    # it would scan every finished run for each batch).
    "prune_runs": """
DELETE FROM {workflow_run} WHERE id IN (SELECT value FROM json_each(:ids))
AND +status IN ('succeeded', 'failed', 'cancelled')""",
    # A batch of a bulk retry, as retry() changes one run; only runs last changed before the
    # call began (:started), so a revived run that fails again is not revived twice.
    "retry_batch": """
UPDATE {workflow_run} SET status = 'pending', attempt = 0, run_at = {now}, updated_at = {now}
WHERE id IN (SELECT id FROM {workflow_run} WHERE status IN ('failed', 'cancelled')
             AND +deleted_at IS NULL AND updated_at <= {time:started}{filters} LIMIT :limit)
RETURNING id""",
    # A batch of a bulk cancel, as cancel() changes one run; only runs created before the call
    # began, so a steady stream of new submits cannot keep it going.
    "cancel_batch": """
UPDATE {workflow_run} SET status = 'cancelled', updated_at = {now}
WHERE id IN (SELECT id FROM {workflow_run} WHERE status IN ('pending', 'leased')
             AND +deleted_at IS NULL AND created_at <= {time:started}{filters} LIMIT :limit)
RETURNING id""",
}


def _sqlite_type_filter(types: int, prefixes: int) -> str:
    """The SQLite claim's {filter} for that many exact types (``:t0``...) and literal prefixes
    (``:g0``..., GLOB patterns), OR-ed; with neither it matches nothing."""
    terms = [f"type GLOB :g{i}" for i in range(prefixes)]
    if types:
        terms.insert(0, "type IN (" + ", ".join(f":t{i}" for i in range(types)) + ")")
    return " OR ".join(terms) or "0"


_SQLITE_SLOTS = {
    "now": "strftime('%Y-%m-%d %H:%M:%f', 'now')",
    "later": "strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.3f seconds', {}))",
    "json": "{}",
    # Schedule payloads: the Go ticker scans them into json.RawMessage, which database/sql
    # fills from a BLOB but refuses from TEXT, so store them as Go does.
    "rawjson": "CAST({} AS BLOB)",
    "uuid": "{}",
    "time": "{}",
    "bool": "{}",
    "tiebreak": "rowid",  # insertion order, for runs created in the same millisecond
    "greatest": "MAX",
    # GLOB is case-sensitive (LIKE is not, in SQLite).
    "startswith": "GLOB {}",
    "filters": "",
    "filter": "0",
}

# -- PostgreSQL's own statements --------------------------------------------------------------

_PG_SQL: dict[str, str] = {
    # Transactions begin plainly: row locks (FOR UPDATE SKIP LOCKED) do the rest.
    "begin": "BEGIN",
    # One migrator at a time per schema, across processes; the lock ends with the transaction,
    # so a crashed migrator cannot leave it held.
    "migration_lock": "SELECT pg_advisory_xact_lock(7040172, hashtext(:schema))",
    # The DSN's schema, created when missing.
    "create_schema": "CREATE SCHEMA IF NOT EXISTS {schema}",
    # The version table.
    "create_migration_table": """CREATE TABLE IF NOT EXISTS {minflow_migration} (
                version INT PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW())""",
    # Insert a batch of runs, their created events and a NOTIFY, in one statement.
    "submit": """
WITH j AS (
  SELECT * FROM unnest(CAST(:id AS uuid[]), CAST(:type AS text[]), CAST(:payload AS jsonb[]),
                       CAST(:priority AS int[]), CAST(:run_at AS timestamptz[]), CAST(:delay AS float8[]),
                       CAST(:key AS text[]), CAST(:max_attempts AS int[]))
         WITH ORDINALITY AS j(id, type, payload, priority, run_at, delay, key, max_attempts, n)
), ins AS (
  INSERT INTO {workflow_run} (id, type, payload, priority, run_at, idempotency_key, max_attempts, created_at, updated_at)
  SELECT id, type, payload, priority, COALESCE(run_at, NOW() + make_interval(secs => delay)), key,
         max_attempts, NOW(), NOW()
  FROM j ORDER BY n
  ON CONFLICT (idempotency_key) DO NOTHING
  RETURNING id, type, idempotency_key
), ev AS (
  INSERT INTO {workflow_event} (workflow_id, event_type, created_at) SELECT id, 'created', NOW() FROM ins
)
SELECT CAST(id AS text) FROM ins WHERE idempotency_key IS NOT NULL
UNION ALL
SELECT NULL FROM (SELECT pg_notify(:channel, type) FROM ins GROUP BY type) AS notified""",
    # The same for one run.
    "submit_one": """
WITH ins AS (
  INSERT INTO {workflow_run} (id, type, payload, priority, run_at, idempotency_key, max_attempts, created_at, updated_at)
  VALUES (CAST(:id AS uuid), :type, CAST(:payload AS jsonb), :priority,
          COALESCE(CAST(:run_at AS timestamptz), NOW() + make_interval(secs => CAST(:delay AS float8))),
          :key, :max_attempts, NOW(), NOW())
  ON CONFLICT (idempotency_key) DO NOTHING
  RETURNING id, type
), ev AS (
  INSERT INTO {workflow_event} (workflow_id, event_type, created_at) SELECT id, 'created', NOW() FROM ins
)
SELECT pg_notify(:channel, type) FROM ins""",
    # The runs holding these idempotency keys (the rows a batch submit skipped).
    "runs_by_keys": (
        "SELECT idempotency_key, id FROM {workflow_run} "
        "WHERE idempotency_key = ANY(CAST(:keys AS text[]))"
    ),
    # Write a batch of outcomes (fenced; a JSON array of [id, attempt, kind, result, error,
    # delay]) and claim up to :limit runs, with every event, in one round trip. Outcomes and
    # claims touch different rows: a run being completed is 'leased'.
    "cycle": """
WITH d AS (
  SELECT CAST(value->>0 AS uuid) AS id, CAST(value->>1 AS int) AS attempt, value->>2 AS kind,
         CAST(value->>3 AS jsonb) AS result, value->>4 AS error, CAST(value->>5 AS float8) AS delay
  FROM json_array_elements(CAST(:done AS json))
), done AS (
  UPDATE {workflow_run} r SET
    status = CASE WHEN d.kind = 'succeeded' THEN 'succeeded'
                  WHEN d.kind = 'failed' AND r.attempt >= r.max_attempts THEN 'failed' ELSE 'pending' END,
    result = CASE WHEN d.kind = 'succeeded' THEN d.result ELSE r.result END,
    last_error = CASE WHEN d.kind = 'failed' THEN d.error ELSE r.last_error END,
    attempt = CASE WHEN d.kind = 'snoozed' THEN r.attempt - 1 ELSE r.attempt END,
    run_at = CASE WHEN d.kind = 'succeeded' THEN r.run_at ELSE NOW() + make_interval(secs => d.delay) END,
    updated_at = NOW()
  FROM d
  WHERE r.id = d.id AND r.status = 'leased' AND r.leased_by = :worker AND r.attempt = d.attempt
  RETURNING r.id, r.status, r.attempt, d.kind, d.error, d.delay
), done_events AS (
  INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at)
  SELECT id, {event_type}, {outcome_data}, NOW()
  FROM done
), picked AS (
  SELECT id FROM {workflow_run}
  WHERE status = 'pending' AND deleted_at IS NULL AND run_at <= NOW()
    AND (type = ANY(CAST(:claim_types AS text[])) OR type LIKE ANY(CAST(:patterns AS text[])))
  ORDER BY priority, run_at, created_at
  LIMIT :limit
  FOR UPDATE SKIP LOCKED
), claimed AS (
  UPDATE {workflow_run} r SET status = 'leased', attempt = r.attempt + 1, leased_by = :worker,
    lease_until = NOW() + make_interval(secs => :lease), updated_at = NOW()
  FROM picked WHERE r.id = picked.id
  RETURNING r.id, r.type, r.payload, r.attempt, r.max_attempts, r.priority, r.run_at, r.created_at
), claim_events AS (
  INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at)
  SELECT id, 'leased', jsonb_build_object('worker_id', CAST(:worker AS text), 'attempt', attempt), NOW()
  FROM claimed
  UNION ALL
  SELECT id, 'started', jsonb_build_object('worker_id', CAST(:worker AS text)), NOW()
  FROM claimed WHERE type = ANY(CAST(:handled AS text[]))
)
-- Two JSON arrays in one row: the driver decodes them in C instead of value by value in Python.
SELECT (SELECT COALESCE(json_agg(json_build_array(id, type, payload, attempt, max_attempts, priority,
                                                  extract(epoch FROM run_at),
                                                  extract(epoch FROM created_at))), '[]')
        FROM claimed),
       (SELECT COALESCE(json_agg(json_build_array(id, status, attempt)), '[]') FROM done)""",
    # Expired leases back to pending (or failed when attempts are used up), with their events.
    "rescue": """
WITH expired AS (
  SELECT id FROM {workflow_run} WHERE status = 'leased' AND lease_until < NOW()
  ORDER BY lease_until LIMIT :limit FOR UPDATE SKIP LOCKED
), r AS (
  UPDATE {workflow_run} w SET status = CASE WHEN w.attempt >= w.max_attempts THEN 'failed' ELSE 'pending' END,
    run_at = NOW(), updated_at = NOW(),
    last_error = 'lease expired: worker ' || COALESCE(w.leased_by, '?') || ' stopped before finishing'
  FROM expired WHERE w.id = expired.id
  RETURNING w.id, w.type, w.status, w.attempt, w.leased_by
), ev AS (
  INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at)
  SELECT id, {event_type}, {rescue_data}, NOW()
  FROM r
)
SELECT id, type, status, attempt, leased_by FROM r""",
    # Automatic heartbeat for every run a worker holds; never shortens a longer explicit lease.
    "extend_leases": """
UPDATE {workflow_run} r SET lease_until = GREATEST(r.lease_until, NOW() + make_interval(secs => :lease)),
  updated_at = NOW()
FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[])) AS h(id, attempt)
WHERE r.id = h.id AND r.attempt = h.attempt AND r.status = 'leased' AND r.leased_by = :worker
RETURNING r.id""",
    # Wake the workers listening on this schema's channel, naming the run type submitted.
    "notify": "SELECT pg_notify(:channel, :type)",
    # Subscribe this connection to the schema's channel.
    "listen": "LISTEN {channel}",
    # An empty query: a round trip that makes pg8000 read the notifications waiting for it.
    "poll": "",
    # Is any schedule due? The literal `enabled` test lets the planner match the partial index
    # idx_workflow_schedule_next_run, which a bound parameter would not in a generic plan.
    "schedules_due": (
        "SELECT 1 FROM {workflow_schedule} WHERE next_run_at <= NOW() "
        "AND enabled = true AND deleted_at IS NULL LIMIT 1"
    ),
    # Due schedules, oldest slot first, with the database clock, locked: other tickers skip them.
    "claim_schedules": (
        f"SELECT {_SCHEDULE_COLUMNS_DUE}, NOW() FROM {{workflow_schedule}} "
        "WHERE next_run_at <= NOW() AND enabled = true AND deleted_at IS NULL "
        "ORDER BY next_run_at LIMIT :limit FOR UPDATE SKIP LOCKED"
    ),
    # -- retention and bulk changes: one statement per batch, events included.
    # How many finished runs a prune would delete ({filters}: the statuses). The literal
    # status list is minflow_run_finished's condition, so the planner may use that index.
    "count_prunable": (
        "SELECT COUNT(*) FROM {workflow_run} WHERE status IN ('succeeded', 'failed', 'cancelled') "
        "AND updated_at < {time:cutoff}{filters}"
    ),
    # How many runs a bulk retry would revive ({filters}: _BULK_FILTERS and the statuses).
    "count_retry": (
        "SELECT COUNT(*) FROM {workflow_run} WHERE status IN ('failed', 'cancelled') "
        "AND deleted_at IS NULL{filters}"
    ),
    # How many runs a bulk cancel would cancel (OR: see cancel_batch).
    "count_cancel": (
        "SELECT COUNT(*) FROM {workflow_run} WHERE (status = 'pending' OR status = 'leased') "
        "AND deleted_at IS NULL{filters}"
    ),
    # Delete a batch of finished runs, oldest first ({filters}: the statuses), and their
    # events. The lock keeps a concurrent retry from reviving a run whose events are going;
    # rows another transaction holds are left for the next batch. The statement is prepared,
    # so its plan may be the generic one, which knows no cut-off: the ORDER BY makes the index
    # the cheapest way to the oldest rows whatever the estimates, and = ANY(ARRAY(...)) finds
    # the batch's rows by key (a join could pick a scan of the whole table).
    "prune_batch": """
WITH picked AS (
  SELECT id FROM {workflow_run}
  WHERE status IN ('succeeded', 'failed', 'cancelled') AND updated_at < {time:cutoff}{filters}
  ORDER BY updated_at LIMIT :limit FOR UPDATE SKIP LOCKED
), events AS (
  DELETE FROM {workflow_event} WHERE workflow_id = ANY(ARRAY(SELECT id FROM picked))
), runs AS (
  DELETE FROM {workflow_run} WHERE id = ANY(ARRAY(SELECT id FROM picked)) RETURNING 1
)
SELECT COUNT(*) FROM runs""",
    # A batch of a bulk retry, as retry() changes one run, with its events (:event_type,
    # :data) and a NOTIFY per type; only runs last changed before the call began (:started).
    # Locked rows are waited for, then checked again, so a bulk change misses none; the rows
    # are found by key, as prune_batch's are.
    "retry_batch": """
WITH picked AS (
  SELECT id FROM {workflow_run}
  WHERE status IN ('failed', 'cancelled') AND deleted_at IS NULL
    AND updated_at <= {time:started}{filters}
  LIMIT :limit FOR UPDATE
), changed AS (
  UPDATE {workflow_run} SET status = 'pending', attempt = 0, run_at = NOW(), updated_at = NOW()
  WHERE id = ANY(ARRAY(SELECT id FROM picked)) RETURNING id, type
), ev AS (
  INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at)
  SELECT id, :event_type, {json:data}, NOW() FROM changed
)
SELECT (SELECT COUNT(*) FROM changed),
       (SELECT COUNT(*) FROM (SELECT pg_notify(:channel, type) FROM changed GROUP BY type) AS n)""",
    # A batch of a bulk cancel, as cancel() changes one run; only runs created before the call
    # began. Written as OR, each branch the condition of a partial index (minflow_run_claim,
    # minflow_run_lease): the planner can combine the two instead of walking every run.
    "cancel_batch": """
WITH picked AS (
  SELECT id FROM {workflow_run}
  WHERE (status = 'pending' OR status = 'leased') AND deleted_at IS NULL
    AND created_at <= {time:started}{filters}
  LIMIT :limit FOR UPDATE
), changed AS (
  UPDATE {workflow_run} SET status = 'cancelled', updated_at = NOW()
  WHERE id = ANY(ARRAY(SELECT id FROM picked)) RETURNING id
), ev AS (
  INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at)
  SELECT id, :event_type, {json:data}, NOW() FROM changed
)
SELECT COUNT(*) FROM changed""",
}

_PG_SLOTS = {
    "now": "NOW()",
    "later": "NOW() + make_interval(secs => {})",
    "json": "CAST({} AS jsonb)",
    "rawjson": "CAST({} AS jsonb)",
    "uuid": "CAST({} AS uuid)",
    "time": "CAST({} AS timestamptz)",
    "bool": "{}",
    "tiebreak": "id",
    "greatest": "GREATEST",
    "startswith": "LIKE {}",
    "filters": "",
    **_event_slots("jsonb_build_object"),
}


# ---------------------------------------------------------------------------------------------
# Connections and the pool
# ---------------------------------------------------------------------------------------------


class _Connection:
    """One driver connection, used by one thread at a time, with translated errors.

    ``sql`` is its dialect's rendered statement table (for begin, commit, rollback and ping).
    """

    broken = False
    idle_since = 0.0
    sql: dict[str, str]

    def query(self, sql: str, params: dict | None = None) -> list:
        raise NotImplementedError

    def ping(self) -> None:
        """One cheap round trip; raises ``MinflowError`` when the connection is dead."""
        self.query(self.sql["ping"])

    def spoke_while_idle(self) -> bool:
        """True if the server sent something while nobody was asking (e.g. the error and EOF
        of a terminated session); costs no round trip."""
        return False

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Connection]:
        self.query(self.sql["begin"])
        try:
            yield self
        except BaseException:
            if not self.broken:
                with contextlib.suppress(MinflowError):
                    self.query(self.sql["rollback"])
            raise
        self.query(self.sql["commit"])

    def close(self) -> None:
        raise NotImplementedError


class _SQLiteConnection(_Connection):
    def __init__(
        self, raw: sqlite3.Connection, sql: dict[str, str], lock: threading.RLock | None = None
    ):
        self.raw = raw
        self.sql = sql
        # sqlite://:memory: shares one connection (the database lives in it), so every use
        # holds this lock; file databases have a connection per user and no lock.
        self._lock = lock

    def query(self, sql: str, params: dict | None = None) -> list:
        if params:
            params = {
                k: _sqlite_time(v) if isinstance(v, _dt.datetime) else v for k, v in params.items()
            }
        try:
            if self._lock is None:
                return self.raw.execute(sql, params or {}).fetchall()
            with self._lock:
                return self.raw.execute(sql, params or {}).fetchall()
        except sqlite3.Error as exc:
            raise _translate_sqlite(exc) from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Connection]:
        if self._lock is None:
            with super().transaction() as conn:
                yield conn
            return
        with self._lock, super().transaction() as conn:
            yield conn

    def close(self) -> None:
        if self._lock is None:
            with contextlib.suppress(sqlite3.Error):
                self.raw.close()


def _translate_sqlite(exc: sqlite3.Error) -> MinflowError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return Unavailable(f"SQLite database is locked (busy_timeout exceeded): {text}")
    if "no such table" in text:
        return MinflowError(
            f"{text}: the minflow schema is missing; run Client.migrate() or `minflow migrate`"
        )
    if isinstance(exc, sqlite3.IntegrityError):
        return InvalidInput(f"rejected by the database: {text}")
    if isinstance(exc, sqlite3.OperationalError) and ("disk" in text or "unable to open" in text):
        return Unavailable(f"SQLite: {text}")
    return MinflowError(f"SQLite: {text}")


class _PgConnection(_Connection):
    """A pg8000 connection; the only code that touches pg8000's connection object."""

    def __init__(self, raw: Any, errors: Any, sql: dict[str, str]):
        self.raw = raw
        self._errors = errors
        self.sql = sql
        # pg8000's run() with parameters costs three round trips (parse, describe, execute);
        # a prepared statement costs one, so every parameterised statement is prepared once.
        self._prepared: dict[str, Any] = {}

    def query(self, sql: str, params: dict | None = None) -> list:
        try:
            if params is None:
                return self.raw.run(sql) or []
            statement = self._prepared.get(sql)
            if statement is None:
                statement = self._prepared[sql] = self.raw.prepare(sql)
            params = {k: _pg_array(v) if isinstance(v, list) else v for k, v in params.items()}
            return statement.run(**params) or []
        except self._errors.DatabaseError as exc:
            error = _translate_pg(exc)
            if isinstance(error, Unavailable):
                self.broken = True
            raise error from exc
        except self._errors.InterfaceError as exc:
            # pg8000 uses InterfaceError both for a dead socket and for misuse of its API.
            if not _PG_NETWORK.search(str(exc)):
                raise MinflowError(f"pg8000: {exc}") from exc
            self.broken = True
            raise Unavailable(f"PostgreSQL connection lost: {exc}") from exc
        except (OSError, EOFError, AttributeError) as exc:
            # A socket error, a short read, or (closed connection) an attribute of its None socket.
            self.broken = True
            raise Unavailable(f"PostgreSQL connection lost: {exc}") from exc

    def forget_prepared(self) -> None:
        """Drop the prepared statements (their plans may be stale after DDL)."""
        self._prepared.clear()

    def _readable(self, timeout: float) -> bool:
        # pg8000 exposes no socket accessor and no wait for unsolicited messages.
        return bool(select.select([self.raw._usock], [], [], timeout)[0])

    def spoke_while_idle(self) -> bool:
        try:
            return self._readable(0)
        except (OSError, ValueError, AttributeError):
            return True

    def wait_readable(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the server to send something unasked (a
        notification, or the farewell of a terminated session)."""
        try:
            return self._readable(timeout)
        except (OSError, ValueError, AttributeError) as exc:
            self.broken = True
            raise Unavailable(f"PostgreSQL connection lost: {exc}") from exc

    def take_notifications(self) -> int:
        """Read what the server sent and return how many notifications arrived (forgotten)."""
        self.query(self.sql["poll"])
        count = len(self.raw.notifications)
        self.raw.notifications.clear()
        return count

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()


def _pg_array(values: list) -> str:
    """An array literal with every element quoted.

    pg8000 leaves a lower-case ``null`` string unquoted, which PostgreSQL reads as NULL: a JSON
    ``null`` payload, or a type or idempotency key spelled "null", would silently become NULL.
    Statements cast the literal to the element type they need.
    """
    parts = []
    for value in values:
        if value is None:
            parts.append("NULL")
        else:
            text = str(value).replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'"{text}"')
    return "{" + ",".join(parts) + "}"


_PG_NETWORK = re.compile(r"network|connection|closed|timed? ?out|socket|EOF|read|write|SSL", re.I)
_PG_UNAVAILABLE = ("08", "53", "57", "58")  # connection, resources, operator intervention, system


def _translate_pg(exc: Exception) -> MinflowError:
    info = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    code, message = info.get("C", ""), info.get("M", str(exc))
    if code.startswith(_PG_UNAVAILABLE) or code in ("40001", "40P01", "55P03"):
        return Unavailable(f"PostgreSQL unavailable ({code}): {message}")
    if code in ("42P01", "3F000"):
        return MinflowError(
            f"{message}: the minflow schema is missing; run Client.migrate() or `minflow migrate`"
        )
    if code.startswith(("22", "23")):
        return InvalidInput(f"rejected by the database ({code}): {message}")
    return MinflowError(f"PostgreSQL error ({code}): {message}")


class _Pool:
    """Connections handed to one thread at a time; LIFO so warm connections are reused.

    Safe after fork: a child never touches its parent's connections (closing a PostgreSQL one
    would end the parent's session), it just forgets them.
    """

    def __init__(
        self, connect: Callable[[], _Connection], size: int = POOL_SIZE, ping: bool = False
    ):
        self._connect = connect
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._ping = ping
        self._pid = os.getpid()
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[_Connection]:
        if not self._slots.acquire(timeout=60):
            raise Unavailable("no database connection free within 60 s (pool exhausted)")
        conn = None
        try:
            conn = self._take()
            yield conn
        finally:
            if conn is not None:
                self._give_back(conn)
            self._slots.release()

    def _take(self) -> _Connection:
        if self._closed:
            raise MinflowError("the client is closed")
        with self._lock:
            if self._pid != os.getpid():
                self._idle, self._pid = [], os.getpid()
            conn = self._idle.pop() if self._idle else None
        # A connection idle for a while may have been cut by a server restart; one cheap
        # round trip here spares the caller an error for something already healed. A session
        # the server ended (restart, pg_terminate_backend) has left its farewell unread on the
        # socket, which shows without a round trip, however short the idle time.
        if (
            conn is not None
            and self._ping
            and (time.monotonic() - conn.idle_since > 1.0 or conn.spoke_while_idle())
        ):
            try:
                conn.ping()
            except MinflowError:
                conn.close()
                conn = None
        return conn if conn is not None else self._connect()

    def _give_back(self, conn: _Connection) -> None:
        if conn.broken or self._closed or self._pid != os.getpid():
            if self._pid == os.getpid():
                conn.close()
            return
        conn.idle_since = time.monotonic()
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        if self._pid == os.getpid():
            for conn in idle:
                conn.close()


# ---------------------------------------------------------------------------------------------
# Dialects: the only place that knows SQLite from PostgreSQL
# ---------------------------------------------------------------------------------------------
# Differences are data first (statement tables, fragments, migrations, pool settings), then a
# few hooks: connect, close, submit, the claim/complete cycle, rescue, lease extension and
# wake-ups. Code above the seam never asks which dialect it talks to.


@dataclasses.dataclass
class _Completion:
    """A finished execution's outcome, as the worker reports it back (kind: _SUCCEEDED...)."""

    id: str
    attempt: int
    kind: str
    result: str | None = None  # JSON text
    error: str | None = None
    delay: float = 0.0
    type: str = ""
    started: float = 0.0  # monotonic, for the duration metric


@dataclasses.dataclass
class _Filter:
    """Which runs a worker may claim: exact types and/or literal prefixes."""

    types: tuple[str, ...]
    prefixes: tuple[str, ...]
    handled: frozenset[str]


class _Claim(NamedTuple):
    """A run the cycle claimed; ``run_at`` and ``created_at`` are numbers that order claims."""

    id: str
    type: str
    payload: Any  # decoded JSON (the raw text if it is not JSON)
    attempt: int
    max_attempts: int
    priority: int
    run_at: float
    created_at: float


class _Dialect:
    name = ""
    own_sql: dict[str, str] = {}  # the dialect's statements beside _SQL
    migration_sql: list[tuple[int, str, list[str]]] = []
    fragments: dict[str, str] = {}  # slot -> SQL text
    pool_size = POOL_SIZE
    pool_ping = False  # check a pooled connection that sat idle before handing it out

    def __init__(self, dsn: _DSN):
        self.dsn = dsn
        self._templates = {**_SQL, **self.own_sql}
        self.sql = {name: _render(text, self.fragments) for name, text in self._templates.items()}
        self.migrations = [
            (version, name, [_render(text, self.fragments) for text in statements])
            for version, name, statements in self.migration_sql
        ]
        self._composed: dict[tuple, str] = {}

    def compose(self, name: str, **pieces: str) -> str:
        """Statement ``name`` with run-time pieces in its slots ({filters}, {filter}); a piece
        may hold slots itself. Each distinct result is rendered once."""
        key = (name, *sorted(pieces.items()))
        text = self._composed.get(key)
        if text is None:
            rendered = {slot: _render(piece, self.fragments) for slot, piece in pieces.items()}
            text = self._composed[key] = _render(
                self._templates[name], {**self.fragments, **rendered}
            )
        return text

    def valid_id(self, run_id: str) -> bool:
        return isinstance(run_id, str) and bool(run_id)

    def decode_json(self, value: Any) -> Any:
        raise NotImplementedError

    def connect(self) -> _Connection:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the dialect itself holds, once its client's pool is closed."""

    def migrate(self, conn: _Connection) -> int:
        """Apply the migrations this database lacks, in one transaction; returns how many."""
        done = 0
        with conn.transaction():
            self._prepare_schema(conn)
            conn.query(self.sql["create_migration_table"])
            applied = {row[0] for row in conn.query(self.sql["applied_migrations"])}
            for version, name, statements in self.migrations:
                if version in applied:
                    continue
                for statement in statements:
                    conn.query(statement)
                conn.query(self.sql["record_migration"], {"version": version, "name": name})
                done += 1
        return done

    def _prepare_schema(self, conn: _Connection) -> None:
        """Before the migrations, in their transaction."""

    # -- hooks for the hot paths -----------------------------------------------------------
    def submit(self, conn: _Connection, rows: list[dict]) -> list[tuple[str, bool]]:
        """Insert runs (with their created events) in one transaction; (id, created) each."""
        raise NotImplementedError

    def cycle(
        self,
        conn: _Connection,
        worker_id: str,
        done: list[_Completion],
        limit: int,
        lease: float,
        filt: _Filter,
    ) -> tuple[list[_Claim], dict[str, tuple[str, int]]]:
        """Write completions and claim up to ``limit`` runs in one transaction; returns the
        claims and, per recorded outcome, the run's (new status, attempt)."""
        raise NotImplementedError

    def rescue(self, conn: _Connection) -> list:
        """Expired leases back to pending or failed; (id, type, status, attempt, leased_by) each."""
        raise NotImplementedError

    def extend_leases(
        self, conn: _Connection, worker_id: str, held: list[tuple[str, int]], lease: float
    ) -> set[str]:
        raise NotImplementedError

    def may_have_work(self, conn: _Connection, filt: _Filter) -> bool:
        return True

    def notify(self, conn: _Connection, types: set[str]) -> None:
        """Tell other processes' workers that runs of ``types`` were submitted."""

    def watcher(self) -> Callable[[threading.Event, Callable[[], None]], None] | None:
        """A loop that calls wake() when another process may have submitted work."""
        return None

    # -- hooks for the operator's bulk actions ---------------------------------------------
    # One batch each, in a transaction of its own; ``filters`` is the composed {filters}
    # piece, ``params`` its parameters plus :limit and :cutoff or :started.
    batch_seconds = 0.0  # how long a batch should take (its size adapts); 0: CHANGE_BATCH runs
    batch_pause = 0.0  # the pause between two batches, as a multiple of the last one's time

    def prefix_pattern(self, prefix: str) -> str:
        """The pattern that {startswith:x} matches against text starting with ``prefix``."""
        raise NotImplementedError

    def prune(self, conn: _Connection, filters: str, params: dict) -> int:
        """Delete a batch of finished runs and their events; returns how many runs."""
        raise NotImplementedError

    def change(self, conn: _Connection, action: str, filters: str, params: dict) -> int:
        """A batch of a bulk ``action`` ("retry", "cancel") with its events (and, for a retry,
        the wake-up of other processes' workers); returns how many runs changed."""
        raise NotImplementedError


def _row_dicts(rows: Sequence[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


class _SQLiteDialect(_Dialect):
    name = "sqlite"
    own_sql = _SQLITE_SQL
    migration_sql = _SQLITE_MIGRATIONS

    def __init__(self, dsn: _DSN):
        if sqlite3.sqlite_version_info < (3, 35, 0):
            raise MinflowError(
                f"minflow needs SQLite >= 3.35 (RETURNING); this Python has {sqlite3.sqlite_version}"
            )
        self.fragments = {
            **_SQLITE_SLOTS,
            **_table_slots(None),
            "busy_timeout_ms": str(int(dsn.busy_timeout_ms)),
            "synchronous": dsn.synchronous.upper(),
        }
        super().__init__(dsn)
        if dsn.memory:
            self.pool_size = 1  # the database lives in one shared connection
        self._shared: _SQLiteConnection | None = None
        self._shared_lock = threading.RLock()
        # Per worker filter: the claim and pre-check statements and their parameters.
        self._filters: dict[tuple, tuple[str, str, dict]] = {}

    def decode_json(self, value: Any) -> Any:
        # The Go library binds JSON as []byte, which SQLite stores as BLOB.
        if value is None:
            return None
        if isinstance(value, (bytes, memoryview)):
            value = bytes(value).decode("utf-8")
        return json.loads(value)

    def _open(self) -> sqlite3.Connection:
        raw = sqlite3.connect(
            self.dsn.path,
            timeout=self.dsn.busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            raw.execute(self.sql["busy_timeout"])
            raw.execute(self.sql["foreign_keys"])
            if not self.dsn.memory:
                mode = self._enable_wal(raw)
                if mode.lower() != "wal":
                    raise MinflowError(
                        f"could not switch {self.dsn.path} to WAL (journal_mode={mode})"
                    )
            raw.execute(self.sql["synchronous"])
        except sqlite3.Error as exc:
            raw.close()
            raise _translate_sqlite(exc) from exc
        except BaseException:
            raw.close()
            raise
        return raw

    def _enable_wal(self, raw: sqlite3.Connection) -> str:
        # Switching a fresh file to WAL needs an exclusive lock, and SQLite answers "locked"
        # at once instead of calling the busy handler when another process is switching it
        # too; retry within busy_timeout (the mode persists, so this is rare after creation).
        deadline = time.monotonic() + self.dsn.busy_timeout_ms / 1000
        while True:
            try:
                return raw.execute(self.sql["journal_mode"]).fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))

    def connect(self) -> _Connection:
        if not self.dsn.memory:
            try:
                return _SQLiteConnection(self._open(), self.sql)
            except sqlite3.Error as exc:
                raise Unavailable(f"cannot open SQLite database {self.dsn.path}: {exc}") from exc
        with self._shared_lock:
            if self._shared is None:
                self._shared = _SQLiteConnection(self._open(), self.sql, self._shared_lock)
            return self._shared

    def close(self) -> None:
        # The pool leaves the shared in-memory connection open: it is the database.
        if self._shared is not None:
            self._shared.raw.close()

    def submit(self, conn: _Connection, rows: list[dict]) -> list[tuple[str, bool]]:
        out = []
        with conn.transaction():
            for row in rows:
                if conn.query(self.sql["insert_run"], row):
                    conn.query(
                        self.sql["insert_event"],
                        {"id": row["id"], "event_type": "created", "data": None},
                    )
                    out.append((row["id"], True))
                else:
                    out.append(
                        (conn.query(self.sql["run_by_key"], {"key": row["key"]})[0][0], False)
                    )
        return out

    def _filter(self, filt: _Filter) -> tuple[str, str, dict]:
        """(claim statement, pre-check statement, their parameters) for ``filt``."""
        cache_key = (filt.types, filt.prefixes)
        cached = self._filters.get(cache_key)
        if cached is None:
            params = {f"t{i}": t for i, t in enumerate(filt.types)}
            for i, prefix in enumerate(filt.prefixes):
                params[f"g{i}"] = self.prefix_pattern(prefix)
            piece = _sqlite_type_filter(len(filt.types), len(filt.prefixes))
            cached = self._filters[cache_key] = (
                self.compose("claim", filter=piece),
                self.compose("has_work", filter=piece),
                params,
            )
        return cached

    def _claim(self, row: Sequence) -> _Claim:
        payload = row[2]
        try:
            payload = self.decode_json(payload)
        except ValueError:
            pass  # the handler sees the raw text; decoding is its problem, not the queue's
        return _Claim(row[0], row[1], payload, *row[3:])

    def cycle(self, conn, worker_id, done, limit, lease, filt):
        # A handful of statements per batch, whatever its size: outcomes and events travel as
        # one JSON array each, expanded by json_each inside SQLite.
        events: list[list] = []
        finished: dict[str, tuple[str, int]] = {}
        claimed: list[_Claim] = []
        with conn.transaction():
            if done:
                items: dict[str, list[_Completion]] = collections.defaultdict(list)
                for item in done:
                    items[item.id].append(item)
                rows = conn.query(
                    self.sql["complete"],
                    {
                        "worker": worker_id,
                        "done": json.dumps(
                            [[d.id, d.attempt, d.kind, d.result, d.error, d.delay] for d in done]
                        ),
                    },
                )
                for run_id, status, attempt in rows:
                    finished[run_id] = (status, attempt)
                    # A stale execution and its successor may both report in one batch; the
                    # fence let through the one whose attempt matches (a snooze gave one back).
                    item = next(
                        (d for d in items[run_id] if d.attempt - (d.kind == _SNOOZED) == attempt),
                        items[run_id][-1],
                    )
                    event = _outcome_event(
                        item.kind, status, attempt=attempt, error=item.error, delay=item.delay
                    )
                    events.append([run_id, *event])
            if limit > 0:
                claim, _, params = self._filter(filt)
                rows = conn.query(
                    claim, {**params, "worker": worker_id, "lease": lease, "limit": limit}
                )
                claimed = [self._claim(row) for row in rows]
                who = json.dumps(worker_id)
                started = f'{{"worker_id": {who}}}'
                for run in claimed:
                    events.append(
                        [run.id, "leased", f'{{"worker_id": {who}, "attempt": {run.attempt}}}']
                    )
                    if run.type in filt.handled:
                        events.append([run.id, "started", started])
            if events:
                conn.query(self.sql["insert_events"], {"events": json.dumps(events)})
        return claimed, finished

    def rescue(self, conn):
        with conn.transaction():
            rows = conn.query(self.sql["rescue"], {"limit": RESCUE_BATCH})
            if rows:
                events = [
                    [run_id, *_outcome_event(_RESCUED, status, attempt=attempt, leased_by=by)]
                    for run_id, _type, status, attempt, by in rows
                ]
                conn.query(self.sql["insert_events"], {"events": json.dumps(events)})
        return rows

    def extend_leases(self, conn, worker_id, held, lease):
        kept = set()
        with conn.transaction():
            for run_id, attempt in held:
                if conn.query(
                    self.sql["extend_lease"],
                    {"id": run_id, "attempt": attempt, "worker": worker_id, "lease": lease},
                ):
                    kept.add(run_id)
        return kept

    def may_have_work(self, conn, filt):
        # A read in WAL mode takes no lock; it spares every idle worker a write transaction
        # each time some other connection commits.
        _, has_work, params = self._filter(filt)
        return bool(conn.query(has_work, params))

    def watcher(self):
        if self.dsn.memory:
            return None

        def watch(stop: threading.Event, wake: Callable[[], None]) -> None:
            conn = None
            last = None
            while not stop.is_set():
                try:
                    if conn is None:
                        conn = self._open()
                    version = conn.execute(self.sql["data_version"]).fetchone()[0]
                    if last is not None and version != last:
                        wake()
                    last = version
                    stop.wait(SQLITE_WATCH_INTERVAL)
                except sqlite3.Error as exc:
                    _worker_log.warning("data_version watcher: %s; retrying", exc)
                    if conn is not None:
                        conn.close()
                    conn, last = None, None
                    stop.wait(1.0)
            if conn is not None:
                conn.close()

        return watch

    # A batch holds the write lock that claims and submits wait for, so it is kept short:
    # 1,000 runs with their events take 60-110 ms on a loaded 2-core machine, a third of it
    # the FULL-sync commit; about 100 take the 20 ms aimed at. A waiting writer's busy handler
    # sleeps ever longer between tries for the lock (1, 2, 5, 10, 15 ms ... up to 100): one
    # that began waiting during a batch tries again within about 15 ms of its end, and a
    # pause of three batches lets it and a few other writers in. Without the pause the bulk
    # action wins the lock at each commit and claims wait until it is done.
    batch_seconds = 0.02
    batch_pause = 3.0

    def prefix_pattern(self, prefix):
        # GLOB is case-sensitive (LIKE is not, in SQLite); its wildcards are escaped with
        # brackets so the prefix is matched literally.
        return re.sub(r"([*?\[])", r"[\1]", prefix) + "*"

    def prune(self, conn, filters, params):
        with conn.transaction():
            ids = [
                row[0] for row in conn.query(self.compose("prune_pick", filters=filters), params)
            ]
            if ids:
                batch = {"ids": json.dumps(ids)}
                conn.query(self.sql["prune_events"], batch)
                conn.query(self.sql["prune_runs"], batch)
        return len(ids)

    def change(self, conn, action, filters, params):
        event_type, data = _MANUAL_EVENTS[action]
        with conn.transaction():
            rows = conn.query(self.compose(f"{action}_batch", filters=filters), params)
            if rows:
                events = [[row[0], event_type, data] for row in rows]
                conn.query(self.sql["insert_events"], {"events": json.dumps(events)})
        return len(rows)


class _PostgresDialect(_Dialect):
    name = "postgres"
    own_sql = _PG_SQL
    migration_sql = _PG_MIGRATIONS
    pool_ping = True  # a server restart or pg_terminate_backend cuts pooled connections

    def __init__(self, dsn: _DSN):
        try:
            import pg8000.exceptions
            import pg8000.native
        except ImportError:
            raise MinflowError("PostgreSQL support needs pg8000: pip install pg8000") from None
        self._driver = pg8000.native
        self._errors = pg8000.exceptions
        schema = dsn.schema
        # NOTIFY channel per schema, so queues in different schemas do not wake each other.
        # A channel name is an identifier too: at most 63 bytes.
        self.channel = (
            ("minflow_" + schema)
            if len(schema.encode()) <= 55
            else "minflow_" + uuid.uuid5(uuid.NAMESPACE_OID, schema).hex
        )
        self.fragments = {
            **_PG_SLOTS,
            **_table_slots(_quote_ident(schema)),
            "schema": _quote_ident(schema),
            "channel": _quote_ident(self.channel),
        }
        super().__init__(dsn)

    def valid_id(self, run_id):
        # A non-UUID id is "not found": PostgreSQL would reject the cast to uuid with an error.
        return _is_uuid(run_id)

    def decode_json(self, value):
        return value  # pg8000 decodes jsonb

    def _ssl_context(self) -> Any:
        mode = self.dsn.sslmode
        if mode in ("disable", "allow"):
            return None
        import ssl

        root, cert, key = self.dsn.ssl_files
        context = ssl.create_default_context(cafile=root)
        if mode in ("prefer", "require"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif mode == "verify-ca":
            context.check_hostname = False
        if cert:
            context.load_cert_chain(cert, key)
        return context

    def connect(self) -> _Connection:
        dsn = self.dsn
        kwargs = dict(
            user=dsn.user,
            password=dsn.password,
            database=dsn.database,
            timeout=dsn.timeout,
            application_name=dsn.application_name,
            # Still sent, though nothing relies on it: every statement names its schema.
            startup_params={
                "search_path": ",".join(_quote_ident(s) for s in dsn.search_path),
                "TimeZone": "UTC",
            },
        )
        if dsn.unix_sock:
            kwargs["unix_sock"] = dsn.unix_sock
        else:
            kwargs.update(host=dsn.host, port=dsn.port)
        context = self._ssl_context()
        try:
            try:
                raw = self._driver.Connection(ssl_context=context, **kwargs)
            except self._errors.InterfaceError as exc:
                # sslmode=prefer: fall back to plain text only when the server has no TLS.
                if dsn.sslmode != "prefer" or "SSL" not in str(exc):
                    raise
                raw = self._driver.Connection(**kwargs)
        except self._errors.DatabaseError as exc:
            raise _translate_pg(exc) from exc
        except (self._errors.InterfaceError, OSError) as exc:
            raise Unavailable(f"cannot connect to PostgreSQL at {dsn.text}: {exc}") from exc
        return _PgConnection(raw, self._errors, self.sql)

    def _prepare_schema(self, conn):
        conn.query(self.sql["migration_lock"], {"schema": self.dsn.schema})
        conn.query(self.sql["create_schema"])

    def migrate(self, conn):
        done = super().migrate(conn)
        conn.forget_prepared()  # plans prepared before the DDL may be stale
        return done

    def submit(self, conn, rows):
        if len(rows) == 1:
            # The common case, a single submit, without the array encoding and unnesting.
            row = rows[0]
            if conn.query(self.sql["submit_one"], {**row, "channel": self.channel}):
                return [(row["id"], True)]
            return [(str(conn.query(self.sql["run_by_key"], {"key": row["key"]})[0][0]), False)]
        params = _row_dicts(rows)
        params["channel"] = self.channel
        out: list[tuple[str, bool] | None] = [None] * len(rows)
        # Only keyed rows can be skipped (ON CONFLICT), so only their ids come back; one
        # NOTIFY per type, not per run.
        inserted = {row[0] for row in conn.query(self.sql["submit"], params)}
        missing = []
        for i, row in enumerate(rows):
            if row["key"] is None or row["id"] in inserted:
                out[i] = (row["id"], True)
            else:
                missing.append(i)
        if missing:
            # Keys that already existed (or lost a race with a concurrent submit of the same key).
            keys = [rows[i]["key"] for i in missing]
            found = {k: str(i) for k, i in conn.query(self.sql["runs_by_keys"], {"keys": keys})}
            for i in missing:
                out[i] = (found[rows[i]["key"]], False)
        return out  # type: ignore[return-value]

    def cycle(self, conn, worker_id, done, limit, lease, filt):
        rows = conn.query(
            self.sql["cycle"],
            {
                # Outcomes as one JSON array, encoded in C (as SQLite's cycle does).
                "done": json.dumps(
                    [[d.id, d.attempt, d.kind, d.result, d.error, float(d.delay)] for d in done]
                ),
                "worker": worker_id,
                "limit": limit,
                "lease": float(lease),
                "claim_types": list(filt.types),
                "patterns": [_like_prefix(p) for p in filt.prefixes],
                "handled": sorted(filt.handled),
            },
        )
        claimed, done_rows = rows[0]
        return (
            [_Claim(*row) for row in claimed],
            {run_id: (status, attempt) for run_id, status, attempt in done_rows},
        )

    def rescue(self, conn):
        return [
            (str(r[0]), *r[1:]) for r in conn.query(self.sql["rescue"], {"limit": RESCUE_BATCH})
        ]

    def notify(self, conn, types):
        for run_type in sorted(types) or [""]:
            conn.query(self.sql["notify"], {"channel": self.channel, "type": run_type})

    def extend_leases(self, conn, worker_id, held, lease):
        rows = conn.query(
            self.sql["extend_leases"],
            {
                "ids": [h[0] for h in held],
                "attempts": [h[1] for h in held],
                "worker": worker_id,
                "lease": float(lease),
            },
        )
        return {str(row[0]) for row in rows}

    def watcher(self):
        def watch(stop: threading.Event, wake: Callable[[], None]) -> None:
            conn: _PgConnection | None = None
            delay = 0.1
            while not stop.is_set():
                try:
                    if conn is None:
                        conn = self.connect()  # type: ignore[assignment]
                        conn.query(self.sql["listen"])
                        delay = 0.1
                        wake()  # anything submitted while we were not listening
                    if conn.wait_readable(0.2) and conn.take_notifications():
                        wake()
                except (MinflowError, OSError, ValueError) as exc:
                    _worker_log.warning("LISTEN connection: %s; reconnecting in %.1fs", exc, delay)
                    if conn is not None:
                        conn.close()
                    conn = None
                    stop.wait(delay)
                    delay = min(delay * 2, 5.0)
            if conn is not None:
                conn.close()

        return watch

    def prefix_pattern(self, prefix):
        return _like_prefix(prefix)

    def prune(self, conn, filters, params):
        return conn.query(self.compose("prune_batch", filters=filters), params)[0][0]

    def change(self, conn, action, filters, params):
        event_type, data = _MANUAL_EVENTS[action]
        params = {**params, "event_type": event_type, "data": data, "channel": self.channel}
        return conn.query(self.compose(f"{action}_batch", filters=filters), params)[0][0]


def _like_prefix(prefix: str) -> str:
    """A literal prefix as a LIKE pattern: backslash-escape the wildcards, then append %."""
    return re.sub(r"([\\%_])", r"\\\1", prefix) + "%"


def _make_dialect(dsn: _DSN) -> _Dialect:
    return _SQLiteDialect(dsn) if dsn.kind == "sqlite" else _PostgresDialect(dsn)


class _Wakeups:
    """In-process wake-ups: a submit wakes the workers of the same database in this process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: dict[str, weakref.WeakSet] = {}

    def register(self, key: str, event: threading.Event) -> None:
        with self._lock:
            self._events.setdefault(key, weakref.WeakSet()).add(event)

    def unregister(self, key: str, event: threading.Event) -> None:
        with self._lock:
            self._events.get(key, weakref.WeakSet()).discard(event)

    def notify(self, key: str) -> None:
        with self._lock:
            events = list(self._events.get(key, ()))
        for event in events:
            event.set()


_wakeups = _Wakeups()


# ---------------------------------------------------------------------------------------------
# Schedules: cron arithmetic and the tick
# ---------------------------------------------------------------------------------------------
# A cron expression is evaluated on the wall clock of the schedule's zone and mapped to UTC
# here, not by croniter: croniter's arithmetic on aware datetimes fires a repeated wall time
# twice when clocks go back (01:30 EDT, then 01:30 EST). croniter only ever sees wall-clock
# times labelled UTC, where its arithmetic is plain calendar arithmetic. The policy (README):
# - a wall time that occurs twice (clocks go back) stands for its first occurrence only;
# - a wall time that does not exist (clocks go forward) stands for the moment the gap ends, so
#   a daily 02:30 job runs at 03:00 that day, and several skipped times collapse into one slot.

_croniter_module: Any = None

# The Go ticker's parser rejects @-aliases, so they are stored in their 5-field form: every
# schedule minflow writes stays readable by a Go ticker sharing the schema.
_CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# The standard five fields as the Go parser (robfig/cron) reads them:
# (name, lowest, highest, names counted from lowest, whether '?' is allowed).
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_WEEKDAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_CRON_FIELDS: tuple[tuple[str, int, int, tuple[str, ...], bool], ...] = (
    ("minute", 0, 59, (), False),
    ("hour", 0, 23, (), False),
    ("day of month", 1, 31, (), True),
    ("month", 1, 12, _MONTHS, False),
    ("day of week", 0, 6, _WEEKDAYS, True),
)
_CRON_TERM = re.compile(r"^(?:([*?])|([0-9A-Za-z]+)(?:-([0-9A-Za-z]+))?)(?:/([0-9]+))?$")
# The Go parser accepts "TZ=Zone expr" and "CRON_TZ=Zone expr", overriding the timezone column.
_CRON_TZ_PREFIX = re.compile(r"^(?:CRON_)?TZ=(\S+) (.*)$")
_cron_cache: dict[tuple[Any, Any], tuple[str, _dt.tzinfo]] = {}
# Candidates inside a repeated hour are skipped one by one (at most one per minute); needing
# more steps than this means the expression is unusable, never an endless loop in the ticker.
_CRON_MAX_STEPS = 10_000


def _croniter() -> Any:
    global _croniter_module
    if _croniter_module is None:
        try:
            import croniter
        except ImportError:
            raise MinflowError("cron schedules need croniter: pip install croniter") from None
        _croniter_module = croniter
    return _croniter_module


def _zone(name: Any) -> _dt.tzinfo:
    """The IANA zone ``name``; ``InvalidInput`` naming the ``timezone`` field otherwise."""
    import zoneinfo

    if not isinstance(name, str) or not name.strip():
        raise InvalidInput("timezone: must be an IANA name such as 'UTC' or 'Europe/Berlin'")
    if name == "UTC":
        return UTC  # needs no tz database on the host
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise InvalidInput(f"timezone: unknown IANA timezone {name!r} ({exc})") from None


def _cron_value(text: str, field: tuple) -> int:
    name, low, high, names, _ = field
    if text.isdigit():
        value = int(text)
    elif text.upper() in names:
        value = low + names.index(text.upper())
    else:
        raise InvalidInput(f"cron: {text!r} is not a valid {name}")
    if not low <= value <= high:
        hint = " (Sunday is 0; the Go ticker rejects 7)" if name == "day of week" else ""
        raise InvalidInput(f"cron: {name} {value} is out of range {low}-{high}{hint}")
    return value


def _check_cron_field(text: str, field: tuple) -> None:
    name, _, _, _, question_mark = field
    for term in text.split(","):
        match = _CRON_TERM.match(term)
        if not match:
            raise InvalidInput(
                f"cron: {term!r} in the {name} field is not standard cron "
                "(croniter's L, W, #, R and H extensions are not supported)"
            )
        wildcard, first, last, step = match.groups()
        if wildcard == "?" and not question_mark:
            raise InvalidInput(f"cron: '?' is only allowed in the day fields, not in {name}")
        if step is not None and int(step) == 0:
            raise InvalidInput(f"cron: step 0 in the {name} field")
        if first is not None:
            low = _cron_value(first, field)
            if last is not None and _cron_value(last, field) < low:
                raise InvalidInput(f"cron: range {term!r} in the {name} field runs backwards")


def _check_cron(cron: Any, timezone: Any) -> str:
    """Validate a new schedule's cron and timezone; return the expression to store.

    Accepts what the Go library's parser reads too: 5 fields (no seconds), numbers, month and
    weekday names, ``*``, ``?``, ranges, steps and lists, plus the usual @-aliases (stored
    expanded). Raises ``InvalidInput`` whose message starts with ``cron:`` or ``timezone:``.
    """
    if not isinstance(cron, str) or not cron.strip():
        raise InvalidInput("cron: a cron expression is required (e.g. '*/5 * * * *' or '@daily')")
    text = " ".join(cron.split())
    if _CRON_TZ_PREFIX.match(text):
        raise InvalidInput("cron: give the zone as timezone=..., not as a TZ= prefix")
    if text.startswith("@"):
        if text.lower() == "@reboot":
            raise InvalidInput("cron: @reboot has no meaning for a stored schedule")
        if text.lower() not in _CRON_ALIASES:
            raise InvalidInput(
                f"cron: unknown alias {text!r}; use one of {', '.join(sorted(_CRON_ALIASES))}"
            )
        text = _CRON_ALIASES[text.lower()]
    fields = text.split(" ")
    if len(fields) != 5:
        raise InvalidInput(
            f"cron: {cron!r} must have 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(fields)}; a seconds field is not supported"
        )
    for value, field in zip(fields, _CRON_FIELDS, strict=True):
        _check_cron_field(value, field)
    _zone(timezone)
    # Whatever croniter still refuses, and expressions that never match (0 0 30 2 *), which the
    # Go library stores as the year-1 "zero time" and keeps due forever.
    _cron_next(text, timezone, _dt.datetime.now(UTC))
    return text


def _parse_cron(cron: Any, timezone: Any) -> tuple[str, _dt.tzinfo]:
    """(croniter expression, zone) of a stored schedule; ``InvalidInput`` when unusable.

    More lenient than ``_check_cron``, because rows other tools wrote may use a ``TZ=`` prefix
    (the Go library), aliases or croniter's deterministic extensions (the seed's Python client).
    """
    key = (cron, timezone)
    cached = _cron_cache.get(key)
    if cached is not None:
        return cached
    if not isinstance(cron, str) or not cron.strip():
        raise InvalidInput("cron: empty cron expression")
    text = " ".join(cron.split())
    prefix = _CRON_TZ_PREFIX.match(text)
    if prefix:
        timezone, text = prefix.groups()
    text = _CRON_ALIASES.get(text.lower(), text)
    fields = text.split(" ")
    # Six fields would mean seconds to croniter; random terms (R) differ between tickers.
    if len(fields) != 5 or any(re.search(r"(?:^|,)R", f, re.I) for f in fields):
        raise InvalidInput(f"cron: {cron!r} is not a 5-field cron expression")
    if not _croniter().croniter.is_valid(text):
        raise InvalidInput(f"cron: invalid cron expression {cron!r}")
    zone = _zone(timezone if timezone != "" else "UTC")  # Go reads an empty zone as UTC
    if len(_cron_cache) > 4096:
        _cron_cache.clear()
    _cron_cache[key] = (text, zone)
    return text, zone


def _wall(moment: _dt.datetime, zone: _dt.tzinfo) -> _dt.datetime:
    """The wall-clock reading of ``moment`` in ``zone``, labelled UTC for croniter."""
    return moment.astimezone(zone).replace(tzinfo=UTC, fold=0)


def _instant(wall: _dt.datetime, zone: _dt.tzinfo) -> _dt.datetime:
    """The instant a cron wall time stands for: first occurrence if repeated, gap end if skipped."""
    local = wall.replace(tzinfo=zone, fold=0)
    moment = local.astimezone(UTC)
    if moment.astimezone(zone).replace(tzinfo=None) == local.replace(tzinfo=None):
        return moment  # the time exists; fold=0 is the first of two occurrences
    # In a gap, fold=0 reads the wall time with the offset from before the change, landing after
    # the gap, and fold=1 with the offset from after it, landing before. The change lies between
    # the two: bisect on whole seconds for the first one with the new offset.
    new_offset = moment.astimezone(zone).utcoffset()
    low = int(local.replace(fold=1).astimezone(UTC).timestamp())
    high = int(moment.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if _dt.datetime.fromtimestamp(middle, zone).utcoffset() == new_offset:
            high = middle
        else:
            low = middle
    return _dt.datetime.fromtimestamp(high, UTC)


def _cron_walk(expr: str, zone: _dt.tzinfo, start: _dt.datetime, backwards: bool) -> Any:
    """Slots (instants) from ``start``'s wall clock onwards (or backwards), as croniter lists them."""
    module = _croniter()
    it = module.croniter(expr, _wall(start, zone))
    step = it.get_prev if backwards else it.get_next
    for _ in range(_CRON_MAX_STEPS):
        try:
            wall = step(_dt.datetime)
        except module.CroniterBadDateError:
            raise InvalidInput(f"cron: {expr!r} never matches") from None
        yield _instant(wall, zone)
    raise InvalidInput(f"cron: {expr!r} has no usable slot near {start.isoformat()}")


def _next_slot(expr: str, zone: _dt.tzinfo, after: _dt.datetime) -> _dt.datetime:
    # Wall time -> instant never goes backwards, and ``after``'s own wall time maps to ``after``
    # or (inside a repeated hour) earlier: no slot after ``after`` is skipped, and only
    # candidates inside a repeated hour can come out too early.
    for slot in _cron_walk(expr, zone, after, backwards=False):
        if slot > after:
            return slot
    raise AssertionError("unreachable")  # _cron_walk raises when it gives up


def _cron_next(cron: str, timezone: str, after: _dt.datetime) -> _dt.datetime:
    """The first slot strictly after ``after``, computed on the wall clock of ``timezone``."""
    expr, zone = _parse_cron(cron, timezone)
    return _next_slot(expr, zone, after)


def _cron_latest(cron: str, timezone: str, at: _dt.datetime) -> _dt.datetime:
    """The last slot at or before ``at``."""
    expr, zone = _parse_cron(cron, timezone)
    # croniter's previous wall time is strictly before ``at``'s, so it maps to at most ``at``;
    # step forwards to catch a slot exactly at ``at``, or later ones inside a repeated hour.
    slot = next(_cron_walk(expr, zone, at, backwards=True))
    for _ in range(_CRON_MAX_STEPS):
        following = _next_slot(expr, zone, slot)
        if following > at:
            return slot
        slot = following
    raise InvalidInput(f"cron: {cron!r} has no usable slot near {at.isoformat()}")


def _due_slot(
    cron: str, timezone: str, planned: _dt.datetime | None, now: _dt.datetime
) -> tuple[_dt.datetime, _dt.datetime]:
    """(slot to fire, next ``next_run_at``) for a due schedule planned at ``planned``.

    Missed slots fire once: the latest slot at or before ``now``. A planned time off the cron
    grid but later than that (written by another tool, e.g. the Go ticker, which computes from
    "now") is itself the slot, so both tickers derive the same idempotency key. The next time
    is computed from the slot, not from ``now``, and is always after ``now``.
    """
    latest = _cron_latest(cron, timezone, now)
    slot = planned if planned is not None and latest < planned <= now else latest
    return slot, _cron_next(cron, timezone, slot)


# Warned about once per process: (schedule id, cron, timezone).
_broken_schedules: set[tuple[str, Any, Any]] = set()
# An unusable row is moved this far ahead instead of being retried every tick, as the seed did:
# ten such rows starved every other schedule there. An hour bounds the log
# noise and the delay after someone repairs the row; its last_run_at is left alone.
_BROKEN_RETRY_SECONDS = 3600.0
# Batches per tick; a larger backlog continues on the next tick.
_TICK_BATCHES = 10


def _tick(dialect: _Dialect, conn: _Connection, limit: int = TICK_BATCH) -> int:
    """One ticker pass over ``conn``; returns the number of runs created. See ``Client.tick``."""
    if not conn.query(dialect.sql["schedules_due"]):  # the idle path: one indexed query
        return 0
    fired = 0
    for _ in range(_TICK_BATCHES):
        with conn.transaction():
            rows = conn.query(dialect.sql["claim_schedules"], {"limit": limit})
            types = set()
            for row in rows:
                if _fire(dialect, conn, row):
                    fired += 1
                    types.add(row[1])
            if types:
                dialect.notify(conn, types)
        if len(rows) < limit:
            break
    return fired


def _fire(dialect: _Dialect, conn: _Connection, row: Sequence) -> bool:
    """Turn one due schedule row into its slot's run and advance it; True if a run was created."""
    sched_id, run_type, payload, cron, timezone, planned, priority, max_attempts, now = row
    sched_id, sql = str(sched_id), dialect.sql
    try:
        json.loads(payload)  # SQLite rows written by raw SQL may hold anything
        slot, following = _due_slot(cron, timezone, _parse_time(planned), _parse_time(now))
    except (InvalidInput, ValueError, TypeError, OverflowError) as exc:
        if (sched_id, cron, timezone) not in _broken_schedules:
            _broken_schedules.add((sched_id, cron, timezone))
            _ticker_log.warning(
                "schedule %s (cron %r, timezone %r) skipped, looking again in an hour: %s",
                sched_id,
                cron,
                timezone,
                exc,
            )
        conn.query(sql["defer_schedule"], {"id": sched_id, "seconds": _BROKEN_RETRY_SECONDS})
        return False
    run_id = _new_id()
    created = conn.query(
        sql["insert_scheduled_run"],
        {
            "id": run_id,
            "type": run_type,
            "payload": payload,
            "priority": priority,
            # The seed's key format, so a Go ticker beside this one never fires a slot twice.
            "key": f"schedule:{sched_id}:{int(slot.timestamp())}",
            # The Go builder stores 0 as given; a run needs at least one attempt.
            "max_attempts": max(1, max_attempts),
        },
    )
    if created:
        conn.query(
            sql["insert_event"],
            {
                "id": run_id,
                "event_type": "created",
                "data": json.dumps({"schedule_id": sched_id, "slot": _json_value(slot)}),
            },
        )
    conn.query(sql["advance_schedule"], {"id": sched_id, "next_run_at": following})
    return bool(created)


# ---------------------------------------------------------------------------------------------
# Client: the producer API
# ---------------------------------------------------------------------------------------------


class Client:
    """Producer and inspector of runs and schedules; also a context manager.

    The DSN is parsed (and validated) at once; the database is first touched by the first call.
    Thread-safe: each call borrows a pooled connection for its duration.
    """

    def __init__(self, dsn: str | None = None):
        self._open(_parse_dsn(dsn))

    def _open(self, dsn: _DSN) -> None:
        self._dsn = dsn
        self._dialect = _make_dialect(self._dsn)
        self._pool = _Pool(
            self._dialect.connect, size=self._dialect.pool_size, ping=self._dialect.pool_ping
        )
        self._migrated = False

    @property
    def dsn(self) -> str:
        """The connection string, with any password masked."""
        return self._dsn.text

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgres"``."""
        return self._dialect.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._dsn.text!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close pooled connections. Further calls raise ``MinflowError``."""
        self._pool.close()
        self._dialect.close()

    # -- schema ----------------------------------------------------------------------------
    def migrate(self) -> int:
        """Create or upgrade the schema; returns how many migrations were applied.

        Idempotent and safe when many processes call it at once. On a database created by the
        Go library it only adds (a version table, indexes, nullable columns).
        """
        with self._pool.connection() as conn:
            applied = self._dialect.migrate(conn)
        self._migrated = True
        if applied:
            log.info(
                "migrated %s to schema version %d (%d migrations)",
                self._dsn.text,
                SCHEMA_VERSION,
                applied,
            )
        return applied

    def schema_version(self) -> int:
        """The applied schema version (0 on an empty database)."""
        try:
            rows = self._sql("schema_version")
        except MinflowError as exc:
            if "schema is missing" in str(exc):
                return 0
            raise
        return rows[0][0] or 0

    # -- submitting ------------------------------------------------------------------------
    def submit(
        self,
        type: str,
        payload: Any = None,
        *,
        priority: int = DEFAULT_PRIORITY,
        idempotency_key: str | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        run_at: _dt.datetime | None = None,
        run_in: float | _dt.timedelta | None = None,
    ) -> _RunId:
        """Record a run and return its id.

        With an ``idempotency_key`` that already exists, nothing is created and the EXISTING
        run's id is returned (keys are unique forever). The id is a ``str`` whose
        ``deduplicated`` attribute tells which happened: ``False`` for a new run, ``True`` for
        an existing one. ``run_at`` (aware datetime) or ``run_in`` (seconds or timedelta) delay
        the first execution. Raises ``InvalidInput`` before touching the database when an
        argument is malformed.
        """
        job = Job(type, payload, priority, idempotency_key, max_attempts, run_at, run_in)
        return self._submit([job])[0]

    def submit_many(self, jobs: Iterable[Job]) -> list[_RunId]:
        """Record several runs in one transaction (all or none); ids in input order.

        Jobs whose idempotency key already exists yield the existing run's id, with
        ``deduplicated`` set as for ``submit``.
        """
        jobs = list(jobs)
        if not all(isinstance(job, Job) for job in jobs):
            raise InvalidInput("submit_many takes minflow.Job objects")
        return self._submit(jobs) if jobs else []

    def _submit(self, jobs: list[Job]) -> list[_RunId]:
        rows = [self._job_row(job) for job in jobs]
        with self._pool.connection() as conn:
            out = self._dialect.submit(conn, rows)
        _wakeups.notify(self._dsn.key)
        return [_RunId(run_id, not created) for run_id, created in out]

    @staticmethod
    def _job_row(job: Job) -> dict:
        run_at, delay = _check_run_at(job.run_at, job.run_in)
        key = job.idempotency_key
        if key is not None:
            _check_text("idempotency_key", key, max_length=1000)
        return {
            "id": _new_id(),
            "type": _check_type(job.type),
            "payload": _dumps(job.payload),
            "priority": _check_int("priority", job.priority),
            "run_at": run_at,
            "delay": delay,
            "key": key,
            "max_attempts": _check_int("max_attempts", job.max_attempts, minimum=1),
        }

    # -- reading ---------------------------------------------------------------------------
    def _run(self, row: Sequence) -> Run:
        d = self._dialect
        return Run(
            id=str(row[0]),
            type=row[1],
            payload=d.decode_json(row[2]),
            status=row[3],
            priority=row[4],
            run_at=_parse_time(row[5]),
            idempotency_key=row[6],
            attempt=row[7],
            max_attempts=row[8],
            leased_by=row[9],
            lease_until=_parse_time(row[10]),
            last_error=row[11],
            result=d.decode_json(row[12]),
            created_at=_parse_time(row[13]),
            updated_at=_parse_time(row[14]),
        )

    def get(self, run_id: str) -> Run | None:
        """The run with this id, or ``None``."""
        if not self._dialect.valid_id(run_id):
            return None
        rows = self._sql("get_run", {"id": run_id})
        return self._run(rows[0]) if rows else None

    def list(
        self,
        *,
        type: str | None = None,
        status: str | None = None,
        idempotency_key: str | None = None,
        limit: int = DEFAULT_LIST_LIMIT,
        offset: int = 0,
    ) -> list[Run]:
        """Runs matching every given filter, newest first."""
        if status is not None and status not in RUN_STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        if type is not None:
            _check_text("type", type, max_length=MAX_TYPE_LENGTH)
        if idempotency_key is not None:
            _check_text("idempotency_key", idempotency_key, empty=True)
        _check_int("limit", limit, minimum=1)
        if limit > MAX_LIST_LIMIT:
            raise InvalidInput(f"limit must be at most {MAX_LIST_LIMIT}, got {limit}")
        _check_int("offset", offset, minimum=0)
        given = {"type": type, "status": status, "idempotency_key": idempotency_key}
        params = {k: v for k, v in given.items() if v is not None}
        filters = "".join(_LIST_FILTERS[k] for k in params)
        sql = self._dialect.compose("list_runs", filters=filters)
        params.update(limit=limit, offset=offset)
        with self._pool.connection() as conn:
            return [self._run(row) for row in conn.query(sql, params)]

    def events(self, run_id: str) -> list[Event]:
        """The run's audit trail, oldest first (empty for an unknown id)."""
        if not self._dialect.valid_id(run_id):
            return []
        decode = self._dialect.decode_json
        return [
            Event(int(r[0]), str(r[1]), r[2], decode(r[3]), _parse_time(r[4]))
            for r in self._sql("events", {"id": run_id})
        ]

    def stats(self) -> dict[str, dict[str, int]]:
        """Run counts: ``{type: {status: count}}``."""
        out: dict[str, dict[str, int]] = {}
        for run_type, status, count in self._sql("stats"):
            out.setdefault(run_type, {})[status] = int(count)
        return out

    # -- changing runs ---------------------------------------------------------------------
    def cancel(self, run_id: str) -> None:
        """Cancel a pending or leased run; sticky, a running handler sees ``is_cancelled()``.

        Raises ``NotFound`` for an unknown id and ``AlreadyComplete`` for a finished run.
        """
        self._change(run_id, "cancel", AlreadyComplete)

    def retry(self, run_id: str) -> None:
        """Put a failed or cancelled run back to pending now, with its attempt count reset.

        Raises ``NotFound`` for an unknown id and ``InvalidState`` for other states.
        """
        self._change(run_id, "retry", InvalidState)
        _wakeups.notify(self._dsn.key)

    def _change(self, run_id: str, statement: str, refusal: type[MinflowError]) -> None:
        if not self._dialect.valid_id(run_id):
            raise NotFound(f"run {run_id!r} not found")
        with self._pool.connection() as conn, conn.transaction():
            rows = conn.query(self._dialect.sql[statement], {"id": run_id})
            if rows:
                event, data = _MANUAL_EVENTS[statement]
                conn.query(
                    self._dialect.sql["insert_event"],
                    {"id": run_id, "event_type": event, "data": data},
                )
                if statement == "retry":
                    self._dialect.notify(conn, {rows[0][1]})
                return
            state = conn.query(self._dialect.sql["run_state"], {"id": run_id})
        if not state:
            raise NotFound(f"run {run_id!r} not found")
        raise refusal(f"run {run_id} is {state[0][0]}; cannot {statement} it")

    # -- schedules -------------------------------------------------------------------------
    def _schedule(self, row: Sequence) -> Schedule:
        return Schedule(
            id=str(row[0]),
            type=row[1],
            payload=self._dialect.decode_json(row[2]),
            cron=row[3],
            timezone=row[4],
            next_run_at=_parse_time(row[5]),
            last_run_at=_parse_time(row[6]),
            enabled=bool(row[7]),
            priority=row[8],
            max_attempts=row[9],
            name=row[10],
            created_at=_parse_time(row[11]),
        )

    def _db_now(self, conn: _Connection) -> _dt.datetime:
        return _parse_time(conn.query(self._dialect.sql["now"])[0][0])  # type: ignore[return-value]

    def schedule(
        self,
        type: str,
        payload: Any = None,
        *,
        cron: str,
        timezone: str = "UTC",
        priority: int = DEFAULT_PRIORITY,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        name: str | None = None,
    ) -> str:
        """Create a cron schedule and return its id; each slot becomes one run of ``type``.

        ``cron`` is a standard 5-field expression (minute hour day-of-month month day-of-week)
        or ``@hourly``, ``@daily``/``@midnight``, ``@weekly``, ``@monthly``,
        ``@yearly``/``@annually`` (stored in 5-field form), evaluated on the wall clock of the
        IANA ``timezone``. ``payload`` is any JSON value, copied into every run.

        With a ``name``, the call is an upsert: a live schedule of that name is updated in place
        (type, payload, cron, timezone, priority, max_attempts; its next slot is kept when cron
        and timezone are unchanged; a paused one stays paused) and its id returned, so a
        program may declare its schedules at every start-up without piling up duplicates.
        Raises ``InvalidInput`` (message starting with the field name) before writing anything.
        """
        _check_type(type)
        body = _dumps(payload)
        _check_int("priority", priority)
        _check_int("max_attempts", max_attempts, minimum=1)
        if name is not None:
            _check_text("name", name, max_length=MAX_TYPE_LENGTH)
        expr = _check_cron(cron, timezone)
        params = {
            "id": _new_id(),
            "type": type,
            "payload": body,
            "cron": expr,
            "timezone": timezone,
            "priority": priority,
            "max_attempts": max_attempts,
            "name": name,
        }
        with self._pool.connection() as conn, conn.transaction():
            params["next_run_at"] = _cron_next(expr, timezone, self._db_now(conn))
            rows = conn.query(self._dialect.sql["upsert_schedule"], params)
        return str(rows[0][0])

    def schedules(self) -> list[Schedule]:
        """All schedules, paused included, deleted excluded, oldest first."""
        return [self._schedule(row) for row in self._sql("schedules")]

    def get_schedule(self, schedule_id: str) -> Schedule:
        """One live schedule; ``NotFound`` when unknown or deleted."""
        rows = (
            self._sql("get_schedule", {"id": schedule_id})
            if self._dialect.valid_id(schedule_id)
            else []
        )
        if not rows:
            raise NotFound(f"schedule {schedule_id!r} not found")
        return self._schedule(rows[0])

    def pause_schedule(self, schedule_id: str) -> None:
        """Stop a schedule from firing until resumed; ``NotFound`` when unknown or deleted."""
        if not (
            self._dialect.valid_id(schedule_id)
            and self._sql("pause_schedule", {"id": schedule_id, "enabled": False})
        ):
            raise NotFound(f"schedule {schedule_id!r} not found")

    def resume_schedule(self, schedule_id: str) -> None:
        """Resume a paused schedule at its first slot after now: slots missed while paused do
        not fire. A no-op on a running schedule; ``NotFound`` when unknown or deleted."""
        current = self.get_schedule(schedule_id)
        with self._pool.connection() as conn, conn.transaction():
            next_run_at = None
            # A row we cannot parse keeps its time; the ticker warns about it.
            with contextlib.suppress(InvalidInput):
                next_run_at = _cron_next(current.cron, current.timezone, self._db_now(conn))
            rows = conn.query(
                self._dialect.sql["resume_schedule"],
                {"id": schedule_id, "enabled": True, "next_run_at": next_run_at},
            )
        if not rows:
            raise NotFound(f"schedule {schedule_id!r} not found")

    def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule for good (soft delete, as the seed); runs it created stay.

        ``NotFound`` when unknown or already deleted; its name becomes free for a new schedule.
        """
        if not (
            self._dialect.valid_id(schedule_id)
            and self._sql("delete_schedule", {"id": schedule_id, "disabled": False})
        ):
            raise NotFound(f"schedule {schedule_id!r} not found")

    def tick(self) -> int:
        """Turn every due schedule slot into a run, once; returns how many runs were created.

        Safe with many tickers at once (threads, processes, the Go library): each slot's run has
        the idempotency key ``schedule:<id>:<unix slot>``. Workers tick by themselves
        (``schedules=True``), as does ``python -m minflow ticker``.
        """
        with self._pool.connection() as conn:
            fired = self._tick_on(conn)
        if fired:
            _wakeups.notify(self._dsn.key)
        return fired

    # -- operating: retention, bulk changes, live workers ----------------------------------
    def prune(
        self,
        *,
        older_than: float | _dt.timedelta,
        statuses: Iterable[str] = FINISHED_STATUSES,
        dry_run: bool = False,
    ) -> int:
        """Delete finished runs last updated more than ``older_than`` ago, with their events;
        returns how many runs were deleted.

        ``older_than`` is seconds (> 0) or a timedelta, judged on ``updated_at`` by the
        database clock. Only runs in ``statuses`` go (default: succeeded, failed, cancelled);
        pending and leased runs never do, and naming them raises ``InvalidInput``. Runs are
        deleted in batches of at most 1,000, each its own short transaction, so workers go on
        claiming meanwhile; if the call fails part way, the batches done stay done.
        ``dry_run=True`` returns how many would be deleted and writes nothing.

        A deleted run's idempotency key is free again: submitting it creates a new run.
        """
        seconds = _check_age("older_than", older_than)
        chosen = _check_statuses("statuses", statuses, FINISHED_STATUSES, "prune")
        with self._pool.connection() as conn:
            return self._prune_on(conn, seconds, chosen, dry_run=dry_run)[0]

    def retry_many(
        self,
        *,
        type: str | None = None,
        status: str | Iterable[str] | None = None,
        created_before: _dt.datetime | None = None,
        created_after: _dt.datetime | None = None,
        key_prefix: str | None = None,
        dry_run: bool = False,
    ) -> int:
        """Revive every run matching all given filters, as ``retry`` does one; returns how
        many were revived.

        ``status``: "failed", "cancelled" or both (the default). ``created_after`` (included)
        and ``created_before`` (excluded) are aware datetimes; ``key_prefix`` matches
        idempotency keys that start with it, literally. Only runs last changed before the call
        began are revived, in batches of at most 1,000 per transaction, each with its
        ``retried`` events; if the call fails part way, running it again continues.
        ``dry_run=True`` counts the matching runs and writes nothing.
        """
        filters = {"created_before": created_before, "created_after": created_after}
        return self._change_many("retry", dry_run, status, type, key_prefix, **filters)

    def cancel_many(
        self,
        *,
        type: str | None = None,
        status: str | Iterable[str] | None = None,
        created_before: _dt.datetime | None = None,
        created_after: _dt.datetime | None = None,
        key_prefix: str | None = None,
        dry_run: bool = False,
    ) -> int:
        """Cancel every run matching all given filters, as ``cancel`` does one; returns how
        many were cancelled.

        ``status``: "pending", "leased" or both (the default); the other filters are those of
        ``retry_many``. Only runs created before the call began are cancelled, so new submits
        cannot keep it going.
        """
        filters = {"created_before": created_before, "created_after": created_after}
        return self._change_many("cancel", dry_run, status, type, key_prefix, **filters)

    def workers(self) -> list[WorkerInfo]:
        """The workers recorded in this database, oldest first.

        Every worker records itself when it starts, renews its entry every heartbeat period
        (a third of its lease) and removes it when it stops. An entry not renewed for three
        periods is reported with ``alive=False`` (a killed process, a lost database), and is
        deleted a day later by any running worker.
        """
        out = []
        for row in self._sql("workers"):
            last_seen, now = _parse_time(row[10]), _parse_time(row[11])
            heartbeat = float(row[7])
            age = (now - last_seen).total_seconds() if now and last_seen else math.inf
            out.append(
                WorkerInfo(
                    id=row[0],
                    host=row[1],
                    pid=int(row[2]),
                    types=_json_strings(row[3]),
                    prefixes=_json_strings(row[4]),
                    concurrency=int(row[5]),
                    running=int(row[6]),
                    heartbeat_interval=heartbeat,
                    version=row[8],
                    started_at=_parse_time(row[9]),
                    last_seen_at=last_seen,
                    alive=age <= WORKER_DEAD_AFTER * heartbeat,
                )
            )
        return out

    def _change_many(
        self,
        action: str,
        dry_run: bool,
        status: str | Iterable[str] | None,
        run_type: str | None,
        key_prefix: str | None,
        **moments: _dt.datetime | None,
    ) -> int:
        """retry_many or cancel_many (``action``); ``moments``: created_before/after."""
        allowed = ("failed", "cancelled") if action == "retry" else ("pending", "leased")
        statuses = _check_statuses("status", status, allowed, f"a bulk {action}")
        params: dict[str, Any] = {}
        if run_type is not None:
            params["type"] = _check_type(run_type)
        for name, moment in moments.items():
            if moment is not None:
                params[name] = _check_moment(name, moment)
        if key_prefix is not None:
            prefix = _check_text("key_prefix", key_prefix, max_length=1000)
            params["key_prefix"] = self._dialect.prefix_pattern(prefix)
        filters = "".join(piece for name, piece in _BULK_FILTERS.items() if name in params)
        filters += _status_filter(len(statuses))
        params.update({f"status{i}": value for i, value in enumerate(statuses)})
        with self._pool.connection() as conn:
            if dry_run:
                count = self._dialect.compose(f"count_{action}", filters=filters)
                return int(conn.query(count, params)[0][0])
            params["started"] = conn.query(self._dialect.sql["now"])[0][0]

            def batch(size: int) -> int:
                return self._dialect.change(conn, action, filters, {**params, "limit": size})

            # A batch may come back short while matching runs remain (PostgreSQL drops a row
            # that changed while it waited for its lock), so only an empty batch ends it.
            total, _ = self._batches(batch, until_empty=True)
        if action == "retry" and total:
            _wakeups.notify(self._dsn.key)
        return total

    def _batches(
        self,
        batch: Callable[[int], int],
        *,
        until_empty: bool = False,
        budget: float | None = None,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> tuple[int, bool]:
        """Run ``batch(size)`` until it changes fewer than ``size`` runs (``until_empty``:
        none) or ``budget`` seconds have passed, pausing in between as the dialect asks;
        ``sleep(seconds)`` returning true stops early. Returns the total and whether more may
        be left."""
        target = self._dialect.batch_seconds
        size = CHANGE_BATCH // 10 if target else CHANGE_BATCH
        total, deadline = 0, math.inf if budget is None else time.monotonic() + budget
        while True:
            started = time.monotonic()
            count = batch(size)
            took = time.monotonic() - started
            total += count
            if count == 0 or (count < size and not until_empty):
                return total, False
            if target:
                # Towards the size that takes ``target`` seconds, at most doubling; not below a
                # tenth, where the commit's fixed cost would dominate.
                factor = min(2.0, target / max(took, 1e-4))
                size = min(CHANGE_BATCH, max(CHANGE_BATCH // 10, int(size * factor)))
            if time.monotonic() >= deadline or sleep(self._dialect.batch_pause * took):
                return total, True

    # -- internal interface used by the Worker, RunContext, the HTTP layer and the CLI -----
    # Underscored because users must not depend on it. These methods are all those callers use
    # of a Client: its DSN, dialect and pool stay private to it.

    def _configure(self, dsn: str | None) -> None:
        """Point this client at another database, closing the connections to the previous one
        (the CLI's ``worker --dsn``, for an imported App)."""
        parsed = _parse_dsn(dsn)  # a bad DSN leaves the client as it was
        self.close()
        self._open(parsed)

    def _ensure_schema(self) -> None:
        """Migrate unless the schema is current; checked once per client (Worker, CLI)."""
        if not self._migrated and self.schema_version() < SCHEMA_VERSION:
            self.migrate()
        self._migrated = True

    def _sql(self, name: str, params: dict | None = None) -> list:
        """Rows of the named statement, run on a pooled connection (HTTP, RunContext)."""
        with self._pool.connection() as conn:
            return conn.query(self._dialect.sql[name], params)

    def _heartbeat(self, run_id: str, worker_id: str, attempt: int, seconds: float) -> bool:
        """Extend a held lease to now + ``seconds`` and record a heartbeat event; False when
        the lease is no longer this worker's (RunContext)."""
        sql = self._dialect.sql
        with self._pool.connection() as conn, conn.transaction():
            held = conn.query(
                sql["heartbeat"],
                {"id": run_id, "worker": worker_id, "attempt": attempt, "seconds": float(seconds)},
            )
            if held:
                data = json.dumps({"extended_by_seconds": seconds})
                conn.query(
                    sql["insert_event"], {"id": run_id, "event_type": "heartbeat", "data": data}
                )
        return bool(held)

    # The Worker's threads keep connections of their own (never pooled) and run the dialect's
    # hot paths on them.

    def _connect(self) -> _Connection:
        """A new connection for one worker thread; the caller closes it."""
        return self._dialect.connect()

    def _watcher(self) -> Callable[[threading.Event, Callable[[], None]], None] | None:
        """A loop that calls wake() when another process may have submitted work, if any."""
        return self._dialect.watcher()

    def _may_have_work(self, conn: _Connection, filt: _Filter) -> bool:
        """False when nothing is claimable, where a read-only check can tell that cheaply."""
        return self._dialect.may_have_work(conn, filt)

    def _cycle(
        self,
        conn: _Connection,
        worker_id: str,
        done: list[_Completion],
        limit: int,
        lease: float,
        filt: _Filter,
    ) -> tuple[list[_Claim], dict[str, tuple[str, int]]]:
        """Record outcomes and claim up to ``limit`` runs, in one transaction."""
        return self._dialect.cycle(conn, worker_id, done, limit, lease, filt)

    def _rescue(self, conn: _Connection) -> list:
        """Expired leases back to pending or failed; wakes this process's workers for them."""
        rows = self._dialect.rescue(conn)
        if rows:
            _wakeups.notify(self._dsn.key)
        return rows

    def _extend_leases(
        self, conn: _Connection, worker_id: str, held: list[tuple[str, int]], lease: float
    ) -> set[str]:
        """Extend the leases a worker holds; returns the ids whose lease it still holds."""
        return self._dialect.extend_leases(conn, worker_id, held, lease)

    def _tick_on(self, conn: _Connection) -> int:
        """One ticker pass on ``conn``; returns how many runs it created (see ``tick``)."""
        return _tick(self._dialect, conn)

    def _subscribe(self, wake: threading.Event) -> None:
        """Set ``wake`` whenever this process submits to the same database."""
        _wakeups.register(self._dsn.key, wake)

    def _unsubscribe(self, wake: threading.Event) -> None:
        """Undo ``_subscribe``."""
        _wakeups.unregister(self._dsn.key, wake)

    # For retention and the worker registry (Worker, on its housekeeper's connection).

    def _prune_on(
        self,
        conn: _Connection,
        seconds: float,
        statuses: Sequence[str] = FINISHED_STATUSES,
        *,
        dry_run: bool = False,
        budget: float | None = None,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> tuple[int, bool]:
        """``prune`` on ``conn`` (arguments checked) for at most about ``budget`` seconds;
        returns (runs deleted, or that would be with ``dry_run``; whether more may be left)."""
        filters = _status_filter(len(statuses))
        params: dict[str, Any] = {f"status{i}": value for i, value in enumerate(statuses)}
        # One cut-off for the whole call: runs finishing meanwhile cannot keep it going.
        ago = {"seconds": -seconds}
        params["cutoff"] = conn.query(self._dialect.sql["clock_offset"], ago)[0][0]
        if dry_run:
            count = self._dialect.compose("count_prunable", filters=filters)
            return int(conn.query(count, params)[0][0]), False

        def batch(size: int) -> int:
            return self._dialect.prune(conn, filters, {**params, "limit": size})

        return self._batches(batch, budget=budget, sleep=sleep)

    def _register_worker(self, conn: _Connection, entry: dict, *, first: bool) -> None:
        """Write a worker's entry (``first``: afresh, else renewed), and delete the entries of
        workers dead for a day."""
        sql = self._dialect.sql
        with conn.transaction():
            seen = {"id": entry["id"], "running": entry["running"]}
            if first or not conn.query(sql["worker_seen"], seen):
                conn.query(sql["register_worker"], entry)
            conn.query(sql["forget_dead_workers"], {"seconds": -WORKER_FORGET_AFTER})

    def _forget_worker(self, conn: _Connection, worker_id: str) -> None:
        """Delete a stopping worker's entry."""
        conn.query(self._dialect.sql["forget_worker"], {"id": worker_id})


# ---------------------------------------------------------------------------------------------
# App: a Client with a handler registry (the seed's "Workflow")
# ---------------------------------------------------------------------------------------------
# The one name used before its section: App.worker() and run_worker() build a Worker, which in
# turn takes an App.


class App(Client):
    """A Client plus the handlers a worker runs, keyed by exact run type."""

    def __init__(self, dsn: str | None = None):
        super().__init__(dsn)
        self.handlers: dict[str, Callable[[RunContext], Any]] = {}

    def handler(self, type: str) -> Callable[[Callable], Callable]:
        """Decorator registering ``fn(run: RunContext)`` for runs of ``type``."""
        _check_type(type)

        def register(fn: Callable[[RunContext], Any]) -> Callable[[RunContext], Any]:
            if not callable(fn):
                raise InvalidInput(f"handler for {type!r} must be callable")
            if type in self.handlers and self.handlers[type] is not fn:
                raise InvalidInput(f"a handler for {type!r} is already registered")
            self.handlers[type] = fn
            return fn

        return register

    def worker(self, **options: Any) -> Worker:
        """A ``Worker`` for this app (see ``Worker`` for the options)."""
        return Worker(self, **options)

    def run_worker(self, *, burst: bool = False, **options: Any) -> int:
        """Build a Worker with ``options`` and run it (``burst=True``: until nothing is due)."""
        return Worker(self, **options).run(burst=burst)


# ---------------------------------------------------------------------------------------------
# Metrics registry (recorded by the Worker; rendered by the HTTP section)
# ---------------------------------------------------------------------------------------------
# Prometheus text exposition format 0.0.4, written by hand: no client library, so copying
# minflow.py alone still works. Names, types, labels and buckets are the Go library's, so its
# dashboards and alerts keep working; its defects are fixed where the values are produced
# (Worker, scrape-time queries).

_RUN = ("workflow_type", "worker_id")
# name -> (type, help, label names in exposition order: the seed's declaration order)
_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "workflow_run_claimed_total": ("counter", "Runs claimed by this worker.", _RUN),
    "workflow_run_completed_total": (
        "counter",
        "Executions finished, by recorded outcome "
        "(succeeded, pending = retry scheduled, failed, lost).",
        (*_RUN, "status"),
    ),
    "workflow_run_execution_duration_seconds": (
        "histogram",
        "Seconds from claim to recorded outcome.",
        (*_RUN, "status"),
    ),
    "workflow_run_failed_total": (
        "counter",
        "Runs that used up their attempts (dead letters).",
        _RUN,
    ),
    "workflow_run_failed_attempts_total": (
        "counter",
        "Failed executions, by attempt number.",
        (*_RUN, "attempt"),
    ),
    "workflow_run_rescued_total": (
        "counter",
        "Expired leases rescued by this worker's sweep, by new status.",
        ("worker_id", "status"),
    ),
    "workflow_run_pruned_total": (
        "counter",
        "Finished runs deleted by this worker's retention (Worker(retention=...)).",
        ("worker_id",),
    ),
    "workflow_worker_poll_cycle_total": ("counter", "Database polls for work.", ("worker_id",)),
    "workflow_worker_poll_errors_total": (
        "counter",
        "Database polls or claim/complete cycles that failed, by error type.",
        ("worker_id", "error_type"),
    ),
    "workflow_worker_uptime_seconds": (
        "gauge",
        "Seconds since the worker started.",
        ("worker_id",),
    ),
    "workflow_worker_last_poll_timestamp": (
        "gauge",
        "Unix time of the last successful poll.",
        ("worker_id",),
    ),
    "workflow_worker_running": ("gauge", "Handlers executing now.", ("worker_id",)),
    # Read from the database at scrape time, so every process reports the same queue.
    "workflow_run_queue_depth": (
        "gauge",
        "Runs by type in status pending (waiting, due or not) or leased (running), "
        "database-wide at scrape time.",
        ("workflow_type", "status"),
    ),
    "workflow_run_oldest_pending_age_seconds": (
        "gauge",
        "Seconds the oldest due pending run of each type has been waiting since it became due "
        "(its run_at, or its creation if later; 0 when none is due), database-wide at scrape "
        "time.",
        ("workflow_type",),
    ),
    "workflow_workers_alive": (
        "gauge",
        "Workers whose registry entry was renewed within three heartbeat periods, "
        "database-wide at scrape time.",
        (),
    ),
    "workflow_database_up": (
        "gauge",
        "1 if the scrape-time database query succeeded, else 0.",
        (),
    ),
}
_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300)


def _escape_label(value: str) -> str:
    """A label value as the exposition format quotes it: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _label_text(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels) + "}"


def _number(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _label_key(name: str, labels: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The series key: label values in the metric's declared order (exactly its labels)."""
    names = _METRICS[name][2]
    if set(labels) != set(names):
        raise KeyError(f"{name} takes labels {names}, got {tuple(labels)}")
    return tuple((k, str(labels[k])) for k in names)


class _Metrics:
    """Counters, gauges and histograms in memory, rendered as Prometheus text format 0.0.4."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = {}
        self._histograms: dict[str, dict[tuple, list[float]]] = {}

    @staticmethod
    def _known(name: str, *kinds: str) -> None:
        # A typo in a metric or label name would otherwise vanish silently from the exposition.
        if name not in _METRICS or _METRICS[name][0] not in kinds:
            raise KeyError(f"unknown {'/'.join(kinds)} metric {name!r}")

    def inc(self, name: str, value: float = 1.0, **labels: Any) -> None:
        """Add ``value`` to a counter (or gauge) series."""
        self._known(name, "counter", "gauge")
        key = _label_key(name, labels)
        with self._lock:
            series = self._values.setdefault(name, {})
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: Any) -> None:
        """Set a gauge series."""
        self._known(name, "gauge")
        key = _label_key(name, labels)
        with self._lock:
            self._values.setdefault(name, {})[key] = float(value)

    def observe(self, name: str, value: float, **labels: Any) -> None:
        """Record one observation in a histogram series (the seed's buckets)."""
        self.observe_many(name, (value,), **labels)

    def observe_many(self, name: str, values: Iterable[float], **labels: Any) -> None:
        """Record several observations in one histogram series (a worker's batch)."""
        self._known(name, "histogram")
        key = _label_key(name, labels)
        with self._lock:
            # Cumulative bucket counts, then sum and count.
            cells = self._histograms.setdefault(name, {}).setdefault(
                key, [0.0] * (len(_BUCKETS) + 2)
            )
            for value in values:
                for i, bound in enumerate(_BUCKETS):
                    if value <= bound:
                        cells[i] += 1
                cells[-2] += value
                cells[-1] += 1

    def value(self, name: str, **labels: Any) -> float:
        """One series' current value (0 when never recorded); a histogram gives its count."""
        key = _label_key(name, labels)
        with self._lock:
            if name in self._histograms:
                cells = self._histograms[name].get(key)
                return cells[-1] if cells else 0.0
            return self._values.get(name, {}).get(key, 0.0)

    def render(self, extra: dict[str, dict[tuple, float]] | None = None) -> str:
        """Exposition text. ``extra`` adds scrape-time series of gauges named in ``_METRICS``:
        name -> {label key: value}, label keys as ``(("label", "value"), ...)``."""
        with self._lock:
            values = {name: dict(series) for name, series in self._values.items()}
            histograms = {
                name: {k: list(v) for k, v in series.items()}
                for name, series in self._histograms.items()
            }
        for name, series in (extra or {}).items():
            self._known(name, "counter", "gauge")
            values.setdefault(name, {}).update(
                {_label_key(name, dict(key)): val for key, val in series.items()}
            )
        lines: list[str] = []
        for name in sorted(set(values) | set(histograms)):
            kind, help_text, _ = _METRICS[name]
            help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                for key, cells in sorted(histograms.get(name, {}).items()):
                    for i, bound in enumerate((*_BUCKETS, math.inf)):
                        count = cells[-1] if bound == math.inf else cells[i]
                        labels = _label_text((*key, ("le", _number(bound))))
                        lines.append(f"{name}_bucket{labels} {_number(count)}")
                    lines.append(f"{name}_sum{_label_text(key)} {_number(cells[-2])}")
                    lines.append(f"{name}_count{_label_text(key)} {_number(cells[-1])}")
                continue
            for key, value in sorted(values[name].items()):
                lines.append(f"{name}{_label_text(key)} {_number(value)}")
        return "\n".join(lines) + "\n" if lines else ""


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------


class RunContext:
    """What a handler receives: the run's identity, decoded payload and lease controls."""

    def __init__(
        self,
        worker: Worker,
        run_id: str,
        run_type: str,
        payload: Any,
        attempt: int,
        max_attempts: int,
    ):
        self.id = run_id
        self.type = run_type
        self.payload = payload
        self.attempt = attempt  # 1 on the first execution
        self.max_attempts = max_attempts
        self.worker_id = worker.worker_id
        self._worker = worker
        self._lost = False  # sticky: set once the lease is known to be gone

    def __repr__(self) -> str:
        return f"RunContext(id={self.id!r}, type={self.type!r}, attempt={self.attempt}/{self.max_attempts})"

    def heartbeat(self, seconds: float | None = None) -> None:
        """Extend this run's lease to now + ``seconds`` (default: the worker's lease).

        Leases are also extended automatically while the handler runs; call this to ask for a
        longer lease before a long step. Raises ``LeaseLost`` if the run was cancelled or taken.
        """
        seconds = self._worker.lease if seconds is None else seconds
        if not _is_number(seconds) or seconds <= 0 or math.isinf(seconds):
            raise InvalidInput(f"heartbeat seconds must be a positive number, got {seconds!r}")
        if not self._worker.app._heartbeat(self.id, self.worker_id, self.attempt, seconds):
            self._lost = True
            raise LeaseLost(f"run {self.id}: lease lost (cancelled, rescued or taken over)")

    def is_cancelled(self) -> bool:
        """True once the run was cancelled or this worker lost its lease: stop and return."""
        if self._lost:
            return True
        try:
            rows = self._worker.app._sql("run_state", {"id": self.id})
        except MinflowError as exc:
            _worker_log.warning("run %s: cancellation check failed: %s", self.id, exc)
            return False
        if not rows or tuple(rows[0]) != ("leased", self.worker_id, self.attempt):
            self._lost = True
        return self._lost

    # -- internal interface used by the Worker ---------------------------------------------
    def _mark_lost(self) -> bool:
        """Record that the worker found the lease gone; True the first time."""
        first, self._lost = not self._lost, True
        return first


_worker_numbers = iter(range(1, 1 << 62))
# A retention pass deletes batches for about this long (ticks and heartbeats wait meanwhile);
# with a backlog left, the next pass comes after the pause.
_PRUNE_PASS_SECONDS = 0.5
_PRUNE_BACKLOG_PAUSE = 0.5


class Worker:
    """Claims runs of the app's handler types and executes them on a thread pool.

    ``concurrency`` handlers run at once; ``lease`` seconds is how long a claim lasts without a
    heartbeat (extended automatically every lease/3); ``types`` narrows the exact types claimed
    (default: every registered handler); ``prefixes`` also claims types starting with these
    literal prefixes; ``schedules`` runs the cron ticker; ``backoff(attempt) -> seconds`` sets the
    retry delay (default: the seed's attempt² minutes + up to 10% jitter); on shutdown, running
    handlers get ``shutdown_timeout`` seconds to finish. ``retention`` (seconds or a timedelta;
    default None: keep everything) deletes finished runs last updated longer ago than that, as
    ``Client.prune`` does, checking at least every min(retention, 60 s).

    While it runs, the worker records itself in the database (see ``Client.workers``).
    """

    def __init__(
        self,
        app: App,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        lease: float = DEFAULT_LEASE,
        poll_interval: float | None = None,
        worker_id: str | None = None,
        types: Iterable[str] | None = None,
        prefixes: Iterable[str] | None = None,
        schedules: bool = True,
        backoff: Callable[[int], float] | None = None,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        tick_interval: float = DEFAULT_TICK_INTERVAL,
        retention: float | _dt.timedelta | None = None,
    ):
        if not isinstance(app, App):
            raise InvalidInput(f"Worker needs a minflow.App, got {type(app).__name__}")
        self.app = app
        self.concurrency = _check_int("concurrency", concurrency, minimum=1)
        for name, value in (
            ("lease", lease),
            ("shutdown_timeout", shutdown_timeout),
            ("tick_interval", tick_interval),
        ):
            if not _is_number(value) or value <= 0 or math.isinf(value):
                raise InvalidInput(f"{name} must be a positive number of seconds, got {value!r}")
        self.lease = float(lease)
        if poll_interval is None:
            poll_interval = DEFAULT_POLL_INTERVAL
        if not _is_number(poll_interval) or poll_interval <= 0:
            raise InvalidInput(
                f"poll_interval must be a positive number of seconds, got {poll_interval!r}"
            )
        self.poll_interval = float(poll_interval)
        self.shutdown_timeout = float(shutdown_timeout)
        self.tick_interval = float(tick_interval)
        self.retention = None if retention is None else _check_age("retention", retention)
        number = next(_worker_numbers)
        default_id = f"{socket.gethostname() or 'unknown'}-{os.getpid()}"
        self.worker_id = worker_id or (default_id if number == 1 else f"{default_id}-{number}")
        _check_text("worker_id", self.worker_id, max_length=MAX_TYPE_LENGTH)
        self._types = (
            None if types is None else tuple(_check_type(t) for t in _as_list(types, "types"))
        )
        self._prefixes = tuple(
            _check_text("prefix", p, max_length=MAX_TYPE_LENGTH)
            for p in _as_list(prefixes or (), "prefixes")
        )
        self.schedules = bool(schedules)
        if backoff is not None and not callable(backoff):
            raise InvalidInput("backoff must be a callable(attempt) -> seconds")
        self._backoff = backoff or seed_backoff
        self.metrics = _Metrics()
        self.processed = 0  # executions finished, as run() returns
        self._stop = threading.Event()
        self._force = threading.Event()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.Lock()
        # Keyed by (id, attempt): after a lease expired, this worker may claim the run again
        # while the stale execution is still running, and the two must not be confused.
        self._active: dict[tuple[str, int], RunContext] = {}
        self._completions: list[_Completion] = []
        self._thread: threading.Thread | None = None
        self._fatal: BaseException | None = None
        self._started_at = time.time()
        self._next_due = math.inf  # monotonic time a retry this worker wrote becomes due

    def __repr__(self) -> str:
        return f"Worker({self.worker_id!r}, concurrency={self.concurrency}, dsn={self.app.dsn!r})"

    # -- public control --------------------------------------------------------------------
    def run(self, *, burst: bool = False, handle_signals: bool = True) -> int:
        """Work until stopped; returns the number of executions that finished (the handler
        returned or raised), whether or not their outcome could still be recorded.

        Stops on ``stop()`` or SIGTERM/SIGINT (when called from the main thread): the first
        signal stops claiming and lets running handlers finish (up to ``shutdown_timeout``), a
        second one returns at once (unfinished leases then expire and are rescued).
        ``burst=True`` returns as soon as nothing is due and nothing is running.
        """
        if self._finished.is_set() or self._thread not in (None, threading.current_thread()):
            raise InvalidState("a Worker runs once; create a new one")
        restore = self._install_signals() if handle_signals else {}
        try:
            return self._run(burst)
        finally:
            for signum, previous in restore.items():
                signal.signal(signum, previous)

    def start(self) -> Worker:
        """Run in a background thread; returns once it is claiming (or waiting for its database)."""
        self._thread = threading.Thread(
            target=self._run_in_thread, name=f"minflow-{self.worker_id}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._fatal is not None:
            raise self._fatal
        return self

    def _run_in_thread(self) -> None:
        with contextlib.suppress(BaseException):
            self.run(handle_signals=False)

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming and wait for running handlers (at most ``timeout`` seconds, then abandon
        them: their leases expire and are rescued)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._force.set()
                self._wake.set()
                self._thread.join(10)

    @property
    def running(self) -> int:
        """Handlers executing now."""
        return len(self._active)

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum: int, frame: Any) -> None:
            if self._stop.is_set():
                self._force.set()
            else:
                self._stop.set()
                _worker_log.info(
                    "%s: %s received, finishing %d running handlers (again to exit now)",
                    self.worker_id,
                    signal.Signals(signum).name,
                    len(self._active),
                )
            self._wake.set()

        return {
            signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)
        }

    # -- the coordinator -------------------------------------------------------------------
    def _filter(self) -> _Filter:
        handlers = dict(self.app.handlers)
        types = self._types if self._types is not None else tuple(sorted(handlers))
        missing = [t for t in types if t not in handlers]
        if missing:
            raise InvalidInput(f"types without a registered handler: {', '.join(missing)}")
        if not types and not self._prefixes:
            raise InvalidInput(
                "no handlers registered and no prefixes given: this worker could claim nothing"
            )
        return _Filter(types, self._prefixes, frozenset(handlers))

    def _run(self, burst: bool) -> int:
        threads: list[threading.Thread] = []
        side_stop = threading.Event()
        conn: _Connection | None = None
        try:
            self._handlers = dict(self.app.handlers)
            filt = self._filter()
            prepared = self._prepare()
            if prepared is None:  # stopped while waiting for the database
                self._ready.set()
                self._finished.set()
                return 0
            conn, rescued = prepared
            self._pool = _HandlerPool(self.concurrency, self._execute, self.worker_id)
            threads.append(_spawn(self._housekeeper, f"{self.worker_id}-housekeeper", side_stop))
            watch = self.app._watcher()
            if watch is not None and not burst:
                threads.append(
                    _spawn(
                        lambda stop: watch(stop, self._wake.set),
                        f"{self.worker_id}-watch",
                        side_stop,
                    )
                )
            self.app._subscribe(self._wake)
        except BaseException as exc:
            self._fatal = exc
            self._ready.set()
            self._finished.set()
            if conn is not None:
                conn.close()
            raise
        _worker_log.info(
            "%s started: %s, types=%s prefixes=%s concurrency=%d lease=%.1fs%s",
            self.worker_id,
            self.app.dsn,
            list(filt.types),
            list(filt.prefixes),
            self.concurrency,
            self.lease,
            f", {rescued} expired leases rescued" if rescued else "",
        )
        self._ready.set()
        try:
            conn = self._loop(conn, filt, burst)
        finally:
            self.app._unsubscribe(self._wake)
            side_stop.set()
            self._pool.shutdown()
            for thread in threads:
                thread.join(5)
            if conn is not None:
                conn.close()
            self._finished.set()
            _worker_log.info("%s stopped after %d executions", self.worker_id, self.processed)
        if self._fatal is not None:
            raise MinflowError(f"worker {self.worker_id} stopped: {self._fatal}") from self._fatal
        return self.processed

    def _prepare(self) -> tuple[_Connection, int] | None:
        """First contact: schema, connection, rescue sweep, first tick.

        Retried with backoff while the database is unavailable, as it is once running, so a
        worker may start before its database; ``start()`` returns meanwhile.
        """
        delay = 0.1
        while True:
            conn = None
            try:
                self.app._ensure_schema()
                conn = self.app._connect()
                rescued = self._rescue(conn)
                if self.schedules:
                    self.app._tick_on(conn)
                return conn, rescued
            except Unavailable as exc:
                if conn is not None:
                    conn.close()
                _worker_log.warning(
                    "%s: database unavailable at start-up, retrying in %.1fs: %s",
                    self.worker_id,
                    delay,
                    exc,
                )
                self._ready.set()
                self._wake.wait(delay)  # stop() sets it
                if self._force.is_set() or self._stop.is_set():
                    return None
                delay = min(delay * 2, 5.0)

    def _loop(self, conn: _Connection | None, filt: _Filter, burst: bool) -> _Connection | None:
        app = self.app
        retry_delay = 0.1
        deadline = None
        while not self._force.is_set():
            self._wake.clear()
            stopping = self._stop.is_set()
            if stopping and deadline is None:
                deadline = time.monotonic() + self.shutdown_timeout
            with self._lock:
                done, self._completions = self._completions, []
                free = self.concurrency - len(self._active)
            if stopping and not done and not self._active:
                break
            if deadline is not None and time.monotonic() > deadline:
                _worker_log.warning(
                    "%s: %d handlers still running after %.0fs; leaving them to lease expiry",
                    self.worker_id,
                    len(self._active),
                    self.shutdown_timeout,
                )
                break
            limit = 0 if stopping else free
            claimed: list[_Claim] = []
            try:
                if conn is None:
                    conn = app._connect()
                # An idle SQLite worker polls with the read-only pre-check alone; it counts as
                # a poll, so last_poll_timestamp does not make an idle worker look stuck.
                polled = bool(limit)
                if limit and not done and not app._may_have_work(conn, filt):
                    limit = 0
                if done or limit:
                    claimed, finished = app._cycle(
                        conn, self.worker_id, done, limit, self.lease, filt
                    )
                    polled = True
                    self._record(done, finished)
                    self._dispatch(claimed)
                if polled:
                    self.metrics.inc("workflow_worker_poll_cycle_total", worker_id=self.worker_id)
                    self.metrics.set(
                        "workflow_worker_last_poll_timestamp", time.time(), worker_id=self.worker_id
                    )
                retry_delay = 0.1
            except MinflowError as exc:
                with self._lock:
                    self._completions[:0] = done  # written on the next successful cycle
                self.metrics.inc(
                    "workflow_worker_poll_errors_total",
                    worker_id=self.worker_id,
                    error_type=type(exc).__name__.lower(),
                )
                _worker_log.warning(
                    "%s: database error, retrying in %.1fs: %s", self.worker_id, retry_delay, exc
                )
                if conn is not None and (conn.broken or isinstance(exc, Unavailable)):
                    conn.close()
                    conn = None
                self._force.wait(retry_delay)
                retry_delay = min(retry_delay * 2, 5.0)
                continue
            if claimed or done:
                continue  # more may be due (and on PostgreSQL, retries written just now)
            with self._lock:
                idle = not self._active and not self._completions
            if burst and idle and self._next_due > time.monotonic():
                break
            # Retries this worker scheduled are not announced by anyone: wake up for them.
            timeout = min(self.poll_interval, max(0.0, self._next_due - time.monotonic()))
            self._wake.wait(timeout)
            if time.monotonic() >= self._next_due:
                self._next_due = math.inf
        if self._force.is_set() and conn is not None:
            self._flush(conn, filt)
        return conn

    def _flush(self, conn: _Connection, filt: _Filter) -> None:
        """On a forced stop, record what already finished, once, without retrying."""
        with self._lock:
            done, self._completions = self._completions, []
        if done:
            with contextlib.suppress(MinflowError):
                _, finished = self.app._cycle(conn, self.worker_id, done, 0, self.lease, filt)
                self._record(done, finished)

    def _dispatch(self, claimed: list[_Claim]) -> None:
        # Claims come back in no particular order; start them in claim order (the dialects
        # return run_at and created_at as numbers, cheap to compare).
        claimed = sorted(claimed, key=lambda c: (c.priority, c.run_at, c.created_at))
        contexts = [
            RunContext(self, c.id, c.type, c.payload, c.attempt, c.max_attempts) for c in claimed
        ]
        with self._lock:
            for ctx in contexts:
                self._active[(ctx.id, ctx.attempt)] = ctx
        now = time.monotonic()
        for ctx in contexts:
            # Succeeded until the handler says otherwise; started: the claim, for the duration.
            self._pool.submit(
                ctx, _Completion(ctx.id, ctx.attempt, _SUCCEEDED, type=ctx.type, started=now)
            )
        for run_type, count in collections.Counter(ctx.type for ctx in contexts).items():
            self.metrics.inc(
                "workflow_run_claimed_total",
                count,
                workflow_type=run_type,
                worker_id=self.worker_id,
            )
        self.metrics.set("workflow_worker_running", len(self._active), worker_id=self.worker_id)

    def _record(self, done: list[_Completion], finished: dict[str, tuple[str, int]]) -> None:
        now = time.monotonic()
        durations: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        for item in done:
            outcome = finished.get(item.id)
            status = outcome[0] if outcome else "lost"
            labels = {"workflow_type": item.type, "worker_id": self.worker_id}
            durations[(item.type, status)].append(now - item.started)
            if item.kind == _FAILED:
                attempt = str(item.attempt) if item.attempt < 3 else "3+"
                self.metrics.inc("workflow_run_failed_attempts_total", attempt=attempt, **labels)
            if status == "failed":
                self.metrics.inc("workflow_run_failed_total", **labels)
            elif status == "pending":
                self._next_due = min(self._next_due, now + item.delay)
            if outcome is None:
                _worker_log.info(
                    "run %s (%s): outcome %s not recorded: the run was cancelled, rescued or "
                    "taken over meanwhile",
                    item.id,
                    item.type,
                    item.kind,
                )
            elif status == "failed":
                _worker_log.error(
                    "run %s (%s) failed for good after %d attempts: %s",
                    item.id,
                    item.type,
                    outcome[1],
                    item.error,
                )
        # One metrics update per type and outcome, not per run: batches are large under load.
        for (run_type, status), values in durations.items():
            labels = {"workflow_type": run_type, "worker_id": self.worker_id, "status": status}
            self.metrics.inc("workflow_run_completed_total", len(values), **labels)
            self.metrics.observe_many("workflow_run_execution_duration_seconds", values, **labels)

    def _execute(self, ctx: RunContext, item: _Completion) -> None:
        """Run one handler on a pool thread and queue its outcome in ``item`` (never raises)."""
        try:
            fn = self._handlers.get(ctx.type)
            if fn is None:
                raise LookupError(
                    f"no handler registered for type {ctx.type!r} on worker {self.worker_id}"
                )
            item.result = _dumps(fn(ctx), "result")
        except Retry as request:
            item.kind = _SNOOZED
            item.delay = request.delay if request.delay is not None else self._delay(ctx.attempt)
        except BaseException as exc:  # a handler's failure is a row update, never a dead worker
            item.kind = _FAILED
            item.error = f"{type(exc).__name__}: {exc}"[:10_000]
            item.delay = self._delay(ctx.attempt)
            _worker_log.warning(
                "run %s (%s) attempt %d/%d failed: %s\n%s",
                ctx.id,
                ctx.type,
                ctx.attempt,
                ctx.max_attempts,
                item.error,
                traceback.format_exc().rstrip(),
            )
        with self._lock:
            self._active.pop((ctx.id, ctx.attempt), None)
            self._completions.append(item)
            self.processed += 1
        self._wake.set()

    def _delay(self, attempt: int) -> float:
        try:
            delay = self._backoff(attempt)
            if _is_number(delay) and delay >= 0 and not math.isinf(delay):
                return float(delay)
            raise ValueError(f"returned {delay!r}")
        except Exception as exc:
            _worker_log.error("backoff(%d) failed (%s); using the default", attempt, exc)
            return seed_backoff(attempt)

    # -- housekeeping: heartbeats, rescue, schedules, retention, the registry -------------
    def _rescue(self, conn: _Connection) -> int:
        rows = self.app._rescue(conn)
        for run_id, run_type, status, attempt, leased_by in rows:
            self.metrics.inc("workflow_run_rescued_total", worker_id=self.worker_id, status=status)
            _worker_log.warning(
                "run %s (%s): lease of %s expired after attempt %d; now %s",
                run_id,
                run_type,
                leased_by,
                attempt,
                status,
            )
        return len(rows)

    def _housekeeper(self, stop: threading.Event) -> None:
        conn: _Connection | None = None
        beat_every = self.lease / 3
        rescue_every = max(0.5, min(self.lease / 2, 15.0))
        now = time.monotonic()
        # The first beat, at once, records the worker in the registry.
        due = {"beat": now, "rescue": now + rescue_every}
        if self.schedules:  # a deadline nobody advances would make the wait below spin
            due["tick"] = now + self.tick_interval
        if self.retention is not None:
            due["prune"] = now + min(self.retention, PRUNE_CHECK_INTERVAL)
        registered = False
        delay = 0.1
        while not stop.is_set():
            try:
                if conn is None:
                    conn = self.app._connect()
                now = time.monotonic()
                if now >= due["beat"]:
                    due["beat"] = now + beat_every
                    self._extend(conn)
                    self._register(conn, first=not registered)
                    registered = True
                if "prune" in due and now >= due["prune"]:
                    due["prune"] = time.monotonic() + self._prune(conn, stop)
                if now >= due["rescue"]:
                    due["rescue"] = now + rescue_every
                    self._rescue(conn)
                if "tick" in due and now >= due["tick"]:
                    due["tick"] = now + self.tick_interval
                    self.app._tick_on(conn)
                delay = 0.1
                stop.wait(max(0.0, min(due.values()) - time.monotonic()))
            except MinflowError as exc:
                _worker_log.warning(
                    "%s housekeeping: %s; retrying in %.1fs", self.worker_id, exc, delay
                )
                if conn is not None:
                    conn.close()
                conn = None
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
            except Exception as exc:  # a bug here must not leave a half-alive worker
                _worker_log.exception(
                    "%s housekeeping crashed; stopping the worker", self.worker_id
                )
                self._fatal = exc
                self._force.set()
                self._wake.set()
                break
        if conn is not None:
            with contextlib.suppress(MinflowError):
                self.app._forget_worker(conn, self.worker_id)
            conn.close()

    def _register(self, conn: _Connection, first: bool) -> None:
        entry = {
            "id": self.worker_id,
            "host": socket.gethostname() or "unknown",
            "pid": os.getpid(),
            "type_list": json.dumps(sorted(self._claimed_types())),
            "prefix_list": json.dumps(list(self._prefixes)),
            "concurrency": self.concurrency,
            "running": len(self._active),
            "heartbeat_interval": self.lease / 3,
            "version": __version__,
        }
        self.app._register_worker(conn, entry, first=first)

    def _prune(self, conn: _Connection, stop: threading.Event) -> float:
        """One retention pass of a few batches; returns the seconds until the next one: soon
        while a backlog remains, so heartbeats and ticks keep their pace and the backlog still
        drains at thousands of runs a second."""
        retention = self.retention or 0.0  # set: a prune is due only then
        deleted, more = self.app._prune_on(
            conn, retention, budget=_PRUNE_PASS_SECONDS, sleep=stop.wait
        )
        if deleted:
            self.metrics.inc("workflow_run_pruned_total", deleted, worker_id=self.worker_id)
            _worker_log.info(
                "%s: pruned %d finished runs last updated over %s ago",
                self.worker_id,
                deleted,
                _fmt_duration(retention),
            )
        return _PRUNE_BACKLOG_PAUSE if more else min(retention, PRUNE_CHECK_INTERVAL)

    def _extend(self, conn: _Connection) -> None:
        with self._lock:
            held = [(ctx.id, ctx.attempt) for ctx in self._active.values()]
        if not held:
            return
        kept = self.app._extend_leases(conn, self.worker_id, held, self.lease)
        for run_id, attempt in held:
            if run_id not in kept:
                ctx = self._active.get((run_id, attempt))
                if ctx is not None and ctx._mark_lost():
                    _worker_log.info(
                        "run %s: lease lost (cancelled or taken over); is_cancelled() is now true",
                        run_id,
                    )

    # -- internal interface used by the HTTP layer (metrics) and the CLI ------------------
    def _uptime(self) -> float:
        """Seconds since this worker was created."""
        return time.time() - self._started_at

    def _claimed_types(self) -> Iterable[str]:
        """The exact types this worker claims (its app's handlers unless ``types`` narrowed them)."""
        return self._types or self.app.handlers

    def _stopped_hard(self) -> bool:
        """True when it stopped without waiting for running handlers (second signal, timeout)."""
        return self._force.is_set()


def _as_list(value: Any, name: str) -> list:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    try:
        return list(value)
    except TypeError:
        raise InvalidInput(f"{name} must be a list of strings") from None


def _spawn(
    target: Callable[[threading.Event], None], name: str, stop: threading.Event
) -> threading.Thread:
    thread = threading.Thread(target=target, args=(stop,), name=name, daemon=True)
    thread.start()
    return thread


class _HandlerPool:
    """Daemon threads running handlers; daemon so that a forced exit never waits for them."""

    def __init__(self, size: int, execute: Callable[[RunContext, _Completion], None], name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._execute = execute
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-handler-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            self._execute(*work)

    def submit(self, ctx: RunContext, item: _Completion) -> None:
        self._queue.put((ctx, item))

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)


# ---------------------------------------------------------------------------------------------
# HTTP API and metrics
# ---------------------------------------------------------------------------------------------
# The REST API (the seed's routes under /api/v1 with clean JSON, plus retry, one schedule, an
# OpenAPI document, /healthz and /metrics) on the stdlib's ThreadingHTTPServer: a
# (method, pattern) -> function route table, JSON errors, an optional API key compared in
# constant time, a body limit, a per-request deadline and a bounded number of handler threads.
# The same server with two routes is a worker's --metrics-port listener.

_http_log = logging.getLogger("minflow.http")

_DRAIN_LIMIT = 16 << 20  # an oversized body up to this size is read and dropped, so the 413 arrives
_API = "/api/v1"
_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _HTTPError(Exception):
    """An HTTP error response: status, ``{"error": message, **fields}`` and extra headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **fields: Any):
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **fields}
        self.headers = headers or {}


@dataclasses.dataclass(frozen=True)
class _Text:
    """A non-JSON response body."""

    text: str
    content_type: str = _METRICS_CONTENT_TYPE


@dataclasses.dataclass
class _Request:
    """What a route function sees."""

    method: str
    path: str
    params: dict[str, str]  # from the route pattern
    query: dict[str, str]
    body: bytes
    client: Client
    worker: Worker | None

    def json_object(self, allowed: Sequence[str]) -> dict:
        """The body as a JSON object with only ``allowed`` keys, or a 400."""
        if not self.body.strip():
            raise _HTTPError(400, "invalid JSON body: the body is empty")
        try:
            value = json.loads(self.body, parse_constant=_reject_json_constant)
        except (ValueError, RecursionError) as exc:
            raise _HTTPError(400, f"invalid JSON body: {exc}") from None
        if not isinstance(value, dict):
            raise _HTTPError(400, "invalid JSON body: expected an object")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise _HTTPError(
                400, f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(allowed)}"
            )
        try:
            # json.loads accepts lone surrogates (\ud800), which no database driver can encode.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _HTTPError(400, "invalid JSON body: lone surrogate in a string") from None
        return value

    def int_param(self, name: str, default: int) -> int:
        """An integer query parameter (absent or empty: ``default``), or a 400."""
        text = self.query.get(name, "").strip()
        if not text:
            return default
        if not re.fullmatch(r"[+-]?\d{1,12}", text):
            raise _HTTPError(400, f"{name} must be an integer, got {text[:50]!r}")
        return int(text)


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)


def _parse_rfc3339(value: Any, what: str) -> _dt.datetime:
    """An RFC 3339 timestamp with its zone (``Z`` or ``+hh:mm``) as an aware UTC datetime."""
    match = _RFC3339.fullmatch(value.strip()) if isinstance(value, str) else None
    if not match:
        raise InvalidInput(
            f"{what} must be an RFC 3339 time with a zone, e.g. 2030-01-31T09:00:00Z, got {value!r}"
        )
    *fields, frac, zone = match.groups()
    try:
        tz = UTC
        if zone.upper() != "Z":
            sign = -1 if zone[0] == "-" else 1
            tz = _dt.timezone(sign * _dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
        moment = _dt.datetime(
            *map(int, fields), int((frac or "0")[:6].ljust(6, "0")), tzinfo=tz
        ).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidInput(f"{what}: {value!r} is not a valid time ({exc})") from None
    return moment


def _optional(body: dict, name: str, default: Any) -> Any:
    """A body field; null or absent gives ``default``. JSON Schema counts 5.0 as an integer,
    so integral floats become ints (the Client then checks types and ranges)."""
    value = body.get(name)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return default if value is None else value


# -- route functions --------------------------------------------------------------------------


def _r_healthz(req: _Request) -> tuple[int, Any]:
    try:
        req.client._sql("now")
    except MinflowError as exc:
        _http_log.warning("health check: database unhealthy: %s", exc)
        raise _HTTPError(503, "database unhealthy") from None
    return 200, {"status": "ok"}


def _r_metrics(req: _Request) -> tuple[int, Any]:
    return 200, _Text(_render_metrics(req.client, req.worker))


def _r_openapi(req: _Request) -> tuple[int, Any]:
    return 200, _openapi_document()


_SUBMIT_FIELDS = (
    "type",
    "payload",
    "priority",
    "idempotency_key",
    "max_attempts",
    "run_after",
    "run_at",
    "run_in",
)


def _r_submit(req: _Request) -> tuple[int, Any]:
    body = req.json_object(_SUBMIT_FIELDS)
    if body.get("type") in (None, ""):
        raise _HTTPError(400, "type is required")
    if body.get("run_after") is not None and body.get("run_at") is not None:
        raise _HTTPError(400, "give run_after or run_at, not both")
    when = _optional(body, "run_after", body.get("run_at"))
    run_id = req.client.submit(
        body["type"],
        body.get("payload"),
        priority=_optional(body, "priority", DEFAULT_PRIORITY),
        # The seed treats an empty key as "no key"; so does this API.
        idempotency_key=None if body.get("idempotency_key") == "" else body.get("idempotency_key"),
        max_attempts=_optional(body, "max_attempts", DEFAULT_MAX_ATTEMPTS),
        run_at=None if when is None else _parse_rfc3339(when, "run_after"),
        run_in=body.get("run_in"),
    )
    if run_id.deduplicated:
        raise _HTTPError(
            409, "idempotency conflict: a run with this idempotency_key already exists", id=run_id
        )
    return 201, {"id": run_id}


def _r_list(req: _Request) -> tuple[int, Any]:
    runs = req.client.list(
        type=req.query.get("type") or None,
        status=req.query.get("status") or None,
        idempotency_key=req.query.get("idempotency_key") or None,
        limit=req.int_param("limit", DEFAULT_LIST_LIMIT),
        offset=req.int_param("offset", 0),
    )
    return 200, [run.to_json() for run in runs]


def _get_run(req: _Request) -> Run:
    run = req.client.get(req.params["id"])
    if run is None:
        raise _HTTPError(404, "workflow run not found")
    return run


def _r_get(req: _Request) -> tuple[int, Any]:
    return 200, _get_run(req).to_json()


def _r_events(req: _Request) -> tuple[int, Any]:
    run = _get_run(req)
    return 200, [event.to_json() for event in req.client.events(run.id)]


def _r_cancel(req: _Request) -> tuple[int, Any]:
    req.client.cancel(req.params["id"])
    return 200, {"status": "cancelled"}


def _r_retry(req: _Request) -> tuple[int, Any]:
    req.client.retry(req.params["id"])
    return 200, {"status": "pending"}


_SCHEDULE_FIELDS = ("type", "cron", "payload", "timezone", "priority", "max_attempts", "name")


def _r_schedule_create(req: _Request) -> tuple[int, Any]:
    body = req.json_object(_SCHEDULE_FIELDS)
    if body.get("type") in (None, "") or body.get("cron") in (None, ""):
        raise _HTTPError(400, "type and cron are required")
    schedule_id = req.client.schedule(
        body["type"],
        body.get("payload"),
        cron=body["cron"],
        timezone=_optional(body, "timezone", "UTC"),
        priority=_optional(body, "priority", DEFAULT_PRIORITY),
        max_attempts=_optional(body, "max_attempts", DEFAULT_MAX_ATTEMPTS),
        name=body.get("name"),
    )
    return 201, {"id": schedule_id}


def _r_schedules(req: _Request) -> tuple[int, Any]:
    return 200, [schedule.to_json() for schedule in req.client.schedules()]


def _r_schedule_get(req: _Request) -> tuple[int, Any]:
    return 200, req.client.get_schedule(req.params["id"]).to_json()


def _r_pause(req: _Request) -> tuple[int, Any]:
    req.client.pause_schedule(req.params["id"])
    return 200, {"status": "paused"}


def _r_resume(req: _Request) -> tuple[int, Any]:
    req.client.resume_schedule(req.params["id"])
    return 200, {"status": "resumed"}


def _r_schedule_delete(req: _Request) -> tuple[int, Any]:
    req.client.delete_schedule(req.params["id"])
    return 200, {"status": "deleted"}


# Durations in a body: a number of seconds, or text in a form whose every match is between
# 1 ms and 100 years (the document can state that; the command line's form is looser).
_BODY_DURATION = (
    "^([1-9][0-9]{0,11}ms|[1-9][0-9]{0,8}s|[1-9][0-9]{0,6}m|[1-9][0-9]{0,4}h|[1-9][0-9]{0,3}d)$"
)


def _body_duration(body: dict, name: str) -> float:
    """A required duration field: seconds, or text such as ``"7d"`` (see _BODY_DURATION)."""
    value = _optional(body, name, None)
    if value is None:
        raise _HTTPError(400, f"{name} is required")
    if isinstance(value, str):
        if not re.fullmatch(_BODY_DURATION, value):
            raise _HTTPError(
                400, f'{name} must be seconds or a duration such as "90s", "15m", "2h", "7d"'
            )
        return _parse_duration(value, name)
    return value  # the Client checks numbers


def _body_flag(body: dict, name: str) -> bool:
    """An optional boolean field (null or absent: false)."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _HTTPError(400, f"{name} must be true or false")
    return bool(value)


def _r_prune(req: _Request) -> tuple[int, Any]:
    body = req.json_object(("older_than", "statuses", "dry_run"))
    dry_run = _body_flag(body, "dry_run")
    count = req.client.prune(
        older_than=_body_duration(body, "older_than"),
        statuses=_optional(body, "statuses", FINISHED_STATUSES),
        dry_run=dry_run,
    )
    return 200, {"count": count, "dry_run": dry_run}


_BULK_FIELDS = ("type", "status", "created_before", "created_after", "key_prefix", "dry_run")


def _bulk_route(method: str) -> Callable[[_Request], tuple[int, Any]]:
    """A route applying ``Client.<method>`` (retry_many, cancel_many) to the body's filter."""

    def route(req: _Request) -> tuple[int, Any]:
        body = req.json_object(_BULK_FIELDS)
        dry_run = _body_flag(body, "dry_run")
        times = {
            name: None if body.get(name) is None else _parse_rfc3339(body[name], name)
            for name in ("created_before", "created_after")
        }
        count = getattr(req.client, method)(
            type=body.get("type"),
            status=body.get("status"),
            key_prefix=body.get("key_prefix"),
            dry_run=dry_run,
            **times,
        )
        return 200, {"count": count, "dry_run": dry_run}

    return route


_r_retry_many = _bulk_route("retry_many")
_r_cancel_many = _bulk_route("cancel_many")


def _r_workers(req: _Request) -> tuple[int, Any]:
    return 200, [entry.to_json() for entry in req.client.workers()]


# -- the route table --------------------------------------------------------------------------
# Each route carries what the OpenAPI document says about it, so a new route is one row.


def _ref(name: str) -> dict:
    """A reference to one of the OpenAPI document's component schemas."""
    return {"$ref": f"#/components/schemas/{name}"}


def _array_of(name: str) -> dict:
    return {"type": "array", "items": _ref(name)}


def _status_is(word: str) -> dict:
    """The schema of a ``{"status": word}`` answer."""
    return {"type": "object", "properties": {"status": {"const": word}}, "required": ["status"]}


_CREATED = {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}
# What prune and the bulk changes answer: how many runs (with dry_run: would be) changed.
_COUNTED = {
    "type": "object",
    "properties": {"count": {"type": "integer", "minimum": 0}, "dry_run": {"type": "boolean"}},
    "required": ["count", "dry_run"],
}
# What the Client accepts: non-blank text without NUL; filters may also be empty (no filter).
_NAME_TEXT = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_TYPE_LENGTH,
    "pattern": r"^[^\u0000]*[^\s\u0000][^\u0000]*$",
}
_FILTER_TEXT = {**_NAME_TEXT, "minLength": 0, "pattern": r"^([^\u0000]*[^\s\u0000][^\u0000]*)?$"}


@dataclasses.dataclass(frozen=True)
class _Operation:
    """What a route runs, and how the OpenAPI document describes it."""

    fn: Callable[[_Request], tuple[int, Any]]
    id: str  # operationId
    summary: str
    schema: dict | None  # of the success body; None: text/plain
    errors: tuple[int, ...] = ()  # error statuses; 401 is added unless the route is public
    status: int = 200  # on success
    public: bool = False  # answered without the API key
    query: tuple[tuple[str, dict], ...] = ()  # query parameters and their schemas
    body: tuple[str, dict] | None = None  # the request body's component schema and an example
    links: tuple[str, ...] = ()  # operations that take the id this one answers with


_Route = tuple[str, str, _Operation]
_RUNS, _RUN = f"{_API}/workflows", f"{_API}/workflows/{{id}}"
_SCHEDULES, _SCHEDULE = f"{_API}/schedules", f"{_API}/schedules/{{id}}"

# The REST server's routes; {id} matches one path segment.
_API_ROUTES: list[_Route] = [
    ("GET", "/healthz", _Operation(_r_healthz, "healthz", "Database check; no API key needed", _status_is("ok"), (503,), public=True)),
    ("GET", "/metrics", _Operation(_r_metrics, "metrics", "Prometheus metrics (text format 0.0.4)", None)),
    ("GET", f"{_API}/openapi.json", _Operation(_r_openapi, "openapi", "This document", {"type": "object"})),
    ("GET", f"{_API}/health", _Operation(_r_healthz, "health", "Database check", _status_is("ok"), (503,))),
    ("POST", _RUNS, _Operation(_r_submit, "submitRun", "Submit a run", _CREATED, (400, 409, 413, 503), status=201,
        body=("SubmitRequest", {"type": "billing.invoice.v1", "payload": {"order": 42}}),
        links=("getRun", "runEvents", "cancelRun", "retryRun"))),
    ("GET", _RUNS, _Operation(_r_list, "listRuns", "Runs, newest first", _array_of("Run"), (400, 503), query=(
        ("type", _FILTER_TEXT),
        ("status", {"type": "string", "enum": ["", *RUN_STATUSES]}),
        ("idempotency_key", {"type": "string", "pattern": r"^[^\u0000]*$"}),
        ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT}),
        ("offset", {"type": "integer", "minimum": 0, "maximum": _INT32[1]})))),
    ("GET", _RUN, _Operation(_r_get, "getRun", "One run", _ref("Run"), (404, 503))),
    ("DELETE", _RUN, _Operation(_r_cancel, "cancelRun", "Cancel a run", _status_is("cancelled"), (404, 409, 503))),
    ("GET", f"{_RUN}/events", _Operation(_r_events, "runEvents", "A run's events, oldest first", _array_of("Event"), (404, 503))),
    ("POST", f"{_RUN}/retry", _Operation(_r_retry, "retryRun", "A failed or cancelled run back to pending", _status_is("pending"), (404, 409, 503))),
    ("POST", _SCHEDULES, _Operation(_r_schedule_create, "createSchedule", "Create (or, by name, update) a schedule", _CREATED, (400, 413, 503), status=201,
        body=("ScheduleRequest", {"type": "reports.daily.v1", "cron": "0 6 * * *"}),
        links=("getSchedule", "pauseSchedule", "resumeSchedule", "deleteSchedule"))),
    ("GET", _SCHEDULES, _Operation(_r_schedules, "listSchedules", "Schedules, oldest first", _array_of("Schedule"), (503,))),
    ("GET", _SCHEDULE, _Operation(_r_schedule_get, "getSchedule", "One schedule", _ref("Schedule"), (404, 503))),
    ("DELETE", _SCHEDULE, _Operation(_r_schedule_delete, "deleteSchedule", "Delete a schedule", _status_is("deleted"), (404, 503))),
    ("PATCH", f"{_SCHEDULE}/pause", _Operation(_r_pause, "pauseSchedule", "Pause a schedule", _status_is("paused"), (404, 503))),
    ("PATCH", f"{_SCHEDULE}/resume", _Operation(_r_resume, "resumeSchedule", "Resume a schedule from now", _status_is("resumed"), (404, 503))),
    ("POST", f"{_API}/prune", _Operation(_r_prune, "pruneRuns", "Delete finished runs last updated longer ago than older_than, with their events", _COUNTED, (400, 413, 503),
        body=("PruneRequest", {"older_than": "7d", "statuses": ["succeeded"], "dry_run": True}))),
    ("POST", f"{_RUNS}/retry", _Operation(_r_retry_many, "retryRuns", "Retry every failed or cancelled run matching the filter", _COUNTED, (400, 413, 503),
        body=("RetryFilter", {"type": "billing.invoice.v1", "status": "failed", "created_after": "2030-01-31T00:00:00Z"}))),
    ("POST", f"{_RUNS}/cancel", _Operation(_r_cancel_many, "cancelRuns", "Cancel every pending or running run matching the filter", _COUNTED, (400, 413, 503),
        body=("CancelFilter", {"key_prefix": "import-2030-01-", "dry_run": True}))),
    ("GET", f"{_API}/workers", _Operation(_r_workers, "listWorkers", "Workers recorded in the database, oldest first (dead ones for a day)", _array_of("WorkerInfo"), (503,))),
]  # fmt: skip
# A worker's --metrics-port listener.
_METRICS_ROUTES: list[_Route] = [r for r in _API_ROUTES if r[1] in ("/healthz", "/metrics")]
_PUBLIC_PATHS = frozenset(path for _, path, operation in _API_ROUTES if operation.public)


def _compile_routes(routes: list[_Route]) -> list[tuple[str, re.Pattern, Callable]]:
    # A concrete path takes precedence over a templated one that would match it too (as in
    # OpenAPI): /workflows/{id} does not match /workflows/retry.
    literal = {p for _, p, _ in routes if "{" not in p}
    compiled = []
    for method, p, operation in routes:
        body = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(p))
        shadowed = sorted(path for path in literal if path != p and re.fullmatch(body, path))
        guard = "(?!(?:" + "|".join(map(re.escape, shadowed)) + ")$)" if shadowed else ""
        compiled.append((method, re.compile("^" + guard + body + "$"), operation.fn))
    return compiled


# -- metrics at scrape time -------------------------------------------------------------------


def _queue_snapshot(client: Client) -> list[tuple[str, str, int, float | None]]:
    """Pending and leased runs by type and status, with how long the oldest due pending run
    has waited since it became due (None: none is due), from one aggregate query."""
    out = []
    for run_type, status, count, oldest, now in client._sql("queue_snapshot"):
        since, clock = _parse_time(oldest), _parse_time(now)
        waited = max(0.0, (clock - since).total_seconds()) if since and clock else None
        out.append((run_type, status, int(count), waited))
    return out


def _render_metrics(client: Client, worker: Worker | None = None) -> str:
    """The exposition: the worker's own series (if any) plus the queue read from the database
    in one aggregate query, so queue depth is right even while every worker is busy."""
    extra: dict[str, dict[tuple, float]] = {}
    if worker is not None:
        wid = (("worker_id", worker.worker_id),)
        extra["workflow_worker_uptime_seconds"] = {wid: worker._uptime()}
        extra["workflow_worker_running"] = {wid: float(worker.running)}
    depth: dict[tuple, float] = {}
    age: dict[tuple, float] = {}
    if worker is not None:
        # Handled types always have series, so an alert sees 0 rather than nothing.
        for run_type in worker._claimed_types():
            for status in ("pending", "leased"):
                depth[(("workflow_type", run_type), ("status", status))] = 0.0
            age[(("workflow_type", run_type),)] = 0.0
    try:
        rows = _queue_snapshot(client)
        up = 1.0
    except MinflowError as exc:
        _http_log.warning("metrics: queue query failed: %s", exc)
        rows, up = [], 0.0
    alive = 0
    if up:
        try:
            alive = sum(entry.alive for entry in client.workers())
        except MinflowError as exc:
            _http_log.warning("metrics: worker registry query failed: %s", exc)
            up = 0.0
    for run_type, status, count, waited in rows:
        depth[(("workflow_type", run_type), ("status", status))] = float(count)
        if status == "pending":
            age[(("workflow_type", run_type),)] = waited or 0.0
    if up:
        extra["workflow_run_queue_depth"] = depth
        extra["workflow_run_oldest_pending_age_seconds"] = age
        extra["workflow_workers_alive"] = {(): float(alive)}
    extra["workflow_database_up"] = {(): up}
    registry = worker.metrics if worker is not None else _Metrics()
    return registry.render(extra)


# -- the server -------------------------------------------------------------------------------


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail once the request's deadline has passed, so a client sending one
    byte at a time cannot hold a handler thread for longer than the request time limit."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received within the time limit")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _Handler(http.server.BaseHTTPRequestHandler):
    """One connection, one request (HTTP/1.0 semantics: the connection closes after it)."""

    server: _Server
    server_version = f"minflow/{__version__}"
    sys_version = ""
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self._started = time.monotonic()
        self.rfile = io.BufferedReader(
            _DeadlineReader(self.connection, self._started + self.server.request_timeout)
        )

    def __getattr__(self, name: str) -> Any:
        # Every method reaches the route table, which answers 404 or 405 (never http.server's 501).
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self) -> None:
        headers: dict[str, str] = {}
        try:
            status, body = self._route()
        except _HTTPError as exc:
            status, body, headers = exc.status, exc.body, exc.headers
        except InvalidInput as exc:
            status, body = 400, {"error": str(exc)}
        except NotFound as exc:
            status, body = 404, {"error": str(exc)}
        except (AlreadyComplete, InvalidState) as exc:
            status, body = 409, {"error": str(exc)}
        except Unavailable as exc:
            _http_log.warning("%s %s: database unavailable: %s", self.command, self.path, exc)
            status, body, headers = 503, {"error": "database unavailable"}, {"Retry-After": "1"}
        except (TimeoutError, ConnectionError):
            raise  # the client is gone or too slow: nothing to answer
        except Exception:
            # A bug or an unexpected database error: its text may reveal the schema or the data,
            # so it stays in the log and the client gets a generic message.
            _http_log.exception("%s %s failed", self.command, self.path)
            status, body = 500, {"error": "internal server error; see the server log"}
        self._send(status, body, headers)

    def _route(self) -> tuple[int, Any]:
        server = self.server
        url = urlsplit(self.path)
        if url.path not in _PUBLIC_PATHS and server.api_key is not None and not self._authorized():
            raise _HTTPError(
                401, "invalid or missing API key", {"WWW-Authenticate": 'Bearer realm="minflow"'}
            )
        allowed: list[str] = []
        for method, pattern, fn in server.routes:
            match = pattern.match(url.path)
            if match is None:
                continue
            if method != self.command:
                if method not in allowed:
                    allowed.append(method)
                continue
            body = self._read_body()
            try:
                pairs = parse_qsl(url.query, keep_blank_values=True, max_num_fields=50)
            except ValueError:
                raise _HTTPError(400, "too many query parameters") from None
            query: dict[str, str] = {}
            for key, value in pairs:
                if key in query:
                    raise _HTTPError(400, f"query parameter {key!r} given more than once")
                query[key] = value
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            return fn(
                _Request(self.command, url.path, params, query, body, server.client, server.worker)
            )
        if allowed:
            raise _HTTPError(
                405,
                f"method {self.command} not allowed here; allowed: {', '.join(allowed)}",
                {"Allow": ", ".join(allowed)},
            )
        raise _HTTPError(404, f"no such endpoint: {url.path}")

    def _authorized(self) -> bool:
        offered = self.headers.get("X-API-Key")
        if offered is None:
            scheme, _, token = self.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer":
                return False
            offered = token.strip()
        # Header bytes arrive decoded as Latin-1; compare the original bytes in constant time.
        return hmac.compare_digest(offered.encode("latin-1", "replace"), self.server.api_key)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise _HTTPError(411, "send the body with a Content-Length (chunked is not supported)")
        text = self.headers.get("Content-Length", "0").strip() or "0"
        if not text.isdigit():
            self.close_connection = True
            raise _HTTPError(400, f"invalid Content-Length {text[:30]!r}")
        length = int(text)
        if length > self.server.max_body:
            self.close_connection = True
            if length <= _DRAIN_LIMIT:
                # Read and drop the body: closing with unread data would reset the connection
                # before the client reads the 413.
                with contextlib.suppress(OSError):
                    while length > 0:
                        chunk = self.rfile.read(min(length, 1 << 16))
                        if not chunk:
                            break
                        length -= len(chunk)
            raise _HTTPError(413, f"request body larger than {self.server.max_body} bytes")
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            self.close_connection = True
            raise _HTTPError(400, "request body shorter than its Content-Length")
        return body

    def _send(self, status: int, body: Any, headers: dict[str, str]) -> None:
        if isinstance(body, _Text):
            data, content_type = body.text.encode("utf-8"), body.content_type
        else:
            data = (json.dumps(body, ensure_ascii=False) + "\n").encode("utf-8")
            content_type = "application/json"
        # Writing gets its own time limit, so a client that stops reading cannot hold the thread.
        self.connection.settimeout(self.server.request_timeout)
        self.send_response_only(status)
        self.send_header("Server", self.version_string())
        self.send_header("Date", self.date_time_string())
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self._access_log(status, len(data))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (malformed request line, oversized headers), as JSON."""
        self.close_connection = True
        text = message or self.responses.get(code, ("error",))[0]
        self._send(code, {"error": text}, {})

    def _access_log(self, status: int, size: int) -> None:
        # Headers are never logged: they may carry the API key.
        path = urlsplit(self.path or "").path
        level = logging.DEBUG if path in ("/healthz", "/metrics") and status < 400 else logging.INFO
        _http_log.log(
            level,
            '%s "%s" %d %d %.1fms',
            self.client_address[0],
            self.requestline,
            status,
            size,
            (time.monotonic() - self._started) * 1000,
        )

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        """Unused: responses are logged by ``_access_log`` once their size is known."""

    def log_message(self, format: str, *args: Any) -> None:
        """http.server's own messages (timeouts, protocol errors) go to ``minflow.http``."""
        _http_log.info("%s: %s", self.client_address[0], format % args)


class _Server(http.server.ThreadingHTTPServer):
    """A ThreadingHTTPServer with at most ``threads`` requests in flight; beyond that a new
    connection gets an immediate 503, so the accept loop never waits on a slow client."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        host: str,
        port: int,
        client: Client,
        *,
        worker: Worker | None = None,
        routes: list[_Route] = _API_ROUTES,
        api_key: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        threads: int = DEFAULT_HTTP_THREADS,
    ):
        self.client = client
        self.worker = worker
        self.routes = _compile_routes(routes)
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.max_body = _check_int("max_body", max_body, minimum=0)
        if not _is_number(request_timeout) or request_timeout <= 0:
            raise InvalidInput(f"request timeout must be positive seconds, got {request_timeout!r}")
        self.request_timeout = float(request_timeout)
        self._max_threads = _check_int("threads", threads, minimum=1)
        self._slots = threading.BoundedSemaphore(self._max_threads)
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also resolves the host's FQDN, a DNS lookup that can stall
        # start-up in containers; the name is only used in CGI variables.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    @property
    def url(self) -> str:
        """The base URL this server listens on."""
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            body = b'{"error": "server busy, retry shortly"}\n'
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
            self.shutdown_request(request)
            _http_log.warning("%s: all handler threads busy; answered 503", client_address[0])
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def drain(self, timeout: float) -> bool:
        """After ``shutdown()``: wait until no request is in flight, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        taken = 0
        while taken < self._max_threads and self._slots.acquire(
            timeout=max(0.0, deadline - time.monotonic())
        ):
            taken += 1
        for _ in range(taken):
            self._slots.release()
        return taken == self._max_threads

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # the client went away mid-request
            _http_log.info("%s: connection error: %s", client_address[0], exc)
        else:
            _http_log.exception("%s: request handling failed", client_address[0])


def _start_server(server: _Server, poll_interval: float = 0.5) -> threading.Thread:
    """Run ``server`` on a daemon thread; ``server.shutdown()`` returns within ``poll_interval``."""
    thread = threading.Thread(
        target=server.serve_forever,
        args=(poll_interval,),
        name=f"minflow-http-{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    return thread


def _serve_metrics(worker: Worker, host: str, port: int) -> _Server:
    """Serve ``/metrics`` and ``/healthz`` for ``worker`` on a background thread."""
    server = _Server(
        host,
        port,
        worker.app,
        worker=worker,
        routes=_METRICS_ROUTES,
        api_key=os.environ.get("MINFLOW_API_KEY") or None,
        threads=4,
    )
    _start_server(server)
    _http_log.info("worker metrics on %s/metrics", server.url)
    return server


# -- the OpenAPI document ---------------------------------------------------------------------

_openapi_cache: dict = {}

_ERROR_TEXT = {
    400: "Invalid input (the body, a parameter or a value).",
    401: "Missing or wrong API key (only when MINFLOW_API_KEY is set).",
    404: "No such run or schedule.",
    409: "Conflict: the idempotency key exists (the body carries that run's id), or the run is "
    "not in a state that allows the operation.",
    413: "Request body too large.",
    503: "Database unavailable.",
}


def _openapi_operation(path: str, op: _Operation) -> dict:
    """One route of the table as an OpenAPI operation."""
    text = {"type": "string"}
    media = "text/plain" if op.schema is None else "application/json"
    success: dict[str, Any] = {
        "description": op.summary,
        "content": {media: {"schema": op.schema or text}},
    }
    if op.links:
        success["links"] = {
            target: {"operationId": target, "parameters": {"id": "$response.body#/id"}}
            for target in op.links
        }
    responses = {str(op.status): success}
    for error in sorted(set(op.errors) if op.public else {401, *op.errors}):
        responses[str(error)] = {
            "description": _ERROR_TEXT[error],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    operation: dict[str, Any] = {
        "operationId": op.id,
        "summary": op.summary,
        "responses": responses,
    }
    if op.public:
        operation["security"] = []
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": text}
        for name in re.findall(r"\{(\w+)\}", path)
    ] + [{"name": name, "in": "query", "schema": schema} for name, schema in op.query]
    if parameters:
        operation["parameters"] = parameters
    if op.body is not None:
        name, example = op.body
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(name), "example": example}},
        }
    return operation


def _openapi_schemas() -> dict:
    """The document's component schemas: the read models, the request bodies and errors."""
    nullable = lambda schema: {"oneOf": [schema, {"type": "null"}]}  # noqa: E731
    when = {"type": "string", "format": "date-time"}
    text = {"type": "string"}
    integer = {"type": "integer"}
    anything = {"description": "Any JSON value."}
    int32 = {"type": "integer", "minimum": _INT32[0], "maximum": _INT32[1]}

    def model(cls: type, **properties: dict) -> dict:
        """A response object: every field of the dataclass, nothing else."""
        names = [f.name for f in dataclasses.fields(cls)]
        if list(properties) != names:
            raise TypeError(f"{cls.__name__} has the fields {names}, its schema {list(properties)}")
        return {
            "type": "object",
            "properties": properties,
            "required": names,
            "additionalProperties": False,
        }

    def request(required: list[str], **properties: dict) -> dict:
        return {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        }

    def statuses(allowed: Sequence[str]) -> dict:
        """One status or a list of them (default: all of ``allowed``)."""
        one = {"type": "string", "enum": list(allowed)}
        return {"oneOf": [one, {"type": "array", "items": one, "minItems": 1}]}

    def bulk_filter(allowed: Sequence[str]) -> dict:
        """The filter of a bulk change: every given field must match."""
        return request(
            [],
            type=nullable(_NAME_TEXT),
            status=nullable(statuses(allowed)),
            created_before=nullable({**when, "description": "Created before (excluded)."}),
            created_after=nullable({**when, "description": "Created at or after."}),
            key_prefix=nullable({**_NAME_TEXT, "maxLength": 1000, "description": "Literal."}),
            dry_run=nullable({"type": "boolean", "description": "Count only; default false."}),
        )

    return {
        "Error": {
            "type": "object",
            "properties": {"error": text, "id": {**text, "description": "The existing run (409)."}},
            "required": ["error"],
        },
        "Run": model(
            Run,
            id=text,
            type=text,
            payload=anything,
            status={"type": "string", "enum": list(RUN_STATUSES)},
            priority=integer,
            run_at=nullable(when),
            idempotency_key=nullable(text),
            attempt=integer,
            max_attempts=integer,
            leased_by=nullable(text),
            lease_until=nullable(when),
            last_error=nullable(text),
            result=anything,
            created_at=nullable(when),
            updated_at=nullable(when),
        ),
        "Event": model(
            Event,
            id=integer,
            workflow_id=text,
            event_type={"type": "string", "enum": list(EVENT_TYPES)},
            data=anything,
            created_at=nullable(when),
        ),
        "Schedule": model(
            Schedule,
            id=text,
            type=text,
            payload=anything,
            cron=text,
            timezone=text,
            next_run_at=nullable(when),
            last_run_at=nullable(when),
            enabled={"type": "boolean"},
            priority=integer,
            max_attempts=integer,
            name=nullable(text),
            created_at=nullable(when),
        ),
        "SubmitRequest": {
            **request(
                ["type"],
                type=_NAME_TEXT,
                payload=anything,
                priority=nullable({**int32, "description": "Lower runs first; default 100."}),
                idempotency_key=nullable({**_FILTER_TEXT, "maxLength": 1000}),
                max_attempts=nullable({**int32, "minimum": 1, "description": "Default 3."}),
                run_after=nullable({**when, "description": "Earliest start, with a zone."}),
                run_at=nullable({**when, "description": "Alias of run_after."}),
                run_in=nullable({"type": "number", "minimum": 0, "maximum": MAX_DELAY}),
            ),
            # At most one of run_after, run_at and run_in (null counts as absent).
            "not": {
                "anyOf": [
                    {"properties": {a: {"not": {"type": "null"}}, b: {"not": {"type": "null"}}}}
                    | {"required": [a, b]}
                    for a, b in (
                        ("run_after", "run_at"),
                        ("run_after", "run_in"),
                        ("run_at", "run_in"),
                    )
                ]
            },
        },
        "WorkerInfo": model(
            WorkerInfo,
            id=text,
            host=text,
            pid=integer,
            types={"type": "array", "items": text},
            prefixes={"type": "array", "items": text},
            concurrency=integer,
            running=integer,
            heartbeat_interval={"type": "number", "description": "Seconds between renewals."},
            version=text,
            started_at=nullable(when),
            last_seen_at=nullable(when),
            alive={"type": "boolean", "description": "Renewed within 3 heartbeat intervals."},
        ),
        "PruneRequest": request(
            ["older_than"],
            older_than={
                "oneOf": [
                    {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_DELAY},
                    {"type": "string", "pattern": _BODY_DURATION},
                ],
                "description": 'Seconds, or a duration such as "90s", "15m", "2h", "7d".',
            },
            statuses=nullable(statuses(FINISHED_STATUSES)),
            dry_run=nullable({"type": "boolean", "description": "Count only; default false."}),
        ),
        "RetryFilter": bulk_filter(("failed", "cancelled")),
        "CancelFilter": bulk_filter(("pending", "leased")),
        "ScheduleRequest": request(
            ["type", "cron"],
            type=_NAME_TEXT,
            cron={**text, "minLength": 1, "description": "5-field cron, or @hourly, @daily..."},
            payload=anything,
            timezone=nullable({**text, "description": "IANA name; default UTC."}),
            priority=nullable(int32),
            max_attempts=nullable({**int32, "minimum": 1}),
            name=nullable(_NAME_TEXT),
        ),
    }


def _openapi_document() -> dict:
    """OpenAPI 3.1 description of ``_API_ROUTES``; built once."""
    if _openapi_cache:
        return _openapi_cache
    paths: dict[str, dict] = {}
    for method, path, operation in _API_ROUTES:
        paths.setdefault(path, {})[method.lower()] = _openapi_operation(path, operation)
    _openapi_cache.update(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "minflow",
                "version": __version__,
                "description": "Durable job queue: runs, their audit trail and cron schedules.",
            },
            "paths": paths,
            "components": {
                "schemas": _openapi_schemas(),
                "securitySchemes": {
                    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                    "bearer": {"type": "http", "scheme": "bearer"},
                },
            },
            "security": [{"apiKey": []}, {"bearer": []}],
        }
    )
    return _openapi_cache


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class _UsageError(Exception):
    """A user mistake on the command line: one line on stderr, exit status 2, no traceback."""


def _load_app(spec: str) -> App:
    """Import ``MODULE[:ATTR]`` (attribute ``app`` by default) and return the App it holds."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if not module_name:
        raise _UsageError(f"expected MODULE[:ATTR], got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if getattr(exc, "name", None) and module_name.startswith(str(exc.name)):
            raise _UsageError(f"cannot import {module_name!r}: {exc}") from None
        raise
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise _UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(app, App):
        raise _UsageError(f"{module_name}:{attr} is a {type(app).__name__}, not a minflow.App")
    return app


# -- options ----------------------------------------------------------------------------------


def _duration_arg(text: str) -> float:
    try:
        return _parse_duration(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("duration: ")) from None


def _port_arg(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {text!r}")
    return int(text)


def _time_arg(text: str) -> _dt.datetime:
    try:
        return _parse_rfc3339(text, "time")
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclasses.dataclass(frozen=True)
class _Option:
    """A command-line option. ``kwarg``: the keyword argument its value is passed as (None: the
    command reads it itself, as ``args.<flag name>``). ``parse`` turns its text into the value
    (None: the text as is); a bool ``default`` makes the flag a switch to the other value."""

    flag: str
    kwarg: str | None
    parse: Callable[[str], Any] | None
    default: Any
    help: str

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add this option to ``parser``."""
        dest = {"dest": self.kwarg} if self.kwarg else {}
        if isinstance(self.default, bool):
            action = "store_false" if self.default else "store_true"
            parser.add_argument(self.flag, action=action, help=self.help, **dest)
        else:
            parser.add_argument(
                self.flag, type=self.parse, default=self.default, help=self.help, **dest
            )


# The worker command's options; those with a keyword go to Worker(), so a new Worker option is
# one row here.
_WORKER_OPTIONS = (
    _Option("--concurrency", "concurrency", int, DEFAULT_CONCURRENCY, f"handlers run at once (default {DEFAULT_CONCURRENCY})"),
    _Option("--lease", "lease", float, DEFAULT_LEASE, f"lease seconds (default {DEFAULT_LEASE:g})"),
    _Option("--poll-interval", "poll_interval", float, None, f"fallback poll seconds (default {DEFAULT_POLL_INTERVAL:g})"),
    _Option("--types", "types", None, None, "comma-separated exact types to claim (default: all handlers)"),
    _Option("--prefixes", "prefixes", None, None, "comma-separated literal type prefixes to claim as well"),
    _Option("--worker-id", "worker_id", None, None, "worker id (default: hostname-pid)"),
    _Option("--burst", None, None, False, "exit once nothing is due and nothing runs"),
    _Option("--no-schedules", "schedules", None, True, "do not run the cron ticker in this worker"),
    _Option("--shutdown-timeout", "shutdown_timeout", float, DEFAULT_SHUTDOWN_TIMEOUT, f"seconds running handlers get after SIGTERM (default {DEFAULT_SHUTDOWN_TIMEOUT:g})"),
    _Option("--retention", "retention", _duration_arg, None, "delete finished runs last updated longer ago than this, e.g. 7d (default: keep everything)"),
    _Option("--metrics-port", None, _port_arg, None, "serve Prometheus /metrics (and /healthz) on this port"),
    _Option("--metrics-host", None, None, DEFAULT_HTTP_HOST, f"address for --metrics-port (default {DEFAULT_HTTP_HOST})"),
)  # fmt: skip

# The serve command's options.
_SERVE_OPTIONS = (
    _Option("--host", None, None, DEFAULT_HTTP_HOST, f"address to listen on (default {DEFAULT_HTTP_HOST})"),
    _Option("--port", None, _port_arg, DEFAULT_HTTP_PORT, f"port (default {DEFAULT_HTTP_PORT})"),
    _Option("--max-body", None, int, DEFAULT_MAX_BODY, f"largest request body in bytes (default {DEFAULT_MAX_BODY})"),
    _Option("--request-timeout", None, float, DEFAULT_REQUEST_TIMEOUT, f"seconds a client has to send its request (default {DEFAULT_REQUEST_TIMEOUT:g})"),
    _Option("--threads", None, int, DEFAULT_HTTP_THREADS, f"requests handled at once; more get 503 (default {DEFAULT_HTTP_THREADS})"),
)  # fmt: skip


# -- migrate and the long-running commands ----------------------------------------------------


def _cmd_migrate(args: argparse.Namespace) -> int:
    with Client(args.dsn) as client:
        applied = client.migrate()
        version = client.schema_version()
        if args.json:
            _print_json({"schema_version": version, "applied": applied})
        else:
            print(f"schema version {version} ({applied} migrations applied) on {client.dsn}")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    app = _load_app(args.app)
    if args.dsn:
        app._configure(args.dsn)
    worker = Worker(
        app,
        **{option.kwarg: getattr(args, option.kwarg) for option in _WORKER_OPTIONS if option.kwarg},
    )
    server = None
    if args.metrics_port is not None:
        server = _listen(lambda: _serve_metrics(worker, args.metrics_host, args.metrics_port))
    try:
        count = worker.run(burst=args.burst)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    if args.burst:
        print(f"{count} runs executed")
    return 1 if worker._stopped_hard() else 0


def _listen(make: Callable[[], _Server]) -> _Server:
    try:
        return make()
    except OSError as exc:
        raise MinflowError(f"cannot listen: {exc.strerror or exc}") from None


def _cmd_ticker(args: argparse.Namespace) -> int:
    if not (_is_number(args.interval) and 0 < args.interval < math.inf):
        raise _UsageError(f"--interval must be a positive number of seconds, got {args.interval}")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with Client(args.dsn) as client:
        client._ensure_schema()
        _ticker_log.info("ticker started on %s, every %gs", client.dsn, args.interval)
        delay = args.interval
        while not stop.is_set():
            try:
                fired = client.tick()
                if fired:
                    _ticker_log.info("%d schedule slots fired", fired)
                delay = args.interval
            except Unavailable as exc:
                _ticker_log.warning("tick failed: %s; retrying in %.1fs", exc, delay)
                delay = min(delay * 2, 30.0)
            stop.wait(delay)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    api_key = os.environ.get("MINFLOW_API_KEY") or None
    with Client(args.dsn) as client:
        client._ensure_schema()
        server = _listen(
            lambda: _Server(
                args.host,
                args.port,
                client,
                api_key=api_key,
                max_body=args.max_body,
                request_timeout=args.request_timeout,
                threads=args.threads,
            )
        )
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        thread = _start_server(server)
        _http_log.info(
            "serving the API for %s on %s%s (API key %s)",
            client.dsn,
            server.url,
            _API,
            "required" if api_key else "not required: set MINFLOW_API_KEY to require one",
        )
        if not api_key and not server.url.startswith(("http://127.", "http://[::1]")):
            _http_log.warning("the API is reachable from the network without a key")
        try:
            stop.wait()
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
            # Requests in flight finish before the database connections close.
            if not server.drain(args.request_timeout):
                _http_log.warning(
                    "requests still running after %.0fs; stopping anyway", args.request_timeout
                )
        _http_log.info("server stopped")
    return 0


# -- producer and inspector commands ----------------------------------------------------------


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


def _json_arg(text: str | None, what: str) -> Any:
    """A JSON value given on the command line; ``-`` reads it from standard input."""
    if text is None:
        return None
    if text == "-":
        text = sys.stdin.read()
    try:
        return json.loads(text, parse_constant=_reject_json_constant)
    except (ValueError, RecursionError) as exc:
        raise _UsageError(
            f"{what} is not valid JSON ({exc}); quote it, e.g. '{{\"k\": 1}}'"
        ) from None


def _fmt_time(moment: _dt.datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}{(seconds % size) // sub_size:02d}{sub}"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _cmd_submit(args: argparse.Namespace) -> int:
    payload = _json_arg(args.payload, "PAYLOAD_JSON")
    with Client(args.dsn) as client:
        client._ensure_schema()
        run_id = client.submit(
            args.type,
            payload,
            priority=args.priority,
            idempotency_key=args.key,
            max_attempts=args.max_attempts,
            run_at=args.run_at,
            run_in=args.run_in,
        )
    if args.json:
        _print_json({"id": run_id})
    else:
        print(run_id)
        if run_id.deduplicated:
            print(f"minflow: idempotency key {args.key!r} exists; that run's id", file=sys.stderr)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    with Client(args.dsn) as client:
        runs = client.list(
            type=args.type,
            status=args.status,
            idempotency_key=args.key,
            limit=args.limit,
            offset=args.offset,
        )
    if args.json:
        _print_json([run.to_json() for run in runs])
    elif not runs:
        print("no runs")
    else:
        _print_table(
            ("ID", "TYPE", "STATUS", "ATTEMPT", "PRIORITY", "RUN_AT (UTC)", "CREATED (UTC)"),
            [
                (
                    r.id,
                    r.type,
                    r.status,
                    f"{r.attempt}/{r.max_attempts}",
                    r.priority,
                    _fmt_time(r.run_at),
                    _fmt_time(r.created_at),
                )
                for r in runs
            ],
        )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    with Client(args.dsn) as client:
        run = client.get(args.run_id)
        if run is None:
            raise NotFound(f"run {args.run_id!r} not found")
        events = client.events(run.id)
    if args.json:
        _print_json({**run.to_json(), "events": [event.to_json() for event in events]})
        return 0
    compact = lambda value: json.dumps(value, ensure_ascii=False)  # noqa: E731
    fields = [
        ("id", run.id),
        ("type", run.type),
        ("status", run.status),
        ("attempt", f"{run.attempt} of {run.max_attempts}"),
        ("priority", run.priority),
        ("run_at", _fmt_time(run.run_at)),
        ("idempotency_key", run.idempotency_key or "-"),
        ("leased_by", run.leased_by or "-"),
        ("lease_until", _fmt_time(run.lease_until)),
        ("last_error", run.last_error or "-"),
        ("payload", compact(run.payload)),
        ("result", compact(run.result)),
        ("created_at", _fmt_time(run.created_at)),
        ("updated_at", _fmt_time(run.updated_at)),
    ]
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name:<{width}}  {value}")
    print(f"\nevents ({len(events)}, times UTC):")
    start = events[0].created_at if events else None
    for event in events:
        offset = (event.created_at - start).total_seconds() if start and event.created_at else 0.0
        data = "" if event.data is None else "  " + compact(event.data)
        line = f"  {_fmt_time(event.created_at)}  +{offset:8.3f}s  {event.event_type:<9}{data}"
        print(line.rstrip())
    return 0


def _change_command(
    method: str, id_arg: str, status: str, message: str = "{status} {id}"
) -> Callable[[argparse.Namespace], int]:
    """A command that calls ``Client.<method>(id)`` and reports the new status."""

    def change(args: argparse.Namespace) -> int:
        target = getattr(args, id_arg)
        with Client(args.dsn) as client:
            getattr(client, method)(target)
        if args.json:
            _print_json({"id": target, "status": status})
        else:
            print(message.format(id=target, status=status))
        return 0

    return change


_BULK_OPTIONS = ("type", "status", "created_before", "created_after", "key_prefix")


def _bulk_command(
    method: str, verb: str, single: Callable[[argparse.Namespace], int]
) -> Callable[[argparse.Namespace], int]:
    """The cancel or retry command: one run by id, or with ``--all`` every run matching the
    filters through ``Client.<method>``, confirmed on a terminal unless ``--yes``."""

    def change(args: argparse.Namespace) -> int:
        filters = {name: getattr(args, name) for name in _BULK_OPTIONS}
        given = [f"--{n.replace('_', '-')}" for n, v in filters.items() if v is not None]
        if not args.all:
            if args.run_id is None:
                raise _UsageError(f"give a RUN_ID, or --all (with filters) to {verb} many runs")
            if given or args.yes or args.dry_run:
                raise _UsageError(f"{', '.join(given) or '--yes/--dry-run'} only go with --all")
            return single(args)
        if args.run_id is not None:
            raise _UsageError("give a RUN_ID or --all, not both")
        with Client(args.dsn) as client:
            bulk = getattr(client, method)
            count = bulk(dry_run=True, **filters)
            if count and not args.dry_run and not args.yes:
                _confirm(f"{verb} {count:,} runs ({_describe(filters)})?", verb)
            if count and not args.dry_run:
                count = bulk(**filters)
        if args.json:
            _print_json({"count": count, "dry_run": args.dry_run})
        else:
            done = "would be " if args.dry_run else ""
            print(f"{count:,} runs {done}{'retried' if verb == 'retry' else 'cancelled'}")
        return 0

    return change


def _describe(filters: dict[str, Any]) -> str:
    parts = []
    for name, value in filters.items():
        if isinstance(value, list):
            value = ", ".join(value)
        elif isinstance(value, _dt.datetime):
            value = _fmt_time(value) + " UTC"
        if value is not None:
            parts.append(f"{name.replace('_', ' ')} {value}")
    return "; ".join(parts) or "every one in a state that allows it"


def _confirm(question: str, verb: str) -> None:
    """Ask on the terminal; refuse when there is none (a script must say --yes)."""
    if not sys.stdin.isatty():
        raise _UsageError(f"{question.rstrip('?')}: not on a terminal, so pass --yes to {verb}")
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise MinflowError("not confirmed; nothing changed")


_cmd_cancel = _bulk_command(
    "cancel_many", "cancel", _change_command("cancel", "run_id", "cancelled")
)
_cmd_retry = _bulk_command(
    "retry_many",
    "retry",
    _change_command("retry", "run_id", "pending", "retrying {id} (pending again, attempts reset)"),
)


def _cmd_prune(args: argparse.Namespace) -> int:
    statuses = list(dict.fromkeys(args.status or FINISHED_STATUSES))
    with Client(args.dsn) as client:
        count = client.prune(older_than=args.older_than, statuses=statuses, dry_run=args.dry_run)
    if args.json:
        _print_json({"count": count, "dry_run": args.dry_run})
    else:
        print(
            f"{count:,} runs ({', '.join(statuses)}) last updated over "
            f"{_fmt_duration(args.older_than)} ago "
            f"{'would be deleted' if args.dry_run else 'deleted'}, with their events"
        )
    return 0


def _cmd_workers(args: argparse.Namespace) -> int:
    with Client(args.dsn) as client:
        entries = client.workers()
    if args.json:
        _print_json([entry.to_json() for entry in entries])
    elif not entries:
        print("no workers recorded")
    else:
        _print_table(
            ("ID", "HOST", "PID", "STATE", "RUNNING", "TYPES", "STARTED (UTC)", "LAST SEEN (UTC)"),
            [
                (
                    w.id,
                    w.host,
                    w.pid,
                    "alive" if w.alive else "dead",
                    f"{w.running}/{w.concurrency}",
                    ",".join([*w.types, *(p + "*" for p in w.prefixes)]) or "-",
                    _fmt_time(w.started_at),
                    _fmt_time(w.last_seen_at),
                )
                for w in entries
            ],
        )
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    with Client(args.dsn) as client:
        counts = client.stats()
        ages = {t: w for t, _, _, w in _queue_snapshot(client) if w is not None}
    if args.json:
        # Beside each type's status counts, as in the table's last column.
        _print_json(
            {
                run_type: {**by_status, "oldest_due_pending_seconds": ages.get(run_type)}
                for run_type, by_status in counts.items()
            }
        )
        return 0
    if not counts:
        print("no runs")
        return 0
    rows = [
        (run_type, *(by_status.get(s, 0) for s in RUN_STATUSES), _fmt_age(ages.get(run_type)))
        for run_type, by_status in sorted(counts.items())
    ]
    totals = [sum(by_status.get(s, 0) for by_status in counts.values()) for s in RUN_STATUSES]
    oldest = max(ages.values()) if ages else None
    rows.append(("TOTAL", *totals, _fmt_age(oldest)))
    _print_table(("TYPE", *(s.upper() for s in RUN_STATUSES), "OLDEST DUE PENDING"), rows)
    return 0


def _cmd_schedule_add(args: argparse.Namespace) -> int:
    payload = _json_arg(args.payload, "PAYLOAD_JSON")
    with Client(args.dsn) as client:
        client._ensure_schema()
        schedule_id = client.schedule(
            args.type,
            payload,
            cron=args.cron,
            timezone=args.timezone,
            priority=args.priority,
            max_attempts=args.max_attempts,
            name=args.name,
        )
        schedule = client.get_schedule(schedule_id)
    if args.json:
        _print_json({"id": schedule_id})
    else:
        print(schedule_id)
        print(f"next run at {_fmt_time(schedule.next_run_at)} UTC", file=sys.stderr)
    return 0


def _cmd_schedule_list(args: argparse.Namespace) -> int:
    with Client(args.dsn) as client:
        schedules = client.schedules()
    if args.json:
        _print_json([s.to_json() for s in schedules])
    elif not schedules:
        print("no schedules")
    else:
        _print_table(
            ("ID", "NAME", "TYPE", "CRON", "TIMEZONE", "STATE", "NEXT RUN (UTC)", "LAST RUN (UTC)"),
            [
                (
                    s.id,
                    s.name or "-",
                    s.type,
                    s.cron,
                    s.timezone,
                    "active" if s.enabled else "paused",
                    _fmt_time(s.next_run_at),
                    _fmt_time(s.last_run_at),
                )
                for s in schedules
            ],
        )
    return 0


def _cmd_schedule_show(args: argparse.Namespace) -> int:
    with Client(args.dsn) as client:
        schedule = client.get_schedule(args.schedule_id)
    if args.json:
        _print_json(schedule.to_json())
    else:
        for name, value in schedule.to_json().items():
            if name in ("payload",):
                value = json.dumps(value, ensure_ascii=False)
            print(f"{name:<12}  {'-' if value is None else value}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    dsn = args.dsn or "sqlite:///" + os.path.join(
        tempfile.mkdtemp(prefix="minflow-demo-"), "demo.db"
    )
    app = App(dsn)
    app.migrate()

    @app.handler("demo.email.send.v1")
    def send_email(run: RunContext) -> dict:
        time.sleep(random.uniform(0.01, 0.05))
        return {"sent_to": run.payload["to"]}

    @app.handler("demo.invoice.charge.v1")
    def charge(run: RunContext) -> dict:
        if run.attempt == 1:
            raise ConnectionError("payment gateway timed out")
        return {"charged": run.payload["amount"], "attempt": run.attempt}

    @app.handler("demo.report.render.v1")
    def render(run: RunContext) -> None:
        raise ValueError(f"template {run.payload['template']!r} not found")

    jobs = [
        Job("demo.email.send.v1", {"to": f"user{i}@example.com"}) for i in range(args.runs * 2 // 3)
    ]
    jobs += [
        Job("demo.invoice.charge.v1", {"amount": 10 * i}, priority=50)
        for i in range(args.runs // 4)
    ]
    jobs += [
        Job("demo.report.render.v1", {"template": "weekly"}, max_attempts=3)
        for _ in range(max(1, args.runs - len(jobs)))
    ]
    ids = app.submit_many(jobs)
    print(f"minflow demo: {len(ids)} runs submitted to {app.dsn}")
    print("  demo.email.send.v1 succeeds, demo.invoice.charge.v1 fails once then succeeds,")
    print("  demo.report.render.v1 always fails (3 attempts, then 'failed')\n")
    # A fast backoff so the retries finish in seconds instead of the default minutes.
    worker = Worker(
        app, concurrency=4, lease=10, backoff=lambda attempt: 0.2 * attempt, schedules=False
    )
    worker.start()
    deadline = time.monotonic() + 120
    tty = sys.stdout.isatty()
    last = ""
    try:
        while True:
            totals = {s: 0 for s in RUN_STATUSES}
            for counts in app.stats().values():
                for status, n in counts.items():
                    totals[status] += n
            line = "  " + "  ".join(f"{s} {n:>3}" for s, n in totals.items())
            if line != last:
                print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
                last = line
            if totals["pending"] + totals["leased"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        worker.stop(timeout=10)
    print("\n" if tty else "")
    stats = app.stats()
    width = max(len(t) for t in stats) + 2
    print(f"{'type':<{width}}" + "".join(f"{s:>11}" for s in RUN_STATUSES))
    for run_type, counts in sorted(stats.items()):
        print(f"{run_type:<{width}}" + "".join(f"{counts.get(s, 0):>11}" for s in RUN_STATUSES))
    print("\nevent timelines:")
    for run_type in sorted(stats):
        run = app.list(type=run_type, limit=1)[0]
        events = app.events(run.id)
        start = events[0].created_at if events and events[0].created_at else None
        print(
            f"\n  {run.type} {run.id}: {run.status} after {run.attempt} attempt(s)"
            + (f", last error: {run.last_error}" if run.last_error else "")
        )
        for event in events:
            offset = (
                (event.created_at - start).total_seconds() if start and event.created_at else 0.0
            )
            data = "" if event.data is None else " " + json.dumps(event.data)
            print(f"    +{offset:6.3f}s  {event.event_type:<10}{data}")
    app.close()
    print(f"\ndatabase kept at {dsn}")
    return 0


_EPILOG = """\
examples:
  minflow migrate --dsn sqlite:///jobs.db
  minflow submit billing.invoice.v1 '{"order": 42}' --key order-42
  minflow worker myjobs:app --concurrency 8 --metrics-port 9100
  minflow list --status failed --json
  minflow show RUN_ID
  minflow retry --all --status failed --type billing.invoice.v1
  minflow prune --older-than 30d --dry-run
  minflow schedule add reports.daily.v1 --cron '0 6 * * *' --timezone Europe/Berlin
  minflow serve --port 8080

Every command takes --dsn (default: $MINFLOW_DSN, else sqlite:///minflow.db) and
--help. Exit status: 0 success, 1 the operation failed (not found, wrong state,
database error), 2 invalid arguments or input.
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minflow",
        description="A durable job queue on SQLite or PostgreSQL.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"minflow {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="logging level (default: info for worker/ticker/serve, warning otherwise)",
    )
    # Also accepted before the command; a separate dest, because a subcommand's default would
    # overwrite the value given here.
    parser.add_argument("--dsn", dest="global_dsn", default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        parent: Any,
        name: str,
        help_text: str,
        func: Callable[[argparse.Namespace], int],
        *,
        json_flag: bool = True,
        options: Sequence[_Option] = (),
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--dsn",
            default=None,
            help="database (default: $MINFLOW_DSN, else sqlite:///minflow.db)",
        )
        if json_flag:
            sub.add_argument(
                "--json", action="store_true", help="print JSON for scripts instead of text"
            )
        for option in options:
            option.add_to(sub)
        sub.set_defaults(func=func)
        return sub

    def run_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "payload",
            metavar="PAYLOAD_JSON",
            nargs="?",
            default=None,
            help="the payload as JSON (default null; '-' reads standard input)",
        )
        sub.add_argument(
            "--priority",
            type=int,
            default=DEFAULT_PRIORITY,
            help=f"lower runs first (default {DEFAULT_PRIORITY})",
        )
        sub.add_argument(
            "--max-attempts",
            type=int,
            default=DEFAULT_MAX_ATTEMPTS,
            help=f"executions before the run is failed for good (default {DEFAULT_MAX_ATTEMPTS})",
        )

    command(commands, "migrate", "create or upgrade the schema", _cmd_migrate)

    sub = command(commands, "submit", "submit a run; prints its id", _cmd_submit)
    sub.add_argument("type", metavar="TYPE", help="run type, e.g. billing.invoice.v1")
    run_options(sub)
    sub.add_argument(
        "--key",
        default=None,
        help="idempotency key: if a run has it already, nothing is created and its id printed",
    )
    when = sub.add_mutually_exclusive_group()
    when.add_argument(
        "--run-in", type=_duration_arg, default=None, help="delay, e.g. 30, 30s, 5m, 2h, 1d"
    )
    when.add_argument(
        "--run-at",
        type=_time_arg,
        default=None,
        help="earliest start, RFC 3339 with a zone, e.g. 2030-01-31T09:00:00Z",
    )

    sub = command(commands, "list", "list runs, newest first", _cmd_list)
    sub.add_argument("--type", default=None, help="only runs of this exact type")
    sub.add_argument(
        "--status", default=None, choices=RUN_STATUSES, help="only runs in this status"
    )
    sub.add_argument("--key", default=None, help="only the run with this idempotency key")
    sub.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIST_LIMIT,
        help=f"at most this many (default {DEFAULT_LIST_LIMIT}, max {MAX_LIST_LIMIT})",
    )
    sub.add_argument("--offset", type=int, default=0, help="skip this many (default 0)")

    command(commands, "show", "show a run and its event timeline", _cmd_show).add_argument(
        "run_id", metavar="RUN_ID"
    )
    for name, text, func, allowed in (
        ("cancel", "cancel a pending or running run", _cmd_cancel, ("pending", "leased")),
        (
            "retry",
            "put a failed or cancelled run back to pending",
            _cmd_retry,
            ("failed", "cancelled"),
        ),
    ):
        sub = command(commands, name, f"{text}, or with --all every run matching the filters", func)
        sub.add_argument("run_id", metavar="RUN_ID", nargs="?")
        sub.add_argument(
            "--all", action="store_true", help=f"{name} every run matching the filters"
        )
        sub.add_argument("--type", default=None, help="only runs of this exact type")
        sub.add_argument(
            "--status",
            action="append",
            choices=allowed,
            help=f"only runs in this status (repeatable; default: {' and '.join(allowed)})",
        )
        for flag, when in (
            ("--created-before", "before (excluded)"),
            ("--created-after", "at or after"),
        ):
            sub.add_argument(
                flag,
                type=_time_arg,
                default=None,
                help=f"only runs created {when} this RFC 3339 time",
            )
        sub.add_argument(
            "--key-prefix", default=None, help="only runs whose idempotency key starts with this"
        )
        sub.add_argument(
            "--dry-run", action="store_true", help="print how many runs match; change nothing"
        )
        sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    sub = command(
        commands,
        "prune",
        "delete finished runs (and their events) last updated longer ago than --older-than",
        _cmd_prune,
    )
    sub.add_argument(
        "--older-than", type=_duration_arg, required=True, help="age, e.g. 30s, 15m, 2h, 7d"
    )
    sub.add_argument(
        "--status",
        action="append",
        choices=FINISHED_STATUSES,
        help="only runs in this status (repeatable; default: succeeded, failed and cancelled)",
    )
    sub.add_argument(
        "--dry-run", action="store_true", help="print how many would go; delete nothing"
    )

    command(commands, "workers", "workers recorded in the database, alive and dead", _cmd_workers)

    command(
        commands,
        "stats",
        "run counts by type and status, and how long the oldest due run has waited",
        _cmd_stats,
    )

    schedule = commands.add_parser(
        "schedule", help="manage cron schedules", description="Manage cron schedules."
    )
    actions = schedule.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub = command(
        actions, "add", "create a schedule (or update the one with --name)", _cmd_schedule_add
    )
    sub.add_argument("type", metavar="TYPE", help="type of the runs it creates")
    run_options(sub)
    sub.add_argument(
        "--cron", required=True, help="5-field cron expression or @hourly, @daily, ..."
    )
    sub.add_argument("--timezone", default="UTC", help="IANA timezone of the cron (default UTC)")
    sub.add_argument(
        "--name", default=None, help="unique name: adding it again updates that schedule"
    )
    command(actions, "list", "list schedules", _cmd_schedule_list)
    sub = command(actions, "show", "show one schedule", _cmd_schedule_show)
    sub.add_argument("schedule_id", metavar="SCHEDULE_ID")
    for action, method, word, text in (
        ("pause", "pause_schedule", "paused", "stop a schedule from firing"),
        ("resume", "resume_schedule", "resumed", "resume a paused schedule from now"),
        ("delete", "delete_schedule", "deleted", "delete a schedule"),
    ):
        sub = command(actions, action, text, _change_command(method, "schedule_id", word))
        sub.add_argument("schedule_id", metavar="SCHEDULE_ID")

    sub = command(
        commands,
        "worker",
        "run a worker for the handlers of an App",
        _cmd_worker,
        json_flag=False,
        options=_WORKER_OPTIONS,
    )
    sub.add_argument(
        "app",
        metavar="MODULE[:ATTR]",
        help="module holding a minflow.App (attribute 'app' by default)",
    )

    sub = command(
        commands,
        "ticker",
        "run the cron ticker alone (workers also run it by default)",
        _cmd_ticker,
        json_flag=False,
    )
    sub.add_argument(
        "--interval", type=float, default=DEFAULT_TICK_INTERVAL, help="seconds between ticks"
    )

    command(
        commands,
        "serve",
        "serve the REST API, /metrics and /healthz (API key from $MINFLOW_API_KEY)",
        _cmd_serve,
        json_flag=False,
        options=_SERVE_OPTIONS,
    )

    sub = command(
        commands,
        "demo",
        "run a self-contained demo on a fresh SQLite file",
        _cmd_demo,
        json_flag=False,
    )
    sub.add_argument("--runs", type=int, default=36, help="how many runs to submit (default 36)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``minflow`` command; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.dsn = args.dsn or args.global_dsn
    level = args.log_level or (
        "info" if args.command in ("worker", "ticker", "serve") else "warning"
    )
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "demo" and not args.log_level:
        logging.getLogger("minflow.worker").setLevel(logging.CRITICAL)  # the failures are the point
    try:
        return args.func(args)
    except (_UsageError, InvalidInput) as exc:
        print(f"minflow: error: {exc}", file=sys.stderr)
        return 2
    except MinflowError as exc:  # not found, wrong state, database trouble
        print(f"minflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, without a second error at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    # `python -m minflow` runs this file as __main__; user code that does `import minflow` would
    # get a second module whose App class and handlers this copy cannot see. Hand over to the
    # importable module so there is only one.
    import minflow as _minflow

    sys.exit(_minflow.main())

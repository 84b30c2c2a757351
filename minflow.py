"""minflow: a durable job and workflow-run queue in one Python file.

Producers record intent as rows in a ``workflow_run`` table; workers claim rows under a lease, run
a handler and record the outcome. The database is the only coordination point: SQLite (stdlib
``sqlite3``) by default, PostgreSQL (pure-Python ``pg8000``) when many machines share one queue.
The schema is the one of the Go library ``simple-workflow``, so both can share a database.

    import minflow

    app = minflow.App("sqlite://jobs.db")   # jobs.db in the working directory

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

import builtins
import collections
import contextlib
import datetime as _dt
import errno
import functools
import importlib
import io
import itertools
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

# Why most imports are deferred: minflow is imported by command-line tools and web apps, often
# vendored, and every start of those pays for what `import minflow` does. Imported here,
# http.server, asyncio, argparse, logging, dataclasses and typing were most of that cost, and
# most processes never use them. So the modules below, minflow's loggers and its regular
# expressions are globals whose first use makes them (a _Deferred stand-in replaces itself with
# the real value). Type checkers read the real imports: typing's TYPE_CHECKING is replaced by a
# constant of the same name, which they take as true, and NamedTuple by what it makes.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NamedTuple, TypeVar

    import argparse
    import asyncio
    import base64
    import email.utils
    import hashlib
    import heapq
    import hmac
    import http.server
    import inspect
    import json
    import logging
    import queue
    import random
    import re
    import select
    import selectors
    import signal
    import socket
    import socketserver
    import sqlite3
    import traceback
    import urllib.parse
    import uuid
    import weakref


class _Deferred:
    """A stand-in for a global that minflow makes on first use: the first attribute read calls
    ``make`` and puts its value in the stand-in's place among minflow's globals, as ``name``,
    so later uses read the value itself."""

    def __init__(self, name: str, make: Callable[[], Any]):
        # Made once: a copy of the stand-in kept elsewhere (an attribute) reads the same value.
        self._name, self._make = name, functools.cache(make)

    def __getattr__(self, attr: str) -> Any:
        value = self._make()
        globals()[self._name] = value
        return getattr(value, attr)

    def __repr__(self) -> str:
        return f"<{self._name}, made on first use>"


def _module(name: str) -> Any:
    """A stand-in for module ``name`` (``email.utils``: for the email package, utils imported)."""
    return _Deferred(name.partition(".")[0], lambda: __import__(name))


def _logger(binding: str, name: str) -> Any:
    """A stand-in for ``logging.getLogger(name)``, bound to the global ``binding``."""

    def make() -> logging.Logger:
        _library_logger()
        return logging.getLogger(name)

    return _Deferred(binding, make)


def _regex(binding: str, pattern: str) -> Any:
    """A stand-in for ``re.compile(pattern)``, bound to the global ``binding``: compiling all of
    minflow's patterns took longer than defining all its classes, and a process uses few."""
    return _Deferred(binding, lambda: re.compile(pattern))


@functools.cache
def _library_logger() -> logging.Logger:
    """The "minflow" logger, given once the NullHandler a library adds: showing its records is
    the application's decision (only ``main()`` configures handlers)."""
    logger = logging.getLogger("minflow")
    logger.addHandler(logging.NullHandler())
    return logger


if not TYPE_CHECKING:
    argparse = _module("argparse")
    asyncio = _module("asyncio")
    base64 = _module("base64")
    email = _module("email.utils")
    hashlib = _module("hashlib")
    heapq = _module("heapq")
    hmac = _module("hmac")
    http = _module("http.server")
    inspect = _module("inspect")
    json = _module("json")
    logging = _module("logging")
    queue = _module("queue")
    random = _module("random")
    re = _module("re")
    select = _module("select")
    selectors = _module("selectors")
    signal = _module("signal")
    socket = _module("socket")
    socketserver = _module("socketserver")
    sqlite3 = _module("sqlite3")
    traceback = _module("traceback")
    urllib = _module("urllib.parse")
    uuid = _module("uuid")
    weakref = _module("weakref")

    class _NamedTupleType(type):
        """What ``class C(NamedTuple)`` makes, as typing.NamedTuple makes it: a
        collections.namedtuple whose fields are the class's annotations, its attributes their
        defaults (minflow's named tuples have no methods)."""

        def __new__(mcs, name: str, bases: tuple, namespace: dict) -> type:
            if not bases:  # NamedTuple itself
                return super().__new__(mcs, name, bases, namespace)
            fields = tuple(namespace.get("__annotations__", ()))
            defaults = [namespace[field] for field in fields if field in namespace]
            made = collections.namedtuple(name, fields, defaults=defaults, module=__name__)
            made.__doc__ = namespace.get("__doc__")
            return made

    class NamedTuple(metaclass=_NamedTupleType):
        pass


log = _logger("log", "minflow")
_worker_log = _logger("_worker_log", "minflow.worker")
_ticker_log = _logger("_ticker_log", "minflow.ticker")

UTC = _dt.timezone.utc

# ---------------------------------------------------------------------------------------------
# Defaults (the seed's, unless a comment says why not)
# ---------------------------------------------------------------------------------------------

DEFAULT_DSN = "sqlite://minflow.db"  # minflow.db in the working directory
DEFAULT_SCHEMA = "workflow"
DEFAULT_PRIORITY = 100  # lower runs first
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LEASE = 30.0  # seconds
# Wake-ups come from LISTEN/NOTIFY or PRAGMA data_version; this poll only catches runs whose
# run_at has just become due (retries, delayed submits), hence shorter than the seed's 2 s.
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_CONCURRENCY = 4
# Runs a worker claims beyond its free handler slots, started from its buffer as slots free up
# (see Worker): a claim round trip then moves up to concurrency + prefetch runs, not just the
# free slots, while each buffered run waits in one worker for a slot.
DEFAULT_PREFETCH = 64
# ... but a buffered run should start within about this long: the buffer holds no more runs
# than the slots finish in that time at the pace handlers have been finishing, and none before
# the first has finished. Slow handlers' runs therefore stay in the database, where any worker
# may take them, and a claim takes only the free slots, as without a buffer.
PREFETCH_HORIZON = 0.05  # seconds
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# A second SIGTERM/SIGINT this soon after the first is not "exit now": terminals may send two
# SIGINTs for one Ctrl-C, and impatient fingers press twice.
SIGNAL_DEBOUNCE = 1.0
# A run may ask to be run later (Retry) this often; after that each request counts as a failed
# attempt, so a handler that snoozes forever still ends in `failed` (the seed has no bound).
DEFAULT_MAX_SNOOZES = 25
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
# How often a worker looks for expired leases (and, on SQLite, zoned retry times to rewrite):
# a dead worker's runs are taken over within about this long after their lease expires.
RESCUE_INTERVAL = 0.5
TICK_BATCH = 100
# Runs per transaction of prune() and the bulk changes: each batch is a short write of its own,
# so workers' claims interleave with a large clean-up.
CHANGE_BATCH = 1000
PRUNE_CHECK_INTERVAL = 60.0  # the longest a retention worker waits between two prune passes
WORKER_DEAD_AFTER = 3  # heartbeat periods without a sign of life before a worker counts as dead
WORKER_FORGET_AFTER = 86400.0  # seconds after which a dead worker's entry is deleted
SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_WATCH_INTERVAL = 0.005  # PRAGMA data_version costs microseconds; 5 ms keeps latency low
# The deadline of every read and write on a PostgreSQL connection (the DSN's timeout= sets it).
PG_TIMEOUT = 30.0
# TCP keepalive on PostgreSQL connections (idle seconds, seconds between probes, probes): a
# silent link whose peer is gone is given up on after about 25 s, not the OS's two hours.
PG_KEEPALIVE = (10, 5, 3)
PG_LISTEN_PROBE = 10.0  # a LISTEN connection silent this long gets a round trip, with its deadline
PG_LISTEN_SELF_TEST = 2.0  # seconds a worker waits for its own test notification at start-up
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

    ``delay`` is in seconds (``None``: the backoff for this attempt). The attempt is given
    back, so ``max_attempts`` is not consumed, and ``last_error`` is left alone. A run may
    snooze like this ``Worker(max_snoozes=...)`` times (``RunContext.snoozes`` counts them);
    each request after that counts as a failed attempt.
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


def _new_id(random_bytes: bytes | None = None) -> str:
    """A UUID in the version 7 layout: 48 bits of Unix milliseconds, then 74 random bits
    (from ``random_bytes``, 10 of them, when given; see ``_new_ids``).

    Time-ordered ids land at the right edge of the primary-key index instead of on random
    pages, which keeps inserts cheap once the table is large; they remain valid UUIDs for the
    Go library and PostgreSQL's uuid type.
    """
    rand = int.from_bytes(random_bytes or os.urandom(10), "big")
    value = (
        (time.time_ns() // 1_000_000) << 80
        | 0x7 << 76
        | (rand >> 68) << 64
        | 0b10 << 62
        | rand & ((1 << 62) - 1)
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _new_ids(count: int) -> list[str]:
    """``count`` ids as ``_new_id`` makes them, from one read of the system's random source
    (one system call per id was a tenth of a bulk submit's time)."""
    pool = os.urandom(10 * count)
    return [_new_id(pool[i : i + 10]) for i in range(0, 10 * count, 10)]


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


_GO_TIME = _regex(
    "_GO_TIME",
    r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?"
    r"\s*(Z|[+-]\d{2}(?::?\d{2})?)?(?:\s+[A-Za-z][A-Za-z0-9+-]*)?(?:\s+m=[+-][\d.]+)?$",
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


def _jitter(delay: float) -> float:
    """Between half and all of ``delay``: processes that failed together do not retry in step."""
    return random.uniform(delay / 2, delay)


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


_DURATION = _regex("_DURATION", r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*")
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


def _fixed_backoff(seconds: float) -> Callable[[int], float]:
    """The same delay after every failed attempt, without jitter."""
    return lambda attempt: seconds


def _exponential_backoff(base: float, cap: float) -> Callable[[int], float]:
    """``base`` doubling with each failed attempt, at most ``cap``, less up to 10% jitter (so
    runs that failed together spread out, and the cap is never exceeded)."""

    def backoff(attempt: int) -> float:
        # A bounded exponent: 2.0 ** 1024 overflows a float, and any cap is reached far sooner.
        delay = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 1000))
        return delay - delay * 0.1 * random.random()

    return backoff


# ---------------------------------------------------------------------------------------------
# Public value types
# ---------------------------------------------------------------------------------------------

# The value types are classes like frozen (or plain) dataclasses, with the same constructor,
# repr, equality, hash and immutability, made by _dataclass below: the dataclasses module (it
# imports inspect) and the code it generates for each class when defined were over half of the
# cost of `import minflow` (see the Header). Here a class's __init__ is generated when its first
# instance is made. Type checkers read them as the dataclasses they behave like, and the
# dataclasses module's functions accept them (_DataclassFields).


class _Field:
    """A field's default with options, as ``dataclasses.field`` takes them."""

    def __init__(
        self,
        *,
        default: Any = None,
        default_factory: Callable[[], Any] | None = None,
        repr: bool = True,
    ):
        self.default, self.default_factory, self.repr = default, default_factory, repr


_NO_DEFAULT = object()
_FROM_FACTORY = object()  # the default of a field whose default_factory makes its value


def _dataclass_init(cls: type, frozen: bool) -> Callable[..., None]:
    """``cls.__init__``, written as dataclasses writes it: the fields in order as parameters,
    each set as an attribute (stored in the instance's ``__dict__`` if the class is frozen)."""
    scope: dict[str, Any] = {"_FROM_FACTORY": _FROM_FACTORY}
    params, body = [], [" d = self.__dict__"] if frozen else []
    for name in cls._fields:  # type: ignore[attr-defined]
        default = cls._defaults.get(name, _NO_DEFAULT)  # type: ignore[attr-defined]
        value = name
        if isinstance(default, _Field) and default.default_factory is not None:
            scope[f"_factory_{name}"] = default.default_factory
            params.append(f"{name}=_FROM_FACTORY")
            value = f"_factory_{name}() if {name} is _FROM_FACTORY else {name}"
        elif default is _NO_DEFAULT:
            params.append(name)
        else:
            scope[f"_default_{name}"] = default.default if isinstance(default, _Field) else default
            params.append(f"{name}=_default_{name}")
        body.append(f" d[{name!r}] = {value}" if frozen else f" self.{name} = {value}")
    exec(f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body or [" pass"]), scope)
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init  # type: ignore[no-any-return]


def _dataclass_repr(self: Any) -> str:
    shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in type(self)._shown)
    return f"{type(self).__qualname__}({shown})"


def _dataclass_eq(self: Any, other: Any) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _dataclass_values(self) == _dataclass_values(other)


def _dataclass_values(self: Any) -> tuple:
    return tuple(getattr(self, name) for name in self._fields)


def _dataclass_hash(self: Any) -> int:
    return hash(_dataclass_values(self))


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    raise AttributeError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise AttributeError(f"cannot delete field {name!r}")


class _DataclassFields:
    """``__dataclass_fields__``, made when first read: ``dataclasses.is_dataclass``, ``fields``,
    ``asdict``, ``astuple`` and ``replace`` then accept minflow's value types as the dataclasses
    they behave like, and an application that never asks does not import the module. The
    fields are those of an equivalent class made by ``dataclasses.make_dataclass``."""

    def __get__(self, instance: Any, owner: type) -> dict[str, Any]:
        import dataclasses

        specs = []
        for name in owner._fields:  # type: ignore[attr-defined]
            default = owner._defaults.get(name, _NO_DEFAULT)  # type: ignore[attr-defined]
            if isinstance(default, _Field) and default.default_factory is not None:
                spec = dataclasses.field(default_factory=default.default_factory, repr=default.repr)
            elif isinstance(default, _Field):
                spec = dataclasses.field(default=default.default, repr=default.repr)
            elif default is _NO_DEFAULT:
                spec = dataclasses.field()
            else:
                spec = dataclasses.field(default=default)
            specs.append((name, owner.__annotations__[name], spec))
        twin = dataclasses.make_dataclass(
            owner.__name__,
            specs,
            frozen=owner._frozen,  # type: ignore[attr-defined]
            eq=owner._eq,  # type: ignore[attr-defined]
        )
        owner.__dataclass_params__ = twin.__dataclass_params__  # type: ignore[attr-defined]
        owner.__dataclass_fields__ = twin.__dataclass_fields__  # type: ignore[attr-defined]
        return twin.__dataclass_fields__  # type: ignore[no-any-return]


def _runtime_dataclass(cls: type | None = None, /, *, frozen: bool = False, eq: bool = True) -> Any:
    """``dataclasses.dataclass`` as minflow uses it: fields are the class's own annotations,
    their defaults its class attributes or ``_field(...)``."""

    def make(cls: type) -> type:
        fields = tuple(cls.__dict__.get("__annotations__", {}))
        defaults = {name: cls.__dict__[name] for name in fields if name in cls.__dict__}
        for name, default in defaults.items():
            if isinstance(default, _Field):  # the class attribute is the plain default, if any
                if default.default_factory is None:
                    setattr(cls, name, default.default)
                else:
                    delattr(cls, name)
        shown = tuple(
            n for n in fields if not isinstance(defaults.get(n), _Field) or defaults[n].repr
        )

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            # The first instance writes the real __init__: no code is generated at import.
            cls.__init__ = _dataclass_init(cls, frozen)  # type: ignore[misc]
            cls.__init__(self, *args, **kwargs)  # type: ignore[misc]

        attributes: dict[str, Any] = {
            "_fields": fields,
            "_defaults": defaults,
            "_shown": shown,
            "_frozen": frozen,
            "_eq": eq,
            "__dataclass_fields__": _DataclassFields(),
            "__match_args__": fields,
            "__init__": __init__,
            "__repr__": _dataclass_repr,
        }
        if eq:
            attributes["__eq__"] = _dataclass_eq
            attributes["__hash__"] = _dataclass_hash if frozen else None
        if frozen:
            attributes["__setattr__"] = _frozen_setattr
            attributes["__delattr__"] = _frozen_delattr
        for name, value in attributes.items():
            setattr(cls, name, value)
        return cls

    return make if cls is None else make(cls)


if TYPE_CHECKING:
    from dataclasses import dataclass as _dataclass
    from dataclasses import field as _field
else:
    _dataclass, _field = _runtime_dataclass, _Field


def _fields(cls_or_record: Any) -> tuple[str, ...]:
    """The field names of a ``_dataclass`` class or instance, in order."""
    return cls_or_record._fields  # type: ignore[no-any-return]


def _replace(record: Any, **changes: Any) -> Any:
    """A copy of ``record`` with some fields changed, like ``dataclasses.replace``."""
    return type(record)(**{**{name: getattr(record, name) for name in _fields(record)}, **changes})


@_dataclass(frozen=True)
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


class _ScheduleId(str):
    """A schedule id as ``schedule`` returns it: a plain ``str`` with an ``updated`` flag, True
    when a live schedule of the given name existed and was updated in place."""

    updated: bool

    def __new__(cls, schedule_id: str, updated: bool = False) -> _ScheduleId:
        self = super().__new__(cls, schedule_id)
        self.updated = updated
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
        return {name: _json_value(getattr(self, name)) for name in _fields(self)}


@_dataclass(frozen=True)
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


@_dataclass(frozen=True)
class Event(_Record):
    """One entry of a run's audit trail (``workflow_event``)."""

    id: int
    workflow_id: str
    event_type: str
    data: Any
    created_at: _dt.datetime | None


@_dataclass(frozen=True)
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


@_dataclass(frozen=True)
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

# SQLite query parameters. minflow's own: ``synchronous`` (NORMAL is the opt-in to trade the
# last commits before a power loss for speed) and ``busy_timeout`` (milliseconds).
_SQLITE_OPTIONS = {"synchronous": ("full", "normal", "extra"), "busy_timeout": None}
# The Go library hands the query string to its SQLite driver (modernc.org/sqlite, which also
# reads mattn/go-sqlite3's names), so a DSN shared with a Go service may carry that driver's
# parameters. Each is accepted: honoured where it means something to sqlite3, otherwise
# ignored (README). Parameters naming a pragma, by the pragma they set:
_GO_PRAGMA_KEYS = {
    "_busy_timeout": "busy_timeout",
    "_timeout": "busy_timeout",
    "_journal_mode": "journal_mode",
    "_journal": "journal_mode",
    "_synchronous": "synchronous",
    "_sync": "synchronous",
    "_foreign_keys": "foreign_keys",
    "_fk": "foreign_keys",
}
# ... and those without meaning for minflow's connections: it always begins write
# transactions IMMEDIATE (_txlock), writes its own UTC time text (_time_format), opens private
# read-write connections (cache, mode: outside a file: URI the Go drivers drop these too).
_GO_IGNORED = frozenset(
    [
        "_txlock",
        "_time_format",
        "_time_integer_format",
        "cache",
        "mode",
        "vfs",
        "immutable",
        "nolock",
        "psow",
        "_loc",
        "_mutex",
        "_auth",
        "_auth_user",
        "_auth_pass",
        "_auth_crypt",
        "_auth_salt",
        "_auto_vacuum",
        "_vacuum",
        "_case_sensitive_like",
        "_cslike",
        "_defer_foreign_keys",
        "_defer_fk",
        "_ignore_check_constraints",
        "_locking_mode",
        "_locking",
        "_query_only",
        "_recursive_triggers",
        "_rt",
        "_secure_delete",
        "_writable_schema",
        "_cache_size",
    ]
)
# What minflow's connections need, whatever a Go parameter asks: WAL (its locking and
# wake-ups rely on it, and the mode persists in the file), foreign keys (events cascade with
# their run) and at least FULL durability unless minflow's own synchronous=normal says so.
_SQLITE_FIXED = {
    "journal_mode": ("wal",),
    "foreign_keys": ("1", "on", "true", "yes"),
    "synchronous": ("2", "full", "3", "extra"),
}
_PRAGMA = _regex("_PRAGMA", r"\s*(\w+)\s*(?:\(\s*([^()]*?)\s*\)|=\s*(.*?))?\s*")
_warned_dsns: set[str] = set()
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
    "binary_parameters",
    "prepared_statements",
}
# Boolean DSN values as lib/pq and libpq spell them.
_DSN_FLAGS = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@_dataclass(frozen=True)
class _DSN:
    """A parsed connection string. ``key`` names the database for in-process wake-ups."""

    kind: str  # "sqlite" | "postgres"
    text: str  # for messages, password masked
    path: str = ""
    memory: bool = False
    three_slash: bool = False  # sqlite:///x: read as the absolute /x, as the Go library does
    synchronous: str = "full"
    busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS
    host: str = "localhost"
    port: int = 5432
    user: str = "postgres"
    password: str | None = _field(default=None, repr=False)  # never in logs
    database: str | None = None
    unix_sock: str | None = None
    search_path: tuple[str, ...] = (DEFAULT_SCHEMA,)
    sslmode: str = "disable"
    ssl_files: tuple[str | None, str | None, str | None] = (None, None, None)
    timeout: float = PG_TIMEOUT
    application_name: str | None = "minflow"
    # lib/pq's switch for PgBouncer (unnamed statements, parameters sent with each execution).
    binary_parameters: bool = False
    prepared_statements: str = "auto"  # "auto" | "yes" | "no": see _StatementMode

    @property
    def schema(self) -> str:
        return self.search_path[0]

    @property
    def key(self) -> str:
        if self.kind == "sqlite":
            return "sqlite:" + (f":memory:{id(self)}" if self.memory else self.path)
        return f"pg:{self.unix_sock or self.host}:{self.port}/{self.database}/{self.schema}"

    @property
    def hint(self) -> str:
        """For errors about a file that cannot be opened: how a three-slash DSN was read."""
        if not self.three_slash:
            return ""
        relative = self.path.lstrip("/")
        return (
            f" (sqlite:///{relative} names the absolute path {self.path}, as in the Go library;"
            f" for {relative} in the working directory write sqlite://{relative})"
        )


def _parse_dsn(text: str | None) -> _DSN:
    """Parse ``sqlite://PATH``, ``postgres://...`` or libpq ``key=value`` text (``None``:
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
        f"unrecognised DSN {text!r}: expected sqlite://file.db, postgres://... or key=value pairs"
    )


def _parse_sqlite_dsn(text: str) -> _DSN:
    rest = text.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    rest = rest.partition("#")[0]  # a fragment is no part of the path (Go's net/url)
    options = _sqlite_query(text, query)
    # PATH as written, as the Go library reads it: sqlite:///abs/x.db is /abs/x.db (four
    # slashes too), sqlite://x.db is x.db in the working directory.
    path = urllib.parse.unquote(rest)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
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
        three_slash=rest.startswith("/") and not rest.startswith("//"),
        synchronous=synchronous,
        busy_timeout_ms=int(busy),
    )


def _sqlite_query(text: str, query: str) -> dict[str, str]:
    """minflow's SQLite options from a query string that may also carry the Go drivers'
    parameters (busy timeout and durability given those ways are folded in); what is ignored
    and changes behaviour is logged once per DSN."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise InvalidInput(f"malformed sqlite DSN query string {query!r}") from None
    options: dict[str, str] = {}
    pragmas: dict[str, str] = {}  # from the Go drivers' parameters
    ignored: list[str] = []
    for key, value in pairs:
        if key in _SQLITE_OPTIONS:
            if key in options:
                raise InvalidInput(f"sqlite DSN parameter {key!r} given twice")
            options[key] = value
        elif key == "_pragma":  # modernc's: busy_timeout(5000) or busy_timeout=5000
            match = _PRAGMA.fullmatch(value)
            if not match or match.group(2) is None and match.group(3) is None:
                raise InvalidInput(f"sqlite _pragma must be NAME(VALUE), got {value!r}")
            name = match.group(1).lower()
            pragmas[name] = (match.group(2) or match.group(3) or "").strip("'\"")
        elif key in _GO_PRAGMA_KEYS:
            pragmas[_GO_PRAGMA_KEYS[key]] = value
        elif key not in _GO_IGNORED:
            ignored.append(f"unknown parameter {key}={value}")
    for name, value in pragmas.items():
        if name in options:  # minflow's own option wins
            continue
        if name == "busy_timeout":
            if not value.isdigit():
                raise InvalidInput(f"sqlite busy_timeout must be milliseconds, got {value!r}")
            options["busy_timeout"] = value
        elif name not in _SQLITE_FIXED:
            ignored.append(f"pragma {name}({value})")
        elif value.lower() not in _SQLITE_FIXED[name]:
            kept = "WAL" if name == "journal_mode" else "ON" if name == "foreign_keys" else "FULL"
            ignored.append(f"{name}={value} (minflow keeps {kept})")
        elif name == "synchronous":
            options["synchronous"] = "extra" if value.lower() in ("3", "extra") else "full"
    if ignored and text not in _warned_dsns:
        _warned_dsns.add(text)
        log.warning(
            "SQLite DSN: ignored %s; minflow's own options are synchronous=full|normal|extra and "
            "busy_timeout=MS",
            ", ".join(ignored),
        )
    return options


def _query_options(query: str, allowed: Iterable[str], what: str) -> dict[str, str]:
    options: dict[str, str] = {}
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
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
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"malformed PostgreSQL DSN: {exc}") from None
    options = _query_options(parts.query, _PG_OPTIONS, "postgres")
    host = urllib.parse.unquote(parts.hostname or "") or "localhost"
    return _pg_dsn(
        _mask_url(text, parts),
        host=host,
        port=port or 5432,
        user=urllib.parse.unquote(parts.username) if parts.username else "postgres",
        password=urllib.parse.unquote(parts.password) if parts.password is not None else None,
        database=urllib.parse.unquote(parts.path.lstrip("/")) or None,
        options=options,
    )


_KEYWORD = _regex("_KEYWORD", r"\s*([A-Za-z_]+)\s*=\s*('((?:[^'\\]|\\.)*)'|[^\s']*)")


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
    binary = options.get("binary_parameters", "no").lower()
    if binary not in _DSN_FLAGS:
        raise InvalidInput(f"binary_parameters must be yes or no, got {binary!r}")
    prepared = options.get("prepared_statements", "auto").lower()
    if prepared != "auto":
        if prepared not in _DSN_FLAGS:
            raise InvalidInput(f"prepared_statements must be auto, yes or no, got {prepared!r}")
        prepared = "yes" if _DSN_FLAGS[prepared] else "no"
    if _DSN_FLAGS[binary] and prepared == "yes":
        raise InvalidInput(
            "binary_parameters=yes means no prepared statements; drop prepared_statements=yes"
        )
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
        binary_parameters=_DSN_FLAGS[binary],
        prepared_statements=prepared,
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
#   {clock}                      the same for an event: the moment it is written, not the
#                                transaction's start, so events written later sort later
#   {later:x}                    the database clock + :x seconds ({later:t.c}: + column t.c)
#   {json:x} {rawjson:x}         a JSON parameter (rawjson: one Go reads as json.RawMessage)
#   {uuid:x} {time:x} {bool:x}   an id, a timestamp, a boolean parameter
#   {tiebreak}                   orders rows whose created_at ties
#   {greatest}                   the larger of its arguments (a scalar function)
#   {startswith:x}               matches the pattern :x made by the dialect's prefix_pattern()
#   {schema} {channel}           the DSN's schema and its NOTIFY channel, quoted (PostgreSQL)
#   {ascii:x}                    a NOTIFY payload made ASCII (PostgreSQL)
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
        "index of zoned retry times",
        [
            # The Go worker writes retry times as Go's time.Time text, in its own zone
            # ("... 21:23:45.07 +0900 JST m=+60.69"), which compares as text at the wrong
            # instant. minflow's forms are 19 or 23 characters; this holds only the longer ones,
            # usually none, so finding them to rewrite as UTC costs a look at an empty index.
            """CREATE INDEX IF NOT EXISTS minflow_run_zoned ON {workflow_run} (id)
            WHERE status = 'pending' AND length(run_at) > 23""",
        ],
    ),
    (
        4,
        "snooze counts",
        # How often a run asked to run later (Retry) since it was submitted or retried; the
        # Go library's statements name their columns, so they never see it, and its inserts
        # get the default.
        ["ALTER TABLE {workflow_run} ADD COLUMN snoozes INTEGER NOT NULL DEFAULT 0"],
    ),
    (
        5,
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
    (
        6,
        "retryable-run index",
        [
            # retry_many() finds failed and cancelled runs here, as on PostgreSQL; only a
            # failure or a cancel adds an entry.
            """CREATE INDEX IF NOT EXISTS minflow_run_retryable ON {workflow_run} (created_at)
            WHERE status IN ('failed', 'cancelled')""",
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
    # Nothing to add: timestamptz compares instants. Kept so both dialects share version numbers.
    (3, "index of zoned retry times", []),
    (
        4,
        "snooze counts",
        # A constant default: PostgreSQL adds the column without rewriting the table.
        ["ALTER TABLE {workflow_run} ADD COLUMN IF NOT EXISTS snoozes INT NOT NULL DEFAULT 0"],
    ),
    (
        5,
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
    # Empty: PostgreSQL has had SQLite's version 6 index since version 5. Kept so both
    # dialects share version numbers.
    (6, "retryable-run index", []),
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
_SLOT = _regex("_SLOT", r"\{(\w+)(?::([\w.]+))?\}")


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


# -- parameter styles of callers' drivers -----------------------------------------------------
# A caller's own connection (Client.submit(connection=...)) may bind parameters in any DB-API
# paramstyle; its statements are the rendered ones, rewritten once per (statement, style).
# Quoted text, quoted identifiers and comments are copied unchanged, except that the format
# styles need a literal % doubled: outside quotes for every driver, inside them too for psycopg
# and psycopg2, which read % wherever it stands.
_PARAM_TOKEN = _regex("_PARAM_TOKEN", r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|::|:(\w+)|%")
_PARAMSTYLES = ("named", "pyformat", "format", "qmark", "numeric")
_RESTYLED: dict[tuple[str, str, bool], tuple[str, tuple[str, ...]]] = {}


def _restyle(sql: str, style: str, percent_in_quotes: bool = False) -> tuple[str, tuple[str, ...]]:
    """``sql`` with its ``:name`` parameters in the DB-API paramstyle ``style``, and the names
    in the order the positional styles (format, qmark, numeric) take their values."""
    key = (sql, style, percent_in_quotes)
    cached = _RESTYLED.get(key)
    if cached is not None:
        return cached
    if style not in _PARAMSTYLES:
        raise MinflowError(f"unsupported DB-API paramstyle {style!r}")
    doubled = style in ("format", "pyformat")
    names: list[str] = []

    def replace(match: re.Match[str]) -> str:
        token, name = match.group(0), match.group(1)
        if name is None:
            quoted = token[0] in "'\""
            if doubled and (token == "%" or (quoted and percent_in_quotes)):
                return token.replace("%", "%%")
            return token
        names.append(name)
        if style == "named":
            return token
        if style == "pyformat":
            return f"%({name})s"
        return {"format": "%s", "qmark": "?", "numeric": f":{len(names)}"}[style]

    cached = _RESTYLED[key] = (_PARAM_TOKEN.sub(replace, sql), tuple(names))
    return cached


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
    "retry": ("retried", '{"reason": "manual", "attempt": 0}'),
}


def _release_data(attempt: int, worker_id: str) -> str:
    """The data of the ``retried`` event of a prefetched run given back unstarted (PostgreSQL
    builds the same object in its "release" statement)."""
    return json.dumps({"reason": "released", "attempt": attempt, "worker_id": worker_id})


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
    # minflow's statements inside a caller's transaction (Client.submit(connection=...)) run in
    # this savepoint: a failure undoes them alone and leaves the caller's transaction usable.
    "savepoint": "SAVEPOINT minflow_submit",
    "release_savepoint": "RELEASE SAVEPOINT minflow_submit",
    "rollback_to_savepoint": "ROLLBACK TO SAVEPOINT minflow_submit",
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
        "VALUES ({uuid:id}, :event_type, {json:data}, {clock})"
    ),
    # Cancel a run that is not finished; sticky: the worker's fenced writes no longer match.
    "cancel": (
        "UPDATE {workflow_run} SET status = 'cancelled', updated_at = {now} "
        "WHERE id = {uuid:id} AND status IN ('pending', 'leased') AND deleted_at IS NULL RETURNING id"
    ),
    # Revive a dead or cancelled run: pending now, attempts and snoozes start again from zero.
    "retry": (
        "UPDATE {workflow_run} SET status = 'pending', attempt = 0, snoozes = 0, run_at = {now}, "
        "updated_at = {now} "
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
    # The files of a connection's databases (a caller's main one must be the client's). Unlike a
    # SELECT it reads no page, so it gives a caller's deferred transaction no read snapshot,
    # which minflow's first write could find stale (SQLITE_BUSY_SNAPSHOT, without waiting).
    "database": "PRAGMA database_list",
    # Can the database take writes (read-only? a standby?): a file that opens can.
    "health": "SELECT 0, 0",
    # Runs finished (succeeded, or failed for good) per minute since :since, from their events
    # by idx_workflow_event_type; each minute as 'YYYY-MM-DD HH:MM:00' (times are UTC text).
    "throughput": (
        "SELECT substr(created_at, 1, 16) || ':00', event_type, COUNT(*) FROM {workflow_event} "
        "WHERE event_type IN ('succeeded', 'failed') AND created_at >= :since "
        "GROUP BY substr(created_at, 1, 16), event_type"
    ),
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
  snoozes = CASE WHEN d.kind = 'snoozed' THEN snoozes + 1 ELSE snoozes END,
  -- A run that failed for good keeps its run_at: no retry is due.
  run_at = CASE WHEN d.kind = 'succeeded' OR (d.kind = 'failed' AND workflow_run.attempt >= max_attempts)
           THEN run_at ELSE {later:d.delay} END,
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
       {clock}
FROM json_each(:events)""",
    # "started" events (a JSON array of [run id, attempt]) for prefetched runs whose handlers
    # started since the last cycle. A handler that started did start, even if its lease was
    # lost meanwhile (an outage longer than the lease): only a run that no longer exists
    # (pruned after a cancel) gets none.
    "insert_started": """
INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at)
SELECT r.id, 'started', :data, {clock}
FROM json_each(:runs) AS s CROSS JOIN {workflow_run} AS r
WHERE r.id = json_extract(s.value, '$[0]')""",
    # Give back prefetched runs a stopping worker never started (a JSON array of [id,
    # attempt]): pending again, the claim undone (attempt, owner, lease), fenced like outcomes.
    "release": """
UPDATE {workflow_run} SET status = 'pending', attempt = workflow_run.attempt - 1, leased_by = NULL,
  lease_until = NULL, updated_at = {now}
FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS attempt
      FROM json_each(:runs)) AS d
WHERE workflow_run.id = d.id AND +status = 'leased' AND +leased_by = :worker
  AND workflow_run.attempt = d.attempt
RETURNING id, attempt""",
    # Claim due runs of the worker's types ({filter}) in claim order; attempt counts claims.
    # Without statistics SQLite prefers the type index and sorts every due run on each claim;
    # walking the claim-order index stops after LIMIT rows (0.2 ms instead of 6 ms with 20,000
    # runs queued). A zoned time (longer than minflow's forms, see minflow_run_zoned) compares
    # at the wrong instant: it waits for repair_times to rewrite it (the index holds run_at).
    "claim": """
UPDATE {workflow_run} SET status = 'leased', attempt = attempt + 1, leased_by = :worker,
  lease_until = {later:lease}, updated_at = {now}
WHERE id IN (SELECT id FROM {workflow_run} INDEXED BY minflow_run_claim
             WHERE status = 'pending' AND deleted_at IS NULL AND run_at <= {now}
               AND length(run_at) <= 23 AND ({filter})
             ORDER BY priority, run_at, created_at, rowid LIMIT :limit)
RETURNING id, type, payload, attempt, max_attempts, priority,
  COALESCE(julianday(run_at), 0), COALESCE(julianday(created_at), 0), snoozes, rowid""",
    # The same when the worker caps some types ({filter} then leaves them out): each capped
    # type ({capped}: one arm per type, see _sqlite_capped_arms) adds at most its room (:r0...)
    # of its due runs, and the whole claim still takes the first :limit in claim order.
    "claim_capped": """
UPDATE {workflow_run} SET status = 'leased', attempt = attempt + 1, leased_by = :worker,
  lease_until = {later:lease}, updated_at = {now}
WHERE id IN (SELECT id FROM (
    SELECT * FROM (SELECT id, priority, run_at, created_at, rowid AS seq
                   FROM {workflow_run} INDEXED BY minflow_run_claim
                   WHERE status = 'pending' AND deleted_at IS NULL AND run_at <= {now} AND ({filter})
                   ORDER BY priority, run_at, created_at, rowid LIMIT :limit){capped})
  ORDER BY priority, run_at, created_at, seq LIMIT :limit)
RETURNING id, type, payload, attempt, max_attempts, priority,
  COALESCE(julianday(run_at), 0), COALESCE(julianday(created_at), 0), snoozes, rowid""",
    # Is anything claimable? (read-only pre-check)
    "has_work": """
SELECT 1 FROM {workflow_run} WHERE status = 'pending' AND deleted_at IS NULL AND run_at <= {now}
AND length(run_at) <= 23 AND ({filter}) LIMIT 1""",
    # Pending runs whose run_at is not minflow's UTC text (the partial index minflow_run_zoned).
    "zoned_runs": """
SELECT id, run_at FROM {workflow_run} WHERE status = 'pending' AND length(run_at) > 23
LIMIT :limit""",
    # Rewrite one as UTC text, unless it changed meanwhile.
    "set_run_at": """
UPDATE {workflow_run} SET run_at = :run_at
WHERE id = :id AND status = 'pending' AND run_at = :old RETURNING id""",
    # Has any lease expired? (read-only: spares the sweep's write transaction most of the time)
    "lease_expired": """
SELECT 1 FROM {workflow_run} WHERE status = 'leased' AND lease_until < {now} LIMIT 1""",
    # Expired leases go back to pending, or to failed once attempts are used up (crash loops end).
    "rescue": """
UPDATE {workflow_run} SET status = CASE WHEN attempt >= max_attempts THEN 'failed' ELSE 'pending' END,
  run_at = CASE WHEN attempt >= max_attempts THEN run_at ELSE {now} END, updated_at = {now},
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
    # How many runs a bulk cancel would cancel: pending and leased runs counted apart, each
    # from its partial index (minflow_run_claim, minflow_run_lease).
    "count_cancel": """
SELECT (SELECT COUNT(*) FROM {workflow_run} WHERE status = 'pending' AND deleted_at IS NULL{filters})
     + (SELECT COUNT(*) FROM {workflow_run} WHERE status = 'leased' AND deleted_at IS NULL{filters})""",
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
    # Pending and leased runs are picked apart, each from its partial index, as count_cancel
    # (the unary + keeps SQLite off minflow_run_created, which holds finished runs too).
    "cancel_batch": """
UPDATE {workflow_run} SET status = 'cancelled', updated_at = {now}
WHERE id IN (SELECT id FROM (SELECT id FROM {workflow_run} WHERE status = 'pending'
                             AND deleted_at IS NULL AND +created_at <= {time:started}{filters}
                             LIMIT :limit)
             UNION ALL
             SELECT id FROM (SELECT id FROM {workflow_run} WHERE status = 'leased'
                             AND deleted_at IS NULL AND +created_at <= {time:started}{filters}
                             LIMIT :limit)
             LIMIT :limit)
RETURNING id""",
}


def _sqlite_type_filter(types: int, prefixes: int, capped: int = 0) -> str:
    """The SQLite claim's {filter} for that many exact types (``:t0``...) and literal prefixes
    (``:g0``..., GLOB patterns), OR-ed, leaving out the capped types (``:c0``...); with neither
    types nor prefixes it matches nothing."""
    terms = [f"type GLOB :g{i}" for i in range(prefixes)]
    if types:
        terms.insert(0, "type IN (" + ", ".join(f":t{i}" for i in range(types)) + ")")
    matched = " OR ".join(terms) or "0"
    if not capped:
        return matched
    return f"({matched}) AND type NOT IN (" + ", ".join(f":c{i}" for i in range(capped)) + ")"


def _sqlite_capped_arms(capped: int) -> str:
    """The "claim_capped" statement's {capped}: per capped type ``:c<i>``, its first ``:r<i>``
    due runs in claim order (its room below the cap)."""
    return "".join(
        " UNION ALL SELECT * FROM (SELECT id, priority, run_at, created_at, rowid FROM "
        "{workflow_run} WHERE status = 'pending' AND deleted_at IS NULL AND run_at <= {now} "
        f"AND type = :c{i} ORDER BY priority, run_at, created_at, rowid LIMIT :r{i})"
        for i in range(capped)
    )


def _sqlite_room_filter(capped: int) -> str:
    """The has_work pre-check's addition for capped types: due work of one with room counts."""
    return "".join(f" OR (type = :c{i} AND :r{i} > 0)" for i in range(capped))


_SQLITE_SLOTS = {
    "now": "strftime('%Y-%m-%d %H:%M:%f', 'now')",
    # 'now' is fixed per statement; events of one statement keep their order by id.
    "clock": "strftime('%Y-%m-%d %H:%M:%f', 'now')",
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
    "capped": "",
}

# -- PostgreSQL's own statements --------------------------------------------------------------

# The claim/complete cycle, written once with its choice of runs (<picked>) left open.
_PG_CYCLE = """
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
    snoozes = CASE WHEN d.kind = 'snoozed' THEN r.snoozes + 1 ELSE r.snoozes END,
    run_at = CASE WHEN d.kind = 'succeeded' OR (d.kind = 'failed' AND r.attempt >= r.max_attempts)
                  THEN r.run_at ELSE NOW() + make_interval(secs => d.delay) END,
    updated_at = NOW()
  FROM d
  WHERE r.id = d.id AND r.status = 'leased' AND r.leased_by = :worker AND r.attempt = d.attempt
  RETURNING r.id, r.status, r.attempt, d.kind, d.error, d.delay
), done_events AS (
  INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at)
  SELECT id, {event_type}, {outcome_data}, clock_timestamp()
  FROM done
), prefetched AS (
  -- Handlers of prefetched runs that started since the last cycle (:start_ids), for runs that
  -- still exist (see SQLite's insert_started). NOW() is the statement's start: before this
  -- statement's outcomes, after the claim's events (an earlier statement).
  INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at)
  SELECT r.id, 'started', jsonb_build_object('worker_id', CAST(:worker AS text)), NOW()
  FROM unnest(CAST(:start_ids AS uuid[])) AS s(id)
  JOIN {workflow_run} r ON r.id = s.id
), <picked>, claimed AS (
  UPDATE {workflow_run} r SET status = 'leased', attempt = r.attempt + 1, leased_by = :worker,
    lease_until = NOW() + make_interval(secs => :lease), updated_at = NOW()
  FROM picked WHERE r.id = picked.id
  RETURNING r.id, r.type, r.payload, r.attempt, r.max_attempts, r.priority, r.run_at, r.created_at,
    r.snoozes, clock_timestamp() AS at
), ranked AS (
  -- Claim order, which the worker starts them in: the first :start_now start at once, the
  -- rest wait in its prefetch buffer (their started events come when they start).
  SELECT *, row_number() OVER (ORDER BY priority, run_at, created_at, id) AS rn FROM claimed
), claim_events AS (
  -- Distinct times, in causal order: a reader ordering by time alone (the Go library's) sees
  -- leased before started; ids, drawn in this order, agree.
  INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at)
  SELECT id, 'leased', jsonb_build_object('worker_id', CAST(:worker AS text), 'attempt', attempt), at
  FROM ranked
  UNION ALL
  SELECT id, 'started', jsonb_build_object('worker_id', CAST(:worker AS text)),
    at + interval '1 microsecond'
  FROM ranked WHERE rn <= :start_now AND type = ANY(CAST(:handled AS text[]))
)
-- Two JSON arrays in one row: the driver decodes them in C instead of value by value in Python.
SELECT (SELECT COALESCE(json_agg(json_build_array(id, type, payload, attempt, max_attempts, priority,
                                                  extract(epoch FROM run_at),
                                                  extract(epoch FROM created_at), snoozes)
                                 ORDER BY rn), '[]')
        FROM ranked),
       (SELECT COALESCE(json_agg(json_build_array(id, status, attempt)), '[]') FROM done)"""
# The runs a cycle claims: due, of the worker's types, in claim order, skipping rows other
# workers are locking.
_PG_PICK = """picked AS (
  SELECT id FROM {workflow_run}
  WHERE status = 'pending' AND deleted_at IS NULL AND run_at <= NOW()
    AND (type = ANY(CAST(:claim_types AS text[])) OR type LIKE ANY(CAST(:patterns AS text[])))
  ORDER BY priority, run_at, created_at
  LIMIT :limit
  FOR UPDATE SKIP LOCKED
)"""
# The same when the worker caps some types: the first arm leaves them out, the second adds
# per capped type (:capped) at most its room (:room) of its own due runs, and the first :limit
# of both in claim order are taken. Rows an arm locked but the outer LIMIT drops stay pending.
_PG_PICK_CAPPED = """picked AS (
  SELECT id FROM (
    SELECT * FROM (
      SELECT id, priority, run_at, created_at FROM {workflow_run}
      WHERE status = 'pending' AND deleted_at IS NULL AND run_at <= NOW()
        AND (type = ANY(CAST(:claim_types AS text[])) OR type LIKE ANY(CAST(:patterns AS text[])))
        AND type <> ALL(CAST(:capped AS text[]))
      ORDER BY priority, run_at, created_at
      LIMIT :limit
      FOR UPDATE SKIP LOCKED
    ) AS uncapped
    UNION ALL
    SELECT c.* FROM unnest(CAST(:capped AS text[]), CAST(:room AS int[])) AS k(type, room)
    CROSS JOIN LATERAL (
      SELECT id, priority, run_at, created_at FROM {workflow_run}
      WHERE status = 'pending' AND deleted_at IS NULL AND run_at <= NOW() AND type = k.type
      ORDER BY priority, run_at, created_at
      LIMIT k.room
      FOR UPDATE SKIP LOCKED
    ) AS c
  ) AS due
  ORDER BY priority, run_at, created_at
  LIMIT :limit
)"""

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
SELECT NULL FROM (SELECT pg_notify(:channel, {ascii:ins.type}) FROM ins GROUP BY type) AS notified""",
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
SELECT pg_notify(:channel, {ascii:ins.type}) FROM ins""",
    # The runs holding these idempotency keys (the rows a batch submit skipped).
    "runs_by_keys": (
        "SELECT idempotency_key, id FROM {workflow_run} "
        "WHERE idempotency_key = ANY(CAST(:keys AS text[]))"
    ),
    # Write a batch of outcomes (fenced; a JSON array of [id, attempt, kind, result, error,
    # delay]) and claim up to :limit runs, with every event, in one round trip. Outcomes and
    # claims touch different rows: a run being completed is 'leased'.
    "cycle": _PG_CYCLE.replace("<picked>", _PG_PICK),
    # The same for a worker that caps some types (see _PG_PICK_CAPPED).
    "cycle_capped": _PG_CYCLE.replace("<picked>", _PG_PICK_CAPPED),
    # Expired leases back to pending (or failed when attempts are used up), with their events.
    "rescue": """
WITH expired AS (
  SELECT id FROM {workflow_run} WHERE status = 'leased' AND lease_until < NOW()
  ORDER BY lease_until LIMIT :limit FOR UPDATE SKIP LOCKED
), r AS (
  UPDATE {workflow_run} w SET status = CASE WHEN w.attempt >= w.max_attempts THEN 'failed' ELSE 'pending' END,
    run_at = CASE WHEN w.attempt >= w.max_attempts THEN w.run_at ELSE NOW() END, updated_at = NOW(),
    last_error = 'lease expired: worker ' || COALESCE(w.leased_by, '?') || ' stopped before finishing'
  FROM expired WHERE w.id = expired.id
  RETURNING w.id, w.type, w.status, w.attempt, w.leased_by
), ev AS (
  INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at)
  SELECT id, {event_type}, {rescue_data}, clock_timestamp()
  FROM r
)
SELECT id, type, status, attempt, leased_by FROM r""",
    # Give back prefetched runs a stopping worker never started: pending again, the claim
    # undone (attempt, owner, lease), fenced like outcomes, with their events and a NOTIFY
    # per type.
    "release": """
WITH r AS (
  UPDATE {workflow_run} w SET status = 'pending', attempt = w.attempt - 1, leased_by = NULL,
    lease_until = NULL, updated_at = NOW()
  FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[])) AS h(id, attempt)
  WHERE w.id = h.id AND w.attempt = h.attempt AND w.status = 'leased' AND w.leased_by = :worker
  RETURNING w.id, w.type, w.attempt
), ev AS (
  INSERT INTO {workflow_event} (workflow_id, event_type, data, created_at)
  SELECT id, 'retried', jsonb_build_object('reason', 'released', 'attempt', attempt,
                                           'worker_id', CAST(:worker AS text)), clock_timestamp()
  FROM r
)
SELECT CAST(id AS text) FROM r
UNION ALL
SELECT NULL FROM (SELECT pg_notify(:channel, {ascii:r.type}) FROM r GROUP BY type) AS notified""",
    # Automatic heartbeat for every run a worker holds; never shortens a longer explicit lease.
    "extend_leases": """
UPDATE {workflow_run} r SET lease_until = GREATEST(r.lease_until, NOW() + make_interval(secs => :lease)),
  updated_at = NOW()
FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[])) AS h(id, attempt)
WHERE r.id = h.id AND r.attempt = h.attempt AND r.status = 'leased' AND r.leased_by = :worker
RETURNING r.id""",
    # Wake the workers listening on this schema's channel, naming the run type submitted.
    "notify": "SELECT pg_notify(:channel, {ascii:type})",
    # Subscribe this connection to the schema's channel.
    "listen": "LISTEN {channel}",
    # The database a connection is on (a caller's must be the client's).
    "database": "SELECT current_database()",
    # Does the DSN's schema hold minflow's tables? (A caller's connection, before writing.)
    "has_schema": (
        "SELECT to_regclass(quote_ident(CAST(:schema AS text)) || '.workflow_run') IS NOT NULL "
        "AND to_regclass(quote_ident(CAST(:schema AS text)) || '.workflow_event') IS NOT NULL"
    ),
    # The server process this connection reaches; through a pooler it is not the one whose
    # cancel key the start-up carried (see _PgConnection.pooled).
    "backend_pid": "SELECT pg_backend_pid()",
    # Can the database take writes? transaction_read_only is on on a standby and on a primary
    # demoted by a failover (default_transaction_read_only); no table is read.
    "health": "SELECT current_setting('transaction_read_only') = 'on', pg_is_in_recovery()",
    # Runs finished (succeeded, or failed for good) per minute since :since, from their events
    # by idx_workflow_event_type.
    "throughput": (
        "SELECT date_trunc('minute', created_at), event_type, COUNT(*) FROM {workflow_event} "
        "WHERE event_type IN ('succeeded', 'failed') AND created_at >= {time:since} "
        "GROUP BY 1, 2"
    ),
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
    # A NOTIFY payload as ASCII (bytes above 127 as \ooo escapes): pg8000 decodes channel
    # and payload as ASCII, and one non-ASCII type would cut every LISTEN connection.
    "ascii": "encode(convert_to(CAST({} AS text), 'UTF8'), 'escape')",
    "now": "NOW()",
    "clock": "clock_timestamp()",
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
    if "no such column" in text:
        return MinflowError(
            f"{text}: the minflow schema is out of date; run Client.migrate() or `minflow migrate`"
        )
    if isinstance(exc, sqlite3.IntegrityError):
        return InvalidInput(f"rejected by the database: {text}")
    if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or "disk is full" in text:
        # SQLite rolls the transaction back, so the call wrote nothing and can be repeated.
        return Unavailable(
            f"SQLite disk full ({text}): no space for the database file or its WAL; "
            "nothing was written, repeat the call once space is freed"
        )
    if isinstance(exc, sqlite3.OperationalError) and ("disk" in text or "unable to open" in text):
        return Unavailable(f"SQLite: {text}")
    return MinflowError(f"SQLite: {text}")


class _StatementMode:
    """Whether a dialect's PostgreSQL connections prepare their statements under a name.

    Named (the default on a direct connection): a statement is parsed and planned once per
    connection, then only bound and executed. Unnamed: parsed at every execution, in the same
    single round trip; the only form that works through PgBouncer in transaction mode, where a
    statement prepared on one server connection is missing from the next. The DSN chooses
    (``prepared_statements=no``, or lib/pq's ``binary_parameters=yes``), and with the default
    ``auto`` a pooler that shows itself switches the dialect to unnamed for good, with one
    warning: at connect time (see ``_PgConnection.pooled``), or when the server no longer knows
    a statement this connection prepared (26000) or already has its name (42P05).
    ``prepared_statements=yes`` skips the connect-time check (a pooler that keeps statements,
    such as PgBouncer 1.21+ with max_prepared_statements); the server's errors still switch.
    """

    def __init__(self, dsn: _DSN):
        self.named = not dsn.binary_parameters and dsn.prepared_statements != "no"
        self.check_pooler = dsn.prepared_statements == "auto"
        self._where = dsn.text
        self._lock = threading.Lock()

    def unname(self, why: str) -> None:
        """Stop naming statements on every connection of this dialect; warns the first time."""
        with self._lock:
            first, self.named = self.named, False
        if first:
            log.warning(
                "%s: %s; statements are now parsed at each execution instead of prepared once. "
                "Add prepared_statements=no (or binary_parameters=yes) to the DSN to start so.",
                self._where,
                why,
            )


@_dataclass
class _PgStatement:
    """A statement as one connection runs it: $n placeholders, and once prepared its name."""

    text: str
    values: Callable[[dict], tuple]  # :name parameters -> values in placeholder order
    name: bytes | None = None  # NUL-terminated, as the protocol sends it
    columns: Any = None  # pg8000's row description, for decoding rows of the named statement
    input_funcs: Any = None


class _PgWire(NamedTuple):
    """pg8000's own pieces that the one-round-trip statements are built from: its placeholder
    rewriting, its parameter encoding, and its reply handling (a Context collects one reply)."""

    to_statement: Callable[[str], tuple[str, Callable[[dict], tuple]]]
    make_params: Callable[[Any, tuple], tuple]
    context: Callable[..., Any]


@functools.cache
def _pg_wire() -> _PgWire | None:
    """pg8000's pieces for one-round-trip statements, or None (said once in the log) when this
    pg8000 lacks one: statements then take pg8000's run(), see ``_PgConnection``."""
    import pg8000.converters
    import pg8000.core
    import pg8000.native

    found = {
        "core.Context": getattr(pg8000.core, "Context", None),
        "native.to_statement": getattr(pg8000.native, "to_statement", None),
        "converters.make_params": getattr(pg8000.converters, "make_params", None),
        "CoreConnection.handle_messages": getattr(
            pg8000.core.CoreConnection, "handle_messages", None
        ),
    }
    missing = sorted(name for name, value in found.items() if not callable(value))
    if missing:
        log.warning(
            "pg8000 %s has no %s: statements with parameters use pg8000's run() (three "
            "round trips, each outside a transaction wrapped in one of its own)",
            getattr(pg8000.native, "__version__", "?"),
            ", ".join(missing),
        )
        return None
    return _PgWire(
        found["native.to_statement"], found["converters.make_params"], found["core.Context"]
    )


def _set_keepalive(sock: Any, timeout: float) -> None:
    """TCP keepalive, and where the platform has it TCP_USER_TIMEOUT (data unacknowledged for
    ``timeout`` seconds ends the connection), on a PostgreSQL socket; nothing on Unix sockets."""
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return
    idle, interval, probes = PG_KEEPALIVE
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (
        # macOS names the idle time TCP_KEEPALIVE.
        ("TCP_KEEPIDLE" if hasattr(socket, "TCP_KEEPIDLE") else "TCP_KEEPALIVE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", probes),
        ("TCP_USER_TIMEOUT", int(timeout * 1000)),
    ):
        number = getattr(socket, name, None)
        if number is not None:
            options.append((socket.IPPROTO_TCP, number, value))
    for level, option, value in options:
        with contextlib.suppress(OSError):  # a platform that has the name but not the option
            sock.setsockopt(level, option, value)


def _pg_message(code: bytes, *parts: bytes) -> bytes:
    """One frontend message of the PostgreSQL protocol: type byte, length, body."""
    body = b"".join(parts)
    return code + (len(body) + 4).to_bytes(4, "big") + body


def _pg_bind(name: bytes, values: tuple) -> bytes:
    """Bind ``values`` (text, or None for NULL) to statement ``name`` in the unnamed portal,
    every parameter and result column in text format, as pg8000 binds them."""
    parts = [b"\0", name, b"\0\0", len(values).to_bytes(2, "big")]
    for value in values:
        if value is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            data = value.encode("utf-8")
            parts += [len(data).to_bytes(4, "big"), data]
    parts.append(b"\0\0")
    return _pg_message(b"B", *parts)


# Describe the unnamed portal (its columns), execute it without a row limit, and Sync: the end
# of the request, after which a pooler may hand the server connection to another client.
_PG_DESCRIBE = _pg_message(b"D", b"P\0")
_PG_EXECUTE = _pg_message(b"E", b"\0", b"\0\0\0\0")
_PG_SYNC = _pg_message(b"S")
_PG_STATEMENT_GONE = ("26000", "42P05")  # prepared statement missing, or its name taken


class _PgConnection(_Connection):
    """A pg8000 connection; the only code that touches pg8000's connection object.

    A statement without parameters goes out as one simple query. One with parameters goes out
    in one write and comes back in one round trip: Parse, Bind, Describe, Execute and Sync,
    read with pg8000's own message handling (pg8000's run() takes three round trips, each ended
    by a Sync, and PgBouncer in transaction mode may hand each to another server connection).
    Named (see ``_StatementMode``), the Parse happens on first use only, under a name unique to
    this connection: behind a pooler a server connection carries the statements of every client
    that used it, and a shared name (pg8000's are ``pg8000_statement_N``) would run another
    client's statement with these parameters.
    """

    def __init__(
        self,
        raw: Any,
        errors: Any,
        sql: dict[str, str],
        mode: _StatementMode,
        wire: _PgWire | None,
    ):
        self.raw = raw
        self._errors = errors
        self.sql = sql
        self._mode = mode
        self._wire = wire
        self._statements: dict[str, _PgStatement] = {}
        self._prefix = f"minflow_{uuid.uuid4().hex[:16]}_"
        self._named = 0  # statements named so far: the next name's number
        self._in_transaction = False

    def query(self, sql: str, params: dict | None = None) -> list:
        try:
            if params is None:
                return self.raw.run(sql) or []
            params = {k: _pg_array(v) if isinstance(v, list) else v for k, v in params.items()}
            if self._wire is None:
                return self._run(sql, params)
            return self._execute(sql, params)
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
            # A socket error (a timeout too), a short read, or (closed connection) an attribute
            # of its None socket.
            self.broken = True
            raise Unavailable(f"PostgreSQL connection lost: {exc}") from exc

    def _execute(self, sql: str, params: dict) -> list:
        statement = self._statements.get(sql)
        if statement is None:
            statement = self._statements[sql] = _PgStatement(*self._wire.to_statement(sql))
        values = self._wire.make_params(self.raw.py_types, statement.values(params))
        if not self._mode.named:
            return self._round_trip(statement, values, b"\0", parse=True).rows or []
        first = statement.name is None
        name = statement.name or f"{self._prefix}{self._named}".encode("ascii") + b"\0"
        try:
            context = self._round_trip(statement, values, name, parse=first)
        except self._errors.DatabaseError as exc:
            code = exc.args[0].get("C") if exc.args and isinstance(exc.args[0], dict) else None
            if code not in _PG_STATEMENT_GONE:
                raise
            # Nothing ran: the server refused the statement before executing it.
            self._mode.unname(
                f"the server {'lost' if code == '26000' else 'already had'} a statement this "
                f"connection prepared ({code}): a connection pooler stands between"
            )
            self._statements.clear()
            if self._in_transaction:  # the error aborted the transaction: all of it again
                raise Unavailable(
                    "PostgreSQL statement vanished behind a connection pooler; switched to "
                    "unnamed statements, retry"
                ) from exc
            return self._execute(sql, params)
        finally:
            if first:
                self._named += 1  # never reused, even after an error: the server may keep it
        if first:
            statement.name, statement.columns = name, context.columns
            statement.input_funcs = context.input_funcs
        return context.rows or []

    def _round_trip(self, statement: _PgStatement, values: tuple, name: bytes, parse: bool) -> Any:
        # One write, no Flush messages in it: the server answers everything in one packet.
        if parse:
            context = self._wire.context(statement.text)
            request = [
                _pg_message(b"P", name, statement.text.encode("utf-8"), b"\0\0\0"),
                _pg_bind(name, values),
                _PG_DESCRIBE,
            ]
        else:
            context = self._wire.context(
                statement.text, columns=statement.columns, input_funcs=statement.input_funcs
            )
            request = [_pg_bind(name, values)]
        self.raw._sock.write(b"".join((*request, _PG_EXECUTE, _PG_SYNC)))
        self.raw._sock.flush()
        self.raw.handle_messages(context)
        return context

    def _run(self, sql: str, params: dict) -> list:
        # pg8000's run() (see _pg_wire): outside a transaction its three Syncs could reach three
        # server connections behind a pooler, so it gets a transaction of its own.
        if self._in_transaction:
            return self.raw.run(sql, **params) or []
        self.raw.run(self.sql["begin"])
        try:
            rows = self.raw.run(sql, **params) or []
        except BaseException:
            with contextlib.suppress(Exception):
                self.raw.run(self.sql["rollback"])
            raise
        self.raw.run(self.sql["commit"])
        return rows

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Connection]:
        self._in_transaction = True
        try:
            with super().transaction() as conn:
                yield conn
        finally:
            self._in_transaction = False

    def pooled(self) -> bool | None:
        """True when a pooler stands between: the server process answering is not the one
        whose cancel key the start-up carried (PgBouncer and its kind hand out keys of their
        own); None when this pg8000 does not show that key. One round trip."""
        key = getattr(self.raw, "_backend_key_data", None)
        if not isinstance(key, (bytes, bytearray)) or len(key) < 4:
            return None
        pid = int.from_bytes(key[:4], "big", signed=True)
        return self.query(self.sql["backend_pid"])[0][0] != pid

    def forget_prepared(self) -> None:
        """Prepare statements afresh from now on (plans prepared before DDL may be stale); the
        old names are never used again and end with the session."""
        self._statements.clear()

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

    def take_notifications(self) -> list[str]:
        """Read what the server sent (one round trip, within the socket's deadline) and return
        the payloads of the notifications that arrived."""
        self.query(self.sql["poll"])
        payloads = [payload for _, _, payload in self.raw.notifications]
        self.raw.notifications.clear()
        return payloads

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


_PG_NETWORK = _regex(
    "_PG_NETWORK", r"(?i)network|connection|closed|timed? ?out|socket|EOF|read|write|SSL"
)
_PG_UNAVAILABLE = ("08", "53", "57", "58")  # connection, resources, operator intervention, system


def _translate_pg(exc: Exception) -> MinflowError:
    info = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    code, message = info.get("C", ""), info.get("M", str(exc))
    if code.startswith(_PG_UNAVAILABLE) or code in ("40001", "40P01", "55P03"):
        return Unavailable(f"PostgreSQL unavailable ({code}): {message}")
    if code == "25006":
        # A standby, or a primary demoted by a failover: writes return with the new primary.
        return Unavailable(f"PostgreSQL is read-only ({code}): {message}")
    if code in ("42P01", "3F000"):
        return MinflowError(
            f"{message}: the minflow schema is missing; run Client.migrate() or `minflow migrate`"
        )
    if code == "42703":  # undefined column
        return MinflowError(
            f"{message}: the minflow schema is out of date; run Client.migrate() or `minflow migrate`"
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


@_dataclass
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


@_dataclass
class _Filter:
    """Which runs a worker may claim: exact types and/or literal prefixes, except the capped
    types, which come with their room (how many more of each may start now, maybe 0)."""

    types: tuple[str, ...]
    prefixes: tuple[str, ...]
    handled: frozenset[str]
    capped: tuple[tuple[str, int], ...] = ()


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
    snoozes: int = 0  # Retry requests since submit or retry()


# -- the caller's own connection --------------------------------------------------------------
# Client.submit(connection=...) runs minflow's statements on a connection the caller opened,
# inside the caller's transaction. A driver is recognised by its connection type's module and
# name, so none is imported for this; a _Driver knows how to run a statement on its connection
# and what state the connection's transaction is in.

# What minflow does with a caller's connection, by the state of its transaction:
#   closed, failed  refuses it (InvalidInput)
#   open            runs its statements in a savepoint of the caller's transaction
#   pending         none is open yet, but the caller's statements run in transactions the
#                   driver opens (the DB-API default): minflow's first statement opens it, and
#                   the caller commits it
#   autocommit      none is open and none will be: the call is a transaction of its own
_CLOSED, _FAILED, _OPEN, _PENDING, _AUTOCOMMIT = "closed", "failed", "open", "pending", "autocommit"
_ABORTED = (
    "the caller's transaction is aborted (a statement in it failed): roll it back, then submit "
    "again; nothing was written"
)


class _Driver:
    """How minflow uses one driver's connections when a caller hands one in."""

    label = ""  # the connection type, as messages name it
    dialect = ""  # the dialect whose database it reaches
    package = ""  # the driver's top-level module, which its exceptions come from
    paramstyle = "named"
    percent_in_quotes = False  # a format-style driver reads % inside quoted text too
    begins_itself = True  # in the pending state, the driver begins the transaction itself

    def style(self, raw: Any) -> str:
        """The paramstyle of this connection's next statement."""
        return self.paramstyle

    def state(self, raw: Any) -> str:
        raise NotImplementedError

    def execute(self, raw: Any, sql: str, args: dict[str, Any] | tuple[Any, ...] | None) -> Any:
        """The statement's rows as tuples (an empty list for a statement without rows)."""
        raise NotImplementedError

    def value(self, value: Any) -> Any:
        """A parameter value as this dialect's statements expect it."""
        return value

    def error(self, exc: Exception) -> MinflowError | None:
        """``exc`` as minflow reports it, or None if it is not the driver's."""
        raise NotImplementedError


class _Sqlite3Driver(_Driver):
    label = "sqlite3.Connection"
    dialect = "sqlite"
    package = "sqlite3"
    # sqlite3 (outside autocommit mode) begins its implicit transaction only before an INSERT,
    # UPDATE, DELETE or REPLACE, and deferred; minflow begins it first, IMMEDIATE, so that the
    # caller's later read-then-write cannot fail with SQLITE_BUSY without waiting.
    begins_itself = False

    def state(self, raw: Any) -> str:
        try:
            if raw.in_transaction:
                return _OPEN
        except sqlite3.ProgrammingError:
            return _CLOSED
        # Python 3.12's autocommit attribute: True, False (always in a transaction), or
        # LEGACY_TRANSACTION_CONTROL, where isolation_level None means autocommit.
        autocommit = getattr(raw, "autocommit", None)
        if autocommit is True or (autocommit is not False and raw.isolation_level is None):
            return _AUTOCOMMIT
        return _PENDING

    def execute(self, raw: Any, sql: str, args: dict[str, Any] | tuple[Any, ...] | None) -> Any:
        cursor = raw.cursor()
        cursor.row_factory = None  # tuples, whatever the caller's connection makes
        try:
            return cursor.execute(sql, args or ()).fetchall()
        finally:
            cursor.close()

    def value(self, value: Any) -> Any:
        return _sqlite_time(value) if isinstance(value, _dt.datetime) else value

    def error(self, exc: Exception) -> MinflowError | None:
        if not isinstance(exc, sqlite3.Error):
            return None
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_BUSY_SNAPSHOT":
            return Unavailable(
                "the caller's transaction read the database before minflow's first write, and "
                "another connection has written since (SQLITE_BUSY_SNAPSHOT): roll it back and "
                "retry; a transaction begun with BEGIN IMMEDIATE cannot meet this"
            )
        return _translate_sqlite(exc)


class _PgDriver(_Driver):
    dialect = "postgres"

    def value(self, value: Any) -> Any:
        return _pg_array(value) if isinstance(value, list) else value

    def error(self, exc: Exception) -> MinflowError | None:
        if not isinstance(exc, (OSError, EOFError)) and (
            type(exc).__module__.partition(".")[0] != self.package
        ):
            return None
        # pg8000 puts the server's fields in a dict; psycopg and psycopg2 in attributes.
        fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        code = fields.get("C") or getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        diag = getattr(exc, "diag", None)
        message = fields.get("M") or getattr(diag, "message_primary", None) or str(exc).strip()
        if code == "25P02":
            return InvalidInput(_ABORTED)
        if code:
            return _translate_pg(Exception({"C": code, "M": message}))
        kinds = {cls.__name__ for cls in type(exc).__mro__}
        if (
            isinstance(exc, (OSError, EOFError))
            or "OperationalError" in kinds
            or ("InterfaceError" in kinds and _PG_NETWORK.search(message))
        ):
            return Unavailable(f"PostgreSQL connection lost ({self.label}): {message}")
        return MinflowError(f"{self.label}: {message}")


class _Pg8000Driver(_PgDriver):
    label = "pg8000.native.Connection"
    package = "pg8000"

    def state(self, raw: Any) -> str:
        # pg8000 has no public accessors for these: its socket is None once closed, and its
        # transaction status is the last ReadyForQuery's (I, T or E; None before any).
        if getattr(raw, "_usock", None) is None:
            return _CLOSED
        status = getattr(raw, "_transaction_status", None)
        if status == b"E":
            return _FAILED
        if status == b"T":
            return _OPEN
        return self._idle(raw)

    def _idle(self, raw: Any) -> str:
        return _AUTOCOMMIT  # pg8000.native begins no transaction by itself

    def execute(self, raw: Any, sql: str, args: dict[str, Any] | tuple[Any, ...] | None) -> Any:
        return (raw.run(sql, **args) if isinstance(args, dict) else raw.run(sql)) or []


class _Pg8000DbapiDriver(_Pg8000Driver):
    label = "pg8000.dbapi.Connection"

    def _idle(self, raw: Any) -> str:
        return _AUTOCOMMIT if raw.autocommit else _PENDING

    def style(self, raw: Any) -> str:
        # pg8000.dbapi reads one module-wide paramstyle at each execute: follow it.
        return str(sys.modules["pg8000.dbapi"].paramstyle)

    def _cursor(self, raw: Any) -> Any:
        return raw.cursor()

    def execute(self, raw: Any, sql: str, args: dict[str, Any] | tuple[Any, ...] | None) -> Any:
        cursor = self._cursor(raw)
        try:
            if args is None:
                cursor.execute(sql)
            else:
                cursor.execute(sql, args)
            return cursor.fetchall() if cursor.description else []
        finally:
            cursor.close()


class _Pg8000LegacyDriver(_Pg8000DbapiDriver):
    label = "pg8000.legacy.Connection"

    def style(self, raw: Any) -> str:
        return "named"

    def _cursor(self, raw: Any) -> Any:
        cursor = raw.cursor()
        cursor.paramstyle = "named"  # this cursor's own, unlike pg8000.dbapi's
        return cursor


def _libpq_state(status: int, autocommit: bool) -> str:
    """A state from libpq's PQtransactionStatus: idle, active, in transaction, in error, unknown."""
    if status == 3:
        return _FAILED
    if status in (1, 2):
        return _OPEN
    if status == 4:
        return _CLOSED  # the connection is bad
    return _AUTOCOMMIT if autocommit else _PENDING


class _PsycopgDriver(_PgDriver):
    label = "psycopg.Connection"
    package = "psycopg"
    paramstyle = "pyformat"
    percent_in_quotes = True

    def state(self, raw: Any) -> str:
        if raw.closed:
            return _CLOSED
        return _libpq_state(int(raw.info.transaction_status), raw.autocommit)

    def execute(self, raw: Any, sql: str, args: dict[str, Any] | tuple[Any, ...] | None) -> Any:
        # psycopg is loaded: the caller's connection is one of its objects.
        tuple_row = sys.modules["psycopg.rows"].tuple_row
        with raw.cursor(row_factory=tuple_row) as cursor:
            cursor.execute(sql, args)
            return cursor.fetchall() if cursor.description is not None else []


class _Psycopg2Driver(_PgDriver):
    label = "psycopg2 connection"
    package = "psycopg2"
    paramstyle = "pyformat"
    percent_in_quotes = True

    def state(self, raw: Any) -> str:
        if raw.closed:
            return _CLOSED
        return _libpq_state(raw.get_transaction_status(), raw.autocommit)

    def execute(self, raw: Any, sql: str, args: dict[str, Any] | tuple[Any, ...] | None) -> Any:
        plain = sys.modules["psycopg2.extensions"].cursor  # whatever cursor_factory it has
        with raw.cursor(cursor_factory=plain) as cursor:
            cursor.execute(sql, args)
            return cursor.fetchall() if cursor.description is not None else []


# By (module, name) of a connection class, looked up along the type's MRO (subclasses count).
_DRIVERS: dict[tuple[str, str], _Driver] = {
    ("sqlite3", "Connection"): _Sqlite3Driver(),
    ("pg8000.native", "Connection"): _Pg8000Driver(),
    ("pg8000.dbapi", "Connection"): _Pg8000DbapiDriver(),
    ("pg8000.legacy", "Connection"): _Pg8000LegacyDriver(),
    ("psycopg", "Connection"): _PsycopgDriver(),
    ("psycopg.connection", "Connection"): _PsycopgDriver(),
    ("psycopg2.extensions", "connection"): _Psycopg2Driver(),
}


def _caller_driver(raw: object) -> _Driver | None:
    for cls in type(raw).__mro__:
        driver = _DRIVERS.get((cls.__module__, cls.__qualname__))
        if driver is not None:
            return driver
    return None


class _CallerConnection(_Connection):
    """A caller's own open connection, used for one call and never closed, committed or rolled
    back by minflow: ``transaction()`` is a savepoint in the caller's transaction (or, in
    autocommit mode, a transaction of the call's own), and nests (inner ones join it)."""

    def __init__(self, raw: Any, driver: _Driver, sql: dict[str, str]):
        self.raw = raw
        self.driver = driver
        self.sql = sql
        self._depth = 0

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        driver = self.driver
        try:
            if not params:
                return list(driver.execute(self.raw, sql, None))
            style = driver.style(self.raw)
            text, names = _restyle(sql, style, driver.percent_in_quotes)
            values = {key: driver.value(value) for key, value in params.items()}
            if style in ("named", "pyformat"):
                return list(driver.execute(self.raw, text, values))
            return list(driver.execute(self.raw, text, tuple(values[name] for name in names)))
        except Exception as exc:
            error = driver.error(exc)
            if error is None:
                raise
            raise error from exc

    def usable(self) -> str:
        """The connection's state; ``InvalidInput`` when it is closed or its transaction failed."""
        state = self.driver.state(self.raw)
        if state == _CLOSED:
            raise InvalidInput(f"connection= is closed ({self.driver.label})")
        if state == _FAILED:
            raise InvalidInput(_ABORTED)
        return state

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Connection]:
        if self._depth:
            yield self
            return
        state = self.usable()
        self._depth += 1
        try:
            if state == _AUTOCOMMIT:
                with super().transaction():
                    yield self
                return
            if state == _PENDING and not self.driver.begins_itself:
                self.query(self.sql["begin"])
            self.query(self.sql["savepoint"])
            try:
                yield self
            except BaseException:
                with contextlib.suppress(MinflowError):
                    self.query(self.sql["rollback_to_savepoint"])
                    self.query(self.sql["release_savepoint"])
                raise
            self.query(self.sql["release_savepoint"])
        finally:
            self._depth -= 1

    def close(self) -> None:
        """Nothing: the connection is the caller's."""


# The shape of a dialect's watcher loop (see _Dialect.watcher).
_Watch = Callable[
    [threading.Event, Callable[[], None], Callable[[BaseException | None], None]], "str | None"
]


class _Dialect:
    name = ""
    own_sql: dict[str, str] = {}  # the dialect's statements beside _SQL
    migration_sql: list[tuple[int, str, list[str]]] = []
    fragments: dict[str, str] = {}  # slot -> SQL text
    pool_size = POOL_SIZE
    pool_ping = False  # check a pooled connection that sat idle before handing it out
    create = True  # False: a missing database is an error, never created (SQLite)

    def __init__(self, dsn: _DSN):
        self.dsn = dsn
        self._templates = {**_SQL, **self.own_sql}
        self.sql = {name: _render(text, self.fragments) for name, text in self._templates.items()}
        self.migrations = [
            (version, name, [_render(text, self.fragments) for text in statements])
            for version, name, statements in self.migration_sql
        ]
        self._composed: dict[tuple, str] = {}
        # Callers' connections found to be on this database (see adopt).
        self._adopted: weakref.WeakSet[Any] = weakref.WeakSet()

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

    def describe(self) -> str:
        """The database as resolved, for start-up lines (a password never shows)."""
        return self.dsn.text

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

    # -- a caller's own connection ---------------------------------------------------------
    def database(self, conn: _Connection) -> str:
        """Which database ``conn`` is on, as messages name it; equal for two connections to
        the same database ("" when there is none to share: SQLite in memory)."""
        raise NotImplementedError

    def home(self, connection: Callable[[], contextlib.AbstractContextManager[_Connection]]) -> str:
        """The client's own database as ``database`` names it; ``connection()`` lends one of
        the client's connections."""
        with connection() as conn:
            return self.database(conn)

    def adopt(self, raw: object, ours: Callable[[], str]) -> _CallerConnection:
        """The caller's open connection ``raw``, ready to run this dialect's statements in the
        caller's transaction. ``InvalidInput`` unless it is a supported driver's connection,
        open, outside a failed transaction, and on the client's database (``ours()``, named as
        ``database`` names it); the last check is made once per connection object where the
        connection takes weak references."""
        driver = _caller_driver(raw)
        if driver is None or driver.dialect != self.name:
            supported = ", ".join(
                dict.fromkeys(d.label for d in _DRIVERS.values() if d.dialect == self.name)
            )
            kind = type(raw)
            raise InvalidInput(
                f"connection= takes an open connection to this client's {self.name} database "
                f"({supported}); got {kind.__module__}.{kind.__qualname__}"
            )
        conn = _CallerConnection(raw, driver, self.sql)
        conn.usable()
        try:
            known = raw in self._adopted
        except TypeError:  # no weak references (sqlite3.Connection): checked every call
            known = False
        if not known:
            mine = ours()
            if not mine:
                raise InvalidInput(
                    "connection= needs a database file; this client's database lives in a "
                    "connection of its own (sqlite://:memory:)"
                )
            theirs = self.database(conn)
            if theirs != mine:
                where = repr(theirs) if theirs else "an in-memory database"
                raise InvalidInput(
                    f"connection= is on {where}, but this client's database is {mine!r}"
                )
            self._check_schema(conn)
            with contextlib.suppress(TypeError):
                self._adopted.add(raw)
        return conn

    def _check_schema(self, conn: _CallerConnection) -> None:
        """``InvalidInput`` if the caller's database lacks minflow's tables, where a check can
        tell without side effects; otherwise the first statement's error says so."""

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
        started: Sequence[tuple[str, int]] = (),
        start_now: int | None = None,
    ) -> tuple[list[_Claim], dict[str, tuple[str, int]]]:
        """Write completions and claim up to ``limit`` runs in one transaction; returns the
        claims in claim order and, per recorded outcome, the run's (new status, attempt).
        ``started``: (id, attempt) of prefetched runs whose handlers started since the last
        cycle; ``start_now``: how many of the claims start at once (None: all), the others
        get their started event when they start."""
        raise NotImplementedError

    def release(self, conn: _Connection, worker_id: str, held: list[tuple[str, int]]) -> list[str]:
        """Give back prefetched runs never started (pending, their claim's attempt undone, a
        ``retried`` event each); returns the ids released."""
        raise NotImplementedError

    def rescue(self, conn: _Connection) -> list:
        """Expired leases back to pending or failed; (id, type, status, attempt, leased_by) each."""
        raise NotImplementedError

    def repair_times(self, conn: _Connection) -> int:
        """Rewrite pending runs' times that other tools wrote in a form the claim cannot compare;
        returns how many."""
        return 0

    def extend_leases(
        self, conn: _Connection, worker_id: str, held: list[tuple[str, int]], lease: float
    ) -> set[str]:
        raise NotImplementedError

    def may_have_work(self, conn: _Connection, filt: _Filter) -> bool:
        return True

    def notify(self, conn: _Connection, types: set[str]) -> None:
        """Tell other processes' workers that runs of ``types`` were submitted."""

    def check_listen_dsn(self, dsn: _DSN) -> None:
        """Raise ``InvalidInput`` unless wake-ups can come through ``dsn`` (see ``watcher``)."""
        raise InvalidInput(f"listen_dsn is for PostgreSQL; this queue is on {self.name}")

    def watcher(self, listen: _DSN | None = None) -> _Watch | None:
        """A loop, ``watch(stop, wake, report)``, that calls wake() when another process may
        have submitted work and report(None) or report(error) as its connection works or fails;
        it returns a reason when wake-ups cannot work (the worker then polls). ``listen``: the
        DSN of a direct connection for them, when the DSN's own goes through a pooler."""
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

    def database(self, conn: _Connection) -> str:
        # The file SQLite opened (absolute), symlinks resolved; SQLite names none in memory.
        files = {row[1]: row[2] for row in conn.query(self.sql["database"])}
        return os.path.realpath(files["main"]) if files.get("main") else ""

    def home(self, connection: Callable[[], contextlib.AbstractContextManager[_Connection]]) -> str:
        # Without opening the file: a new connection would switch a file that is not in WAL
        # mode yet, which waits for the caller's transaction to end.
        return "" if self.dsn.memory else os.path.realpath(self.dsn.path)

    # _check_schema stays the base's: reading sqlite_master would give a caller's deferred
    # transaction the read snapshot the "database" statement avoids; a missing table shows as
    # the first INSERT's error instead, inside the savepoint.
    def describe(self):
        return "SQLite in memory" if self.dsn.memory else f"SQLite {self.dsn.path}"

    def decode_json(self, value: Any) -> Any:
        # The Go library binds JSON as []byte, which SQLite stores as BLOB.
        if value is None:
            return None
        if isinstance(value, (bytes, memoryview)):
            value = bytes(value).decode("utf-8")
        return json.loads(value)

    def _open(self) -> sqlite3.Connection:
        target, uri = self.dsn.path, False
        if not self.create and not self.dsn.memory:
            # mode=rw: never create
            target, uri = f"file:{urllib.parse.quote(self.dsn.path)}?mode=rw", True
        raw = sqlite3.connect(
            target,
            timeout=self.dsn.busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
            uri=uri,
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
                path, hint = self.dsn.path, self.dsn.hint
                if not self.create and not os.path.exists(path):
                    raise MinflowError(
                        f"SQLite database {path} does not exist{hint}; `minflow migrate` creates it"
                    ) from exc
                raise Unavailable(f"cannot open SQLite database {path}: {exc}{hint}") from exc
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
        capped = tuple(run_type for run_type, _ in filt.capped)
        cache_key = (filt.types, filt.prefixes, capped)
        cached = self._filters.get(cache_key)
        if cached is None:
            params: dict[str, Any] = {f"t{i}": t for i, t in enumerate(filt.types)}
            for i, prefix in enumerate(filt.prefixes):
                params[f"g{i}"] = self.prefix_pattern(prefix)
            params.update((f"c{i}", t) for i, t in enumerate(capped))
            piece = _sqlite_type_filter(len(filt.types), len(filt.prefixes), len(capped))
            if capped:
                arms = _render(_sqlite_capped_arms(len(capped)), self.fragments)
                claim = self.compose("claim_capped", filter=piece, capped=arms)
                piece += _sqlite_room_filter(len(capped))
            else:
                claim = self.compose("claim", filter=piece)
            cached = self._filters[cache_key] = (
                claim,
                self.compose("has_work", filter=piece),
                params,
            )
        claim, has_work, params = cached
        if filt.capped:  # the rooms change from cycle to cycle
            params = {**params, **{f"r{i}": room for i, (_, room) in enumerate(filt.capped)}}
        return claim, has_work, params

    def _claim(self, row: Sequence) -> _Claim:
        payload = row[2]
        try:
            payload = self.decode_json(payload)
        except ValueError:
            pass  # the handler sees the raw text; decoding is its problem, not the queue's
        return _Claim(row[0], row[1], payload, *row[3:9])

    def cycle(self, conn, worker_id, done, limit, lease, filt, started=(), start_now=None):
        # A handful of statements per batch, whatever its size: outcomes and events travel as
        # one JSON array each, expanded by json_each inside SQLite.
        events: list[list] = []
        finished: dict[str, tuple[str, int]] = {}
        claimed: list[_Claim] = []
        who = json.dumps(worker_id)
        start_data = f'{{"worker_id": {who}}}'
        with conn.transaction():
            if started:  # before the outcomes: a run may have started and finished since
                conn.query(
                    self.sql["insert_started"],
                    {"runs": json.dumps(started), "worker": worker_id, "data": start_data},
                )
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
                # Claim order, as the claim's ORDER BY (RETURNING has none; run_at and
                # created_at come as numbers, cheap to compare, rowid last): the first
                # start_now start at once, the rest wait in the worker's buffer.
                rows = sorted(rows, key=lambda r: (r[5], r[6], r[7], r[9]))
                claimed = [self._claim(row) for row in rows]
                now = len(claimed) if start_now is None else start_now
                for number, run in enumerate(claimed):
                    events.append(
                        [run.id, "leased", f'{{"worker_id": {who}, "attempt": {run.attempt}}}']
                    )
                    if number < now and run.type in filt.handled:
                        events.append([run.id, "started", start_data])
            if events:
                conn.query(self.sql["insert_events"], {"events": json.dumps(events)})
        return claimed, finished

    def release(self, conn, worker_id, held):
        with conn.transaction():
            rows = conn.query(self.sql["release"], {"runs": json.dumps(held), "worker": worker_id})
            if rows:
                events = [
                    [run_id, "retried", _release_data(attempt, worker_id)]
                    for run_id, attempt in rows
                ]
                conn.query(self.sql["insert_events"], {"events": json.dumps(events)})
        return [row[0] for row in rows]

    def rescue(self, conn):
        if not conn.query(self.sql["lease_expired"]):
            return []
        with conn.transaction():
            rows = conn.query(self.sql["rescue"], {"limit": RESCUE_BATCH})
            if rows:
                events = [
                    [run_id, *_outcome_event(_RESCUED, status, attempt=attempt, leased_by=by)]
                    for run_id, _type, status, attempt, by in rows
                ]
                conn.query(self.sql["insert_events"], {"events": json.dumps(events)})
        return rows

    def repair_times(self, conn):
        rows = conn.query(self.sql["zoned_runs"], {"limit": RESCUE_BATCH})
        # An unparseable one is logged by _parse_time, and stays (never claimed).
        moments = [(run_id, text, _parse_time(text)) for run_id, text in rows]
        repaired = 0
        if any(moment is not None for _, _, moment in moments):
            with conn.transaction():
                for run_id, text, moment in moments:
                    if moment is not None:
                        params = {"id": run_id, "run_at": moment, "old": text}
                        repaired += len(conn.query(self.sql["set_run_at"], params))
        return repaired

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

    def watcher(self, listen=None):
        if self.dsn.memory:
            return None

        def watch(stop, wake, report):
            conn = None
            last = None
            while not stop.is_set():
                try:
                    if conn is None:
                        conn = self._open()
                    version = conn.execute(self.sql["data_version"]).fetchone()[0]
                    if last is None:
                        report(None)  # (re)opened and read
                    elif version != last:
                        wake()
                    last = version
                    stop.wait(SQLITE_WATCH_INTERVAL)
                except (sqlite3.Error, MinflowError) as exc:
                    report(exc)
                    if conn is not None:
                        conn.close()
                    conn, last = None, None
                    stop.wait(1.0)
            if conn is not None:
                conn.close()
            return None

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
        self._wire = _pg_wire()
        self.statements = _StatementMode(dsn)
        schema = dsn.schema
        # NOTIFY channel per schema, so queues in different schemas do not wake each other.
        # A channel name is an identifier too: at most 63 bytes; and ASCII, as its payload.
        self.channel = (
            ("minflow_" + schema)
            if len(schema.encode()) <= 55 and schema.isascii()
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

    def describe(self):
        return f"PostgreSQL {self.dsn.text} (schema {self.dsn.schema})"

    def decode_json(self, value):
        return value  # pg8000 decodes jsonb

    def _ssl_context(self, dsn: _DSN) -> Any:
        mode = dsn.sslmode
        if mode in ("disable", "allow"):
            # False, not None: pg8000 reads None as "TLS whenever the server offers it".
            return False
        import ssl

        root, cert, key = dsn.ssl_files
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
        conn = self._open(self.dsn)
        if self.statements.named and self.statements.check_pooler:
            try:
                pooled = conn.pooled()
            except MinflowError:
                conn.close()
                raise
            if pooled:
                self.statements.unname(
                    "connected through a connection pooler (the server process answering is "
                    "not the one the start-up named)"
                )
        return conn

    def _open(self, dsn: _DSN) -> _PgConnection:
        kwargs = dict(
            user=dsn.user,
            password=dsn.password,
            database=dsn.database,
            timeout=dsn.timeout,
            application_name=dsn.application_name,
            # The only start-up parameters, both among the few PgBouncer accepts (it refuses
            # search_path: every statement names its schema instead). UTF-8 is what statements
            # are encoded in; times are read and written with their offset, so nothing depends
            # on the zone, which only keeps the server's text readable.
            startup_params={"client_encoding": "UTF8", "TimeZone": "UTC"},
        )
        if dsn.unix_sock:
            kwargs["unix_sock"] = dsn.unix_sock
        else:
            kwargs.update(host=dsn.host, port=dsn.port)
        context = self._ssl_context(dsn)
        try:
            try:
                raw = self._driver.Connection(ssl_context=context, **kwargs)
            except self._errors.InterfaceError as exc:
                # sslmode=prefer: fall back to plain text only when the server has no TLS.
                if dsn.sslmode != "prefer" or "SSL" not in str(exc):
                    raise
                raw = self._driver.Connection(ssl_context=False, **kwargs)
        except self._errors.DatabaseError as exc:
            raise _translate_pg(exc) from exc
        except (self._errors.InterfaceError, OSError) as exc:
            raise Unavailable(f"cannot connect to PostgreSQL at {dsn.text}: {exc}") from exc
        _set_keepalive(getattr(raw, "_usock", None), dsn.timeout)
        return _PgConnection(raw, self._errors, self.sql, self.statements, self._wire)

    def database(self, conn: _Connection) -> str:
        return str(conn.query(self.sql["database"])[0][0])

    def _check_schema(self, conn: _CallerConnection) -> None:
        if not conn.query(self.sql["has_schema"], {"schema": self.dsn.schema})[0][0]:
            raise InvalidInput(
                f"connection= is on database {self.database(conn)!r}, whose schema "
                f"{self.dsn.schema!r} has no minflow tables: run Client.migrate() first"
            )

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

    def cycle(self, conn, worker_id, done, limit, lease, filt, started=(), start_now=None):
        params = {
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
            "start_ids": [run_id for run_id, _ in started],
            "start_now": limit if start_now is None else start_now,
        }
        statement = self.sql["cycle"]
        if filt.capped:
            statement = self.sql["cycle_capped"]
            params["capped"] = [run_type for run_type, _ in filt.capped]
            params["room"] = [room for _, room in filt.capped]
        rows = conn.query(statement, params)
        claimed, done_rows = rows[0]
        return (
            [_Claim(*row) for row in claimed],
            {run_id: (status, attempt) for run_id, status, attempt in done_rows},
        )

    def release(self, conn, worker_id, held):
        params = {
            "ids": [h[0] for h in held],
            "attempts": [h[1] for h in held],
            "worker": worker_id,
            "channel": self.channel,
        }
        return [row[0] for row in conn.query(self.sql["release"], params) if row[0] is not None]

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

    def check_listen_dsn(self, dsn):
        if dsn.kind != "postgres":
            raise InvalidInput(f"listen_dsn must be a PostgreSQL DSN, got {dsn.text!r}")

    def watcher(self, listen=None):
        target = listen or self.dsn

        def watch(stop, wake, report):
            conn: _PgConnection | None = None
            tested = False
            delay = heard = 0.0
            try:
                while not stop.is_set():
                    try:
                        if conn is None:
                            conn = self._open(target)
                            if conn.pooled():
                                return (
                                    f"{target.text} leads to a connection pooler, which cannot "
                                    "deliver LISTEN/NOTIFY"
                                )
                            conn.query(self.sql["listen"])
                            if not tested and not self._hears(conn):
                                return (
                                    f"a test notification sent through {self.dsn.text} did not "
                                    f"arrive on a LISTEN connection to {target.text} within "
                                    f"{PG_LISTEN_SELF_TEST:g}s"
                                )
                            tested, delay = True, 0.1
                            report(None)
                            wake()  # anything submitted while we were not listening
                            heard = time.monotonic()
                        if conn.wait_readable(0.2):
                            heard = time.monotonic()
                            if conn.take_notifications():
                                wake()
                        elif time.monotonic() - heard > PG_LISTEN_PROBE:
                            # A link that went silent without closing shows only to a round
                            # trip, which has the socket's deadline.
                            conn.take_notifications()
                            heard = time.monotonic()
                    except (MinflowError, OSError, ValueError) as exc:
                        report(exc)
                        if conn is not None:
                            conn.close()
                        conn = None
                        delay = min(max(delay * 2, 0.1), 5.0)
                        stop.wait(_jitter(delay))
                return None
            finally:
                if conn is not None:
                    conn.close()

        return watch

    def _hears(self, conn: _PgConnection) -> bool:
        """Whether a notification sent the way producers send theirs (through this dialect's
        DSN, perhaps a pooler) arrives on the listening ``conn``."""
        token = f"minflow-self-test-{uuid.uuid4().hex}"
        sender = self.connect()
        try:
            sender.query(self.sql["notify"], {"channel": self.channel, "type": token})
        finally:
            sender.close()
        deadline = time.monotonic() + PG_LISTEN_SELF_TEST
        while (left := deadline - time.monotonic()) > 0:
            if conn.wait_readable(left) and token in conn.take_notifications():
                return True
        return False

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
_CRON_TERM = _regex("_CRON_TERM", r"^(?:([*?])|([0-9A-Za-z]+)(?:-([0-9A-Za-z]+))?)(?:/([0-9]+))?$")
# The Go parser accepts "TZ=Zone expr" and "CRON_TZ=Zone expr", overriding the timezone column.
_CRON_TZ_PREFIX = _regex("_CRON_TZ_PREFIX", r"^(?:CRON_)?TZ=(\S+) (.*)$")
_cron_cache: dict[tuple[Any, Any], tuple[str, _dt.tzinfo]] = {}
# Candidates inside a repeated hour are skipped one by one (at most one per minute); needing
# more steps than this means the expression is unusable, never an endless loop in the ticker.
_CRON_MAX_STEPS = 10_000


class _MissingCroniter(MinflowError):
    """croniter is not installed: no cron expression can be evaluated in this process."""


def _croniter() -> Any:
    global _croniter_module
    if _croniter_module is None:
        try:
            import croniter
        except ImportError:
            raise _MissingCroniter("cron schedules need croniter: pip install croniter") from None
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
        count = len(fields)
        why = (
            f"{5 - count} missing"
            if count < 5
            else "a seconds field is not supported"
            if count == 6
            else f"{count - 5} too many"
        )
        raise InvalidInput(
            f"cron: {cron!r} must have 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(fields)}: {why}"
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

    # Annotations in this class say builtins.list: here, a type checker reads list as the
    # method Client.list.

    def __init__(self, dsn: str | None = None):
        self._open(_parse_dsn(dsn))

    def _open(self, dsn: _DSN) -> None:
        self._dsn = dsn
        self._dialect = _make_dialect(self._dsn)
        self._pool = _Pool(
            self._dialect.connect, size=self._dialect.pool_size, ping=self._dialect.pool_ping
        )
        self._migrated = False
        self._database_name: str | None = None  # see _database

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
        connection: object | None = None,
    ) -> _RunId:
        """Record a run and return its id.

        With an ``idempotency_key`` that already exists, nothing is created and the EXISTING
        run's id is returned (keys are unique forever). The id is a ``str`` whose
        ``deduplicated`` attribute tells which happened: ``False`` for a new run, ``True`` for
        an existing one. ``run_at`` (aware datetime) or ``run_in`` (seconds or timedelta) delay
        the first execution. Raises ``InvalidInput`` before touching the database when an
        argument is malformed.

        ``connection``: the caller's own open connection to this client's database (a
        ``sqlite3.Connection``; a pg8000 native, DB-API or legacy, psycopg 3 or psycopg2
        connection). The run is then written inside the caller's transaction, which minflow
        neither commits nor rolls back: it exists, and wakes workers, only once the caller
        commits. In autocommit mode, where no transaction is open, the call is a transaction of
        its own. ``InvalidInput`` for another kind of object, a closed connection, one on
        another database, or one whose transaction has failed.
        """
        job = Job(type, payload, priority, idempotency_key, max_attempts, run_at, run_in)
        return self._submit([job], connection)[0]

    def submit_many(
        self, jobs: Iterable[Job], *, connection: object | None = None
    ) -> builtins.list[_RunId]:
        """Record several runs in one transaction (all or none); ids in input order.

        Jobs whose idempotency key already exists yield the existing run's id, with
        ``deduplicated`` set as for ``submit``. ``connection``: as for ``submit``; all of the
        runs or none are then part of the caller's transaction.
        """
        jobs = list(jobs)
        if not all(isinstance(job, Job) for job in jobs):
            raise InvalidInput("submit_many takes minflow.Job objects")
        return self._submit(jobs, connection) if jobs else []

    def _submit(
        self, jobs: builtins.list[Job], connection: object | None = None
    ) -> builtins.list[_RunId]:
        rows = [
            self._job_row(job, run_id)
            for job, run_id in zip(jobs, _new_ids(len(jobs)), strict=True)
        ]
        if connection is None:
            with self._pool.connection() as conn:
                out = self._dialect.submit(conn, rows)
            _wakeups.notify(self._dsn.key)
        else:
            # No in-process wake-up: the runs exist once the caller commits, which is when
            # workers hear of them (NOTIFY is transactional; SQLite's data_version changes).
            caller = self._dialect.adopt(connection, self._database)
            with caller.transaction():
                out = self._dialect.submit(caller, rows)
        return [_RunId(run_id, not created) for run_id, created in out]

    def _database(self) -> str:
        """This client's database, as its dialect names it (see ``_Dialect.database``)."""
        if self._database_name is None:
            self._database_name = self._dialect.home(self._pool.connection)
        return self._database_name

    @staticmethod
    def _job_row(job: Job, run_id: str) -> dict[str, Any]:
        run_at, delay = _check_run_at(job.run_at, job.run_in)
        key = job.idempotency_key
        if key is not None:
            _check_text("idempotency_key", key, max_length=1000)
        return {
            "id": run_id,
            "type": _check_type(job.type),
            "payload": _dumps(job.payload),
            "priority": _check_int("priority", job.priority),
            "run_at": run_at,
            "delay": delay,
            "key": key,
            "max_attempts": _check_int("max_attempts", job.max_attempts, minimum=1),
        }

    # -- reading ---------------------------------------------------------------------------
    def _run(self, row: Sequence[Any]) -> Run:
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
    ) -> builtins.list[Run]:
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
        params: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        filters = "".join(_LIST_FILTERS[k] for k in params)
        sql = self._dialect.compose("list_runs", filters=filters)
        params.update(limit=limit, offset=offset)
        with self._pool.connection() as conn:
            return [self._run(row) for row in conn.query(sql, params)]

    def events(self, run_id: str) -> builtins.list[Event]:
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

    # -- asyncio ---------------------------------------------------------------------------
    # The drivers are synchronous: each facade runs its method on a thread of the event loop's
    # default executor (asyncio.to_thread), holding a pooled connection only meanwhile, so the
    # loop is never blocked on the database. There is no connection= facade: a caller's
    # connection belongs to the thread and transaction using it (sqlite3 refuses other threads).

    async def asubmit(
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
        """``submit`` for asyncio code, run on a thread."""
        job = Job(type, payload, priority, idempotency_key, max_attempts, run_at, run_in)
        return (await asyncio.to_thread(self._submit, [job]))[0]

    async def asubmit_many(self, jobs: Iterable[Job]) -> builtins.list[_RunId]:
        """``submit_many`` for asyncio code, run on a thread (``jobs`` is read first, here)."""
        return await asyncio.to_thread(self.submit_many, list(jobs))

    async def aget(self, run_id: str) -> Run | None:
        """``get`` for asyncio code, run on a thread."""
        return await asyncio.to_thread(self.get, run_id)

    async def alist(
        self,
        *,
        type: str | None = None,
        status: str | None = None,
        idempotency_key: str | None = None,
        limit: int = DEFAULT_LIST_LIMIT,
        offset: int = 0,
    ) -> builtins.list[Run]:
        """``list`` for asyncio code, run on a thread."""
        return await asyncio.to_thread(
            self.list,
            type=type,
            status=status,
            idempotency_key=idempotency_key,
            limit=limit,
            offset=offset,
        )

    async def acancel(self, run_id: str) -> None:
        """``cancel`` for asyncio code, run on a thread."""
        await asyncio.to_thread(self.cancel, run_id)

    async def aretry(self, run_id: str) -> None:
        """``retry`` for asyncio code, run on a thread."""
        await asyncio.to_thread(self.retry, run_id)

    # -- schedules -------------------------------------------------------------------------
    def _schedule(self, row: Sequence[Any]) -> Schedule:
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
    ) -> _ScheduleId:
        """Create a cron schedule and return its id; each slot becomes one run of ``type``.

        ``cron`` is a standard 5-field expression (minute hour day-of-month month day-of-week)
        or ``@hourly``, ``@daily``/``@midnight``, ``@weekly``, ``@monthly``,
        ``@yearly``/``@annually`` (stored in 5-field form), evaluated on the wall clock of the
        IANA ``timezone``. ``payload`` is any JSON value, copied into every run.

        With a ``name``, the call is an upsert: a live schedule of that name is updated in place
        (type, payload, cron, timezone, priority, max_attempts; its next slot is kept when cron
        and timezone are unchanged; a paused one stays paused) and its id returned, so a
        program may declare its schedules at every start-up without piling up duplicates. The
        id is a ``str`` whose ``updated`` attribute tells which happened.
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
        schedule_id = str(rows[0][0])
        return _ScheduleId(schedule_id, updated=schedule_id != params["id"])

    def schedules(self) -> builtins.list[Schedule]:
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

    def workers(self) -> builtins.list[WorkerInfo]:
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

    def _describe(self) -> str:
        """The database as resolved: an absolute SQLite path, or the DSN with its password
        masked (the Worker's start-up line)."""
        return self._dialect.describe()

    def _configure(self, dsn: str | None) -> None:
        """Point this client at another database, closing the connections to the previous one
        (the CLI's ``worker --dsn``, for an imported App)."""
        parsed = _parse_dsn(dsn)  # a bad DSN leaves the client as it was
        self.close()
        self._open(parsed)

    def _open_existing(self) -> None:
        """Never create the database: a missing SQLite file is an error naming it (the CLI's
        commands that inspect or change existing runs)."""
        self._dialect.create = False

    def _ensure_schema(self) -> None:
        """Migrate unless the schema is current; checked once per client (Worker, CLI)."""
        if not self._migrated and self.schema_version() < SCHEMA_VERSION:
            self.migrate()
        self._migrated = True

    def _sql(self, name: str, params: dict[str, Any] | None = None) -> builtins.list[Any]:
        """Rows of the named statement, run on a pooled connection (HTTP, RunContext)."""
        with self._pool.connection() as conn:
            return conn.query(self._dialect.sql[name], params)

    def _finished_per_minute(self, minutes: int) -> tuple[_dt.datetime, builtins.list[Any]]:
        """The first of the last ``minutes`` minutes of the database clock (the last one is the
        current, partial minute) and the (minute, event type, count) rows of the runs that
        succeeded or failed for good since then (the dashboard's throughput)."""
        with self._pool.connection() as conn:
            now = self._db_now(conn)
            first = now.replace(second=0, microsecond=0) - _dt.timedelta(minutes=minutes - 1)
            return first, conn.query(self._dialect.sql["throughput"], {"since": first})

    def _health(self) -> str | None:
        """Why the database refuses writes now (a standby, or read-only after a failover), or
        None when it takes them; raises ``MinflowError`` when it cannot be asked (/healthz)."""
        read_only, standby = self._sql("health")[0]
        if standby:
            return "the server is a standby (in recovery)"
        if read_only:
            return "the server refuses writes (default_transaction_read_only is on)"
        return None

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

    def _listen_dsn(self, dsn: str) -> _DSN:
        """``dsn`` parsed, for ``_watcher``; ``InvalidInput`` unless wake-ups can use it."""
        parsed = _parse_dsn(dsn)
        self._dialect.check_listen_dsn(parsed)
        return parsed

    def _watcher(self, listen: _DSN | None = None) -> _Watch | None:
        """The dialect's wake-up loop, if it has one (see ``_Dialect.watcher``); ``listen``
        from ``_listen_dsn``."""
        return self._dialect.watcher(listen)

    def _may_have_work(self, conn: _Connection, filt: _Filter) -> bool:
        """False when nothing is claimable, where a read-only check can tell that cheaply."""
        return self._dialect.may_have_work(conn, filt)

    def _cycle(
        self,
        conn: _Connection,
        worker_id: str,
        done: builtins.list[_Completion],
        limit: int,
        lease: float,
        filt: _Filter,
        started: Sequence[tuple[str, int]] = (),
        start_now: int | None = None,
    ) -> tuple[builtins.list[_Claim], dict[str, tuple[str, int]]]:
        """Record outcomes and claim up to ``limit`` runs, in one transaction (see
        ``_Dialect.cycle`` for ``started`` and ``start_now``)."""
        return self._dialect.cycle(conn, worker_id, done, limit, lease, filt, started, start_now)

    def _release(
        self, conn: _Connection, worker_id: str, held: builtins.list[tuple[str, int]]
    ) -> builtins.list[str]:
        """Give back prefetched runs a worker never started; wakes this process's workers."""
        released = self._dialect.release(conn, worker_id, held)
        if released:
            _wakeups.notify(self._dsn.key)
        return released

    def _rescue(self, conn: _Connection) -> builtins.list[Any]:
        """Expired leases back to pending or failed; wakes this process's workers for them."""
        rows = self._dialect.rescue(conn)
        if rows:
            _wakeups.notify(self._dsn.key)
        return rows

    def _repair_times(self, conn: _Connection) -> int:
        """Rewrite pending runs' zoned times (the Go worker's, on SQLite) as UTC; wakes this
        process's workers when some were."""
        repaired = self._dialect.repair_times(conn)
        if repaired:
            _wakeups.notify(self._dsn.key)
        return repaired

    def _extend_leases(
        self, conn: _Connection, worker_id: str, held: builtins.list[tuple[str, int]], lease: float
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


# What @app.handler accepts, and returns unchanged: a type checker keeps the function's own
# signature (and rejects a function that cannot take a RunContext).
if TYPE_CHECKING:
    _HandlerFn = TypeVar("_HandlerFn", bound="Callable[[RunContext], Any]")


@_dataclass(frozen=True)
class _Policy:
    """How the worker treats one type's runs besides calling its handler (see App.handler)."""

    backoff: Callable[[int], float] | None = None
    timeout: float | None = None
    concurrency: int | None = None


class App(Client):
    """A Client plus the handlers a worker runs, keyed by exact run type."""

    def __init__(self, dsn: str | None = None):
        super().__init__(dsn)
        self.handlers: dict[str, Callable[[RunContext], Any]] = {}
        self._policies: dict[str, _Policy] = {}

    def handler(
        self,
        type: str,
        *,
        backoff: Callable[[int], float] | None = None,
        timeout: float | None = None,
        concurrency: int | None = None,
    ) -> Callable[[_HandlerFn], _HandlerFn]:
        """Decorator registering ``fn(run: RunContext)`` for runs of ``type``; ``fn`` may be a
        plain function (run on a worker thread) or an ``async def`` one (awaited on the
        worker's event loop).

        ``backoff(attempt) -> seconds`` is the retry delay for this type, instead of the
        worker's. ``timeout`` (seconds) ends an execution that runs longer: the attempt is
        recorded as failed, ``run.is_cancelled()`` turns true, an async handler is cancelled,
        and whatever the handler does afterwards is discarded. ``concurrency`` caps how many
        runs of this type one worker executes at once; the rest stay for other workers.
        """
        _check_type(type)
        if backoff is not None and not callable(backoff):
            raise InvalidInput(f"backoff for {type!r} must be a callable(attempt) -> seconds")
        if timeout is not None and not (_is_number(timeout) and 0 < timeout < math.inf):
            raise InvalidInput(
                f"timeout for {type!r} must be a positive number of seconds, got {timeout!r}"
            )
        if concurrency is not None:
            _check_int("concurrency", concurrency, minimum=1)
        policy = _Policy(backoff, None if timeout is None else float(timeout), concurrency)

        def register(fn: _HandlerFn) -> _HandlerFn:
            if not callable(fn):
                raise InvalidInput(f"handler for {type!r} must be callable")
            if type in self.handlers and self.handlers[type] is not fn:
                raise InvalidInput(f"a handler for {type!r} is already registered")
            self.handlers[type] = fn
            self._policies[type] = policy
            return fn

        return register

    def worker(self, **options: Any) -> Worker:
        """A ``Worker`` for this app (see ``Worker`` for the options)."""
        return Worker(self, **options)

    def run_worker(self, *, burst: bool = False, **options: Any) -> int:
        """Build a Worker with ``options`` and run it (``burst=True``: until nothing is due)."""
        return Worker(self, **options).run(burst=burst)

    # -- internal interface used by the Worker ---------------------------------------------
    def _policy(self, type: str) -> _Policy:
        """The policy ``handler()`` registered for ``type`` (none for a handler put into
        ``handlers`` directly)."""
        return self._policies.get(type) or _Policy()


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
    "workflow_run_released_total": (
        "counter",
        "Prefetched runs this worker gave back unstarted when it stopped (attempt undone).",
        ("worker_id",),
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
    "workflow_worker_database_up": (
        "gauge",
        "1 while this worker's database writes succeed, 0 during an outage "
        "(unreachable, read-only, ...).",
        ("worker_id",),
    ),
    "workflow_worker_database_outages_total": (
        "counter",
        "Outages this worker saw: times its database writes started failing.",
        ("worker_id",),
    ),
    "workflow_run_timeouts_total": (
        "counter",
        "Executions failed because they exceeded their handler's timeout.",
        _RUN,
    ),
    "workflow_worker_stuck_threads": (
        "gauge",
        "Handler threads still running an execution that timed out (each replaced by a new "
        "thread, up to concurrency of them).",
        ("worker_id",),
    ),
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


class _Outage:
    """Whether a worker (or the HTTP server) can use its database, so that an outage is logged
    twice, when it starts (WARNING) and when it ends (INFO), instead of at every failed attempt.

    ``what`` names the component in those lines, ``meanwhile`` what it does during the outage;
    ``changed(up)`` is called at both moments.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        changed: Callable[[bool], None] | None = None,
        meanwhile: str = "retrying with backoff until it answers",
    ):
        self._log = logger
        self._what = what
        self._changed = changed
        self._meanwhile = meanwhile
        self._lock = threading.Lock()
        self._since: float | None = None  # monotonic start of the current outage
        self._failures = 0

    @property
    def down(self) -> bool:
        """True between a failure and the next success."""
        return self._since is not None

    def report(self, error: BaseException | None) -> None:
        """``failed(error)``, or ``ok()`` for None."""
        if error is None:
            self.ok()
        else:
            self.failed(error)

    def failed(self, error: BaseException) -> None:
        """An attempt failed; the first one of an outage is logged."""
        with self._lock:
            first = self._since is None
            if first:
                self._since, self._failures = time.monotonic(), 0
            self._failures += 1
        if first:
            self._log.warning("%s unavailable, %s: %s", self._what, self._meanwhile, error)
            if self._changed is not None:
                self._changed(False)
        else:
            self._log.debug("%s still unavailable: %s", self._what, error)

    def ok(self) -> None:
        """An attempt succeeded; ends the outage, if any, with one line."""
        with self._lock:
            since, failures, self._since = self._since, self._failures, None
        if since is not None:
            self._log.info(
                "%s available again after %.1fs (%d failed attempts)",
                self._what,
                time.monotonic() - since,
                failures,
            )
            if self._changed is not None:
                self._changed(True)


class RunContext:
    """What a handler receives: the run's identity, decoded payload and lease controls.

    ``attempt`` is 1 during the first execution and counts the executions that did not snooze;
    ``snoozes`` counts how often the run asked to run later (``Retry``) since it was submitted
    or retried, which uses up no attempt.
    """

    def __init__(
        self,
        worker: Worker,
        run_id: str,
        run_type: str,
        payload: Any,
        attempt: int,
        max_attempts: int,
        snoozes: int = 0,
    ):
        self.id = run_id
        self.type = run_type
        self.payload = payload
        self.attempt = attempt  # 1 on the first execution
        self.max_attempts = max_attempts
        self.snoozes = snoozes
        self.worker_id = worker.worker_id
        self._worker = worker
        # The execution's state, shared with the Worker that runs it (it sets and reads these
        # four; a handler sees only the attributes above):
        self._lost = False  # sticky: set once the lease is known to be gone (or time ran out)
        self._done = False  # the worker has this execution's outcome (or gave up on it)
        self._thread: int | None = None  # the thread running a sync handler
        self._task: Any = None  # the asyncio task awaiting an async handler
        self._order: tuple = ()  # its place in claim order, for the worker's prefetch buffer
        self._lease_end = math.inf  # monotonic time its lease ends at the latest, as last known

    def __repr__(self) -> str:
        return f"RunContext(id={self.id!r}, type={self.type!r}, attempt={self.attempt}/{self.max_attempts})"

    def heartbeat(self, seconds: float | None = None) -> None:
        """Extend this run's lease to now + ``seconds`` (default: the worker's lease).

        Leases are also extended automatically while the handler runs; call this to ask for a
        longer lease before a long step. Raises ``LeaseLost`` if the run was cancelled or taken.
        In an ``async def`` handler it returns at once and extends the lease from a thread
        (raising ``LeaseLost`` only when the loss is already known); ``await run.aheartbeat()``
        waits for the database instead.
        """
        seconds = self._worker.lease if seconds is None else seconds
        if not _is_number(seconds) or seconds <= 0 or math.isinf(seconds):
            raise InvalidInput(f"heartbeat seconds must be a positive number, got {seconds!r}")
        if self._worker._on_event_loop():
            if self._lost:
                raise self._lease_lost()
            # A database round trip here would stall every handler on the loop.
            asyncio.get_running_loop().run_in_executor(None, self._beat_quietly, seconds)
            return
        self._beat(seconds)

    def is_cancelled(self) -> bool:
        """True once the run was cancelled, this worker lost its lease or the handler's timeout
        passed: stop and return.

        In an ``async def`` handler this asks no database (the loop must not block): it tells
        what the worker knows, which its heartbeat brings up to date every lease/3 seconds;
        ``await run.ais_cancelled()`` asks the database.
        """
        if self._lost:
            return True
        if self._worker._on_event_loop():
            return False
        try:
            rows = self._worker.app._sql("run_state", {"id": self.id})
        except MinflowError as exc:
            _worker_log.warning("run %s: cancellation check failed: %s", self.id, exc)
            return False
        if not rows or tuple(rows[0]) != ("leased", self.worker_id, self.attempt):
            self._lost = True
        return self._lost

    async def aheartbeat(self, seconds: float | None = None) -> None:
        """``heartbeat()`` for ``async def`` handlers: extends the lease from a thread (pg8000
        and sqlite3 are synchronous) and raises ``LeaseLost`` as ``heartbeat()`` does."""
        await asyncio.to_thread(self.heartbeat, seconds)

    async def ais_cancelled(self) -> bool:
        """``is_cancelled()`` with a database check, from a thread, for ``async def`` handlers."""
        return await asyncio.to_thread(self.is_cancelled)

    def _beat(self, seconds: float) -> None:
        if not self._worker.app._heartbeat(self.id, self.worker_id, self.attempt, seconds):
            self._lost = True
            raise self._lease_lost()

    def _beat_quietly(self, seconds: float) -> None:
        try:
            self._beat(seconds)
        except LeaseLost:
            pass  # is_cancelled() now says so
        except MinflowError as exc:
            _worker_log.warning("run %s: heartbeat failed: %s", self.id, exc)

    def _lease_lost(self) -> LeaseLost:
        return LeaseLost(f"run {self.id}: lease lost (cancelled, rescued or taken over)")

    # -- internal interface used by the Worker ---------------------------------------------
    def _mark_lost(self) -> bool:
        """Record that the worker found the lease gone; True the first time."""
        first, self._lost = not self._lost, True
        return first


def _is_async(fn: Callable) -> bool:
    """True for an ``async def`` function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the method, not callable()
    )


def _handler_stack(thread: int) -> str:
    """Where the handler on ``thread`` is now: its frames below the pool's."""
    frame = sys._current_frames().get(thread)
    if frame is None:
        return "  (the thread has just finished)"
    frames = traceback.extract_stack(frame)
    inner = [i for i, f in enumerate(frames) if f.name == "_execute" and f.filename == __file__]
    return "".join(traceback.format_list(frames[inner[-1] + 1 if inner else 0 :])).rstrip()


async def _awaited(ctx: RunContext, awaitable: Any) -> Any:
    """Await what a plain handler returned, as a task a timeout can cancel."""
    ctx._task = asyncio.current_task()
    return await awaitable


_worker_numbers = iter(range(1, 1 << 62))
# A retention pass deletes batches for about this long (ticks and heartbeats wait meanwhile);
# with a backlog left, the next pass comes after the pause.
_PRUNE_PASS_SECONDS = 0.5
_PRUNE_BACKLOG_PAUSE = 0.5


class Worker:
    """Claims runs of the app's handler types and executes them: plain handlers on a thread
    pool, ``async def`` ones on an event loop of the worker's own.

    ``concurrency`` handlers run at once, plain and async together; ``lease`` seconds is how
    long a claim lasts without a heartbeat (extended automatically every lease/3); ``types``
    narrows the exact types claimed (default: every registered handler); ``prefixes`` also
    claims types starting with these literal prefixes; ``schedules`` runs the cron ticker;
    ``backoff(attempt) -> seconds`` sets the retry delay (default: the seed's attempt² minutes
    + up to 10% jitter) for types whose handler has none of its own; ``max_snoozes`` bounds how
    often a run may ``Retry`` before each further request counts as a failed attempt; on
    shutdown, running handlers get ``shutdown_timeout`` seconds to finish. ``listen_dsn``
    (PostgreSQL): a direct connection for LISTEN wake-ups, when the app's DSN goes through a
    pooler such as PgBouncer. ``retention`` (seconds or a timedelta; default None: keep everything) deletes
    finished runs last updated longer ago than that, as ``Client.prune`` does, checking at least
    every min(retention, 60 s).

    Up to ``prefetch`` runs beyond the free slots are claimed too and wait in the worker's
    buffer, in claim order, for a slot: a busy worker then claims and records up to
    concurrency + prefetch runs per round trip instead of the few slots that freed up. The
    buffer holds only what the slots finish within PREFETCH_HORIZON at the pace executions
    have been finishing (nothing before one has finished), so slow handlers' runs wait in the
    database, where any worker may take them. Their leases are
    extended like running ones; a run cancelled while buffered is dropped at the next
    heartbeat, and one whose lease has under a third left (heartbeats failing) waits for the
    next successful one before it starts; on a clean stop the buffered runs are given back at
    once, their claim undone (event ``retried``, reason ``released``); those of a worker that
    died wait for their lease to expire like its running ones. ``prefetch=0`` claims only
    free slots (each run waits in the database, where any worker may take it).

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
        listen_dsn: str | None = None,
        max_snoozes: int = DEFAULT_MAX_SNOOZES,
        retention: float | _dt.timedelta | None = None,
        prefetch: int = DEFAULT_PREFETCH,
    ):
        if not isinstance(app, App):
            raise InvalidInput(f"Worker needs a minflow.App, got {type(app).__name__}")
        self.app = app
        self.concurrency = _check_int("concurrency", concurrency, minimum=1)
        self.prefetch = _check_int("prefetch", prefetch, minimum=0)
        self._pace: float | None = None  # smoothed seconds per execution, once one finished
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
        self._ticking = True  # until croniter turns out to be missing
        if backoff is not None and not callable(backoff):
            raise InvalidInput("backoff must be a callable(attempt) -> seconds")
        self._backoff = backoff or seed_backoff
        self._listen = None if listen_dsn is None else app._listen_dsn(listen_dsn)
        self.max_snoozes = _check_int("max_snoozes", max_snoozes, minimum=0)
        self.metrics = _Metrics()
        # One line when the database becomes unusable and one when it is back, whichever of the
        # worker's threads notices (the claim loop, the housekeeper, start-up).
        self._outage = _Outage(_worker_log, f"{self.worker_id}: database", self._database_up)
        self._listen_outage = _Outage(_worker_log, f"{self.worker_id}: LISTEN connection")
        self.processed = 0  # executions finished, as run() returns
        self._stop = threading.Event()
        self._force = threading.Event()
        self._signals: list[tuple[int, float]] = []  # (signal, monotonic time) not yet acted on
        self._first_signal: float | None = None
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.Lock()
        # Keyed by (id, attempt): after a lease expired, this worker may claim the run again
        # while the stale execution is still running, and the two must not be confused.
        self._active: dict[tuple[str, int], RunContext] = {}
        # Prefetched runs waiting for a slot, in claim order, and the (id, attempt) of those
        # started since the last cycle, whose started events the next cycle writes.
        self._buffer: collections.deque[RunContext] = collections.deque()
        self._starts: list[tuple[str, int]] = []
        self._completions: list[_Completion] = []
        self._thread: threading.Thread | None = None
        self._fatal: BaseException | None = None
        self._started_at = time.time()
        self._next_due = math.inf  # monotonic time a retry this worker wrote becomes due
        # Set up by run() from the app's handlers and their policies.
        self._handlers: dict[str, Callable[[RunContext], Any]] = {}
        self._policies: dict[str, _Policy] = {}
        self._async: frozenset[str] = frozenset()  # types with an async def handler
        self._timeouts: dict[str, float] = {}
        self._caps: dict[str, int] = {}  # claimed types with a concurrency cap
        self._capped_running: collections.Counter = collections.Counter()
        self._uncapped: _Filter | None = None  # the claim filter without the capped types
        self._aio: _EventLoop | None = None
        self._aio_lock = threading.Lock()
        self._abandoning = False  # async handlers are being cancelled at shutdown
        self._deadlines: _Deadlines | None = None

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
        restore = self._install_signals() if handle_signals else None
        try:
            return self._run(burst)
        finally:
            if restore is not None:
                restore()

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

    def _install_signals(self) -> Callable[[], None] | None:
        """Route SIGTERM and SIGINT to this worker; returns what restores the previous set-up."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_signal(signum: int, frame: Any) -> None:
            # Only a note, acted on (and logged) by the coordinator: a handler that logged or
            # took a lock could re-enter the very lock the main thread was interrupted in.
            self._signals.append((signum, time.monotonic()))

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        # The coordinator may be asleep in an Event wait, which the Python-level handler does
        # not end: the interpreter's C-level handler writes to this pipe, and a thread that
        # reads it sets the event from outside any signal handler.
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

        def relay() -> None:
            with contextlib.suppress(OSError):
                while os.read(read_fd, 64):  # empty once the write end is closed
                    self._wake.set()

        thread = threading.Thread(target=relay, name=f"{self.worker_id}-signals", daemon=True)
        thread.start()

        def restore() -> None:
            signal.set_wakeup_fd(old_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(write_fd)
            thread.join(1)
            os.close(read_fd)

        return restore

    def _handle_signals(self) -> None:
        """Act on the signals noted since the last call: the first stops claiming; one more
        within SIGNAL_DEBOUNCE seconds of it is ignored; one after that stops at once."""
        while self._signals:
            signum, at = self._signals.pop(0)
            name = signal.Signals(signum).name
            if self._first_signal is None and not self._stop.is_set():
                self._first_signal = at
                self._stop.set()
                _worker_log.info(
                    "%s: %s received, finishing %d running handlers (again to exit now)",
                    self.worker_id,
                    name,
                    len(self._active),
                )
            elif self._first_signal is not None and at - self._first_signal < SIGNAL_DEBOUNCE:
                _worker_log.info(
                    "%s: %s received again within %gs of the first: ignored (a double press?); "
                    "send it once more to exit now",
                    self.worker_id,
                    name,
                    SIGNAL_DEBOUNCE,
                )
            else:
                self._force.set()
                _worker_log.warning(
                    "%s: %s received again: exiting now; %d running handlers are left to "
                    "lease expiry",
                    self.worker_id,
                    name,
                    len(self._active),
                )

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
            self._adopt_policies(filt)
            prepared = self._prepare()
            if prepared is None:  # stopped while waiting for the database
                self._ready.set()
                self._finished.set()
                return 0
            conn, rescued = prepared
            self._pool = _HandlerPool(self.concurrency, self._execute, self.worker_id)
            self._start_executors()
            threads.append(_spawn(self._housekeeper, f"{self.worker_id}-housekeeper", side_stop))
            watch = self.app._watcher(self._listen)
            if watch is not None and not burst:
                threads.append(
                    _spawn(
                        lambda stop: self._watch(watch, stop), f"{self.worker_id}-watch", side_stop
                    )
                )
            self.app._subscribe(self._wake)
        except BaseException as exc:
            self._fatal = exc
            self._ready.set()
            self._finished.set()
            self._stop_executors()
            if conn is not None:
                conn.close()
            raise
        _worker_log.info(
            "%s started on %s: types=%s prefixes=%s concurrency=%d lease=%gs%s%s",
            self.worker_id,
            self.app._describe(),
            list(filt.types),
            list(filt.prefixes),
            self.concurrency,
            self.lease,
            self._policy_summary(),
            f", {rescued} expired leases rescued" if rescued else "",
            extra={"worker_id": self.worker_id},
        )
        self._ready.set()
        try:
            conn = self._loop(conn, filt, burst)
        finally:
            self.app._unsubscribe(self._wake)
            side_stop.set()
            self._pool.shutdown()
            self._stop_executors()
            for thread in threads:
                thread.join(5)
            if conn is not None:
                conn.close()
            self._finished.set()
            _worker_log.info(
                "%s stopped after %d executions",
                self.worker_id,
                self.processed,
                extra={"worker_id": self.worker_id},
            )
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
                self.app._repair_times(conn)
                if self.schedules:
                    self._tick(conn)
                self._outage.ok()
                self._database_up(True)
                self.metrics.inc(
                    "workflow_worker_database_outages_total", 0, worker_id=self.worker_id
                )
                return conn, rescued
            except Unavailable as exc:
                if conn is not None:
                    conn.close()
                self._outage.failed(exc)
                self._ready.set()
                self._wake.wait(_jitter(delay))  # stop() sets it
                self._handle_signals()
                if self._force.is_set() or self._stop.is_set():
                    return None
                delay = min(delay * 2, 5.0)

    def _loop(self, conn: _Connection | None, filt: _Filter, burst: bool) -> _Connection | None:
        app = self.app
        retry_delay = 0.1
        deadline = None
        while True:
            self._handle_signals()
            if self._force.is_set():
                break
            self._wake.clear()
            stopping = self._stop.is_set()
            if stopping and deadline is None:
                deadline = time.monotonic() + self.shutdown_timeout
            release: list[RunContext] = []
            with self._lock:
                launch = self._take_buffered()
                done, self._completions = self._completions, []
                started, self._starts = self._starts, []
                free = self.concurrency - len(self._active) - self._pool.shortfall
                if stopping:  # buffered runs are not started any more: give them back
                    release, self._buffer = list(self._buffer), collections.deque()
                buffered = len(self._buffer)
                room = self._prefetch_room()
                claim = self._claim_filter(filt)
            self._launch(launch)
            if stopping and not done and not self._active and not release:
                break
            if deadline is not None and time.monotonic() > deadline:
                _worker_log.warning(
                    "%s: %d handlers still running after %.0fs; leaving them to lease expiry",
                    self.worker_id,
                    len(self._active),
                    self.shutdown_timeout,
                )
                break
            # Up to the free slots plus the buffer's room; beyond the free slots they wait.
            limit = 0 if stopping else max(0, free + room - buffered)
            claimed: list[_Claim] = []
            try:
                if conn is None:
                    conn = app._connect()
                if release:
                    self._give_back(conn, release)
                # An idle SQLite worker polls with the read-only pre-check alone; it counts as
                # a poll, so last_poll_timestamp does not make an idle worker look stuck.
                polled = bool(limit)
                if limit and not done and not app._may_have_work(conn, claim):
                    limit = 0
                if done or limit or started:
                    start_now = max(0, free)
                    claimed_at = time.monotonic()
                    claimed, finished = app._cycle(
                        conn, self.worker_id, done, limit, self.lease, claim, started, start_now
                    )
                    polled = True
                    self._record(done, finished)
                    self._dispatch(claimed, start_now, claimed_at + self.lease)
                    self._outage.ok()  # the cycle wrote: the database takes writes
                if polled:
                    self.metrics.inc("workflow_worker_poll_cycle_total", worker_id=self.worker_id)
                    self.metrics.set(
                        "workflow_worker_last_poll_timestamp", time.time(), worker_id=self.worker_id
                    )
                retry_delay = 0.1
            except MinflowError as exc:
                with self._lock:
                    self._completions[:0] = done  # written on the next successful cycle
                    self._starts[:0] = started
                    self._buffer.extendleft(reversed(release))  # given back next time
                self.metrics.inc(
                    "workflow_worker_poll_errors_total",
                    worker_id=self.worker_id,
                    error_type=type(exc).__name__.lower(),
                )
                self._outage.failed(exc)
                # Read-only (a failover) is Unavailable too: a new connection may reach the
                # new primary.
                if conn is not None and (conn.broken or isinstance(exc, Unavailable)):
                    conn.close()
                    conn = None
                self._force.wait(_jitter(retry_delay))
                retry_delay = min(retry_delay * 2, 5.0)
                continue
            if claimed or done or release:
                continue  # more may be due (and on PostgreSQL, retries written just now)
            with self._lock:  # threads stuck past a timeout without replacement hold slots too
                idle = (
                    not self._active
                    and not self._completions
                    and not self._pool.shortfall
                    and not self._buffer
                )
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
            release, self._buffer = list(self._buffer), collections.deque()
        if done:
            with contextlib.suppress(MinflowError):
                _, finished = self.app._cycle(conn, self.worker_id, done, 0, self.lease, filt)
                self._record(done, finished)
        if release:
            with contextlib.suppress(MinflowError):
                self._give_back(conn, release)

    def _give_back(self, conn: _Connection, release: list[RunContext]) -> None:
        """Release buffered runs that never started (their attempt undone)."""
        released = self.app._release(conn, self.worker_id, [(c.id, c.attempt) for c in release])
        if released:
            self.metrics.inc("workflow_run_released_total", len(released), worker_id=self.worker_id)
            _worker_log.info(
                "%s: gave back %d prefetched runs that had not started",
                self.worker_id,
                len(released),
                extra={"worker_id": self.worker_id},
            )

    def _dispatch(self, claimed: list[_Claim], start_now: int, lease_end: float) -> None:
        # The cycle returns claims in claim order: the first start_now start at once (the
        # cycle wrote their started events), the others wait in the buffer for a slot, which
        # stays in claim order across claims (the dialects return run_at and created_at as
        # numbers, cheap to compare; equal ones keep the order they were claimed in).
        contexts = []
        for c in claimed:
            ctx = RunContext(self, c.id, c.type, c.payload, c.attempt, c.max_attempts, c.snoozes)
            ctx._order = (c.priority, c.run_at, c.created_at)
            ctx._lease_end = lease_end
            contexts.append(ctx)
        with self._lock:
            for ctx in contexts[:start_now]:
                self._take_slot(ctx)
            if len(contexts) > start_now:
                waiting = [*self._buffer, *contexts[start_now:]]
                self._buffer = collections.deque(sorted(waiting, key=lambda c: c._order))
        self._launch(contexts[:start_now])
        for run_type, count in collections.Counter(ctx.type for ctx in contexts).items():
            self.metrics.inc(
                "workflow_run_claimed_total",
                count,
                workflow_type=run_type,
                worker_id=self.worker_id,
            )

    def _take_slot(self, ctx: RunContext) -> None:  # with the lock held
        self._active[(ctx.id, ctx.attempt)] = ctx
        if ctx.type in self._caps:
            self._capped_running[ctx.type] += 1

    def _take_buffered(self) -> list[RunContext]:
        """With the lock held: move buffered runs into the free slots, in claim order (a
        capped type without room waits; a run whose lease was lost is dropped); returns them,
        for ``_launch`` once the lock is released.

        A run whose lease has less than lease/3 left, as far as the worker knows, waits too:
        the heartbeat (every lease/3) failed, so the database may be out of reach and the lease
        may expire, after which the run would be rescued and run again elsewhere."""
        if not self._buffer or self._stop.is_set():
            return []
        free = self.concurrency - len(self._active) - self._pool.shortfall
        taken: list[RunContext] = []
        waiting: list[RunContext] = []
        soon = time.monotonic() + self.lease / 3
        while self._buffer and free > 0:
            ctx = self._buffer.popleft()
            if ctx._lost:
                continue
            cap = self._caps.get(ctx.type)
            if (cap is not None and self._capped_running[ctx.type] >= cap) or ctx._lease_end < soon:
                waiting.append(ctx)
                continue
            self._take_slot(ctx)
            self._starts.append((ctx.id, ctx.attempt))
            taken.append(ctx)
            free -= 1
        self._buffer.extendleft(reversed(waiting))
        return taken

    def _launch(self, contexts: list[RunContext]) -> None:
        """Start the handlers of runs that just took a slot (from any of the worker's threads)."""
        if not contexts:
            return
        with self._lock:
            running = len(self._active)
        now = time.monotonic()
        # Succeeded until the handler says otherwise; started: the claim, for the duration.
        work = [
            (ctx, _Completion(ctx.id, ctx.attempt, _SUCCEEDED, type=ctx.type, started=now))
            for ctx in contexts
        ]
        coroutines = []
        for ctx, item in work:
            if ctx.type in self._async:
                coroutines.append((ctx, self._execute_async(ctx, item)))
            else:
                self._pool.submit(ctx, item)
        if coroutines:
            self._event_loop().start(coroutines)
        if self._deadlines is not None:  # after the tasks exist, so a timeout can cancel them
            for ctx, item in work:
                timeout = self._timeouts.get(ctx.type)
                if timeout is not None:
                    self._deadlines.add(now + timeout, ctx, item, running)
        self.metrics.set("workflow_worker_running", len(self._active), worker_id=self.worker_id)

    def _record(self, done: list[_Completion], finished: dict[str, tuple[str, int]]) -> None:
        now = time.monotonic()
        info = _worker_log.isEnabledFor(logging.INFO)  # once per batch, not per run
        durations: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        for item in done:
            outcome = finished.get(item.id)
            status = outcome[0] if outcome else "lost"
            labels = {"workflow_type": item.type, "worker_id": self.worker_id}
            duration = now - item.started
            durations[(item.type, status)].append(duration)
            if item.kind == _FAILED:
                attempt = str(item.attempt) if item.attempt < 3 else "3+"
                self.metrics.inc("workflow_run_failed_attempts_total", attempt=attempt, **labels)
            if status == "failed":
                self.metrics.inc("workflow_run_failed_total", **labels)
            elif status == "pending":
                self._next_due = min(self._next_due, now + item.delay)
            if status == "failed" and outcome is not None:
                _worker_log.error(
                    "run %s (%s) failed for good after %d attempts: %s",
                    item.id,
                    item.type,
                    outcome[1],
                    item.error,
                    extra=self._run_fields(item, "failed", duration),
                )
            elif info:
                self._log_outcome(item, status, duration)
        # One metrics update per type and outcome, not per run: batches are large under load.
        for (run_type, status), values in durations.items():
            labels = {"workflow_type": run_type, "worker_id": self.worker_id, "status": status}
            self.metrics.inc("workflow_run_completed_total", len(values), **labels)
            self.metrics.observe_many("workflow_run_execution_duration_seconds", values, **labels)

    def _log_outcome(self, item: _Completion, status: str, duration: float) -> None:
        """The INFO line of a finished execution (a run failed for good gets an ERROR instead)."""
        if status == "succeeded":
            outcome, verb, then = "succeeded", "succeeded", ""
        elif status == "lost":
            outcome, verb = "lost", "finished"
            then = "; outcome not recorded: the run was cancelled, rescued or taken over meanwhile"
        elif item.kind == _SNOOZED:
            outcome, verb, then = "snoozed", "snoozed", f"; due again in {item.delay:.3g}s"
        else:
            outcome, verb, then = "retrying", "failed", f"; retrying in {item.delay:.3g}s"
        _worker_log.info(
            "run %s (%s) attempt %d %s after %.3fs%s",
            item.id,
            item.type,
            item.attempt,
            verb,
            duration,
            then,
            extra=self._run_fields(item, outcome, duration),
        )

    def _run_fields(
        self, run: Any, outcome: str | None = None, duration: float | None = None
    ) -> dict:
        """A log record's ``extra`` for one execution (``run``: a RunContext or a _Completion)."""
        fields = {
            "run_id": run.id,
            "type": run.type,
            "attempt": run.attempt,
            "worker_id": self.worker_id,
        }
        if outcome is not None:
            fields["outcome"] = outcome
        if duration is not None:
            fields["duration"] = round(duration, 6)
        return fields

    def _execute(self, ctx: RunContext, item: _Completion) -> None:
        """Run one plain handler on a pool thread and queue its outcome (never raises)."""
        if ctx.type in self._timeouts:
            with self._lock:  # a timeout must see either no thread or this one
                if ctx._done:  # it passed while the run waited for a thread
                    return
                ctx._thread = threading.get_ident()
        else:
            ctx._thread = threading.get_ident()
        try:
            fn = self._handlers.get(ctx.type)
            if fn is None:
                raise LookupError(
                    f"no handler registered for type {ctx.type!r} on worker {self.worker_id}"
                )
            result = fn(ctx)
            if inspect.isawaitable(result):
                # A plain function returning a coroutine (a wrapper, a partial): awaited on the
                # event loop while this thread waits, never stored.
                loop = self._event_loop().loop
                result = asyncio.run_coroutine_threadsafe(_awaited(ctx, result), loop).result()
            item.result = _dumps(result, "result")
        except BaseException as exc:  # a handler's failure is a row update, never a dead worker
            self._failed(ctx, item, exc)
        self._finish(ctx, item)

    async def _execute_async(self, ctx: RunContext, item: _Completion) -> None:
        """Await one ``async def`` handler on the event loop and queue its outcome."""
        try:
            item.result = _dumps(await self._handlers[ctx.type](ctx), "result")
        except BaseException as exc:  # CancelledError too: after a timeout it is discarded
            self._failed(ctx, item, exc)
        self._finish(ctx, item)

    def _failed(self, ctx: RunContext, item: _Completion, exc: BaseException) -> None:
        """Turn what the handler raised into the outcome in ``item``."""
        if ctx._done:  # timed out: that failure is recorded, this outcome is discarded
            return
        if self._abandoning and isinstance(exc, asyncio.CancelledError):
            item.kind, item.error = _FAILED, "CancelledError: the worker stopped"
            return  # not recorded: the lease expires and the run is rescued
        if isinstance(exc, Retry):
            item.delay = exc.delay if exc.delay is not None else self._delay(ctx.type, ctx.attempt)
            if ctx.snoozes < self.max_snoozes:
                item.kind = _SNOOZED
                return
            item.kind = _FAILED
            item.error = (
                f"Retry: the run snoozed {ctx.snoozes} times, as many as max_snoozes allows; "
                "further snoozes count as failed attempts"
            )
            _worker_log.warning(
                "run %s (%s) attempt %d/%d failed: %s",
                ctx.id,
                ctx.type,
                ctx.attempt,
                ctx.max_attempts,
                item.error,
                extra=self._run_fields(ctx),
            )
            return
        item.kind = _FAILED
        item.error = f"{type(exc).__name__}: {exc}"[:10_000]
        item.delay = self._delay(ctx.type, ctx.attempt)
        _worker_log.warning(
            "run %s (%s) attempt %d/%d failed: %s\n%s",
            ctx.id,
            ctx.type,
            ctx.attempt,
            ctx.max_attempts,
            item.error,
            "".join(traceback.format_exception(exc)).rstrip(),
            extra=self._run_fields(ctx),
        )

    def _prefetch_room(self) -> int:
        """How many runs the buffer may hold now (under the lock): as many as the slots finish
        within PREFETCH_HORIZON at the pace executions have been finishing, at most
        ``prefetch``; none until one has finished."""
        if not self.prefetch or self._pace is None:
            return 0
        return min(self.prefetch, int(self.concurrency * PREFETCH_HORIZON / max(self._pace, 1e-6)))

    def _settle(self, ctx: RunContext, item: _Completion, *, abandon: bool = False) -> bool:
        """Queue ``item`` as the outcome of ``ctx``'s execution unless it has one already (its
        handler's or its timeout's); True if it was queued. ``abandon`` (a timeout's) gives up
        on the thread running a plain handler in the same step, so that a handler returning
        meanwhile finds its thread abandoned, never half so."""
        with self._lock:
            if ctx._done:
                return False
            ctx._done = True  # from here on, ctx._thread no longer changes
            del self._active[(ctx.id, ctx.attempt)]
            if ctx.type in self._caps:
                self._capped_running[ctx.type] -= 1
            self._completions.append(item)
            self.processed += 1
            took = time.monotonic() - item.started
            self._pace = took if self._pace is None else self._pace + 0.2 * (took - self._pace)
            if abandon and ctx._thread is not None and ctx._task is None:
                self._pool.abandon(ctx._thread)
            launch = self._take_buffered()  # the slot goes to the next buffered run at once
        self._launch(launch)
        self._wake.set()
        return True

    def _finish(self, ctx: RunContext, item: _Completion) -> None:
        """Queue an execution's outcome, unless its timeout already ended it."""
        if self._settle(ctx, item):
            return
        if ctx._thread is not None and ctx._task is None:
            self._pool.release(ctx._thread)
            self.metrics.set(
                "workflow_worker_stuck_threads", self._pool.stuck, worker_id=self.worker_id
            )
            self._wake.set()  # a slot may be free again
        _worker_log.info(
            "run %s (%s) attempt %d: the handler returned after its timeout; outcome discarded",
            ctx.id,
            ctx.type,
            ctx.attempt,
            extra=self._run_fields(ctx),
        )

    def _time_out(self, ctx: RunContext, item: _Completion) -> None:
        """An execution passed its handler's timeout (the deadline thread calls this): record
        the attempt as failed now and stop waiting for it."""
        timeout = self._timeouts[ctx.type]
        failure = _Completion(
            ctx.id,
            ctx.attempt,
            _FAILED,
            error=f"TimeoutError: the handler did not finish within its timeout of {timeout:g}s",
            delay=self._delay(ctx.type, ctx.attempt),
            type=ctx.type,
            started=item.started,
        )
        if not self._settle(ctx, failure, abandon=True):  # finished in time after all
            return
        thread = ctx._thread
        ctx._lost = True  # is_cancelled() tells a cooperative handler to stop
        self.metrics.inc(
            "workflow_run_timeouts_total", workflow_type=ctx.type, worker_id=self.worker_id
        )
        fields = self._run_fields(ctx)
        if ctx._task is not None or thread is None:  # async, or never started
            if ctx._task is not None:
                self._event_loop().cancel(ctx)
            _worker_log.warning(
                "run %s (%s) attempt %d/%d timed out after %gs; cancelled",
                ctx.id,
                ctx.type,
                ctx.attempt,
                ctx.max_attempts,
                timeout,
                extra=fields,
            )
            return
        # Python cannot stop a thread: it runs on (abandoned by _settle), and its outcome will
        # be discarded.
        stuck, short = self._pool.stuck, self._pool.shortfall
        self.metrics.set("workflow_worker_stuck_threads", stuck, worker_id=self.worker_id)
        _worker_log.warning(
            "run %s (%s) attempt %d/%d timed out after %gs; its thread is still running the "
            "handler (stuck threads: %d; %s), at:\n%s",
            ctx.id,
            ctx.type,
            ctx.attempt,
            ctx.max_attempts,
            timeout,
            stuck,
            f"{short} slots short until they return: only {self.concurrency} are replaced"
            if short
            else "replaced by new ones",
            _handler_stack(thread),
            extra=fields,
        )

    def _delay(self, run_type: str, attempt: int) -> float:
        """The retry delay after ``attempt``: the type's backoff, else the worker's."""
        for backoff in (self._policies.get(run_type, _Policy()).backoff, self._backoff):
            if backoff is None:
                continue
            try:
                delay = backoff(attempt)
                if _is_number(delay) and delay >= 0 and not math.isinf(delay):
                    return float(delay)
                raise ValueError(f"returned {delay!r}")
            except Exception as exc:
                _worker_log.error(
                    "backoff(%d) for %s failed (%s); using the next one", attempt, run_type, exc
                )
        return seed_backoff(attempt)

    # -- handler policies ------------------------------------------------------------------
    def _adopt_policies(self, filt: _Filter) -> None:
        """Take the handlers' policies as they are when the worker starts."""
        self._policies = {t: self.app._policy(t) for t in self._handlers}
        self._async = frozenset(t for t, fn in self._handlers.items() if _is_async(fn))
        self._timeouts = {t: p.timeout for t, p in self._policies.items() if p.timeout}
        self._caps = {
            t: p.concurrency
            for t, p in self._policies.items()
            if p.concurrency and (t in filt.types or t.startswith(filt.prefixes))
        }
        uncapped = tuple(t for t in filt.types if t not in self._caps)
        self._uncapped = _Filter(uncapped, filt.prefixes, filt.handled)

    def _claim_filter(self, filt: _Filter) -> _Filter:
        """What to claim now: ``filt``, or with caps, each capped type with its room."""
        if not self._caps:
            return filt
        assert self._uncapped is not None
        # Buffered runs of a capped type count against its room: it never buffers past its cap.
        buffered = collections.Counter(ctx.type for ctx in self._buffer if ctx.type in self._caps)
        return _replace(
            self._uncapped,
            capped=tuple(
                (t, max(0, cap - self._capped_running[t] - buffered[t]))
                for t, cap in self._caps.items()
            ),
        )

    def _policy_summary(self) -> str:
        parts = []
        if self._async:
            parts.append(f"async={sorted(self._async)}")
        if self._caps:
            parts.append(f"caps={self._caps}")
        if self._timeouts:
            parts.append(f"timeouts={self._timeouts}")
        return "".join(", " + part for part in parts)

    def _start_executors(self) -> None:
        """The event loop (for async handlers) and the deadline thread (for timeouts), if needed."""
        if self._async:
            self._event_loop()
        if self._timeouts:
            self._deadlines = _Deadlines(self._time_out, f"{self.worker_id}-deadlines")

    def _event_loop(self) -> _EventLoop:
        with self._aio_lock:
            if self._aio is None:
                self._aio = _EventLoop(f"{self.worker_id}-asyncio")
            return self._aio

    def _stop_executors(self) -> None:
        if self._deadlines is not None:
            self._deadlines.close()
        if self._aio is not None:
            # Async handlers still running now outlived the shutdown: cancel them (their leases
            # expire and are rescued, as for threads left running).
            self._abandoning = True
            cancelled = self._aio.close(grace=1.0)
            if cancelled:
                _worker_log.warning(
                    "%s: %d async handlers cancelled at shutdown; their leases will expire",
                    self.worker_id,
                    cancelled,
                    extra={"worker_id": self.worker_id},
                )

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
        now = time.monotonic()
        # The first beat, at once, records the worker in the registry.
        due = {"beat": now, "rescue": now + RESCUE_INTERVAL}
        if self.schedules and self._ticking:  # a deadline nobody advances would spin the wait
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
                    if self._extend(conn):
                        self._outage.ok()
                    self._register(conn, first=not registered)
                    registered = True
                if "prune" in due and now >= due["prune"]:
                    due["prune"] = time.monotonic() + self._prune(conn, stop)
                if now >= due["rescue"]:
                    due["rescue"] = now + RESCUE_INTERVAL
                    self._rescue(conn)
                    self.app._repair_times(conn)
                    # A write every few seconds, busy or idle: the end of an outage shows here
                    # even while every handler slot is taken and the claim loop waits.
                    self._outage.ok()
                if "tick" in due and now >= due["tick"]:
                    due["tick"] = now + self.tick_interval
                    self._tick(conn)
                    if not self._ticking:
                        del due["tick"]
                delay = 0.1
                stop.wait(max(0.0, min(due.values()) - time.monotonic()))
            except MinflowError as exc:
                self._outage.failed(exc)
                if conn is not None:
                    conn.close()
                conn = None
                stop.wait(_jitter(delay))
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

    def _tick(self, conn: _Connection) -> None:
        """One ticker pass. Without croniter no schedule can fire here: the ticker is switched
        off for good, with one error (the worker goes on running handlers)."""
        try:
            self.app._tick_on(conn)
        except _MissingCroniter as exc:
            self._ticking = False
            _worker_log.error(
                "%s: a schedule is due but %s; this worker's ticker is off (install croniter, "
                "or start workers with schedules=False / --no-schedules)",
                self.worker_id,
                exc,
            )

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

    def _extend(self, conn: _Connection) -> bool:
        """Extend the leases of running handlers; False when none runs (nothing written)."""
        # The executions themselves, not their (id, attempt): a run that snoozed is claimed
        # again with the same attempt, and its new execution must not inherit a verdict about
        # the lease of the one before.
        with self._lock:
            running = list(self._active.values())
            waiting = list(self._buffer)
        if not running and not waiting:
            return False
        asked = time.monotonic()
        held = [(ctx.id, ctx.attempt) for ctx in running + waiting]
        kept = self.app._extend_leases(conn, self.worker_id, held, self.lease)
        for ctx in waiting:
            if ctx.id in kept:
                ctx._lease_end = asked + self.lease
        for ctx in running:
            if ctx.id not in kept and not ctx._done and ctx._mark_lost():
                _worker_log.info(
                    "run %s: lease lost (cancelled or taken over); is_cancelled() is now true",
                    ctx.id,
                )
        lost = [ctx for ctx in waiting if ctx.id not in kept]
        if lost:
            with self._lock:  # never started: dropped, nothing to record
                for ctx in lost:
                    ctx._mark_lost()
                self._buffer = collections.deque(c for c in self._buffer if not c._lost)
            for ctx in lost:
                _worker_log.info(
                    "run %s: lease lost while waiting in the prefetch buffer (cancelled or "
                    "taken over); dropped unstarted",
                    ctx.id,
                )
        if waiting:
            self._wake.set()  # buffered runs held back for their lease may start now
        return True

    # -- the database's availability and wake-ups ------------------------------------------
    def _database_up(self, up: bool) -> None:
        self.metrics.set("workflow_worker_database_up", float(up), worker_id=self.worker_id)
        if not up:
            self.metrics.inc("workflow_worker_database_outages_total", worker_id=self.worker_id)

    def _watch(self, watch: _Watch, stop: threading.Event) -> None:
        reason = watch(stop, self._wake.set, self._listen_outage.report)
        if reason:
            _worker_log.warning(
                "%s: no wake-ups: %s; polling every %gs instead (listen_dsn= gives LISTEN a "
                "direct connection)",
                self.worker_id,
                reason,
                self.poll_interval,
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

    # -- internal interface used by RunContext ---------------------------------------------
    def _on_event_loop(self) -> bool:
        """True when called from this worker's event loop (where nothing may block)."""
        aio = self._aio
        return aio is not None and aio.on_loop()


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
    """Daemon threads running plain handlers; daemon so that a forced exit never waits for them.

    A thread abandoned in a handler that overran its timeout gets a replacement, for up to
    ``size`` such threads at once (beyond that, stuck handlers would pile up threads without
    end: ``shortfall`` tells the worker how many slots it lacks); it exits when the handler
    finally returns.
    """

    def __init__(self, size: int, execute: Callable[[RunContext, _Completion], None], name: str):
        self._size = size
        self._execute = execute
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the sets and the count (never the hot path)
        self._threads = 0
        self._stuck: set[int] = set()  # idents of threads running an abandoned execution
        self._leaving: set[int] = set()  # formerly stuck threads, to exit once they are back
        self._numbers = itertools.count()
        with self._lock:
            for _ in range(size):
                self._start_thread()

    @property
    def stuck(self) -> int:
        """Threads still running an abandoned execution."""
        return len(self._stuck)

    @property
    def shortfall(self) -> int:
        """Handler slots lost to stuck threads that were not replaced."""
        return max(0, len(self._stuck) - self._size)

    def _wanted(self) -> int:  # with the lock held
        """Threads the pool should have: its size, plus a replacement per stuck thread."""
        return self._size + min(len(self._stuck), self._size)

    def _start_thread(self) -> None:  # with the lock held
        self._threads += 1
        threading.Thread(
            target=self._serve, name=f"{self._name}-handler-{next(self._numbers)}", daemon=True
        ).start()

    def submit(self, ctx: RunContext, item: _Completion) -> None:
        self._queue.put((ctx, item))

    def _serve(self) -> None:
        me = threading.get_ident()
        while True:
            work = self._queue.get()
            if work is None:
                return
            self._execute(*work)
            # Abandonment is decided before the late outcome is handed in, so by now this
            # thread is in one of the sets if it ever will be.
            if self._stuck or self._leaving:
                with self._lock:
                    if me in self._stuck or me in self._leaving:
                        self._stuck.discard(me)
                        self._leaving.discard(me)
                        if self._threads > self._wanted():  # else it stands in for another
                            self._threads -= 1
                            return

    def abandon(self, ident: int) -> None:
        """Give up on the execution thread ``ident`` runs, and replace it while allowed."""
        with self._lock:
            self._stuck.add(ident)
            if self._threads < self._wanted():
                self._start_thread()

    def release(self, ident: int) -> None:
        """Thread ``ident`` is back from an abandoned execution (it exits once done with it)."""
        with self._lock:
            if ident in self._stuck:
                self._stuck.discard(ident)
                self._leaving.add(ident)

    def shutdown(self) -> None:
        with self._lock:
            threads = self._threads
        for _ in range(threads):
            self._queue.put(None)


class _EventLoop:
    """The worker's asyncio event loop, on a thread of its own, awaiting ``async def`` handlers."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), name=name, daemon=True)
        self._thread.start()
        started.wait()

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        self.loop.run_forever()

    def on_loop(self) -> bool:
        """True when called from the loop's thread."""
        return threading.get_ident() == self._thread.ident

    def start(self, work: list[tuple[RunContext, Any]]) -> None:
        """Start each (context, coroutine) as a task: one wake-up of the loop for a batch."""
        self.loop.call_soon_threadsafe(self._start, work)

    def _start(self, work: list[tuple[RunContext, Any]]) -> None:
        for ctx, coroutine in work:
            if ctx._done:  # its timeout passed before the loop got to it
                coroutine.close()
            else:
                ctx._task = self.loop.create_task(coroutine)

    def cancel(self, ctx: RunContext) -> None:
        """Cancel the task awaiting ``ctx``'s handler (from any thread)."""
        self.loop.call_soon_threadsafe(lambda: ctx._task is not None and ctx._task.cancel())

    def close(self, grace: float) -> int:
        """Cancel the tasks still running, give them ``grace`` seconds to unwind, stop the loop
        and return how many were cancelled."""

        async def cancel_all() -> int:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=grace)
            await self.loop.shutdown_asyncgens()
            return len(tasks)

        cancelled = 0
        if not self.loop.is_closed() and self._thread.is_alive():
            with contextlib.suppress(Exception):
                future = asyncio.run_coroutine_threadsafe(cancel_all(), self.loop)
                cancelled = future.result(grace + 1.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(grace + 1.0)
        if not self._thread.is_alive():  # else a handler blocks the loop; leave it to exit
            self.loop.close()
        return cancelled


class _Deadlines:
    """One thread calling ``expire(ctx, item)`` when an execution's timeout passes."""

    def __init__(self, expire: Callable[[RunContext, _Completion], None], name: str):
        self._expire = expire
        self._heap: list[tuple[float, int, RunContext, _Completion]] = []
        self._order = itertools.count()  # ties: a batch shares one deadline
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def add(self, deadline: float, ctx: RunContext, item: _Completion, running: int) -> None:
        """Expire ``ctx`` at monotonic ``deadline``; ``running``: executions still going."""
        with self._cond:
            entry = (deadline, next(self._order), ctx, item)
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
            # Finished executions stay queued until their deadline; with long timeouts and
            # many runs they would pile up, so they are swept out once they dominate.
            if len(self._heap) > 2 * running + 64:
                self._heap = [e for e in self._heap if not e[2]._done]
                heapq.heapify(self._heap)

    def _serve(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap))
                if not due:
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
                    continue
                self._cond.release()  # expire() takes the worker's lock
                try:
                    for _, _, ctx, item in due:
                        if not ctx._done:
                            try:
                                self._expire(ctx, item)
                            except Exception:  # a bug here must not end every later timeout
                                _worker_log.exception("run %s: timeout handling failed", ctx.id)
                finally:
                    self._cond.acquire()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(5)


# ---------------------------------------------------------------------------------------------
# HTTP API and metrics
# ---------------------------------------------------------------------------------------------
# The REST API (the seed's routes under /api/v1 with clean JSON, plus retry, one schedule, an
# OpenAPI document, /healthz and /metrics) on the stdlib's http.server: a (method, pattern) ->
# function route table, JSON errors, an optional API key compared in constant time, a body
# limit, a per-request deadline, request heads read before a handler thread is taken, and
# bounded numbers of handler threads and of connections still sending their head.
# The same server with two routes is a worker's --metrics-port listener.

_http_log = _logger("_http_log", "minflow.http")

_DRAIN_LIMIT = 16 << 20  # an oversized body up to this size is read and dropped, so the 413 arrives
_API = "/api/v1"
_HEALTH_PATHS = ("/healthz", f"{_API}/health")
_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _HTTPError(Exception):
    """An HTTP error response: status, ``{"error": message, **fields}`` and extra headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **fields: Any):
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **fields}
        self.headers = headers or {}


@_dataclass(frozen=True)
class _Text:
    """A non-JSON response body, with headers of its own."""

    text: str
    content_type: str = _METRICS_CONTENT_TYPE
    headers: dict[str, str] = _field(default_factory=dict)


@_dataclass
class _Request:
    """What a route function sees."""

    method: str
    path: str
    params: dict[str, str]  # from the route pattern
    query: dict[str, str]
    body: bytes
    client: Client
    worker: Worker | None
    api_key_required: bool

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


_RFC3339 = _regex(
    "_RFC3339",
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})",
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
        problem = req.client._health()
    except MinflowError as exc:
        raise _HTTPError(503, "database unhealthy", {"Retry-After": "1"}) from exc
    if problem:
        raise _HTTPError(503, f"database read-only: {problem}", {"Retry-After": "1"})
    return 200, {"status": "ok"}


def _r_metrics(req: _Request) -> tuple[int, Any]:
    return 200, _Text(_render_metrics(req.client, req.worker))


def _r_openapi(req: _Request) -> tuple[int, Any]:
    return 200, _openapi_document(req.api_key_required)


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
    field = "run_at" if body.get("run_at") is not None else "run_after"  # named as sent
    when = body.get(field)
    run_id = req.client.submit(
        body["type"],
        body.get("payload"),
        priority=_optional(body, "priority", DEFAULT_PRIORITY),
        # The seed treats an empty key as "no key"; so does this API.
        idempotency_key=None if body.get("idempotency_key") == "" else body.get("idempotency_key"),
        max_attempts=_optional(body, "max_attempts", DEFAULT_MAX_ATTEMPTS),
        run_at=None if when is None else _parse_rfc3339(when, field),
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
    return (200 if schedule_id.updated else 201), {"id": schedule_id}


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


def _r_stats(req: _Request) -> tuple[int, Any]:
    return 200, _stats_document(*_queue_stats(req.client))


_THROUGHPUT_MINUTES = 1440  # the most minutes one request may ask for: a day


def _r_throughput(req: _Request) -> tuple[int, Any]:
    minutes = req.int_param("minutes", 60)
    if not 1 <= minutes <= _THROUGHPUT_MINUTES:
        raise _HTTPError(400, f"minutes must be 1 to {_THROUGHPUT_MINUTES}, got {minutes}")
    first, rows = req.client._finished_per_minute(minutes)
    counts = {
        first + _dt.timedelta(minutes=i): {"succeeded": 0, "failed": 0} for i in range(minutes)
    }
    for minute, event_type, count in rows:
        bucket = counts.get(_parse_time(minute))  # type: ignore[arg-type]
        if bucket is not None:  # None: stamped after the clock was read
            bucket[event_type] = int(count)
    per_minute = [{"minute": _json_value(m), **bucket} for m, bucket in counts.items()]
    return 200, {"minutes": minutes, "per_minute": per_minute}


# -- the dashboard ----------------------------------------------------------------------------
# GET /ui: one page with its style and script inline, which uses the REST API above and makes
# no other request (it works offline). Its Content-Security-Policy allows exactly that style and
# that script (by their SHA-256) and requests to this server: markup that reached the page by
# mistake could run nothing. The script inserts what the server sends as text, never as HTML.

# The page's style, its markup (a <section> per view, dialogs for the key and confirmations)
# and its script, as served.
_UI_STYLE = r"""
:root {
  color-scheme: light dark;
  --fg: #1b1f24; --muted: #59636e; --bg: #fff; --alt: #f4f5f7; --line: #d5d9de;
  --accent: #0a58a8; --on-accent: #fff;
  --pending: #0a58a8; --pending-bg: #e2edfa; --leased: #7a4a00; --leased-bg: #fcefd2;
  --succeeded: #156229; --succeeded-bg: #dcf2e2; --failed: #a8231b; --failed-bg: #fbe2df;
  --cancelled: #474f59; --cancelled-bg: #e9ebee;
}
@media (prefers-color-scheme: dark) {
  :root {
    --fg: #e4e7eb; --muted: #a3acb6; --bg: #15181c; --alt: #1e2227; --line: #343a42;
    --accent: #6aa8ec; --on-accent: #0d1117;
    --pending: #8dbdf3; --pending-bg: #15304f; --leased: #f2c66d; --leased-bg: #3d2d09;
    --succeeded: #7fd494; --succeeded-bg: #143620; --failed: #f59a92; --failed-bg: #4a1a16;
    --cancelled: #c3c9d0; --cancelled-bg: #2c3138;
  }
}
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: var(--bg); }
header { display: flex; flex-wrap: wrap; align-items: center; gap: .4rem 1.25rem;
  padding: .45rem 1rem; border-bottom: 1px solid var(--line); background: var(--alt); }
header h1 { font-size: 15px; margin: 0; }
nav { display: flex; flex-wrap: wrap; gap: .25rem; }
nav a { color: var(--fg); text-decoration: none; padding: .2rem .5rem; border-radius: 3px; }
nav a:hover { background: var(--line); }
nav a[aria-current="page"] { background: var(--accent); color: var(--on-accent); }
.tools { margin-left: auto; display: flex; flex-wrap: wrap; align-items: center; gap: .5rem; }
main { padding: .5rem 1rem 2rem; }
h2 { font-size: 14px; margin: 1rem 0 .35rem; }
h3 { font-size: 13px; margin: .8rem 0 .3rem; }
a { color: var(--accent); }
table { border-collapse: collapse; }
table.wide { width: 100%; }
th, td { padding: .2rem .55rem; border-bottom: 1px solid var(--line); text-align: left;
  white-space: nowrap; vertical-align: top; }
thead th { font-weight: 600; color: var(--muted); background: var(--alt); }
tbody th { font-weight: normal; }
tfoot td, tfoot th { font-weight: 600; }
.n { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
.clip { max-width: 18rem; overflow: hidden; text-overflow: ellipsis; }
.mono, pre, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12px; }
.muted { color: var(--muted); }
.st { display: inline-block; padding: 0 .4em; border-radius: 3px; font-size: 12px;
  font-weight: 600; border: 1px solid currentColor; }
.st-pending { color: var(--pending); background: var(--pending-bg); }
.st-leased, .st-retried, .st-paused { color: var(--leased); background: var(--leased-bg); }
.st-succeeded, .st-alive, .st-active { color: var(--succeeded); background: var(--succeeded-bg); }
.st-failed, .st-dead { color: var(--failed); background: var(--failed-bg); }
.st-cancelled, .st-other { color: var(--cancelled); background: var(--cancelled-bg); }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: var(--alt); margin: 0;
  border: 1px solid var(--line); border-radius: 3px; padding: .45rem .6rem; max-height: 24rem;
  overflow: auto; }
.bar { display: flex; flex-wrap: wrap; gap: .5rem .75rem; align-items: flex-end;
  margin: .4rem 0; }
fieldset { border: 1px solid var(--line); border-radius: 4px; margin: 0 0 1rem;
  padding: .4rem .8rem .7rem; max-width: 60rem; }
legend { font-weight: 600; padding: 0 .3rem; }
label { display: flex; flex-direction: column; gap: 2px; font-size: 12px; color: var(--muted); }
label.check { flex-direction: row; align-items: center; gap: .3rem; color: var(--fg); }
input, select, button { font: inherit; color: var(--fg); background: var(--bg);
  border: 1px solid var(--line); border-radius: 3px; padding: .2rem .45rem; }
input[type="checkbox"] { padding: 0; }
button { background: var(--alt); cursor: pointer; }
button:hover:not(:disabled) { border-color: var(--muted); }
button.primary { background: var(--accent); border-color: var(--accent); color: var(--on-accent); }
button.danger { color: var(--failed); border-color: var(--failed); }
button:disabled { opacity: .5; cursor: default; }
:focus-visible { outline: 2px solid var(--accent); outline-offset: 1px; }
h2:focus { outline: none; }
.pager { display: flex; flex-wrap: wrap; align-items: center; gap: .5rem; margin: .4rem 0; }
.pager .grow { flex: 1; }
#banner { margin: 0; padding: .4rem 1rem; color: var(--failed); background: var(--failed-bg);
  border-bottom: 1px solid var(--failed); }
.note { margin: .4rem 0; min-height: 1.45em; }
.pager .note { margin: 0; }
.note.bad { color: var(--failed); }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(24rem, 1fr)); gap: 0 1.5rem; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: .1rem 1rem; margin: 0; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; overflow-wrap: anywhere; }
ol.tl { list-style: none; margin: 0; padding: 0; }
ol.tl li { border-left: 2px solid var(--line); padding: 0 0 .5rem .75rem; position: relative; }
ol.tl li::before { content: ""; position: absolute; left: -5px; top: .45em; width: 8px;
  height: 8px; border-radius: 50%; background: var(--muted); }
ol.tl pre { margin-top: .2rem; max-height: 10rem; }
figure { margin: 0; max-width: 60rem; }
svg.chart { display: block; width: 100%; height: 120px; background: var(--alt);
  border: 1px solid var(--line); border-radius: 3px; }
.chart .ok { fill: var(--succeeded); }
.chart .bad { fill: var(--failed); }
.chart .hit { fill: transparent; }
.chart g:hover .hit { fill: var(--line); }
.axis { display: flex; justify-content: space-between; color: var(--muted); font-size: 12px; }
.legend { display: inline-flex; gap: .8rem; margin-left: .8rem; }
.sw { display: inline-block; width: .8em; height: .8em; margin-right: .25em;
  vertical-align: -1px; border-radius: 2px; }
.sw.ok { background: var(--succeeded); }
.sw.bad { background: var(--failed); }
dialog { color: var(--fg); background: var(--bg); border: 1px solid var(--line);
  border-radius: 5px; padding: 1rem 1.2rem; width: min(30rem, calc(100vw - 2rem)); }
dialog::backdrop { background: rgba(0, 0, 0, .35); }
dialog h2 { margin-top: 0; }
dialog input { width: 100%; }
.buttons { display: flex; flex-wrap: wrap; justify-content: flex-end; gap: .5rem;
  margin-top: .9rem; }
.sr { position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%);
  white-space: nowrap; }
@media (max-width: 640px) {
  header, main { padding-left: .5rem; padding-right: .5rem; }
  .tools { margin-left: 0; }
  .clip { max-width: 14rem; }
}
"""

_UI_BODY = r"""<header>
<h1>minflow</h1>
<nav aria-label="Views">
<a href="#overview" data-view="overview">Overview</a>
<a href="#runs" data-view="runs">Runs</a>
<a href="#schedules" data-view="schedules">Schedules</a>
<a href="#actions" data-view="actions">Bulk actions &amp; prune</a>
</nav>
<div class="tools">
<label class="check">Refresh <select id="every"><option value="0">off</option>
<option value="2">every 2 s</option><option value="5" selected>every 5 s</option>
<option value="15">every 15 s</option><option value="60">every minute</option></select></label>
<span id="updated" class="muted"></span>
<button type="button" id="key-open">API key</button>
</div>
</header>
<p id="banner" role="alert" hidden></p>
<noscript><p>The minflow dashboard needs JavaScript.</p></noscript>
<main>
<section id="v-overview" hidden>
<h2 tabindex="-1">Queue <span class="muted">(times in UTC)</span></h2>
<div class="scroll"><table>
<thead><tr><th scope="col">Type</th>
<th scope="col" class="n"><span class="st st-pending">pending</span></th>
<th scope="col" class="n"><span class="st st-leased">leased</span></th>
<th scope="col" class="n"><span class="st st-succeeded">succeeded</span></th>
<th scope="col" class="n"><span class="st st-failed">failed</span></th>
<th scope="col" class="n"><span class="st st-cancelled">cancelled</span></th>
<th scope="col" class="n">Oldest due pending</th></tr></thead>
<tbody id="stats"></tbody><tfoot id="stats-total"></tfoot>
</table></div>
<h2>Runs finished per minute, last hour
<span class="legend"><span><span class="sw ok"></span>succeeded</span>
<span><span class="sw bad"></span>failed</span></span></h2>
<figure id="chart"><svg class="chart" aria-hidden="true"></svg>
<div class="axis"><span>60 min ago</span><span id="chart-peak"></span><span>now</span></div>
<figcaption id="chart-text" class="muted"></figcaption></figure>
<h2>Workers <span id="workers-count" class="muted"></span></h2>
<div class="scroll"><table>
<thead><tr><th scope="col">Worker</th><th scope="col">Host</th><th scope="col" class="n">PID</th>
<th scope="col">Handles</th><th scope="col" class="n">Running</th><th scope="col">Started</th>
<th scope="col">Last seen</th><th scope="col">State</th></tr></thead>
<tbody id="workers"></tbody></table></div>
</section>

<section id="v-runs" hidden>
<h2 tabindex="-1">Runs</h2>
<form id="filter" class="bar" role="search">
<label>Type <input name="type" list="types" size="24" autocomplete="off"></label>
<label>Status <select name="status"><option value="">any</option><option>pending</option>
<option>leased</option><option>succeeded</option><option>failed</option>
<option>cancelled</option></select></label>
<label>Idempotency key <input name="idempotency_key" size="20" autocomplete="off"></label>
<label>Per page <select name="limit"><option>25</option><option selected>50</option>
<option>100</option><option>200</option></select></label>
<button type="submit" class="primary">Apply</button>
<button type="button" id="filter-reset">Reset</button>
</form>
<datalist id="types"></datalist>
<div class="pager">
<span id="runs-range"></span>
<span id="runs-note" class="note grow" role="status"></span>
<button type="button" id="bulk-retry">Retry matching…</button>
<button type="button" id="bulk-cancel" class="danger">Cancel matching…</button>
<button type="button" id="prev">← Newer</button>
<button type="button" id="next">Older →</button>
</div>
<div class="scroll"><table class="wide">
<thead><tr><th scope="col">Run</th><th scope="col">Type</th><th scope="col">Status</th>
<th scope="col" class="n">Attempt</th><th scope="col" class="n">Priority</th>
<th scope="col">Idempotency key</th><th scope="col">Created</th><th scope="col">Updated</th>
<th scope="col">Last error</th></tr></thead>
<tbody id="runs"></tbody></table></div>
</section>

<section id="v-run" hidden>
<p><a href="#runs" id="run-back">← Runs</a></p>
<h2 tabindex="-1" id="run-title">Run</h2>
<div class="pager">
<button type="button" id="run-retry" class="primary">Retry</button>
<button type="button" id="run-cancel" class="danger">Cancel run…</button>
</div>
<p id="run-note" class="note" role="status"></p>
<div id="run-body" class="cols"></div>
</section>

<section id="v-schedules" hidden>
<h2 tabindex="-1">Schedules</h2>
<p id="schedules-note" class="note" role="status"></p>
<div class="scroll"><table>
<thead><tr><th scope="col">Name</th><th scope="col">Type</th><th scope="col">Cron</th>
<th scope="col">Timezone</th><th scope="col">Next run</th><th scope="col">Last run</th>
<th scope="col">State</th><th scope="col">Actions</th></tr></thead>
<tbody id="schedules"></tbody></table></div>
</section>

<section id="v-actions" hidden>
<h2 tabindex="-1">Bulk actions &amp; prune</h2>
<form id="bulk"><fieldset><legend>Retry or cancel every matching run</legend>
<div class="bar">
<label>Action <select name="kind"><option value="retry">retry (failed, cancelled)</option>
<option value="cancel">cancel (pending, leased)</option></select></label>
<label>Type <input name="type" list="types" size="22" autocomplete="off"></label>
<label>Status <select name="status"></select></label>
<label>Created at or after (your time)
<input name="created_after" type="datetime-local" step="1"></label>
<label>Created before (your time)
<input name="created_before" type="datetime-local" step="1"></label>
<label>Idempotency key prefix <input name="key_prefix" size="18" autocomplete="off"></label>
<button type="submit" class="primary">Count and confirm…</button>
</div>
<p id="bulk-note" class="note" role="status"></p></fieldset></form>
<form id="prune"><fieldset><legend>Prune: delete finished runs and their events</legend>
<div class="bar">
<label>Last updated more than <input name="older_than" value="30d" size="8" required
 aria-describedby="prune-hint"></label>
<span id="prune-hint" class="muted">ago: seconds, or e.g. 90s, 15m, 2h, 7d</span>
<label class="check"><input type="checkbox" name="statuses" value="succeeded" checked>
succeeded</label>
<label class="check"><input type="checkbox" name="statuses" value="failed" checked> failed</label>
<label class="check"><input type="checkbox" name="statuses" value="cancelled" checked>
cancelled</label>
<button type="submit" class="danger">Count and confirm…</button>
</div>
<p id="prune-note" class="note" role="status"></p></fieldset></form>
</section>
</main>

<dialog id="key-dialog" aria-labelledby="key-title">
<form id="key-form">
<h2 id="key-title">API key</h2>
<p id="key-msg" role="alert"></p>
<label>API key (kept in this tab only)
<input id="key-input" type="password" autocomplete="off" required></label>
<div class="buttons">
<button type="button" id="key-forget">Forget key</button>
<button type="button" id="key-close">Close</button>
<button type="submit" class="primary">Use key</button>
</div>
</form>
</dialog>

<dialog id="confirm-dialog" aria-labelledby="confirm-text">
<p id="confirm-text"></p>
<div class="buttons">
<button type="button" id="confirm-back">Back</button>
<button type="button" id="confirm-ok" class="primary"></button>
</div>
</dialog>
"""

_UI_SCRIPT = r"""
"use strict";
// Every text that comes from the server is put in the page as text (Text nodes, textContent,
// attribute values set one by one); nothing from the server is ever parsed as HTML.
(() => {
const API = location.pathname.replace(/\/ui\/?$/, "") + "/api/v1";
const KEY = "minflow.api-key"; // sessionStorage: this tab only, gone when it closes
const CHART_EVERY = 30000; // the per-minute chart scans an hour of events: less often
const STATUSES = ["pending", "leased", "succeeded", "failed", "cancelled"];
const BADGES = new Set([...STATUSES, "retried", "alive", "dead", "active", "paused"]);
const $ = (id) => document.getElementById(id);

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "on") {
      for (const [type, fn] of Object.entries(value)) el.addEventListener(type, fn);
    }
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const kid of kids.flat()) {
    if (kid !== null && kid !== undefined && kid !== false) el.append(kid); // strings: Text nodes
  }
  return el;
}

function svg(tag, attrs, ...kids) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  el.append(...kids);
  return el;
}

const badge = (word) => h("span", {class: "st st-" + (BADGES.has(word) ? word : "other")}, word);
const num = (n) => Number(n).toLocaleString("en-US");
const plural = (n, word) => num(n) + " " + word + (n === 1 ? "" : "s");
const json = (value) => JSON.stringify(value === undefined ? null : value, null, 2);
const link = (hash, ...kids) => h("a", {href: hash}, ...kids);
const runsLink = (filter) => "#runs?" + new URLSearchParams(filter);

function when(iso) {
  if (!iso) return "–";
  const t = new Date(iso);
  return isNaN(t) ? String(iso) : t.toISOString().slice(0, 19).replace("T", " ");
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.floor(seconds);
  const two = (n) => String(n).padStart(2, "0");
  if (s >= 86400) return Math.floor(s / 86400) + "d" + two(Math.floor(s % 86400 / 3600)) + "h";
  if (s >= 3600) return Math.floor(s / 3600) + "h" + two(Math.floor(s % 3600 / 60)) + "m";
  if (s >= 60) return Math.floor(s / 60) + "m" + two(s % 60) + "s";
  return s + "s";
}

// -- the API, with the key ---------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const key = sessionStorage.getItem(KEY);
  const headers = {Accept: "application/json"};
  // A header carries bytes: send the key's UTF-8 bytes, which is what the server compares.
  if (key) headers["X-API-Key"] = String.fromCharCode(...new TextEncoder().encode(key));
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(API + path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "omit", redirect: "error",
    });
  } catch {
    throw new ApiError(0, "Cannot reach the minflow server (" + method + " " + path + ").");
  }
  let data = null;
  try { data = await response.json(); } catch { /* not JSON: the status says enough */ }
  if (response.status === 401) {
    // Only the key this request sent is wrong; a newer one may have been entered meanwhile.
    if (sessionStorage.getItem(KEY) === key) {
      sessionStorage.removeItem(KEY);
      askKey(key
        ? "The server did not accept that API key (401). Check it and enter it again."
        : "This server requires an API key (its MINFLOW_API_KEY). Enter it to continue.");
    }
    throw new ApiError(401, "API key needed");
  }
  if (!response.ok) {
    const message = data && typeof data.error === "string" ? data.error : response.statusText;
    throw new ApiError(response.status, response.status + " " + message);
  }
  return data;
}

let keyWanted = false;

function askKey(message) {
  keyWanted = true;
  $("key-msg").textContent = message;
  const dialog = $("key-dialog");
  if (dialog.open) return;
  $("key-input").value = "";
  dialog.showModal();
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  // What a header can carry: its ends trimmed, no control characters.
  const key = $("key-input").value.trim();
  if (!key || /[\x00-\x1f\x7f]/.test(key)) {
    $("key-msg").textContent = key ? "An API key cannot contain control characters."
      : "Enter the API key.";
    return;
  }
  sessionStorage.setItem(KEY, key);
  $("key-input").value = "";
  keyWanted = false;
  $("key-dialog").close();
  banner(null);
  refresh();
});
$("key-open").addEventListener("click", () => {
  const dialog = $("key-dialog");
  $("key-msg").textContent = sessionStorage.getItem(KEY)
    ? "A key is set for this tab. Enter another one to replace it." : "No key is set.";
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
});
$("key-forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  $("key-msg").textContent = "The key is forgotten.";
  $("key-input").focus();
});
$("key-close").addEventListener("click", () => $("key-dialog").close());
$("key-dialog").addEventListener("close", () => {
  if (keyWanted) banner("An API key is needed: use the API key button.");
});

// -- feedback ----------------------------------------------------------------------------------
function banner(message) {
  const el = $("banner");
  if (!message) { el.hidden = true; el.textContent = ""; return; }
  if (el.textContent !== message) el.textContent = message;
  el.hidden = false;
}

function note(id, message, bad) {
  const el = $(id);
  el.textContent = message;
  el.classList.toggle("bad", Boolean(bad));
}

function confirmBox(text, ok) {
  return new Promise((resolve) => {
    const dialog = $("confirm-dialog");
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = ok;
    dialog.returnValue = "";
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), {once: true});
    dialog.showModal();
    $("confirm-back").focus();
  });
}
$("confirm-back").addEventListener("click", () => $("confirm-dialog").close(""));
$("confirm-ok").addEventListener("click", () => $("confirm-dialog").close("ok"));

// An action's errors go to its note; a 401 has already asked for the key.
async function act(noteId, work) {
  try {
    await work();
  } catch (error) {
    note(noteId, error.status === 401 ? "Not done: an API key is needed." : error.message, true);
  }
  refresh();
}

// -- rendering: a view's data is drawn again only when it changed, so focus and selection in a
// table survive the auto-refresh -----------------------------------------------------------------
const drawn = {};

function draw(name, data, paint) {
  const text = JSON.stringify(data);
  if (drawn[name] === text) return;
  drawn[name] = text;
  paint(data);
}

function fill(id, rows, columns, empty) {
  $(id).replaceChildren(...(rows.length ? rows
    : [h("tr", {}, h("td", {colspan: columns, class: "muted"}, empty))]));
}

// -- overview ----------------------------------------------------------------------------------
let chartAt = 0;

async function loadOverview() {
  const chartDue = Date.now() - chartAt >= CHART_EVERY;
  const [stats, workers, throughput] = await Promise.all([
    api("GET", "/stats"),
    api("GET", "/workers"),
    chartDue ? api("GET", "/throughput?minutes=60") : null,
  ]);
  draw("stats", stats, paintStats);
  draw("workers", workers, paintWorkers);
  if (throughput) {
    chartAt = Date.now();
    draw("chart", throughput, paintChart);
  }
}

function paintStats(stats) {
  const types = Object.keys(stats).sort();
  $("types").replaceChildren(...types.map((type) => h("option", {value: type})));
  const totals = STATUSES.map(() => 0);
  let oldest = null;
  const rows = types.map((type) => {
    const counts = stats[type];
    const wait = counts.oldest_due_pending_seconds;
    if (wait !== null && wait !== undefined && (oldest === null || wait > oldest)) oldest = wait;
    return h("tr", {},
      h("th", {scope: "row"}, link(runsLink({type}), type)),
      STATUSES.map((status, i) => {
        const n = counts[status] || 0;
        totals[i] += n;
        return h("td", {class: "n"}, n ? link(runsLink({type, status}), num(n))
          : h("span", {class: "muted"}, "0"));
      }),
      h("td", {class: "n"}, age(wait)));
  });
  fill("stats", rows, 7, "No runs yet.");
  $("stats-total").replaceChildren(...(types.length > 1 ? [h("tr", {}, h("th", {scope: "row"},
    "Total"), totals.map((n) => h("td", {class: "n"}, num(n))), h("td", {class: "n"},
    age(oldest)))] : []));
}

function paintChart(data) {
  const minutes = data.per_minute;
  const width = 600, height = 100, step = width / Math.max(minutes.length, 1);
  const top = Math.max(0, ...minutes.map((m) => m.succeeded + m.failed));
  const peak = Math.max(top, 1);
  let ok = 0, bad = 0;
  const bars = minutes.map((m, i) => {
    ok += m.succeeded;
    bad += m.failed;
    const x = (i * step).toFixed(1), w = Math.max(step - 1, 1).toFixed(1);
    const hOk = (m.succeeded / peak) * height, hBad = (m.failed / peak) * height;
    const label = when(m.minute).slice(11, 16) + " UTC: " + num(m.succeeded) + " succeeded, "
      + num(m.failed) + " failed";
    return svg("g", {},
      svg("title", {}, label),
      svg("rect", {class: "hit", x, y: 0, width: w, height}),
      svg("rect", {class: "ok", x, y: (height - hOk).toFixed(1), width: w, height: hOk.toFixed(1)}),
      svg("rect", {class: "bad", x, y: (height - hOk - hBad).toFixed(1), width: w,
        height: hBad.toFixed(1)}));
  });
  const chart = svg("svg", {class: "chart", viewBox: `0 0 ${width} ${height}`,
    preserveAspectRatio: "none", role: "img", "aria-labelledby": "chart-text"}, ...bars);
  $("chart").querySelector("svg").replaceWith(chart);
  $("chart-peak").textContent = "peak " + plural(top, "run") + " a minute";
  $("chart-text").textContent = plural(ok + bad, "run") + " finished in the last "
    + minutes.length + " minutes: " + num(ok) + " succeeded, " + num(bad) + " failed.";
}

function paintWorkers(workers) {
  const alive = workers.filter((w) => w.alive).length;
  $("workers-count").textContent = "(" + num(alive) + " alive"
    + (workers.length > alive ? ", " + num(workers.length - alive) + " dead" : "") + ")";
  fill("workers", workers.map((w) => {
    const handles = [...w.types, ...w.prefixes.map((p) => p + "*")].join(", ") || "every type";
    return h("tr", {},
      h("td", {class: "mono"}, w.id), h("td", {}, w.host), h("td", {class: "n"}, String(w.pid)),
      h("td", {class: "clip", title: handles}, handles),
      h("td", {class: "n"}, w.running + " / " + w.concurrency),
      h("td", {}, when(w.started_at)), h("td", {}, when(w.last_seen_at)),
      h("td", {}, badge(w.alive ? "alive" : "dead")));
  }), 8, "No workers recorded.");
}

// -- runs --------------------------------------------------------------------------------------
const FILTERS = ["type", "status", "idempotency_key"];
let params = new URLSearchParams();

function whole(text, fallback, low, high) {
  const n = /^\d{1,9}$/.test(text || "") ? Number(text) : fallback;
  return Math.min(Math.max(n, low), high);
}

function runFilter() {
  const filter = {};
  for (const name of FILTERS) if (params.get(name)) filter[name] = params.get(name);
  return filter;
}

async function loadRuns() {
  const limit = whole(params.get("limit"), 50, 1, 500);
  const offset = whole(params.get("offset"), 0, 0, 2147483647);
  // One more than a page: whether an older page exists.
  const query = new URLSearchParams({...runFilter(), limit: limit + 1, offset});
  const runs = await api("GET", "/workflows?" + query);
  const page = runs.slice(0, limit);
  draw("runs", page, paintRuns);
  $("runs-range").textContent = page.length
    ? "Runs " + num(offset + 1) + "–" + num(offset + page.length) : "No runs match.";
  $("prev").disabled = offset === 0;
  $("next").disabled = runs.length <= limit;
  const status = params.get("status") || "";
  const keyed = Boolean(params.get("idempotency_key"));
  for (const [id, allowed] of [["bulk-retry", ["failed", "cancelled"]],
    ["bulk-cancel", ["pending", "leased"]]]) {
    const button = $(id);
    button.disabled = keyed || (status !== "" && !allowed.includes(status));
    button.title = keyed ? "Bulk actions match a key prefix: see Bulk actions & prune" : "";
  }
}

function paintRuns(runs) {
  fill("runs", runs.map((run) => h("tr", {},
    h("td", {class: "mono", title: run.id}, link("#run/" + encodeURIComponent(run.id),
      h("span", {class: "sr"}, "Run "), "…" + run.id.slice(-8))),
    h("td", {}, run.type), h("td", {}, badge(run.status)),
    h("td", {class: "n"}, run.attempt + " / " + run.max_attempts),
    h("td", {class: "n"}, String(run.priority)),
    h("td", {class: "clip mono", title: run.idempotency_key || null}, run.idempotency_key || ""),
    h("td", {}, when(run.created_at)), h("td", {}, when(run.updated_at)),
    h("td", {class: "clip", title: run.last_error || null}, run.last_error || ""))),
  9, "No runs match.");
}

function pageTo(offset) {
  const next = new URLSearchParams(params);
  if (offset > 0) next.set("offset", offset); else next.delete("offset");
  location.hash = "#runs?" + next;
}

$("prev").addEventListener("click", () => {
  const limit = whole(params.get("limit"), 50, 1, 500);
  pageTo(Math.max(0, whole(params.get("offset"), 0, 0, 2147483647) - limit));
});
$("next").addEventListener("click", () => {
  const limit = whole(params.get("limit"), 50, 1, 500);
  pageTo(whole(params.get("offset"), 0, 0, 2147483647) + limit);
});
$("filter").addEventListener("submit", (event) => {
  event.preventDefault();
  const next = new URLSearchParams();
  for (const [name, value] of new FormData(event.target)) {
    if (value && !(name === "limit" && value === "50")) next.set(name, value);
  }
  const hash = "#runs?" + next;
  if (location.hash === hash) refresh(); else location.hash = hash;
});
$("filter-reset").addEventListener("click", () => { location.hash = "#runs"; });

// Retry or cancel every run a filter matches: count first (dry run), confirm, then do it.
async function bulk(action, filter, noteId) {
  const path = "/workflows/" + action;
  const {count} = await api("POST", path, {...filter, dry_run: true});
  const what = Object.entries(filter).map(([k, v]) => k + " " + v).join(", ") || "no filter";
  if (!count) {
    note(noteId, "No runs match (" + what + ").");
    return;
  }
  const verb = action === "retry" ? "Retry" : "Cancel";
  if (!await confirmBox(verb + " " + plural(count, "run") + " (" + what + ")?",
    verb + " " + plural(count, "run"))) {
    note(noteId, "Nothing changed.");
    return;
  }
  const done = await api("POST", path, filter);
  note(noteId, (action === "retry" ? "Retried " : "Cancelled ") + plural(done.count, "run") + ".");
}

function filterFor() {
  const filter = {};
  if (params.get("type")) filter.type = params.get("type");
  if (params.get("status")) filter.status = params.get("status");
  return filter;
}

$("bulk-retry").addEventListener("click",
  () => act("runs-note", () => bulk("retry", filterFor(), "runs-note")));
$("bulk-cancel").addEventListener("click",
  () => act("runs-note", () => bulk("cancel", filterFor(), "runs-note")));

// -- one run -----------------------------------------------------------------------------------
let runId = "";
let runStatus = "";

async function loadRun() {
  const path = "/workflows/" + encodeURIComponent(runId);
  let run, events;
  try {
    [run, events] = await Promise.all([api("GET", path), api("GET", path + "/events")]);
  } catch (error) {
    if (error.status !== 404) throw error;
    runStatus = "";
    delete drawn.run;
    $("run-title").replaceChildren("No run ", h("code", {}, runId));
    $("run-body").replaceChildren();
    $("run-retry").disabled = $("run-cancel").disabled = true;
    return;
  }
  runStatus = run.status;
  $("run-retry").disabled = !["failed", "cancelled"].includes(run.status);
  $("run-cancel").disabled = !["pending", "leased"].includes(run.status);
  draw("run", [run, events], paintRun);
}

function paintRun([run, events]) {
  $("run-title").replaceChildren("Run ", h("code", {}, run.id), " ", badge(run.status));
  const fields = [
    ["Type", run.type], ["Attempt", run.attempt + " of " + run.max_attempts],
    ["Priority", String(run.priority)], ["Idempotency key", run.idempotency_key || "–"],
    ["Run at", when(run.run_at)], ["Created", when(run.created_at)],
    ["Updated", when(run.updated_at)], ["Leased by", run.leased_by || "–"],
    ["Lease until", when(run.lease_until)],
  ];
  const timeline = events.map((e) => h("li", {},
    h("span", {class: "muted"}, when(e.created_at)), " ", badge(e.event_type),
    e.data === null ? null : h("pre", {}, JSON.stringify(e.data))));
  $("run-body").replaceChildren(
    h("div", {},
      h("h3", {}, "Details"),
      h("dl", {class: "kv"}, fields.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      run.last_error ? [h("h3", {}, "Last error"), h("pre", {id: "run-error"}, run.last_error)]
        : null,
      h("h3", {}, "Payload"), h("pre", {id: "run-payload"}, json(run.payload)),
      h("h3", {}, "Result"), h("pre", {id: "run-result"}, json(run.result))),
    h("div", {},
      h("h3", {}, "Events (" + events.length + ")"),
      events.length ? h("ol", {class: "tl", id: "run-events"}, timeline)
        : h("p", {class: "muted"}, "No events.")));
}

$("run-retry").addEventListener("click", () => act("run-note", async () => {
  await api("POST", "/workflows/" + encodeURIComponent(runId) + "/retry");
  note("run-note", "Retried: the run is pending again.");
}));
$("run-cancel").addEventListener("click", () => act("run-note", async () => {
  if (!await confirmBox("Cancel this " + runStatus + " run? A running handler sees "
    + "is_cancelled(); its outcome is not recorded.", "Cancel run")) return;
  await api("DELETE", "/workflows/" + encodeURIComponent(runId));
  note("run-note", "Cancelled.");
}));

// -- schedules ---------------------------------------------------------------------------------
async function loadSchedules() {
  draw("schedules", await api("GET", "/schedules"), paintSchedules);
}

function paintSchedules(schedules) {
  fill("schedules", schedules.map((s) => {
    const name = s.name || "…" + s.id.slice(-8);
    const path = "/schedules/" + encodeURIComponent(s.id);
    const toggle = s.enabled ? "pause" : "resume";
    return h("tr", {},
      h("td", {}, s.name || h("span", {class: "muted mono"}, "…" + s.id.slice(-8))),
      h("td", {}, s.type), h("td", {class: "mono"}, s.cron), h("td", {}, s.timezone),
      h("td", {}, s.enabled ? when(s.next_run_at) : "–"), h("td", {}, when(s.last_run_at)),
      h("td", {}, badge(s.enabled ? "active" : "paused")),
      h("td", {},
        h("button", {type: "button", "aria-label": (s.enabled ? "Pause " : "Resume ") + name,
          on: {click: () => act("schedules-note", async () => {
            await api("PATCH", path + "/" + toggle);
            note("schedules-note", (s.enabled ? "Paused " : "Resumed ") + name + ".");
          })}}, s.enabled ? "Pause" : "Resume"),
        " ",
        h("button", {type: "button", class: "danger", "aria-label": "Delete " + name,
          on: {click: () => act("schedules-note", async () => {
            if (!await confirmBox("Delete schedule " + name + "? Runs it already created stay.",
              "Delete schedule")) return;
            await api("DELETE", path);
            note("schedules-note", "Deleted " + name + ".");
          })}}, "Delete")));
  }), 8, "No schedules.");
}

// -- bulk actions and prune --------------------------------------------------------------------
const BULK_STATUSES = {retry: ["failed", "cancelled"], cancel: ["pending", "leased"]};

function bulkStatuses() {
  const form = $("bulk");
  form.status.replaceChildren(h("option", {value: ""}, "any of " +
    BULK_STATUSES[form.kind.value].join(", ")),
  ...BULK_STATUSES[form.kind.value].map((s) => h("option", {}, s)));
}
$("bulk").kind.addEventListener("change", bulkStatuses);
bulkStatuses();

$("bulk").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const filter = {};
  for (const name of ["type", "status", "key_prefix"]) {
    if (form[name].value) filter[name] = form[name].value;
  }
  for (const name of ["created_after", "created_before"]) {
    if (form[name].value) filter[name] = new Date(form[name].value).toISOString();
  }
  act("bulk-note", () => bulk(form.kind.value, filter, "bulk-note"));
});

$("prune").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const text = form.older_than.value.trim();
  const statuses = [...form.querySelectorAll("[name=statuses]:checked")].map((c) => c.value);
  if (!statuses.length) {
    note("prune-note", "Choose at least one status.", true);
    return;
  }
  const body = {older_than: /^\d+(\.\d+)?$/.test(text) ? Number(text) : text, statuses};
  act("prune-note", async () => {
    const {count} = await api("POST", "/prune", {...body, dry_run: true});
    const what = statuses.join(", ") + ", last updated more than " + text + " ago";
    if (!count) {
      note("prune-note", "No runs to prune (" + what + ").");
      return;
    }
    if (!await confirmBox("Delete " + plural(count, "run") + " (" + what + ") and their "
      + "events? This cannot be undone.", "Delete " + plural(count, "run"))) {
      note("prune-note", "Nothing deleted.");
      return;
    }
    const done = await api("POST", "/prune", body);
    note("prune-note", "Deleted " + plural(done.count, "run") + ".");
  });
});

// -- views and the refresh loop ----------------------------------------------------------------
const VIEWS = {
  overview: {title: "Overview", load: loadOverview},
  runs: {title: "Runs", load: loadRuns},
  run: {title: "Run", load: loadRun, nav: "runs"},
  schedules: {title: "Schedules", load: loadSchedules},
  actions: {title: "Bulk actions & prune", load: async () => {}},
};
let view = "overview";
let busy = false;
let again = false;
let timer = 0;
let took = 0; // how long the last refresh took, in ms
let first = true;

// One refresh at a time: asked for meanwhile, it follows the one in flight.
async function refresh() {
  if (keyWanted) return; // resumed once a key is entered
  if (busy) {
    again = true;
    return;
  }
  busy = true;
  again = false;
  clearTimeout(timer);
  const started = performance.now();
  try {
    await VIEWS[view].load();
    $("updated").textContent = "updated " + new Date().toISOString().slice(11, 19) + " UTC"
      + (Number($("every").value) ? "" : ", paused");
    if (!keyWanted) banner(null);
    if (first) performance.mark("minflow-data"); // the first view drawn with data
    first = false;
  } catch (error) {
    if (error.status !== 401) banner(error.message);
  } finally {
    took = performance.now() - started;
    busy = false;
    if (again) refresh(); else schedule();
  }
}

// A slow answer (a large table to count) spaces the refreshes out: at most a fifth of the time
// is spent waiting for them.
function schedule() {
  clearTimeout(timer);
  const every = Number($("every").value) * 1000;
  if (every && !keyWanted && !document.hidden) {
    timer = setTimeout(refresh, Math.max(every, 4 * took));
  }
}

$("every").addEventListener("change", () => {
  if (Number($("every").value)) refresh();
  else {
    clearTimeout(timer);
    $("updated").textContent = "paused";
  }
});
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && Number($("every").value)) refresh();
});

function route(moved) {
  const hash = location.hash.slice(1);
  const cut = hash.indexOf("?");
  const name = cut < 0 ? hash : hash.slice(0, cut);
  params = new URLSearchParams(cut < 0 ? "" : hash.slice(cut + 1));
  view = "overview";
  if (name.startsWith("run/")) {
    view = "run";
    try { runId = decodeURIComponent(name.slice(4)); } catch { runId = name.slice(4); }
    note("run-note", "");
  } else if (Object.hasOwn(VIEWS, name)) view = name;
  for (const key of Object.keys(VIEWS)) $("v-" + key).hidden = key !== view;
  const current = VIEWS[view].nav || view;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.view === current) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = VIEWS[view].title + " · minflow";
  if (view === "runs") {
    const form = $("filter");
    for (const name of FILTERS) form[name].value = params.get(name) || "";
    form.limit.value = String(whole(params.get("limit"), 50, 1, 500));
    if (!form.limit.value) form.limit.value = "50";
    note("runs-note", "");
  }
  if (view === "overview") chartAt = 0;
  if (moved) $("v-" + view).querySelector("h2").focus();
  refresh();
}

window.addEventListener("hashchange", () => route(true));
route(false);
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_UI_PAGE = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    '<title>minflow</title>\n<link rel="icon" href="data:,">\n'
    f"<style>{_UI_STYLE}</style>\n</head>\n<body>\n{_UI_BODY}"
    f"<script>{_UI_SCRIPT}</script>\n</body>\n</html>\n"
)


@functools.cache  # the hashes need hashlib, imported on first use (see the Header)
def _ui_headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src {_csp_hash(_UI_SCRIPT)}; "
            f"style-src {_csp_hash(_UI_STYLE)}; connect-src 'self'; img-src data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def _r_ui(req: _Request) -> tuple[int, Any]:
    return 200, _Text(_UI_PAGE, "text/html; charset=utf-8", _ui_headers())


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
# Blank is Python's str.isspace(), spelled out: the \s of JSON Schema's regular expressions
# lacks U+001C-U+001F and U+0085, and has U+FEFF.
_SPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_NON_BLANK = rf"[^\u0000]*[^{_SPACE}\u0000][^\u0000]*"
_NAME_TEXT = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_TYPE_LENGTH,
    "pattern": f"^{_NON_BLANK}$",
}
_FILTER_TEXT = {**_NAME_TEXT, "minLength": 0, "pattern": f"^({_NON_BLANK})?$"}


@_dataclass(frozen=True)
class _Operation:
    """What a route runs, and how the OpenAPI document describes it."""

    fn: Callable[[_Request], tuple[int, Any]]
    id: str  # operationId
    summary: str
    schema: dict | None  # of the success body; None: text (``media``)
    errors: tuple[int, ...] = ()  # error statuses; 401 is added when the server requires a key
    status: int = 200  # on success
    also: tuple[int, ...] = ()  # other success statuses, with the same body
    public: bool = False  # answered without the API key
    query: tuple[tuple[str, dict], ...] = ()  # query parameters and their schemas
    body: tuple[str, dict] | None = None  # the request body's component schema and an example
    links: tuple[str, ...] = ()  # operations that take the id this one answers with
    media: str = "text/plain"  # of a success body that is not JSON


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
    ("POST", _SCHEDULES, _Operation(_r_schedule_create, "createSchedule", "Create (201) or, by name, update (200) a schedule", _CREATED, (400, 413, 503), status=201, also=(200,),
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
    ("GET", f"{_API}/stats", _Operation(_r_stats, "queueStats", "Run counts by type and status, with how long each type's oldest due pending run has waited", _ref("Stats"), (503,))),
    ("GET", f"{_API}/throughput", _Operation(_r_throughput, "throughput", "Runs finished (succeeded, or failed for good) per minute by the database clock, oldest first; the last minute is the current one", _ref("Throughput"), (400, 503),
        query=(("minutes", {"type": "integer", "minimum": 1, "maximum": _THROUGHPUT_MINUTES, "description": "How many minutes; default 60."}),))),
    ("GET", "/ui", _Operation(_r_ui, "dashboard", "The web dashboard (HTML); the page needs no API key, the requests it makes send one", None, public=True, media="text/html")),
    ("GET", "/ui/", _Operation(_r_ui, "dashboardSlash", "The web dashboard, as /ui", None, public=True, media="text/html")),
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


def _queue_stats(client: Client) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """Run counts by type and status, and per type how long its oldest due pending run has
    waited (only types with one due)."""
    counts = client.stats()
    return counts, {t: waited for t, _, _, waited in _queue_snapshot(client) if waited is not None}


def _stats_document(counts: dict[str, dict[str, int]], ages: dict[str, float]) -> dict:
    """What ``GET /api/v1/stats`` and ``stats --json`` show: beside each type's status counts,
    its oldest due age as the table's last column shows it."""
    return {
        run_type: {**by_status, "oldest_due_pending_seconds": ages.get(run_type)}
        for run_type, by_status in counts.items()
    }


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
# One accept loop (a selector, on the thread that runs serve_forever) accepts connections and
# collects each request head (request line and headers) without blocking. Only a complete head
# takes one of the handler threads, so a client sending slowly holds a socket in the loop, never
# a thread. The loop holds at most `pending` connections; a new one pushes out the oldest. A
# handler thread parses the head (http.server's parser), reads the body under the same deadline
# (accept + request_timeout) and answers. The loop answers by itself only what needs no handler:
# 503 when every thread is busy, 408, 414 and 431 for heads too slow or too large.

_MAX_HEAD = 64 << 10  # bytes of request line and headers
_MAX_PENDING = 256  # connections still sending their head, or being closed after the loop's answer
_LINGER = 2.0  # seconds to discard what a client still sends after the loop's answer
_SWEEP = 0.1  # seconds between checks of the pending connections' deadlines
_ACCEPT_BATCH = 64  # connections accepted per wake-up, so that heads already sent are read soon
_LOGGED_LINE = 500  # characters of a request line in the access log
_CONTROL_CHARS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def _json_bytes(body: Any) -> bytes:
    return (json.dumps(body, ensure_ascii=False) + "\n").encode("utf-8")


def _response(
    status: int, content_type: str, data: bytes, headers: dict[str, str], *, head: bool = False
) -> bytes:
    """A whole response: status line, headers (the connection always closes) and the body
    (left out for a HEAD request, whose Content-Length is still the body's)."""
    lines = [
        f"HTTP/1.0 {status} {http.HTTPStatus(status).phrase}",
        f"Server: minflow/{__version__}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else data)


def _log_access(
    address: Any, requestline: str, status: int, size: int, started: float, quiet: bool = False
) -> None:
    # Headers are never logged: they may carry the API key. The request line is the client's
    # text, so control characters are escaped and a long one is cut.
    line = requestline.translate(_CONTROL_CHARS)
    if len(line) > _LOGGED_LINE:
        line = line[:_LOGGED_LINE] + "..."
    _http_log.log(
        logging.DEBUG if quiet else logging.INFO,
        '%s "%s" %d %d %.1fms',
        address[0],
        line,
        status,
        size,
        (time.monotonic() - started) * 1000,
    )


@_dataclass(eq=False)
class _Pending:
    """A connection the accept loop holds: its head still arriving (``reply`` is None), or the
    loop's own answer being written (the bytes left) and then what follows discarded (b"")."""

    sock: socket.socket
    address: Any
    accepted: float  # time.monotonic()
    deadline: float  # for the whole request; once answered, for the discarding
    head: bytearray = _field(default_factory=bytearray)
    reply: bytes | None = None

    def request_line(self) -> str:
        return bytes(self.head.split(b"\n", 1)[0]).rstrip(b"\r").decode("latin-1")

    def complete(self, start: int) -> bool:
        """Whether the head has ended (an empty line, CRLF or LF as http.server reads lines),
        looking from byte ``start`` on."""
        return self.head.find(b"\n\r\n", start) >= 0 or self.head.find(b"\n\n", start) >= 0


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail once the request's deadline has passed, so a client sending one
    byte at a time cannot hold a handler thread for longer than the request time limit. The
    bytes the accept loop already read (the head, perhaps the start of the body) come first."""

    def __init__(self, sock: socket.socket, deadline: float, buffered: bytes = b""):
        self._sock = sock
        self._deadline = deadline
        self._buffered = buffered

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._buffered:
            count = min(len(buffer), len(self._buffered))
            buffer[:count] = self._buffered[:count]
            self._buffered = self._buffered[count:]
            return count
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received within the time limit")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


# http.server is imported when the first server is made: then _http_classes puts each of the
# two classes below on its http.server base, which is the base type checkers see.
if TYPE_CHECKING:
    _HandlerBase = http.server.BaseHTTPRequestHandler
    _ServerBase = http.server.HTTPServer
else:
    _HandlerBase = _ServerBase = object


class _Handler(_HandlerBase):
    """One request on a connection whose head the accept loop has read (HTTP/1.0 semantics: the
    connection closes after it)."""

    server: _Server
    protocol_version = "HTTP/1.0"

    def __init__(self, conn: _Pending, client_address: Any, server: _Server):
        self._conn = conn
        super().__init__(conn.sock, client_address, server)

    def setup(self) -> None:
        super().setup()
        # http.server sets these once the request line parses; the answer to one that does not
        # is logged with them.
        self.path = self.requestline = ""
        self.rfile = io.BufferedReader(
            _DeadlineReader(self.connection, self._conn.deadline, bytes(self._conn.head))
        )

    def __getattr__(self, name: str) -> Any:
        # Every method reaches the route table, which answers 404 or 405 (never http.server's 501).
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self) -> None:
        headers: dict[str, str] = {}
        outage = self.server.outage
        try:
            status, body = self._route()
            # A write that worked, or a health check that passed: the database is back.
            if self.command != "GET" or urllib.parse.urlsplit(self.path).path in _HEALTH_PATHS:
                outage.ok()
        except _HTTPError as exc:
            status, body, headers = exc.status, exc.body, exc.headers
            if status == 503:  # the health check's
                outage.failed(exc.__cause__ or exc)
        except InvalidInput as exc:
            status, body = 400, {"error": str(exc)}
        except NotFound as exc:
            status, body = 404, {"error": str(exc)}
        except (AlreadyComplete, InvalidState) as exc:
            status, body = 409, {"error": str(exc)}
        except Unavailable as exc:
            outage.failed(exc)
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
        length = self._body_length()
        try:
            url = urllib.parse.urlsplit(self.path)
        except ValueError:  # e.g. "http://[::1/": an absolute URL with a broken host
            raise _HTTPError(400, f"invalid request target {self.path[:100]!r}") from None
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
            body = self._read_body(length)
            try:
                pairs = urllib.parse.parse_qsl(url.query, keep_blank_values=True, max_num_fields=50)
            except ValueError:
                raise _HTTPError(400, "too many query parameters") from None
            query: dict[str, str] = {}
            for key, value in pairs:
                if key in query:
                    raise _HTTPError(400, f"query parameter {key!r} given more than once")
                query[key] = value
            params = {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
            return fn(
                _Request(
                    self.command,
                    url.path,
                    params,
                    query,
                    body,
                    server.client,
                    server.worker,
                    server.api_key is not None,
                )
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

    def _body_length(self) -> int:
        """The body's length from the framing headers, or a 400 for framing that a proxy in
        front could read differently (request smuggling); a 411 for a chunked body."""
        # http.server's parser stops at a malformed line ("Content-Length : 5") and drops the
        # headers after it; an obsolete folded line continues the previous header's value.
        if self.headers.defects or any("\n" in value for value in self.headers.values()):
            raise _HTTPError(400, "malformed header line (whitespace before ':' or line folding)")
        lengths = {
            part.strip()
            for value in self.headers.get_all("Content-Length", [])
            for part in value.split(",")
        }
        if self.headers.get("Transfer-Encoding") is not None:
            if lengths:
                raise _HTTPError(400, "Content-Length and Transfer-Encoding together are refused")
            raise _HTTPError(411, "send the body with a Content-Length (chunked is not supported)")
        # The same value repeated ("5, 5", or the header twice) is one length (RFC 9110 8.6).
        if len(lengths) > 1:
            shown = ", ".join(sorted(repr(text[:20]) for text in lengths))
            raise _HTTPError(400, f"conflicting Content-Length values: {shown}")
        text = lengths.pop() if lengths else "0"
        if not (text.isascii() and text.isdigit()):
            raise _HTTPError(400, f"invalid Content-Length {text[:30]!r}")
        return int(text)

    def _read_body(self, length: int) -> bytes:
        if length > self.server.max_body:
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
        try:
            body = self.rfile.read(length) if length else b""
        except TimeoutError:
            raise _HTTPError(408, "request not received within the time limit") from None
        if len(body) != length:
            raise _HTTPError(400, "request body shorter than its Content-Length")
        return body

    def _send(self, status: int, body: Any, headers: dict[str, str]) -> None:
        if isinstance(body, _Text):
            data, content_type = body.text.encode("utf-8"), body.content_type
            headers = {**body.headers, **headers}
        else:
            data, content_type = _json_bytes(body), "application/json"
        # Writing gets its own time limit, so a client that stops reading cannot hold the thread.
        self.connection.settimeout(self.server.request_timeout)
        self.wfile.write(
            _response(status, content_type, data, headers, head=self.command == "HEAD")
        )
        quiet = self.path.partition("?")[0] in ("/healthz", "/metrics") and status < 400
        _log_access(
            self.client_address, self.requestline, status, len(data), self._conn.accepted, quiet
        )

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (malformed request line, oversized headers), as JSON."""
        self.close_connection = True
        text = message or http.HTTPStatus(code).phrase
        self._send(code, {"error": text}, {})

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        """Unused: responses are logged by ``_send`` once their size is known."""

    def log_message(self, format: str, *args: Any) -> None:
        """http.server's own messages (timeouts, protocol errors) go to ``minflow.http``."""
        _http_log.info("%s: %s", self.client_address[0], format % args)


class _Server(_ServerBase):
    """The HTTP server. ``serve_forever`` runs the accept loop, which reads request heads and
    holds at most ``pending`` connections doing so (a new one drops the oldest); each complete
    head gets one of at most ``threads`` handler threads, or an immediate 503 when all are busy.
    Connections are only ever handled this way (``handle_request`` is not supported).
    ``_Server(...)`` makes an instance of its subclass on http.server.HTTPServer."""

    request_queue_size = 128

    def __new__(cls, *args: Any, **kwargs: Any) -> _Server:
        return super().__new__(_http_classes()[1] if cls is _Server else cls)

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
        pending: int = _MAX_PENDING,
    ):
        self.client = client
        self.worker = worker
        self.routes = _compile_routes(routes)
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.max_body = _check_int("max_body", max_body, minimum=0)
        if not _is_number(request_timeout) or request_timeout <= 0:
            raise InvalidInput(f"request timeout must be positive seconds, got {request_timeout!r}")
        self.request_timeout = float(request_timeout)
        # Logged when it starts and when it ends, not at every request answered 503.
        self.outage = _Outage(_http_log, "database", meanwhile="answering 503")
        self._max_threads = _check_int("threads", threads, minimum=1)
        self._slots = threading.BoundedSemaphore(self._max_threads)
        self._max_pending = _check_int("pending", pending, minimum=1)
        # The accept loop's state, touched by its thread only. Oldest first.
        self._pending: dict[_Pending, None] = {}
        self._selector: selectors.BaseSelector | None = None
        self._warned: dict[str, tuple[int, float]] = {}  # -> (times since logged, when logged)
        self._stop, self._stopped = threading.Event(), threading.Event()
        self._stopped.set()
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _http_classes()[0])

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

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Run the accept loop until ``shutdown()``."""
        self._stopped.clear()
        self.socket.setblocking(False)
        sweep = paused = 0.0  # next deadline check; end of a pause in accepting
        try:
            with selectors.DefaultSelector() as selector:
                self._selector = selector
                selector.register(self.socket, selectors.EVENT_READ)
                while not self._stop.is_set():
                    now = time.monotonic()
                    if now >= sweep:
                        self._expire(now)
                        sweep = now + _SWEEP
                    if paused and now >= paused:
                        selector.register(self.socket, selectors.EVENT_READ)
                        paused = 0.0
                    waiting = self._pending or paused
                    for key, _ in selector.select(
                        min(poll_interval, sweep - now) if waiting else poll_interval
                    ):
                        conn = key.data
                        try:
                            if conn is None:
                                if self._accept():
                                    selector.unregister(self.socket)
                                    paused = time.monotonic() + _SWEEP
                            elif conn in self._pending:  # not dropped by an earlier event
                                self._advance(conn)
                        except Exception:  # a bug costs one connection, not the server
                            _http_log.exception("accept loop failed")
                            if conn is not None:
                                self._drop(conn)
        finally:
            for conn in list(self._pending):
                self._drop(conn)
            self._selector = None
            self._stop.clear()
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop the accept loop (within its poll interval) and wait until it has stopped; the
        connections it held are closed. Requests in flight go on: see ``drain``."""
        self._stop.set()
        self._stopped.wait()

    def _accept(self) -> bool:
        """Accept what is waiting; True when out of file descriptors with nothing to free."""
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return False  # this client gave up before it was accepted
                if not self._pending:
                    self._warn(f"cannot accept connections: {exc}")
                    return True
                self._push_out(next(iter(self._pending)), str(exc))
                continue
            sock.setblocking(False)
            now = time.monotonic()
            self._admit(
                _Pending(sock, address, now, now + self.request_timeout), selectors.EVENT_READ
            )
        return False

    def _admit(self, conn: _Pending, events: int) -> None:
        if len(self._pending) >= self._max_pending:
            self._push_out(next(iter(self._pending)), f"more than {self._max_pending} pending")
        self._pending[conn] = None
        assert self._selector is not None
        self._selector.register(conn.sock, events, conn)

    def _push_out(self, conn: _Pending, reason: str) -> None:
        self._drop(conn)
        self._warn(f"closed the oldest connection waiting in the accept loop: {reason}")

    def _warn(self, message: str) -> None:
        # One line per message and 10 s, however hard the flood, with how often it happened.
        count, logged = self._warned.get(message, (0, -math.inf))
        now = time.monotonic()
        if now - logged < 10:
            self._warned[message] = (count + 1, logged)
        else:
            _http_log.warning("%s (%d time(s) since the last such warning)", message, count + 1)
            self._warned[message] = (0, now)

    def _forget(self, conn: _Pending) -> None:
        self._pending.pop(conn, None)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)

    def _drop(self, conn: _Pending) -> None:
        self._forget(conn)
        conn.sock.close()

    def _advance(self, conn: _Pending) -> None:
        """Read more of a head, write more of an answer, or discard what follows one."""
        try:
            if conn.reply is None:
                self._read_head(conn)
            elif conn.reply:
                conn.reply = conn.reply[conn.sock.send(conn.reply) :]
                if not conn.reply:
                    conn.sock.shutdown(socket.SHUT_WR)
                    assert self._selector is not None
                    self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
            elif not conn.sock.recv(1 << 16):
                self._drop(conn)  # the client has read the answer and closed
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(conn)

    def _read_head(self, conn: _Pending) -> None:
        data = conn.sock.recv(_MAX_HEAD + 1 - len(conn.head))
        if not data:
            self._drop(conn)  # closed before its head was complete: nobody to answer
            return
        start = max(len(conn.head) - 2, 0)
        conn.head += data
        if conn.complete(start):
            self._hand_over(conn)
        elif len(conn.head) > _MAX_HEAD:
            if b"\n" in conn.head:
                self._reply(conn, 431, f"request head larger than {_MAX_HEAD} bytes")
            else:
                self._reply(conn, 414, f"request line longer than {_MAX_HEAD} bytes")

    def _hand_over(self, conn: _Pending) -> None:
        self._forget(conn)
        if self._slots.acquire(blocking=False):
            conn.sock.setblocking(True)
            try:
                threading.Thread(
                    target=self._handle, args=(conn,), name="minflow-http-request", daemon=True
                ).start()
                return
            except RuntimeError:  # the system refused another thread
                self._slots.release()
                conn.sock.setblocking(False)
        _http_log.warning("%s: all handler threads busy; answered 503", conn.address[0])
        self._reply(conn, 503, "server busy, retry shortly", {"Retry-After": "1"})

    def _reply(
        self, conn: _Pending, status: int, message: str, headers: dict[str, str] | None = None
    ) -> None:
        """Answer from the loop; then discard what the client still sends, until it closes or
        for at most _LINGER seconds (closing at once could reset the connection, and a reset
        can destroy the answer before the client reads it)."""
        data = _json_bytes({"error": message})
        head = conn.head.startswith(b"HEAD ")
        conn.reply = _response(status, "application/json", data, headers or {}, head=head)
        conn.deadline = time.monotonic() + _LINGER
        _log_access(conn.address, conn.request_line(), status, len(data), conn.accepted)
        self._forget(conn)
        self._admit(conn, selectors.EVENT_WRITE)

    def _expire(self, now: float) -> None:
        for conn in [conn for conn in self._pending if conn.deadline <= now]:
            if conn.reply is None and conn.head:
                self._reply(conn, 408, "request not received within the time limit")
            else:  # nothing sent at all (an idle preconnection), or the discarding is over
                self._drop(conn)

    def _handle(self, conn: _Pending) -> None:
        """A handler thread: one request, then the connection is closed and the slot freed."""
        try:
            self.RequestHandlerClass(conn, conn.address, self)
        except Exception:
            self.handle_error(conn.sock, conn.address)
        finally:
            self.shutdown_request(conn.sock)
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        # A body not read because the answer came first (a 401, a 404) would make close() reset
        # the connection: discard what has already arrived, after sending the FIN.
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
            request.setblocking(False)
            for _ in range(16):
                if not request.recv(1 << 16):
                    break
        request.close()

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


@functools.cache
def _http_classes() -> tuple[type[_Handler], type[_Server]]:
    """_Handler and _Server on their http.server bases (imported here, on first use)."""

    class Handler(_Handler, http.server.BaseHTTPRequestHandler):
        pass

    class Server(_Server, http.server.HTTPServer):
        pass

    return Handler, Server


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

_openapi_cache: dict[bool, dict] = {}  # by whether the server requires an API key

_ERROR_TEXT = {
    400: "Invalid input (the body, a parameter or a value).",
    401: "Missing or wrong API key.",
    404: "No such run or schedule.",
    409: "Conflict: the idempotency key exists (the body carries that run's id), or the run is "
    "not in a state that allows the operation.",
    413: "Request body too large.",
    503: "Database unavailable.",
}


def _openapi_operation(path: str, op: _Operation, secured: bool) -> dict:
    """One route of the table as an OpenAPI operation of a server that requires an API key
    (``secured``) or not."""
    text = {"type": "string"}
    media = op.media if op.schema is None else "application/json"
    success: dict[str, Any] = {
        "description": op.summary,
        "content": {media: {"schema": op.schema or text}},
    }
    if op.links:
        success["links"] = {
            target: {"operationId": target, "parameters": {"id": "$response.body#/id"}}
            for target in op.links
        }
    responses = {str(status): success for status in (op.status, *op.also)}
    for error in sorted({401, *op.errors} if secured and not op.public else set(op.errors)):
        responses[str(error)] = {
            "description": _ERROR_TEXT[error],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    operation: dict[str, Any] = {
        "operationId": op.id,
        "summary": op.summary,
        "responses": responses,
    }
    if secured and op.public:
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
    # A start time the Client accepts lies between 1970 and 100 years ahead; these years stay
    # inside that whatever the offset (and the upper one only widens as time passes).
    start = {**when, "pattern": r"^(197[1-9]|19[89]\d|20\d\d|21[01]\d|212[0-4])-"}
    text = {"type": "string"}
    integer = {"type": "integer"}
    anything = {"description": "Any JSON value."}
    no_nul = {"pattern": r"^[^\u0000]*$"}
    int32 = {"type": "integer", "minimum": _INT32[0], "maximum": _INT32[1]}

    def model(cls: type, **properties: dict) -> dict:
        """A response object: every field of the dataclass, nothing else."""
        names = list(_fields(cls))
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
        # What a request may carry as a payload: what the Client stores on both dialects.
        "Value": {
            "description": "Any JSON value in which no string, object keys included, contains "
            "NUL (\\u0000), which PostgreSQL's jsonb cannot store.",
            **no_nul,
            "propertyNames": no_nul,
            "items": _ref("Value"),
            "additionalProperties": _ref("Value"),
        },
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
                payload=_ref("Value"),
                priority=nullable({**int32, "description": "Lower runs first; default 100."}),
                idempotency_key=nullable({**_FILTER_TEXT, "maxLength": 1000}),
                max_attempts=nullable({**int32, "minimum": 1, "description": "Default 3."}),
                run_after=nullable({**start, "description": "Earliest start, with a zone."}),
                run_at=nullable({**start, "description": "Alias of run_after."}),
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
        "Stats": {
            "type": "object",
            "description": "By run type: the count of each status present, and how many seconds "
            "the oldest due pending run has waited since it became due (null: none is due).",
            "additionalProperties": request(
                ["oldest_due_pending_seconds"],
                **{status: {"type": "integer", "minimum": 1} for status in RUN_STATUSES},
                oldest_due_pending_seconds=nullable({"type": "number", "minimum": 0}),
            ),
        },
        "Throughput": request(
            ["minutes", "per_minute"],
            minutes=integer,
            per_minute={
                "type": "array",
                "items": request(
                    ["minute", "succeeded", "failed"],
                    minute={**when, "description": "The minute's start."},
                    succeeded={"type": "integer", "minimum": 0},
                    failed={"type": "integer", "minimum": 0},
                ),
            },
        ),
        "RetryFilter": bulk_filter(("failed", "cancelled")),
        "CancelFilter": bulk_filter(("pending", "leased")),
        "ScheduleRequest": request(
            ["type", "cron"],
            type=_NAME_TEXT,
            cron={
                **text,
                "pattern": f"^{_NON_BLANK}$",
                "description": "5-field cron, or @hourly, @daily...",
            },
            payload=_ref("Value"),
            # The name must also be in the server's tz database, which no pattern can say.
            timezone=nullable(
                {
                    **text,
                    "pattern": r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$",
                    "description": "IANA name such as Europe/Berlin; default UTC.",
                }
            ),
            priority=nullable(int32),
            max_attempts=nullable({**int32, "minimum": 1}),
            name=nullable(_NAME_TEXT),
        ),
    }


def _openapi_document(secured: bool) -> dict:
    """OpenAPI 3.1 description of ``_API_ROUTES`` as served by a server that requires an API
    key (``secured``) or not; each built once."""
    document = _openapi_cache.get(secured)
    if document is not None:
        return document
    paths: dict[str, dict] = {}
    for method, path, operation in _API_ROUTES:
        paths.setdefault(path, {})[method.lower()] = _openapi_operation(path, operation, secured)
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "minflow",
            "version": __version__,
            "description": "Durable job queue: runs, their audit trail and cron schedules.",
        },
        "paths": paths,
        "components": {"schemas": _openapi_schemas()},
    }
    if secured:
        document["components"]["securitySchemes"] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "bearer": {"type": "http", "scheme": "bearer"},
        }
        document["security"] = [{"apiKey": []}, {"bearer": []}]
    return _openapi_cache.setdefault(secured, document)


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


def _backoff_arg(text: str) -> Callable[[int], float]:
    """``seed``, ``fixed:DURATION`` or ``exponential:BASE:CAP`` as a backoff function."""
    kind, *values = text.strip().split(":")
    try:
        if kind == "seed" and not values:
            return seed_backoff
        if kind == "fixed" and len(values) == 1:
            return _fixed_backoff(_duration_arg(values[0]))
        if kind == "exponential" and len(values) == 2:
            base, cap = (_duration_arg(value) for value in values)
            if base > 0 and cap >= base:
                return _exponential_backoff(base, cap)
    except argparse.ArgumentTypeError:
        pass
    raise argparse.ArgumentTypeError(
        f"expected seed, fixed:DURATION or exponential:BASE:CAP (0 < BASE <= CAP), e.g. "
        f"fixed:5s or exponential:1s:10m; got {text!r}"
    )


def _port_arg(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {text!r}")
    return int(text)


def _time_arg(text: str) -> _dt.datetime:
    try:
        return _parse_rfc3339(text, "time")
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@_dataclass(frozen=True)
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
    _Option("--prefetch", "prefetch", int, DEFAULT_PREFETCH, f"runs claimed beyond the free handler slots, started as slots free up (default {DEFAULT_PREFETCH}; 0: claim only the free slots)"),
    _Option("--lease", "lease", float, DEFAULT_LEASE, f"lease seconds (default {DEFAULT_LEASE:g})"),
    _Option("--poll-interval", "poll_interval", float, None, f"fallback poll seconds (default {DEFAULT_POLL_INTERVAL:g})"),
    _Option("--types", "types", None, None, "comma-separated exact types to claim (default: all handlers)"),
    _Option("--prefixes", "prefixes", None, None, "comma-separated literal type prefixes to claim as well"),
    _Option("--worker-id", "worker_id", None, None, "worker id (default: hostname-pid)"),
    _Option("--listen-dsn", "listen_dsn", None, None, "direct PostgreSQL DSN for LISTEN wake-ups when --dsn goes through a pooler"),
    _Option("--burst", None, None, False, "exit once nothing is due and nothing runs"),
    _Option("--no-schedules", "schedules", None, True, "do not run the cron ticker in this worker"),
    _Option("--shutdown-timeout", "shutdown_timeout", float, DEFAULT_SHUTDOWN_TIMEOUT, f"seconds running handlers get after SIGTERM (default {DEFAULT_SHUTDOWN_TIMEOUT:g})"),
    _Option("--backoff", "backoff", _backoff_arg, None, "retry delay for handlers without their own: seed (default: attempt² minutes + up to 10%%), fixed:5s, or exponential:1s:10m (1 s doubling per attempt up to 10 min, less up to 10%% jitter)"),
    _Option("--max-snoozes", "max_snoozes", int, DEFAULT_MAX_SNOOZES, f"Retry requests per run before each counts as a failed attempt (default {DEFAULT_MAX_SNOOZES})"),
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
        outage = _Outage(_ticker_log, "ticker: database")
        delay = args.interval
        while not stop.is_set():
            try:
                fired = client.tick()
                if fired:
                    _ticker_log.info("%d schedule slots fired", fired)
                outage.ok()
                delay = args.interval
            except Unavailable as exc:
                outage.failed(exc)
                delay = min(delay * 2, 30.0)
            stop.wait(_jitter(delay) if outage.down else delay)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    api_key = os.environ.get("MINFLOW_API_KEY") or None
    with Client(args.dsn) as client:
        # The port first: a taken port must not leave a database created or migrated.
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
        try:
            client._ensure_schema()
        except BaseException:
            server.server_close()
            raise
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


def _existing_client(dsn: str | None) -> Client:
    """A Client for a command that reads or changes existing runs: it never creates a database."""
    client = Client(dsn)
    client._open_existing()
    return client


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


def _print_listing(
    args: argparse.Namespace,
    entries: Sequence[Any],
    empty: str,
    headers: Sequence[str],
    row: Callable[[Any], Sequence[Any]],
) -> None:
    """A list command's output: JSON objects with --json, else ``empty`` or a table."""
    if args.json:
        _print_json([entry.to_json() for entry in entries])
    elif not entries:
        print(empty)
    else:
        _print_table(headers, [row(entry) for entry in entries])


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
    with _existing_client(args.dsn) as client:
        runs = client.list(
            type=args.type,
            status=args.status,
            idempotency_key=args.key,
            limit=args.limit,
            offset=args.offset,
        )
    _print_listing(
        args,
        runs,
        "no runs",
        ("ID", "TYPE", "STATUS", "ATTEMPT", "PRIORITY", "RUN_AT (UTC)", "CREATED (UTC)"),
        lambda r: (
            r.id,
            r.type,
            r.status,
            f"{r.attempt}/{r.max_attempts}",
            r.priority,
            _fmt_time(r.run_at),
            _fmt_time(r.created_at),
        ),
    )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    with _existing_client(args.dsn) as client:
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
        with _existing_client(args.dsn) as client:
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
        with _existing_client(args.dsn) as client:
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
    with _existing_client(args.dsn) as client:
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
    with _existing_client(args.dsn) as client:
        entries = client.workers()
    _print_listing(
        args,
        entries,
        "no workers recorded",
        ("ID", "HOST", "PID", "STATE", "RUNNING", "TYPES", "STARTED (UTC)", "LAST SEEN (UTC)"),
        lambda w: (
            w.id,
            w.host,
            w.pid,
            "alive" if w.alive else "dead",
            f"{w.running}/{w.concurrency}",
            ",".join([*w.types, *(p + "*" for p in w.prefixes)]) or "-",
            _fmt_time(w.started_at),
            _fmt_time(w.last_seen_at),
        ),
    )
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    with _existing_client(args.dsn) as client:
        counts, ages = _queue_stats(client)
    if args.json:
        _print_json(_stats_document(counts, ages))
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
    with _existing_client(args.dsn) as client:
        schedules = client.schedules()
    _print_listing(
        args,
        schedules,
        "no schedules",
        ("ID", "NAME", "TYPE", "CRON", "TIMEZONE", "STATE", "NEXT RUN (UTC)", "LAST RUN (UTC)"),
        lambda s: (
            s.id,
            s.name or "-",
            s.type,
            s.cron,
            s.timezone,
            "active" if s.enabled else "paused",
            _fmt_time(s.next_run_at),
            _fmt_time(s.last_run_at),
        ),
    )
    return 0


def _cmd_schedule_show(args: argparse.Namespace) -> int:
    with _existing_client(args.dsn) as client:
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

    dsn = args.dsn or "sqlite://" + os.path.join(
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
  minflow migrate --dsn sqlite://jobs.db
  minflow submit billing.invoice.v1 '{"order": 42}' --key order-42
  minflow worker myjobs:app --concurrency 8 --metrics-port 9100
  minflow list --status failed --json
  minflow show RUN_ID
  minflow retry --all --status failed --type billing.invoice.v1
  minflow prune --older-than 30d --dry-run
  minflow schedule add reports.daily.v1 --cron '0 6 * * *' --timezone Europe/Berlin
  minflow serve --port 8080

Every command takes --dsn (default: $MINFLOW_DSN, else sqlite://minflow.db),
--log-level, --log-format text|json (before or after the command) and --help.
Exit status: 0 success, 1 the operation failed (not found, wrong state, database
error), 2 invalid arguments or input.
"""


def _json_log_formatter() -> logging.Formatter:
    """``--log-format json``: one JSON object per record, with the run fields it carries."""

    class JsonLogFormatter(logging.Formatter):
        FIELDS = ("run_id", "type", "attempt", "worker_id", "outcome", "duration")

        def format(self, record: logging.LogRecord) -> str:
            moment = _dt.datetime.fromtimestamp(record.created, UTC)
            entry = {
                "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
            for name in self.FIELDS:
                value = record.__dict__.get(name)
                if value is not None:
                    entry[name] = value
            if record.exc_info:
                entry["exception"] = self.formatException(record.exc_info)
            return json.dumps(entry, ensure_ascii=False, default=str)

    return JsonLogFormatter()


def _global_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The options every command takes, before its name (``prefix``: their own dest, because
    a subcommand's defaults would overwrite values given there) or after it."""
    before = bool(prefix)
    parser.add_argument(
        "--dsn",
        dest=prefix + "dsn",
        default=None,
        help=argparse.SUPPRESS
        if before
        else "database (default: $MINFLOW_DSN, else sqlite://minflow.db, a file in the "
        "working directory; sqlite:///abs/path.db is absolute)",
    )
    parser.add_argument(
        "--log-level",
        dest=prefix + "log_level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="logging level (default: info for worker/ticker/serve, warning otherwise)",
    )
    parser.add_argument(
        "--log-format",
        dest=prefix + "log_format",
        default=None,
        choices=["text", "json"],
        help="log lines as text (default) or one JSON object per line",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minflow",
        description="A durable job queue on SQLite or PostgreSQL.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"minflow {__version__}")
    _global_options(parser, prefix="global_")
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
        _global_options(sub)
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
    for name in ("dsn", "log_level", "log_format"):  # after the command wins
        setattr(args, name, getattr(args, name, None) or getattr(args, "global_" + name))
    level = args.log_level or (
        "info" if args.command in ("worker", "ticker", "serve") else "warning"
    )
    handler = logging.StreamHandler()
    handler.setFormatter(
        _json_log_formatter()
        if args.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler])
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
    # importable module so there is only one: this file under the name it was run by, so that
    # a copy vendored as proj._vendor.minflow runs itself, never another installed minflow.
    _name = __spec__.name if __spec__ is not None else "minflow"
    sys.exit(importlib.import_module(_name).main())

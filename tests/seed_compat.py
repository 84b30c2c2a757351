"""The seed library's side of the interop tests, written down as fixture data.

minflow shares its database with the Go library ``simple-workflow`` (seed-spec.md). These tests
need that library's schema, the SQL its producer and reader run, and its timestamp parser, but
there is no Go toolchain here. So this module restates them, from seed-spec.md §1, §3.9, §4.2
and §1.6: the DDL its AutoMigrate runs, its queries with their ``$N`` placeholders (rewritten to
``?`` for SQLite, as its ``RewritePlaceholders`` does), and ``parseTimestamp`` ported with Go's
``time.Parse`` rules. Nothing here is minflow code.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
import uuid

UTC = dt.timezone.utc

# -- schema (AutoMigrate's DDL) --------------------------------------------------------------

SQLITE_DDL = [
    """CREATE TABLE IF NOT EXISTS workflow_run (
        id TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        payload TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'leased', 'succeeded', 'failed', 'cancelled')),
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
    "CREATE INDEX IF NOT EXISTS idx_workflow_run_claim ON workflow_run(status, run_at, priority, created_at)",
    "CREATE INDEX IF NOT EXISTS idx_workflow_run_type_prefix ON workflow_run(type, status, run_at)",
    "CREATE INDEX IF NOT EXISTS idx_workflow_run_idempotency ON workflow_run(idempotency_key)",
    "CREATE INDEX IF NOT EXISTS idx_workflow_run_type_status ON workflow_run(type, status, created_at)",
    "CREATE INDEX IF NOT EXISTS idx_workflow_run_deleted_at ON workflow_run(deleted_at)",
    """CREATE TABLE IF NOT EXISTS workflow_event (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        workflow_id TEXT NOT NULL REFERENCES workflow_run(id) ON DELETE CASCADE,
        event_type TEXT NOT NULL CHECK (event_type IN ('created', 'leased', 'started',
            'heartbeat', 'succeeded', 'failed', 'retried', 'cancelled')),
        data TEXT,
        created_at TEXT NOT NULL DEFAULT (datetime('now')))""",
    "CREATE INDEX IF NOT EXISTS idx_workflow_event_workflow_id ON workflow_event(workflow_id, created_at)",
    "CREATE INDEX IF NOT EXISTS idx_workflow_event_type ON workflow_event(event_type, created_at)",
    """CREATE TABLE IF NOT EXISTS workflow_registry (
        id TEXT PRIMARY KEY,
        workflow_name TEXT NOT NULL UNIQUE,
        intent_type TEXT NOT NULL DEFAULT 'workflow',
        runtime TEXT NOT NULL,
        is_enabled INTEGER NOT NULL DEFAULT 1,
        description TEXT,
        created_at TEXT NOT NULL DEFAULT (datetime('now')),
        updated_at TEXT NOT NULL DEFAULT (datetime('now')),
        deleted_at TEXT)""",
    "CREATE INDEX IF NOT EXISTS idx_workflow_registry_runtime ON workflow_registry(runtime, is_enabled)",
    "CREATE INDEX IF NOT EXISTS idx_workflow_registry_deleted_at ON workflow_registry(deleted_at)",
    """CREATE TABLE IF NOT EXISTS workflow_schedule (
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
    "CREATE INDEX IF NOT EXISTS idx_workflow_schedule_next_run ON workflow_schedule(next_run_at)",
    "CREATE INDEX IF NOT EXISTS idx_workflow_schedule_type ON workflow_schedule(type)",
]

POSTGRES_DDL = [
    """CREATE TABLE IF NOT EXISTS workflow_run (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        type TEXT NOT NULL,
        payload JSONB NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'leased', 'succeeded', 'failed', 'cancelled')),
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
    """CREATE INDEX IF NOT EXISTS idx_workflow_run_claim ON workflow_run(status, run_at, priority, created_at)
        WHERE status = 'pending'""",
    """CREATE INDEX IF NOT EXISTS idx_workflow_run_type_prefix
        ON workflow_run(type text_pattern_ops, status, run_at) WHERE status = 'pending'""",
    """CREATE INDEX IF NOT EXISTS idx_workflow_run_idempotency ON workflow_run(idempotency_key)
        WHERE idempotency_key IS NOT NULL""",
    "CREATE INDEX IF NOT EXISTS idx_workflow_run_type_status ON workflow_run(type, status, created_at DESC)",
    """CREATE INDEX IF NOT EXISTS idx_workflow_run_deleted_at ON workflow_run(deleted_at)
        WHERE deleted_at IS NULL""",
    """CREATE TABLE IF NOT EXISTS workflow_event (
        id BIGSERIAL PRIMARY KEY,
        workflow_id UUID NOT NULL REFERENCES workflow_run(id) ON DELETE CASCADE,
        event_type TEXT NOT NULL CHECK (event_type IN ('created', 'leased', 'started',
            'heartbeat', 'succeeded', 'failed', 'retried', 'cancelled')),
        data JSONB,
        created_at TIMESTAMPTZ NOT NULL DEFAULT NOW())""",
    "CREATE INDEX IF NOT EXISTS idx_workflow_event_workflow_id ON workflow_event(workflow_id, created_at DESC)",
    "CREATE INDEX IF NOT EXISTS idx_workflow_event_type ON workflow_event(event_type, created_at DESC)",
    """CREATE TABLE IF NOT EXISTS workflow_registry (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        workflow_name TEXT NOT NULL UNIQUE,
        intent_type TEXT NOT NULL DEFAULT 'workflow',
        runtime TEXT NOT NULL,
        is_enabled BOOLEAN NOT NULL DEFAULT true,
        description TEXT,
        created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
        updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
        deleted_at TIMESTAMPTZ)""",
    "CREATE INDEX IF NOT EXISTS idx_workflow_registry_runtime ON workflow_registry(runtime, is_enabled)",
    """CREATE INDEX IF NOT EXISTS idx_workflow_registry_deleted_at ON workflow_registry(deleted_at)
        WHERE deleted_at IS NULL""",
    """CREATE TABLE IF NOT EXISTS workflow_schedule (
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
    """CREATE INDEX IF NOT EXISTS idx_workflow_schedule_next_run ON workflow_schedule(next_run_at)
        WHERE enabled = true AND deleted_at IS NULL""",
    "CREATE INDEX IF NOT EXISTS idx_workflow_schedule_type ON workflow_schedule(type)",
]

# -- the seed's SQL (seed-spec §3.9, §3.10, §4.2, §5.3), with its $N placeholders ------------

RUN_COLUMNS = (
    "id, type, payload, status, priority, run_at, idempotency_key, attempt, max_attempts, "
    "leased_by, lease_until, last_error, result, created_at, updated_at"
)
CREATE_RUN = (
    "INSERT INTO workflow_run (id, type, payload, priority, run_at, idempotency_key, max_attempts) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
)
LOG_EVENT = "INSERT INTO workflow_event (workflow_id, event_type, data) VALUES ($1, $2, $3)"
GET_RUN = f"SELECT {RUN_COLUMNS} FROM workflow_run WHERE id = $1 AND deleted_at IS NULL"
GET_EVENTS = (
    "SELECT id, workflow_id, event_type, data, created_at FROM workflow_event "
    "WHERE workflow_id = $1 ORDER BY created_at ASC"
)
LIST_SCHEDULES = (
    "SELECT id, type, payload, schedule, timezone, next_run_at, last_run_at, enabled, priority, "
    "max_attempts FROM workflow_schedule WHERE deleted_at IS NULL ORDER BY created_at ASC"
)
CLAIM_DUE = {
    "postgres": (
        "SELECT id, type, payload, schedule, timezone, next_run_at, priority, max_attempts "
        "FROM workflow_schedule WHERE next_run_at <= NOW() AND enabled = true "
        "AND deleted_at IS NULL FOR UPDATE SKIP LOCKED LIMIT 10"
    ),
    "sqlite": (
        "SELECT id, type, payload, schedule, timezone, next_run_at, priority, max_attempts "
        "FROM workflow_schedule WHERE next_run_at <= datetime('now') AND enabled = 1 "
        "AND deleted_at IS NULL LIMIT 10"
    ),
}


def list_runs(type="", status="", idempotency_key="", limit=0, offset=0) -> tuple[str, list]:
    """The seed's List: optional exact filters, newest first, limit <= 0 meaning 50."""
    sql, args = f"SELECT {RUN_COLUMNS} FROM workflow_run WHERE deleted_at IS NULL", []
    for column, value in (("type", type), ("status", status), ("idempotency_key", idempotency_key)):
        if value:
            args.append(value)
            sql += f" AND {column} = ${len(args)}"
    sql += f" ORDER BY created_at DESC LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}"
    return sql, [*args, limit if limit > 0 else 50, offset]


def claim(dialect: str, worker_id: str, lease_seconds: int, prefixes=()) -> tuple[str, list]:
    """The seed's one-row claim, stale-lease branch included (seed-spec §4.2)."""
    if dialect == "postgres":
        args: list = [worker_id, f"{lease_seconds} seconds"]
        lease = "NOW() + $2::interval"
        now = "NOW()"
        lock = "FOR UPDATE SKIP LOCKED"
    else:
        args = [worker_id]
        lease = f"datetime('now', '+{lease_seconds} seconds')"
        now = "datetime('now')"
        lock = ""
    likes = []
    for prefix in prefixes:
        args.append(prefix)
        likes.append(f"type LIKE ${len(args)}")
    condition = f" AND ({' OR '.join(likes)})" if likes else ""
    sql = (
        f"UPDATE workflow_run SET status = 'leased', leased_by = $1, lease_until = {lease}, "
        f"updated_at = {now} WHERE id = (SELECT id FROM workflow_run "
        f"WHERE ((status = 'pending' AND run_at <= {now}) OR "
        f"(status = 'leased' AND lease_until < {now})) AND deleted_at IS NULL{condition} "
        f"ORDER BY priority ASC, created_at ASC {lock} LIMIT 1) "
        "RETURNING id, type, payload, attempt, max_attempts"
    )
    return sql, args


class SeedDB:
    """A raw connection the way the Go library opens one (seed-spec §1.6, §6)."""

    def __init__(self, dialect: str, path: str | None = None, pg=None, schema: str | None = None):
        self.dialect = dialect
        if dialect == "sqlite":
            self.raw = sqlite3.connect(path, isolation_level=None, timeout=30)
            self.raw.execute("PRAGMA journal_mode=WAL")
            self.raw.execute("PRAGMA busy_timeout=5000")
            self.raw.execute("PRAGMA foreign_keys=ON")
        else:
            self.raw = pg
            # lib/pq sends search_path as a start-up parameter; the session zone is the
            # server's, UTC here.
            self.raw.run(f'SET search_path TO "{schema}"')
            self.raw.run("SET TIME ZONE 'UTC'")

    def run(self, sql: str, *args) -> list:
        if self.dialect == "sqlite":
            # RewritePlaceholders: $N -> ? (every seed query uses them in ascending order).
            return self.raw.execute(re.sub(r"\$\d+", "?", sql), args).fetchall()
        return self.raw.run(
            re.sub(r"\$(\d+)", r":p\1", sql), **{f"p{i}": v for i, v in enumerate(args, 1)}
        )

    def migrate(self) -> None:
        for statement in SQLITE_DDL if self.dialect == "sqlite" else POSTGRES_DDL:
            self.run(statement)

    def close(self) -> None:
        self.raw.close()

    def as_scanned_string(self, value):
        """What the Go reader gets when it scans a timestamp column into a ``string``.

        SQLite stores text and hands it over as is. lib/pq returns a ``time.Time``, which
        ``database/sql`` formats with RFC 3339 and nanoseconds.
        """
        if value is None or isinstance(value, str):
            return value
        return go_rfc3339nano(value)

    def json_value(self, value):
        """A JSON column as the Go reader sees it, decoded: SQLite hands over the stored text
        or bytes; pg8000 (unlike lib/pq) has already decoded jsonb."""
        if self.dialect == "sqlite" and value is not None:
            return json.loads(value)
        return value

    # -- the Go producer and poller ------------------------------------------------------
    def create_run(
        self, run_type: str, payload: bytes | str, run_at: str, *, priority=100, key=None
    ) -> str:
        """RunRepository.Create: app-supplied uuid, JSON bound as bytes, run_at as UTC text."""
        run_id = str(uuid.uuid4())
        if self.dialect == "postgres" and isinstance(payload, bytes):
            payload = payload.decode()  # lib/pq sends []byte to a jsonb parameter as text
        rows = self.run(CREATE_RUN, run_id, run_type, payload, priority, run_at, key, 3)
        self.run(LOG_EVENT, run_id, "created", None)
        return str(rows[0][0])

    def claim_run(self, worker_id: str, lease_seconds: int, prefixes=()) -> list:
        """RunRepository.Claim: the one-row claim, then its ``leased`` event."""
        sql, args = claim(self.dialect, worker_id, lease_seconds, prefixes)
        rows = self.run(sql, *args)
        for row in rows:
            data = json.dumps({"worker_id": worker_id, "attempt": row[3]}).encode()
            self.run(
                LOG_EVENT,
                str(row[0]),
                "leased",
                data if self.dialect == "sqlite" else data.decode(),
            )
        return rows


# -- Go's time formats ---------------------------------------------------------------------


def go_utc_text(moment: dt.datetime) -> str:
    """``t.UTC().Format("2006-01-02 15:04:05")``: what Create writes for run_at."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def go_time_string(moment: dt.datetime, monotonic: float = 61.23456789) -> str:
    """``time.Time.String()`` of a UTC time read from ``time.Now()`` (with its monotonic
    reading): what modernc's SQLite driver writes for a bound ``time.Time`` (bug C-6)."""
    moment = moment.astimezone(UTC)
    nanos = f"{moment.microsecond * 1000:09d}".rstrip("0")
    frac = f".{nanos}" if nanos else ""
    return f"{moment:%Y-%m-%d %H:%M:%S}{frac} +0000 UTC m=+{monotonic:.9f}"


def go_zoned_time_string(moment: dt.datetime, zone: dt.tzinfo, name: str) -> str:
    """``time.Time.String()`` of a time in a worker's local ``zone`` (abbreviation ``name``):
    what modernc writes for MarkFailed's retry time on a machine outside UTC."""
    local = moment.astimezone(zone)
    nanos = f"{local.microsecond * 1000:09d}".rstrip("0")
    frac = f".{nanos}" if nanos else ""
    return f"{local:%Y-%m-%d %H:%M:%S}{frac} {local:%z} {name} m=+60.691234567"


def go_sqlite_time_format(moment: dt.datetime, zone: dt.tzinfo) -> str:
    """``2006-01-02 15:04:05.999999999-07:00``: mattn/go-sqlite3's format for a bound time
    (and modernc's with ``_time_format=sqlite``)."""
    local = moment.astimezone(zone)
    nanos = f"{local.microsecond * 1000:09d}".rstrip("0")
    frac = f".{nanos}" if nanos else ""
    offset = local.strftime("%z")
    return f"{local:%Y-%m-%d %H:%M:%S}{frac}{offset[:3]}:{offset[3:]}"


def go_rfc3339nano(moment: dt.datetime) -> str:
    """``t.Format(time.RFC3339Nano)``: trailing zeros of the fraction dropped, Z for UTC."""
    nanos = f"{moment.microsecond * 1000:09d}".rstrip("0")
    frac = f".{nanos}" if nanos else ""
    offset = moment.utcoffset() or dt.timedelta(0)
    if not offset:
        zone = "Z"
    else:
        minutes = int(offset.total_seconds()) // 60
        sign = "+" if minutes >= 0 else "-"
        zone = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return f"{moment:%Y-%m-%dT%H:%M:%S}{frac}{zone}"


# parseTimestamp (repository.go) tries these Go layouts in order. Go's time.Parse accepts a
# fractional second right after the seconds even when the layout has none, and needs the whole
# input consumed. Each layout is expressed below as a regular expression with those rules.
_DATE = r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})"
_CLOCK = r"(?P<h>\d{1,2}):(?P<mi>\d{2}):(?P<s>\d{2})(?:[.,](?P<f>\d+))?"
# Go's parseTimeZone: 3 upper-case letters, 4 ending in T (or WITA), 5 ending in T, ChST/MeST,
# GMT with an optional offset, or a bare signed offset.
_ABBREV = r"(?:ChST|MeST|GMT(?:[+-]\d{1,2})?|[+-]\d{2}(?:\d{2})?|[A-Z]{3}T|WITA|[A-Z]{4}T|[A-Z]{3})"
_GO_LAYOUTS = [
    # time.RFC3339Nano
    rf"{_DATE}T{_CLOCK}(?:Z|(?P<tz>[+-]\d{{2}}:\d{{2}}))",
    # "2006-01-02 15:04:05"
    rf"{_DATE} {_CLOCK}",
    # "2006-01-02T15:04:05Z" (a literal Z)
    rf"{_DATE}T{_CLOCK}Z",
    # "2006-01-02 15:04:05+00:00" (literal)
    rf"{_DATE} {_CLOCK}\+00:00",
    # "2006-01-02 15:04:05 +0000 UTC" (literal)
    rf"{_DATE} {_CLOCK} \+0000 UTC",
    # "2006-01-02 15:04:05-07:00"
    rf"{_DATE} {_CLOCK}(?P<tz>[+-]\d{{2}}:\d{{2}})",
    # "2006-01-02 15:04:05+00" (literal)
    rf"{_DATE} {_CLOCK}\+00",
    # "2006-01-02 15:04:05.999999999 -0700 MST" and the same without the fraction
    rf"{_DATE} {_CLOCK} (?P<tz>[+-]\d{{4}}) {_ABBREV}",
    # "2006-01-02 15:04:05.999999999 +0000 UTC" (literal zone)
    rf"{_DATE} {_CLOCK} \+0000 UTC",
]
_GO_LAYOUTS_RE = [re.compile(layout + r"\Z") for layout in _GO_LAYOUTS]


def go_parse_timestamp(text: str) -> dt.datetime | None:
    """The Go reader's ``parseTimestamp``; ``None`` where Go yields the zero time."""
    for layout in _GO_LAYOUTS_RE:
        match = layout.match(text)
        if not match:
            continue
        parts = match.groupdict()
        try:
            moment = dt.datetime(
                int(parts["y"]),
                int(parts["mo"]),
                int(parts["d"]),
                int(parts["h"]),
                int(parts["mi"]),
                int(parts["s"]),
                int((parts["f"] or "0")[:6].ljust(6, "0")),
                tzinfo=UTC,
            )
        except ValueError:  # out-of-range field: time.Parse fails, try the next layout
            continue
        zone = parts.get("tz")
        if zone:
            digits = zone[1:].replace(":", "")
            offset = dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            moment -= offset if zone[0] == "+" else -offset
        return moment
    return None

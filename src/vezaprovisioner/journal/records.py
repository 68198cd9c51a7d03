"""The request journal: every CREATE_EMAIL is recorded in SQLite before Exchange is touched.

One file, `<data_dir>/journal.sqlite3`, in WAL mode, shared by every worker process. A record
moves through these states, each change committed before the step it describes:

    received ──► running ──► created | already_exists | failed      (the request finished)
        │           │
        └───────────┴──────► created (recovered) | not_created | unknown   (crash recovery)

`received` is written before any Exchange call; `running` once the request holds the claim on
the user (see `claims`, which shares this file); `enable_sent_at` just before Enable-* is sent.
A record whose owner process is gone (see `liveness`) is an orphan for crash recovery.

If the journal cannot be written the request stops with `JournalUnavailable` before any Exchange
change (the API answers 503 JOURNAL_UNAVAILABLE).
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import JournalSettings
from ..exchange.errors import ExchangeError
from ..failures import Failure, as_failure
from .liveness import owner_gone, process_token

JOURNAL_FILE = "journal.sqlite3"

log = logging.getLogger(__name__)

State = Literal[
    "received", "running", "created", "already_exists", "failed", "not_created", "unknown"
]
UNFINISHED: tuple[State, ...] = ("received", "running")
STATES: tuple[State, ...] = (
    "received",
    "running",
    "created",
    "already_exists",
    "failed",
    "not_created",
    "unknown",
)

# Each entry moves the schema from version N to N + 1 (PRAGMA user_version). Never edit a
# released entry: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL,
        action TEXT NOT NULL,
        identity TEXT NOT NULL,
        alias TEXT,
        caller TEXT NOT NULL,
        caller_method TEXT NOT NULL,
        client_address TEXT,
        state TEXT NOT NULL,
        guid TEXT,
        received_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        enable_sent_at REAL,
        finished_at REAL,
        duration_ms INTEGER,
        code TEXT,
        detail TEXT,
        exchange_reason TEXT,
        exchange_error_id TEXT,
        exchange_message TEXT,
        result_alias TEXT,
        primary_smtp_address TEXT,
        recovered INTEGER NOT NULL DEFAULT 0,
        owner_host TEXT NOT NULL,
        owner_pid INTEGER NOT NULL,
        owner_token TEXT NOT NULL
    );
    CREATE INDEX requests_request_id ON requests (request_id);
    CREATE INDEX requests_received_at ON requests (received_at);
    CREATE INDEX requests_state ON requests (state);
    CREATE TABLE claims (
        identity_key TEXT PRIMARY KEY,
        token TEXT NOT NULL,
        owner_host TEXT NOT NULL,
        owner_pid INTEGER NOT NULL,
        owner_token TEXT NOT NULL,
        claimed_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    # Idempotency-Key: the outcome of a request, kept to replay it (see idempotency.py).
    """
    CREATE TABLE idempotency_keys (
        caller TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        request_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        status INTEGER,
        body TEXT,
        PRIMARY KEY (caller, key)
    );
    """,
)


class JournalUnavailable(Failure):
    """The journal could not be written, so nothing was (or will be) sent to Exchange."""

    code = "JOURNAL_UNAVAILABLE"
    status = 503
    title = "The request journal cannot be written"
    advice = "Nothing was sent to Exchange; retry after Retry-After."
    retry_after_seconds = 30

    @property
    def detail(self) -> str:
        return f"{self.message} {self.advice}"


@dataclass(frozen=True)
class RequestContext:
    """Who asked, and under which request id; passed explicitly from the API or the CLI."""

    request_id: str
    caller: str
    caller_method: str
    client_address: str | None = None


@dataclass(frozen=True)
class Record:
    """One journal record, as stored."""

    id: int
    request_id: str
    action: str
    identity: str
    alias: str | None
    caller: str
    caller_method: str
    client_address: str | None
    state: State
    guid: str | None
    received_at: float
    updated_at: float
    enable_sent_at: float | None
    finished_at: float | None
    duration_ms: int | None
    code: str | None
    detail: str | None
    exchange_reason: str | None
    exchange_error_id: str | None
    exchange_message: str | None
    result_alias: str | None
    primary_smtp_address: str | None
    recovered: bool
    owner_host: str
    owner_pid: int
    owner_token: str


_COLUMNS = ", ".join(Record.__dataclass_fields__)


class Journal:
    """The journal file and its records. Thread-safe; one instance per process."""

    def __init__(
        self,
        data_dir: Path,
        settings: JournalSettings,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = data_dir / JOURNAL_FILE
        self._settings = settings
        self._wall = wall
        #: This machine, as claims and records name it (pids are only checked here).
        self.host = socket.gethostname().casefold()
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        #: Called with the exception whenever a journal operation fails (metrics, logs).
        self.on_error: Callable[[Exception], None] = lambda exc: None

    # ---- connection ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """Opens (and migrates) the file on first use, so a broken disk never stops the start."""
        if self._connection is not None:
            return self._connection
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.path,
            timeout=self._settings.busy_timeout_ms / 1000,
            isolation_level=None,  # explicit BEGIN/COMMIT only
            check_same_thread=False,  # guarded by self._lock
        )
        try:
            mode = _enter_wal_mode(connection, self._settings.busy_timeout_ms / 1000)
            if str(mode).lower() != "wal":
                # SQLite falls back silently where WAL cannot work (a network share).
                raise sqlite3.DatabaseError(
                    f"WAL mode is unavailable here (got {mode!r}); keep data_dir on a local disk"
                )
            connection.execute(f"PRAGMA synchronous={self._settings.synchronous.upper()}")
            connection.execute(f"PRAGMA busy_timeout={self._settings.busy_timeout_ms}")
            _migrate(connection)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    @contextmanager
    def transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE); any failure becomes JournalUnavailable."""
        with self._lock:
            try:
                connection = self._connect()
                connection.execute("BEGIN IMMEDIATE")
                try:
                    yield connection
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
                connection.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                self._drop_connection()
                error = JournalUnavailable(
                    f"The request journal {self.path} could not be written ({what}: {exc}). "
                    "Check the disk, the data_dir permissions and journal.busy_timeout_ms."
                )
                self.on_error(error)
                raise error from exc

    def _read(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._connect().execute(sql, parameters).fetchall()
            except (sqlite3.Error, OSError) as exc:
                self._drop_connection()
                error = JournalUnavailable(f"The request journal {self.path} is unreadable: {exc}.")
                self.on_error(error)
                raise error from exc

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def close(self) -> None:
        with self._lock:
            self._drop_connection()

    @property
    def settings(self) -> JournalSettings:
        return self._settings

    def now(self) -> float:
        """Wall-clock time as the journal records it (injectable for tests)."""
        return self._wall()

    # ---- the record's life --------------------------------------------------------------------

    def receive(
        self, context: RequestContext, action: str, identity: str, alias: str | None
    ) -> int:
        """Writes the `received` record; returns its row id."""
        now = self._wall()
        with self.transaction("receive") as db:
            cursor = db.execute(
                "INSERT INTO requests (request_id, action, identity, alias, caller, caller_method,"
                " client_address, state, received_at, updated_at, owner_host, owner_pid,"
                " owner_token) VALUES (?, ?, ?, ?, ?, ?, ?, 'received', ?, ?, ?, ?, ?)",
                (
                    context.request_id,
                    action,
                    identity,
                    alias,
                    context.caller,
                    context.caller_method,
                    context.client_address,
                    now,
                    now,
                    self.host,
                    os.getpid(),
                    process_token(),
                ),
            )
            row_id = cursor.lastrowid
        assert row_id is not None
        return row_id

    def running(self, row_id: int, guid: str) -> None:
        """received → running: this request now holds the claim on the user `guid`."""
        self._move(row_id, ("received",), "running", guid=guid)

    def enable_sent(self, row_id: int) -> None:
        """Marks that Enable-* is about to be sent (committed before it is)."""
        self._move(row_id, ("running",), "running", enable_sent_at=self._wall())

    def finish(
        self,
        row_id: int,
        state: Literal["created", "already_exists"],
        *,
        guid: str,
        alias: str,
        primary_smtp_address: str,
    ) -> None:
        """running → created / already_exists."""
        self._move(
            row_id,
            ("running",),
            state,
            guid=guid,
            result_alias=alias,
            primary_smtp_address=primary_smtp_address,
            finished=True,
        )

    def fail(self, row_id: int, error: Exception) -> None:
        """received / running → failed, with the code and what Exchange said."""
        fields: dict[str, Any] = {"code": as_failure(error).code, "detail": str(error)[:2000]}
        if isinstance(error, ExchangeError) and error.from_exchange:
            fields.update(
                exchange_reason=error.reason,
                exchange_error_id=error.error_id,
                exchange_message=error.message[:2000],
            )
        self._move(row_id, UNFINISHED, "failed", finished=True, **fields)

    def reconcile(self, row_id: int, state: State, reason: str, *, code: str | None = None) -> bool:
        """Crash recovery: an unfinished record gets its final state; False if it had one."""
        return self._move(
            row_id, UNFINISHED, state, detail=reason, code=code, recovered=1, finished=True
        )

    def _move(
        self,
        row_id: int,
        allowed_from: Sequence[State],
        state: State,
        *,
        finished: bool = False,
        **fields: Any,
    ) -> bool:
        now = self._wall()
        fields["state"] = state
        fields["updated_at"] = now
        assignments = ", ".join(f"{name} = ?" for name in fields)
        values = list(fields.values())
        if finished:
            assignments += ", finished_at = ?, duration_ms = CAST((? - received_at) * 1000 AS INT)"
            values += [now, now]
        marks = ", ".join("?" for _ in allowed_from)
        with self.transaction(f"mark {state}") as db:
            cursor = db.execute(
                f"UPDATE requests SET {assignments} WHERE id = ? AND state IN ({marks})",  # noqa: S608 - names are ours
                (*values, row_id, *allowed_from),
            )
            return cursor.rowcount == 1

    # ---- reading ------------------------------------------------------------------------------

    def get(self, request_id: str) -> Record | None:
        """The latest record with this request id (a client may reuse an X-Request-ID)."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM requests WHERE request_id = ? ORDER BY id DESC LIMIT 1",  # noqa: S608
            (request_id,),
        )
        return _record(rows[0]) if rows else None

    def records(
        self,
        *,
        since: float | None = None,
        identity: str | None = None,
        state: State | None = None,
        limit: int = 1000,
    ) -> list[Record]:
        """Records, newest first; `identity` matches the requested identity or the GUID."""
        where, parameters = ["1 = 1"], list[Any]()
        if since is not None:
            where.append("received_at >= ?")
            parameters.append(since)
        if identity is not None:
            where.append("(identity = ? COLLATE NOCASE OR guid = ? COLLATE NOCASE)")
            parameters += [identity, identity]
        if state is not None:
            where.append("state = ?")
            parameters.append(state)
        rows = self._read(
            f"SELECT {_COLUMNS} FROM requests WHERE {' AND '.join(where)}"  # noqa: S608
            " ORDER BY id DESC LIMIT ?",
            [*parameters, limit],
        )
        return [_record(row) for row in rows]

    def page(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        state: str | None = None,
        code: str | None = None,
        identity: str | None = None,
        caller: str | None = None,
        request_id: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[Record]:
        """One page of records for the request list, newest first; `before_id` continues a page.

        `identity` matches the requested identity or the GUID, `caller` the caller's name (both
        case-insensitively); `since` is inclusive and `until` exclusive (received_at, seconds).
        """
        filters: list[tuple[str, list[Any]]] = [
            ("received_at >= ?", [since]),
            ("received_at < ?", [until]),
            ("state = ?", [state]),
            ("code = ?", [code]),
            ("(identity = ? COLLATE NOCASE OR guid = ? COLLATE NOCASE)", [identity, identity]),
            ("caller = ? COLLATE NOCASE", [caller]),
            ("request_id = ?", [request_id]),
            ("id < ?", [before_id]),
        ]
        where, parameters = ["1 = 1"], list[Any]()
        for clause, values in filters:
            if values[0] is not None:
                where.append(clause)
                parameters += values
        rows = self._read(
            f"SELECT {_COLUMNS} FROM requests WHERE {' AND '.join(where)}"  # noqa: S608
            " ORDER BY id DESC LIMIT ?",
            [*parameters, limit],
        )
        return [_record(row) for row in rows]

    def outcome_counts(self, since: float) -> list[tuple[str, str | None, int]]:
        """(state, code, count) of the records received since `since`, most frequent first."""
        rows = self._read(
            "SELECT state, code, COUNT(*) FROM requests WHERE received_at >= ?"
            " GROUP BY state, code ORDER BY COUNT(*) DESC, state, code",
            (since,),
        )
        return [(str(state), code, int(count)) for state, code, count in rows]

    def orphans(self) -> list[Record]:
        """Unfinished records whose process is gone (this machine) or that are stale."""
        now = self._wall()
        rows = self._read(
            f"SELECT {_COLUMNS} FROM requests WHERE state IN ('received', 'running')"  # noqa: S608
            " ORDER BY id"
        )
        records = [_record(row) for row in rows]
        stale_after = self._settings.stale_claim_seconds
        return [
            r
            for r in records
            if owner_gone(
                self.host, r.owner_host, r.owner_pid, r.owner_token, r.updated_at + stale_after, now
            )
        ]

    # ---- maintenance --------------------------------------------------------------------------

    def prune(self) -> int:
        """Deletes finished records older than `retention_days`; returns how many."""
        cutoff = self._wall() - self._settings.retention_days * 86_400
        with self.transaction("prune") as db:
            cursor = db.execute(
                "DELETE FROM requests WHERE finished_at IS NOT NULL AND received_at < ?",
                (cutoff,),
            )
            return cursor.rowcount

    def check_writable(self) -> str:
        """For readiness: a real write transaction (the schema version is rewritten as is)."""
        with self.transaction("readiness check") as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            db.execute(f"PRAGMA user_version = {int(version)}")
        return f"writable: {self.path} (schema {version})"


def _enter_wal_mode(connection: sqlite3.Connection, patience_seconds: float) -> str:
    """PRAGMA journal_mode=WAL, retried while another process is creating the same file.

    Switching a new database to WAL needs an exclusive lock, and SQLite answers "database is
    locked" at once instead of calling the busy handler; several IIS workers starting together
    on a fresh data_dir meet exactly there.
    """
    deadline = time.monotonic() + patience_seconds
    while True:
        try:
            return str(connection.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)  # a retry interval, not synchronisation: the other side is SQLite


def _migrate(connection: sqlite3.Connection) -> None:
    """Brings the schema to the newest version; several processes may race here safely."""
    if connection.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS):
        return  # the usual case: no write lock needed just to connect
    connection.execute("BEGIN IMMEDIATE")
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this program knows ({len(MIGRATIONS)}); "
                "upgrade VezaProvisioner"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in filter(str.strip, script.split(";")):
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {number}")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _record(row: tuple[Any, ...]) -> Record:
    values = dict(zip(Record.__dataclass_fields__, row, strict=True))
    values["recovered"] = bool(values["recovered"])
    return Record(**values)

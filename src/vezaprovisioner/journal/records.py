"""A request's record in the journal: what it holds, how it moves, and how to find it.

Every CREATE_EMAIL is recorded before Exchange is touched. A record moves through these states,
each change committed before the step it describes:

    received ──► running ──► created | already_exists | failed      (the request finished)
        │           │
        └───────────┴──────► created (recovered) | not_created | unknown   (crash recovery)

`received` is written before any Exchange call. `running`, the claim on the user (see
`claims`, which shares this file) and `enable_sent_at` are one commit, made when Enable-* has
been handed to a PowerShell host or a remote session and is about to be sent; the outcome and
the claim's release are the third. A record whose owner process is gone (see `liveness`) is an
orphan for crash recovery.

`Journal` is a `store.JournalStore` (the file, its one writer, its readers; where
`JournalUnavailable` comes from) that knows these records.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import JournalSettings
from ..exchange.errors import ExchangeError
from ..failures import as_failure
from .liveness import owner_gone, process_token
from .store import JournalStore

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


class Journal(JournalStore):
    """The journal file and its records. Thread-safe; one instance per process."""

    def __init__(
        self,
        data_dir: Path,
        settings: JournalSettings,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(data_dir, settings)
        self._wall = wall
        #: This machine, as claims and records name it (pids are only checked here).
        self.host = socket.gethostname().casefold()

    def now(self) -> float:
        """Wall-clock time as the journal records it (injectable for tests)."""
        return self._wall()

    # ---- the record's life --------------------------------------------------------------------

    def receive(
        self, context: RequestContext, action: str, identity: str, alias: str | None
    ) -> int:
        """Writes the `received` record; returns its row id."""
        now = self._wall()

        def insert(db: sqlite3.Connection) -> int:
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
            assert cursor.lastrowid is not None
            return cursor.lastrowid

        # Not fsynced on its own: it reaches the disk with this request's next commit (the sent
        # mark or the outcome, both fsynced with synchronous = "full") before the request sends
        # anything that changes Exchange or answers; a power loss before that loses only the
        # record of a request that did neither.
        return self.write("receive", insert, durable=False)

    def running(self, row_id: int, guid: str) -> None:
        """received → running: this request now holds the claim on the user `guid`."""
        self._move(row_id, ("received",), "running", guid=guid)

    def enable_sent(self, row_id: int) -> None:
        """Marks that Enable-* is about to be sent (committed before it is)."""
        self._move(row_id, ("running",), "running", enable_sent_at=self._wall())

    def mark_sent(self, row_id: int, guid: str) -> None:
        """received → running with `enable_sent_at`, in one commit (without a claim)."""
        self._move(row_id, UNFINISHED, "running", guid=guid, enable_sent_at=self._wall())

    def finish(
        self,
        row_id: int,
        state: Literal["created", "already_exists"],
        *,
        guid: str,
        alias: str,
        primary_smtp_address: str,
        claim: tuple[str, str] | None = None,
    ) -> None:
        """received / running → created / already_exists; with `claim` (key, token) the claim
        is released in the same commit."""
        self._move(
            row_id,
            UNFINISHED,
            state,
            guid=guid,
            result_alias=alias,
            primary_smtp_address=primary_smtp_address,
            finished=True,
            release=claim,
        )

    def fail(
        self,
        row_id: int,
        error: Exception,
        claim: tuple[str, str] | None = None,
        *,
        guid: str | None = None,
    ) -> None:
        """received / running → failed, with the code and what Exchange said (and the claim
        released in the same commit; `guid` when the user was resolved)."""
        fields: dict[str, Any] = {"code": as_failure(error).code, "detail": str(error)[:2000]}
        if guid is not None:
            fields["guid"] = guid
        if isinstance(error, ExchangeError) and error.from_exchange:
            fields.update(
                exchange_reason=error.reason,
                exchange_error_id=error.error_id,
                exchange_message=error.message[:2000],
            )
        self._move(row_id, UNFINISHED, "failed", finished=True, release=claim, **fields)

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
        release: tuple[str, str] | None = None,
        **fields: Any,
    ) -> bool:
        def move(db: sqlite3.Connection) -> bool:
            moved = self.move_in(db, row_id, allowed_from, state, finished=finished, **fields)
            if release is not None:
                db.execute("DELETE FROM claims WHERE identity_key = ? AND token = ?", release)
            return moved

        return self.write(f"mark {state}", move)

    def move_in(
        self,
        db: sqlite3.Connection,
        row_id: int,
        allowed_from: Sequence[State],
        state: State,
        *,
        finished: bool = False,
        **fields: Any,
    ) -> bool:
        """The record's state change, inside a write transaction; False if it was elsewhere."""
        now = self._wall()
        fields["state"] = state
        fields["updated_at"] = now
        assignments = ", ".join(f"{name} = ?" for name in fields)
        values = list(fields.values())
        if finished:
            assignments += ", finished_at = ?, duration_ms = CAST((? - received_at) * 1000 AS INT)"
            values += [now, now]
        marks = ", ".join("?" for _ in allowed_from)
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


def _record(row: tuple[Any, ...]) -> Record:
    values = dict(zip(Record.__dataclass_fields__, row, strict=True))
    values["recovered"] = bool(values["recovered"])
    return Record(**values)

"""The per-user claim: what keeps two requests, in any worker process, from both enabling one user.

The claim (table `claims` of the journal file, one row per user GUID) is taken in one atomic
SQLite transaction and released when the request ends; a claim whose owner process is gone (see
`liveness`) or whose age exceeds `journal.stale_claim_seconds` may be taken over.
`JournalClaims` puts `InProcessClaims` (a lock per user) in front of it, so threads of one process
queue without polling and only processes meet at the row. Whatever holds claims for the flow is a
`UserClaims`: the flow, crash recovery and the service all say "claim" for this one idea.

A CREATE_EMAIL does not commit a claim to read the user: `gate()` waits (reading only) until no
other process holds the user's claim and notes how many Enable-* the journal records as sent for
the user; the claim is then taken in the commit that marks Enable-* sent (`ClaimTable.send`),
which refuses with `ClaimLost` if another process claimed the user or sent an Enable-* for it
since (the flow then waits and reads the user again). So two processes never both send Enable-*
for a user, and a request costs three commits: received, claim + sent, outcome + release.
Crash recovery uses `hold()`, which holds the claim for the whole block.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Final, Protocol

from ..clock import Clock
from ..config import JournalSettings
from ..failures import Failure
from .liveness import owner_gone, process_token
from .records import Journal
from .store import JournalUnavailable

log = logging.getLogger(__name__)


class IdentityBusy(Failure):
    """Another request (maybe in another worker process) holds the claim on this user too long."""

    code = "IDENTITY_BUSY"
    status = 503
    title = "Another request for this user is running"
    retry_after_seconds: int

    def __init__(self, message: str, *, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ClaimLost(Exception):
    """Another process claimed the user, or sent Enable-* for it, after the gate opened."""


@dataclass
class ClaimGate:
    """What a request saw when it passed the gate to a user, and the claim it took later."""

    key: str
    #: Records of this user with `enable_sent_at`, when the gate opened.
    sent_before: int
    #: No Enable-* for this user is recorded as sent and unfinished, or finished since the
    #: request first read the user (`gate(since=...)`): that read is still what Exchange holds,
    #: as far as any request sharing this journal can have changed it. False when not asked.
    read_is_current: bool = False
    #: The claim's token once `ClaimTable.send` took it (released with the outcome).
    token: str | None = None

    @property
    def claim(self) -> tuple[str, str] | None:
        return (self.key, self.token) if self.token else None


# The user's claim (NULLs when none), how many Enable-* the journal records as sent for the
# user, and how many of those were unfinished or finished at or after a time, in one
# statement: read by the gate, then again (sent count only) in the commit that takes the claim.
_CLAIM_AND_SENT = (
    "SELECT c.owner_host, c.owner_pid, c.owner_token, c.expires_at, s.sent, s.recent"
    " FROM (SELECT count(*) AS sent,"
    "  coalesce(sum(finished_at IS NULL OR finished_at >= ?), 0) AS recent"
    "  FROM requests WHERE guid = ? COLLATE NOCASE AND enable_sent_at IS NOT NULL) s"
    " LEFT JOIN claims c ON c.identity_key = ?"
)

#: How far before a request's first read of the user an Enable-* that finished still makes the
#: gate call that read stale: the journal's times are wall-clock, which a time sync may step.
CLOCK_STEP_SECONDS: Final = 5.0


class ClaimTable:
    """The claims table of one journal: one row per claimed user."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def look(self, key: str, since: float | None = None) -> tuple[bool, int, bool]:
        """(held by a live owner, Enable-* sent for the user so far, none of them unfinished or
        finished since `since`), in one read; no commit. The last is False without `since`."""
        after = None if since is None else since - CLOCK_STEP_SECONDS
        rows = self._journal.read(_CLAIM_AND_SENT, (after, key, key))
        host, pid, token, expires_at, sent, recent = rows[0]
        now = self._journal.now()
        held = host is not None and not self._stale(host, pid, token, expires_at, now)
        return held, int(sent), since is not None and recent == 0

    def send(self, row_id: int, guid: str, gate: ClaimGate) -> None:
        """One commit: take the claim, and mark the record running with Enable-* sent.

        Raises ClaimLost (nothing written) when another owner holds the claim or an Enable-* for
        the user was marked sent since the gate opened.
        """
        token = uuid.uuid4().hex

        def claim_and_mark(db: sqlite3.Connection) -> None:
            now = self._journal.now()
            host, pid, owner, expires_at, sent, _ = db.execute(
                _CLAIM_AND_SENT, (None, gate.key, gate.key)
            ).fetchone()
            if host is not None and not self._stale(host, pid, owner, expires_at, now):
                raise ClaimLost(f"another request claimed user {gate.key}")
            if sent != gate.sent_before:
                raise ClaimLost(f"another request sent Enable-* for user {gate.key}")
            self._insert(db, gate.key, token, now)
            self._journal.move_in(
                db, row_id, ("received", "running"), "running", guid=guid, enable_sent_at=now
            )

        self._journal.write("claim and mark Enable-* sent", claim_and_mark)
        gate.token = token

    def _insert(self, db: sqlite3.Connection, key: str, token: str, now: float) -> None:
        db.execute(
            "INSERT OR REPLACE INTO claims (identity_key, token, owner_host, owner_pid,"
            " owner_token, claimed_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                token,
                self._journal.host,
                os.getpid(),
                process_token(),
                now,
                now + self._journal.settings.stale_claim_seconds,
            ),
        )

    def try_claim(self, key: str) -> str | None:
        """Takes the claim on `key` in one transaction; returns its token, or None if held."""
        now = self._journal.now()
        token = uuid.uuid4().hex
        with self._journal.transaction("claim") as db:
            held = db.execute(
                "SELECT owner_host, owner_pid, owner_token, expires_at FROM claims"
                " WHERE identity_key = ?",
                (key,),
            ).fetchone()
            if held is not None and not self._stale(held[0], held[1], held[2], held[3], now):
                return None
            self._insert(db, key, token, now)
        return token

    def release(self, key: str, token: str) -> None:
        """Gives the claim back (only if it is still ours)."""
        with self._journal.transaction("release claim") as db:
            db.execute("DELETE FROM claims WHERE identity_key = ? AND token = ?", (key, token))

    def _stale(self, host: str, pid: int, token: str, expires_at: float, now: float) -> bool:
        return owner_gone(self._journal.host, host, pid, token, expires_at, now)

    def release_dead(self) -> int:
        """Drops claims whose owner process is gone or that expired; returns how many."""
        now = self._journal.now()
        with self._journal.transaction("release dead claims") as db:
            held = db.execute(
                "SELECT identity_key, owner_host, owner_pid, owner_token, expires_at FROM claims"
            ).fetchall()
            dead = [
                key
                for key, host, pid, owner_token, expires_at in held
                if self._stale(host, pid, owner_token, expires_at, now)
            ]
            db.executemany("DELETE FROM claims WHERE identity_key = ?", [(k,) for k in dead])
        return len(dead)


class UserClaims(Protocol):
    """Lets at most one request at a time act on one user (keyed by the user's GUID).

    `hold` holds the claim for the whole block (crash recovery). `gate` is the request flow's:
    within one process the same lock; across processes it waits until no other process holds
    the user's claim and yields the `ClaimGate` the journal takes the claim with when Enable-*
    is sent (None where there is no journal).
    """

    def hold(self, key: str) -> AbstractContextManager[None]: ...

    def gate(
        self, key: str, since: float | None = None
    ) -> AbstractContextManager[ClaimGate | None]: ...


class InProcessClaims:
    """The claim within one process: a lock per user GUID its threads queue on; idle ones go."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        key = key.casefold()
        with self._mutex:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._mutex:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)

    @contextmanager
    def gate(self, key: str, since: float | None = None) -> Iterator[None]:
        with self.hold(key):
            yield None


class JournalClaims:
    """The claim across threads *and* processes: the in-process claim, then the journal's row.

    Threads of one process queue on the in-process lock (no polling); processes meet at the claim
    row, polled with a short backoff up to `journal.claim_wait_seconds`.
    """

    def __init__(
        self,
        journal: Journal,
        settings: JournalSettings,
        clock: Clock,
        local: UserClaims,
    ) -> None:
        self._table = ClaimTable(journal)
        self._settings = settings
        self._clock = clock
        self._local = local

    @contextmanager
    def gate(self, key: str, since: float | None = None) -> Iterator[ClaimGate]:
        """The request flow's: the in-process lock, then wait (reading only) until no other
        process holds the user's claim. The claim itself is taken by `ClaimTable.send`.

        `since`: the journal time before the request first read the user; the gate then says
        whether that read is still current (`ClaimGate.read_is_current`)."""
        key = key.casefold()
        with self._local.hold(key):
            yield self._wait_until_free(key, since)

    def _wait_until_free(self, key: str, since: float | None) -> ClaimGate:
        deadline = self._clock.monotonic() + self._settings.claim_wait_seconds
        delay = 0.01
        while True:
            held, sent, current = self._table.look(key, since)
            if not held:
                return ClaimGate(key, sent, read_is_current=current)
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                raise self._busy(key)
            self._clock.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.25)

    def _busy(self, key: str) -> IdentityBusy:
        return IdentityBusy(
            f"another request for user {key} has been running for more than "
            f"{self._settings.claim_wait_seconds:g} s (journal.claim_wait_seconds); "
            "retry later, or look it up with `vezaprovisioner journal --identity "
            f"{key}`.",
            retry_after_seconds=5,
        )

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """The lock and the claim for the whole block (crash recovery)."""
        key = key.casefold()
        with self._local.hold(key):
            token = self._wait_for_claim(key)
            try:
                yield
            finally:
                try:
                    self._table.release(key, token)
                except JournalUnavailable:
                    # Never mask the request's own outcome (Exchange may have acted): the claim
                    # stays until this process ends or it goes stale; on_error counted it.
                    log.exception("the claim on user %s could not be released", key)

    def _wait_for_claim(self, key: str) -> str:
        deadline = self._clock.monotonic() + self._settings.claim_wait_seconds
        delay = 0.01
        while True:
            token = self._table.try_claim(key)
            if token is not None:
                return token
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                raise self._busy(key)
            self._clock.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.25)

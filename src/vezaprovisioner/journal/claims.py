"""The per-user claim: what keeps two requests, in any worker process, from both enabling one user.

The claim (table `claims` of the journal file, one row per user GUID) is taken in one atomic
SQLite transaction and released when the request ends; a claim whose owner process is gone (see
`liveness`) or whose age exceeds `journal.stale_claim_seconds` may be taken over.
`JournalClaims` puts `InProcessClaims` (a lock per user) in front of it, so threads of one process
queue without polling and only processes meet at the row. Whatever holds claims for the flow is a
`UserClaims`: the flow, crash recovery and the service all say "claim" for this one idea.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from ..clock import Clock
from ..config import JournalSettings
from ..failures import Failure
from .liveness import owner_gone, process_token
from .records import Journal, JournalUnavailable

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


class ClaimTable:
    """The claims table of one journal: one row per claimed user."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

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
    """Lets at most one request at a time act on one user (keyed by the user's GUID)."""

    def hold(self, key: str) -> AbstractContextManager[None]: ...


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
    def hold(self, key: str) -> Iterator[None]:
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
                raise IdentityBusy(
                    f"another request for user {key} has been running for more than "
                    f"{self._settings.claim_wait_seconds:g} s (journal.claim_wait_seconds); "
                    "retry later, or look it up with `vezaprovisioner journal --identity "
                    f"{key}`.",
                    retry_after_seconds=5,
                )
            self._clock.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.25)

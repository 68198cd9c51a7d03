"""The per-user claim: what keeps two requests, in any worker process, from both enabling one user.

The claim (table `claims` of the journal file, one row per user GUID) is taken in one atomic
SQLite transaction and released when the request ends; a claim whose owner process is gone (see
`liveness`) or whose age exceeds `journal.stale_claim_seconds` may be taken over.
`JournalIdentityGuard` puts an in-process lock in front of it, so threads of one process queue
without polling and only processes meet at the row.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from ..clock import Clock
from ..config import JournalSettings
from .liveness import owner_gone, process_token
from .records import Journal, JournalUnavailable

log = logging.getLogger(__name__)


class IdentityBusy(Exception):
    """Another request (maybe in another worker process) holds the claim on this user too long."""

    def __init__(self, message: str, *, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class Claims:
    """The claims table of one journal."""

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


class IdentityLock(Protocol):
    """The in-process part of the guard (provisioning.InProcessIdentityGuard)."""

    def hold(self, key: str) -> AbstractContextManager[None]: ...


class JournalIdentityGuard:
    """The per-user guard across threads *and* processes: a lock, then the journal's claim.

    Threads of one process queue on the in-process lock (no polling); processes meet at the claim
    row, polled with a short backoff up to `journal.claim_wait_seconds`.
    """

    def __init__(
        self,
        journal: Journal,
        settings: JournalSettings,
        clock: Clock,
        local: IdentityLock,
    ) -> None:
        self._claims = Claims(journal)
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
                    self._claims.release(key, token)
                except JournalUnavailable:
                    # Never mask the request's own outcome (Exchange may have acted): the claim
                    # stays until this process ends or it goes stale; on_error counted it.
                    log.exception("the claim on user %s could not be released", key)

    def _wait_for_claim(self, key: str) -> str:
        deadline = self._clock.monotonic() + self._settings.claim_wait_seconds
        delay = 0.01
        while True:
            token = self._claims.try_claim(key)
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

"""Idempotency keys (IETF httpapi draft "The Idempotency-Key HTTP Header Field"), in the journal.

A key is the caller's: (caller, key) names one request. `begin()` records it atomically with the
request's fingerprint (a hash of the validated command) before the request runs, or reports what
an earlier request with the key left: its stored outcome, a request still running, or another
body. `finish()` stores the outcome to replay; `forget()` drops a key whose request ended in a
way worth retrying (5xx). Keys live as long as journal records (journal.retention_days); a
running key whose process died is taken over after journal.stale_claim_seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..failures import Failure
from .records import Journal


class IdempotencyKeyMismatch(Failure):
    """The Idempotency-Key was first used with another body."""

    code = "IDEMPOTENCY_KEY_MISMATCH"
    status = 422
    title = "The Idempotency-Key was used with another body"
    advice = "A key names one request: send a new key for a new request."


class IdempotencyKeyInUse(Failure):
    """A request with the same Idempotency-Key is still running."""

    code = "IDEMPOTENCY_KEY_IN_USE"
    status = 409
    title = "A request with this Idempotency-Key is still running"
    advice = "Retry after Retry-After to get the first request's answer."
    retry_after_seconds = 5


@dataclass(frozen=True)
class KeyState:
    """What `begin()` found: `new` (run it), `replay`, `running` or `mismatch`."""

    kind: Literal["new", "replay", "running", "mismatch"]
    request_id: str | None = None
    status: int | None = None
    body: str | None = None


class IdempotencyKeys:
    """The idempotency_keys table of one journal."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def begin(self, caller: str, key: str, fingerprint: str, request_id: str) -> KeyState:
        now = self._journal.now()
        settings = self._journal.settings
        expired = now - settings.retention_days * 86_400
        abandoned = now - settings.stale_claim_seconds
        with self._journal.transaction("idempotency key") as db:
            db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (expired,))
            row = db.execute(
                "SELECT fingerprint, request_id, created_at, status, body FROM idempotency_keys"
                " WHERE caller = ? AND key = ?",
                (caller, key),
            ).fetchone()
            if row is not None:
                stored_fingerprint, stored_id, created_at, status, body = row
                if stored_fingerprint != fingerprint:
                    return KeyState("mismatch", request_id=stored_id)
                if status is not None:
                    return KeyState("replay", request_id=stored_id, status=status, body=body)
                if created_at >= abandoned:
                    return KeyState("running", request_id=stored_id)
            db.execute(
                "INSERT OR REPLACE INTO idempotency_keys"
                " (caller, key, fingerprint, request_id, created_at) VALUES (?, ?, ?, ?, ?)",
                (caller, key, fingerprint, request_id, now),
            )
        return KeyState("new")

    def finish(self, caller: str, key: str, status: int, body: str) -> None:
        with self._journal.transaction("idempotency outcome") as db:
            db.execute(
                "UPDATE idempotency_keys SET status = ?, body = ? WHERE caller = ? AND key = ?",
                (status, body, caller, key),
            )

    def forget(self, caller: str, key: str) -> None:
        with self._journal.transaction("idempotency key release") as db:
            db.execute("DELETE FROM idempotency_keys WHERE caller = ? AND key = ?", (caller, key))

"""Crash recovery: requests a dead process left `received`/`running` get a final state.

The final state comes from what the journal proves and what Exchange reports now (Get-User,
Get-Recipient), never from a guess:

* `received`: the process died before Enable-* was handed to a PowerShell host or remote
  session (it was reading the user, or queued waiting for a host): nothing that changes Exchange
  was sent → `not_created`.
* `running` without `enable_sent_at` (written by versions before the claim and the sent mark
  became one commit): it died before sending Enable-* → `not_created`.
* `running` with `enable_sent_at`: Enable-* was handed to a host or session and sent, and may or
  may not have landed, so Exchange is asked:
  a mailbox of the configured kind with the requested alias → `created` (recovered); still a
  plain user → `not_created`; anything else (another type, another alias, the user gone, or a
  later request of this service created the mailbox) → `unknown`, with what was seen. When
  Exchange cannot be read now the record is left for the next start.

Each reconciliation holds the same per-user claim as a request, so a new request for that user
cannot change it while recovery reads it. `Maintenance` runs recovery (and journal retention) in
the background of every process: once at start, then every `journal.maintenance_interval_seconds`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone

from .audit import AuditEvent, AuditTrail
from .config import Settings
from .exchange.errors import IdentityNotFound
from .exchange.port import (
    ENABLEABLE_USER_TYPES,
    LOCAL_MAILBOX_TYPE,
    REMOTE_MAILBOX_TYPE,
    ExchangePort,
)
from .failures import Failure
from .journal.claims import ClaimTable, UserClaims
from .journal.records import Journal, Record, State
from .journal.store import JournalUnavailable
from .metrics import Metrics

log = logging.getLogger(__name__)

#: How long closing the services waits for a maintenance pass to finish the record in hand (one
#: Get-User, perhaps a Get-Recipient); IIS allows 30 s from its shutdown signal (install.ps1).
STOP_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class Reconciled:
    """What recovery decided for one record."""

    request_id: str
    state: State
    reason: str


def recover(
    journal: Journal,
    exchange: ExchangePort,
    settings: Settings,
    claims: UserClaims,
    stopping: threading.Event | None = None,
) -> list[Reconciled]:
    """Reconciles every orphaned record; returns what was decided (skipped ones are absent).
    Once `stopping` is set, the records not yet begun are left for the next pass."""
    decided: list[Reconciled] = []
    for record in journal.orphans():
        if stopping is not None and stopping.is_set():
            break
        try:
            outcome = _reconcile(record, journal, exchange, settings, claims)
        except Failure as exc:
            log.warning(
                "recovery of request %s postponed to the next start: %s", record.request_id, exc
            )
            continue
        if outcome is not None:
            decided.append(outcome)
            log.info(
                "recovered request %s: %s (%s)", outcome.request_id, outcome.state, outcome.reason
            )
    ClaimTable(journal).release_dead()
    return decided


def _reconcile(
    record: Record,
    journal: Journal,
    exchange: ExchangePort,
    settings: Settings,
    claims: UserClaims,
) -> Reconciled | None:
    if record.state == "received" or record.guid is None:
        return _decide(
            journal,
            record,
            "not_created",
            "queued, never sent: the process stopped before Enable-* was handed to a PowerShell "
            "host or remote session (it was reading the user or waiting for a host); this "
            "request sent nothing that changes Exchange",
        )
    if record.enable_sent_at is None:
        return _decide(
            journal,
            record,
            "not_created",
            "queued, never sent: the process stopped after claiming the user but before Enable-* "
            "was sent",
        )
    with claims.hold(record.guid):
        state, reason = _read_outcome(record, record.guid, journal, exchange, settings)
        return _decide(journal, record, state, reason)


def _read_outcome(
    record: Record, guid: str, journal: Journal, exchange: ExchangePort, settings: Settings
) -> tuple[State, str]:
    remote = settings.mailbox_kind == "remote"
    mailbox_type = REMOTE_MAILBOX_TYPE if remote else LOCAL_MAILBOX_TYPE
    cmdlet = "Enable-RemoteMailbox" if remote else "Enable-Mailbox"
    dc = settings.exchange.domain_controller or None
    sent = (
        f"sent: {cmdlet} was handed to Exchange at {_iso(record.enable_sent_at)} and the "
        "process stopped"
    )
    try:
        kind = exchange.get_user(guid, dc).recipient_type_details
    except IdentityNotFound:
        return "unknown", f"{sent}; the user {guid} no longer exists in Active Directory"
    if kind in ENABLEABLE_USER_TYPES:
        return "not_created", f"{sent}; Exchange still reports a {kind}, so it did not take effect"
    if kind != mailbox_type:
        return "unknown", f"{sent}; Exchange now reports a {kind}, not a {mailbox_type}"
    later = [
        r
        for r in journal.records(identity=guid, limit=50)
        if r.id > record.id and r.state == "created" and not r.recovered
    ]
    if later:
        return "unknown", (
            f"{sent}; the user has a {kind}, but the later request {later[-1].request_id} "
            "reports that it created it"
        )
    recipient = exchange.get_recipient(guid, dc)
    if record.alias and record.alias.casefold() != recipient.alias.casefold():
        return "unknown", (
            f"{sent}; the user has a {kind} with alias {recipient.alias!r}, not the requested "
            f"{record.alias!r}"
        )
    return "created", f"{sent}; Exchange now reports a {kind} ({recipient.primary_smtp_address})"


def _decide(journal: Journal, record: Record, state: State, reason: str) -> Reconciled | None:
    if not journal.reconcile(record.id, state, reason):
        return None  # finished meanwhile (by a stale-but-alive owner)
    return Reconciled(record.request_id, state, reason)


def _iso(timestamp: float | None) -> str:
    if timestamp is None:
        return "?"
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


class Maintenance:
    """The journal's upkeep in the background, once per process: retention, crash recovery."""

    def __init__(
        self,
        settings: Settings,
        journal: Journal,
        exchange: ExchangePort,
        claims: UserClaims,
        metrics: Metrics,
        audit: AuditTrail | None,
    ) -> None:
        self._settings = settings
        self._journal = journal
        self._exchange = exchange
        self._claims = claims
        self._metrics = metrics
        self._audit = audit
        #: Set once the first pass (retention, crash recovery) has run.
        self.first_pass_done = threading.Event()
        #: Set by `stop()`: no pass starts after it, and a pass in progress ends after its record.
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """In the background, once per process: a pass now, then one every
        `journal.maintenance_interval_seconds` until `stop()`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="journal-maintenance", daemon=True)
        self._thread.start()

    def stop(self, wait_seconds: float = STOP_WAIT_SECONDS) -> None:
        """Ends the background passes, waiting (at most `wait_seconds`) for a pass in progress to
        finish the record in hand, so the services it uses are not closed under it."""
        self.stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait_seconds)

    def _loop(self) -> None:
        interval = self._settings.journal.maintenance_interval_seconds
        while not self.stopping.is_set():
            self.run_once()
            self.stopping.wait(interval)

    def run_once(self) -> None:
        """One pass: delete records past retention, reconcile orphaned ones."""
        try:
            pruned = self._journal.prune()
            if pruned:
                log.info("journal retention: %d finished records deleted", pruned)
            recovered = recover(
                self._journal, self._exchange, self._settings, self._claims, self.stopping
            )
            for outcome in recovered:
                self._metrics.recovered.labels(outcome.state).inc()
                record = self._journal.get(outcome.request_id)
                if self._audit is not None and record is not None:
                    self._audit.write(_recovered_event(record))
        except JournalUnavailable:
            log.exception("start-up maintenance could not use the journal")
        finally:
            self.first_pass_done.set()


def _recovered_event(record: Record) -> AuditEvent:
    return AuditEvent(
        event="request_recovered",
        request_id=record.request_id,
        caller=record.caller,
        caller_method=record.caller_method,
        client_address=record.client_address,
        action=record.action,
        identity=record.identity,
        alias=record.alias,
        outcome=record.state,
        guid=record.guid,
        detail=record.detail,
    )

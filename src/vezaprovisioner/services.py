"""Wiring: everything one process needs, built from the settings. No HTTP here."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from .api.problems import problem_for
from .audit import AuditEvent, AuditTrail
from .auth import Authenticator
from .clock import Clock, SystemClock
from .config import Settings
from .exchange.backends import open_exchange
from .exchange.port import ExchangePort
from .journal.claims import JournalIdentityGuard
from .journal.records import Journal, JournalUnavailable, Record
from .metrics import Metrics, TimedExchange, use_multiprocess_dir
from .provisioning import InProcessIdentityGuard, Provisioner
from .recovery import recover

log = logging.getLogger(__name__)


def problem_code(exc: Exception) -> str:
    """The stable `code` of a failure, from the one table in api/problems.py."""
    return problem_for(exc).kind.code


@dataclass
class Services:
    """The configured pieces shared by the API and the CLI."""

    settings: Settings
    exchange: ExchangePort
    provisioner: Provisioner
    authenticator: Authenticator
    journal: Journal | None = None
    audit: AuditTrail | None = None
    metrics: Metrics | None = None
    guard: JournalIdentityGuard | None = None
    #: Set once the first maintenance pass (retention, crash recovery) has run.
    maintenance_done: threading.Event = field(default_factory=threading.Event)
    _maintenance_started: bool = field(default=False, init=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)

    def start_maintenance(self) -> None:
        """In the background, once per process: a maintenance pass now, then one every
        `journal.maintenance_interval_seconds` until `close()`."""
        if self._maintenance_started:
            return
        self._maintenance_started = True
        threading.Thread(target=self._maintain, name="journal-maintenance", daemon=True).start()

    def _maintain(self) -> None:
        interval = self.settings.journal.maintenance_interval_seconds
        while True:
            self.run_maintenance()
            if self._stopping.wait(interval):
                return

    def run_maintenance(self) -> None:
        """One pass: delete records past retention, reconcile orphaned ones."""
        try:
            if self.journal is not None and self.guard is not None:
                pruned = self.journal.prune()
                if pruned:
                    log.info("journal retention: %d finished records deleted", pruned)
                exchange = TimedExchange(self.exchange, self.metrics) if self.metrics else None
                for outcome in recover(
                    self.journal, exchange or self.exchange, self.settings, self.guard
                ):
                    if self.metrics is not None:
                        self.metrics.recovered.labels(outcome.state).inc()
                    record = self.journal.get(outcome.request_id)
                    if self.audit is not None and record is not None:
                        self.audit.write(_recovered_event(record))
        except JournalUnavailable:
            log.exception("start-up maintenance could not use the journal")
        finally:
            self.maintenance_done.set()

    def close(self) -> None:
        self._stopping.set()
        self.exchange.close()
        if self.journal is not None:
            self.journal.close()
        if self.audit is not None:
            self.audit.close()


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


def build_services(
    settings: Settings, *, exchange: ExchangePort | None = None, clock: Clock | None = None
) -> Services:
    """Build from settings; tests may pass their own Exchange port and clock."""
    clock = clock or SystemClock()
    configured_dir = settings.metrics.multiprocess_dir
    # Metrics first: a backend with hosts reports through metrics.backend_events(<backend>).
    metrics = Metrics(
        use_multiprocess_dir(settings.data_dir / configured_dir if configured_dir else None)
    )
    exchange = exchange or open_exchange(
        settings, clock, host_events=metrics.backend_events(settings.backend)
    )
    journal = Journal(settings.data_dir, settings.journal, code_of=problem_code)

    def journal_failed(error: Exception) -> None:
        metrics.journal_errors.inc()
        log.error("journal error: %s", error)

    journal.on_error = journal_failed
    guard = JournalIdentityGuard(journal, settings.journal, clock, InProcessIdentityGuard())
    audit = (
        AuditTrail(settings.data_dir, settings.audit, code_of=problem_code)
        if settings.audit.enabled
        else None
    )
    return Services(
        settings=settings,
        exchange=exchange,
        provisioner=Provisioner(
            settings,
            TimedExchange(exchange, metrics),
            clock,
            guard=guard,
            journal=journal,
            audit=audit,
            outcomes=lambda outcome, error: metrics.create_email.labels(
                outcome, problem_code(error) if error else ""
            ).inc(),
        ),
        authenticator=Authenticator(settings.auth),
        journal=journal,
        audit=audit,
        metrics=metrics,
        guard=guard,
    )

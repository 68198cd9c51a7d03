"""Wiring: everything one process needs, built from the settings. No HTTP here, and no behaviour:
each piece lives in its own module; this one only puts them together."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import logs
from .audit import AuditTrail
from .auth import Authenticator
from .clock import Clock, SystemClock
from .config import Settings
from .exchange.backends import open_exchange
from .exchange.port import ExchangePort, capacity_of
from .failures import as_failure
from .flow_threads import FlowThreads
from .journal.claims import InProcessClaims, JournalClaims
from .journal.records import Journal
from .metrics import Metrics, TimedExchange, use_multiprocess_dir
from .provisioning import Provisioner
from .recovery import Maintenance

log = logging.getLogger(__name__)


@dataclass
class Services:
    """The configured pieces shared by the API and the CLI."""

    settings: Settings
    exchange: ExchangePort
    provisioner: Provisioner
    authenticator: Authenticator
    journal: Journal
    metrics: Metrics
    claims: JournalClaims
    maintenance: Maintenance
    #: Where the API runs the blocking flow, sized from the backend's capacity.
    flows: FlowThreads
    clock: Clock
    #: None when `audit.enabled` is false.
    audit: AuditTrail | None = None

    def close(self) -> None:
        self.maintenance.stop()
        self.flows.close()
        self.authenticator.close()
        self.exchange.close()
        self.journal.close()
        if self.audit is not None:
            self.audit.close()
        logs.flush()


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
    timed = TimedExchange(exchange, metrics)
    journal = Journal(settings.data_dir, settings.journal)

    def journal_failed(error: Exception) -> None:
        metrics.journal_errors.inc()
        log.error("journal error: %s", error)

    journal.on_error = journal_failed
    claims = JournalClaims(journal, settings.journal, clock, InProcessClaims())
    audit = AuditTrail(settings.data_dir, settings.audit) if settings.audit.enabled else None
    return Services(
        settings=settings,
        exchange=exchange,
        provisioner=Provisioner(
            settings,
            timed,
            clock,
            claims=claims,
            journal=journal,
            audit=audit,
            outcomes=lambda outcome, error: metrics.create_email_by(
                outcome, as_failure(error).code if error else ""
            ).inc(),
        ),
        authenticator=Authenticator(settings.auth, clock=clock),
        journal=journal,
        metrics=metrics,
        claims=claims,
        maintenance=Maintenance(settings, journal, timed, claims, metrics, audit),
        flows=FlowThreads(capacity_of(exchange)),
        clock=clock,
        audit=audit,
    )

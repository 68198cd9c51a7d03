"""Wiring: everything one process needs, built from the settings. No HTTP here."""

from __future__ import annotations

from dataclasses import dataclass

from .auth import Authenticator
from .clock import Clock, SystemClock
from .config import Settings
from .exchange.backends import open_exchange
from .exchange.port import ExchangePort
from .provisioning import Provisioner


@dataclass
class Services:
    """The configured pieces shared by the API and the CLI."""

    settings: Settings
    exchange: ExchangePort
    provisioner: Provisioner
    authenticator: Authenticator

    def close(self) -> None:
        self.exchange.close()


def build_services(
    settings: Settings, *, exchange: ExchangePort | None = None, clock: Clock | None = None
) -> Services:
    """Build from settings; tests may pass their own Exchange port and clock."""
    clock = clock or SystemClock()
    exchange = exchange or open_exchange(settings, clock)
    return Services(
        settings=settings,
        exchange=exchange,
        provisioner=Provisioner(settings, exchange, clock),
        authenticator=Authenticator(settings.auth),
    )

"""Builds the Exchange port the configuration names."""

from __future__ import annotations

import os

from ..clock import Clock
from ..config import ConfigError, Settings
from .port import ExchangePort
from .remote import RemoteCredentials, RemoteExchange
from .simulated import DirectoryError, SimulatedExchange, load_directory


def open_exchange(settings: Settings, clock: Clock) -> ExchangePort:
    """The configured backend, ready for use. Raises ConfigError when it cannot be built."""
    if settings.backend == "simulated":
        try:
            directory = load_directory(settings.simulated.directory)
        except DirectoryError as exc:
            raise ConfigError(f"simulated.directory: {exc}") from exc
        return SimulatedExchange(
            directory,
            clock=clock,
            latency_ms=settings.simulated.latency_ms,
            enable_latency_ms=settings.simulated.enable_latency_ms,
            command_timeout_seconds=settings.exchange.command_timeout_seconds,
        )
    if settings.backend == "remote":
        credentials = RemoteCredentials.from_environment(settings.remote, os.environ)
        try:
            return RemoteExchange(settings.remote, settings.exchange, credentials, clock=clock)
        except ValueError as exc:
            raise ConfigError(f"remote: {exc}") from exc
    raise ConfigError(
        f"backend {settings.backend!r} is not available in this version yet; "
        'use backend = "simulated"'
    )

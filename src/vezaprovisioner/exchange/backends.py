"""Builds the Exchange port the configuration names."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..clock import Clock
from ..config import ConfigError, Settings
from .port import ExchangePort
from .remote import RemoteCredentials, RemoteExchange
from .simulated.directory import DirectoryError, load_directory
from .simulated.engine import SimulatedExchange

if TYPE_CHECKING:
    from .local.supply import PoolEvents


def open_exchange(
    settings: Settings,
    clock: Clock,
    *,
    host_events: PoolEvents | None = None,
    transcript: str | None = None,
) -> ExchangePort:
    """The configured backend, ready for use. Raises ConfigError when it cannot be built.

    `host_events` receives the local pool's host lifecycle and counts (the service passes
    `metrics.BackendEvents`); other backends have no hosts and ignore it. `transcript` is for
    `vezaprovisioner probe --transcript` only: the local backend then starts one host, which
    writes a PowerShell transcript of its connect to that file. The service never passes it.
    """
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
    if settings.backend == "local":
        return _open_local(settings, host_events, transcript)
    raise ConfigError(
        f"backend {settings.backend!r} is not available in this version yet; "
        'use backend = "simulated"'
    )


def _open_local(
    settings: Settings, host_events: PoolEvents | None, transcript: str | None
) -> ExchangePort:
    """The pool of PowerShell hosts; it starts warming in the background before this returns."""
    from .local.backend import LocalExchange, host_argv, open_hosts
    from .local.supply import HostOptions, PoolLimits

    local = settings.local
    pool = open_hosts(
        host_argv(settings.exchange.powershell_path),
        settings.exchange.remote_exchange_path,
        PoolLimits(
            pool_size=1 if transcript is not None else local.pool_size,
            queue_size=local.queue_size,
            queue_wait_seconds=local.queue_wait_seconds,
            startup_timeout_seconds=local.startup_timeout_seconds,
            connect_lock_wait_seconds=local.connect_lock_wait_seconds,
            command_timeout_seconds=settings.exchange.command_timeout_seconds,
            max_commands=local.max_commands,
            max_age_seconds=local.max_age_seconds,
            restart_backoff_seconds=local.restart_backoff_seconds,
            restart_backoff_max_seconds=local.restart_backoff_max_seconds,
        ),
        events=host_events,
        options=HostOptions(transcript=transcript),
    )
    pool.start()
    return LocalExchange(pool)


def wait_for_warm_up(port: ExchangePort, timeout: float) -> None:
    """Block, at most `timeout` seconds, until none of the local backend's hosts is starting any
    more (each connected or failed): the IIS warm-up. Other backends have no hosts: no wait.
    (`probe` and `doctor` wait for one host: `LocalExchange.wait_started`.)"""
    from .local.backend import LocalExchange

    if isinstance(port, LocalExchange):
        port.pool.wait_for(lambda status: status.starting == 0, timeout)

"""`backend = "local"`: the Exchange port over a pool of Windows PowerShell hosts on this server.

Cmdlet calls go in as allow-listed names with string parameters; typed results come out. Error
records the host reports are classified by `exchange.errors.classify`, like every backend's.
Host failures become: a command timeout → ExchangeTimeout (the flow then re-reads the user's
state; nothing is retried blindly), a crash, protocol error or refusal → UnexpectedExchangeError
(502), no free or working host → BackendUnavailable (503 with Retry-After).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from ..errors import (
    BackendUnavailable,
    ExchangeTimeout,
    UnexpectedExchangeError,
    classify,
)
from ..port import (
    DirectoryUser,
    EnableMailbox,
    EnableRemoteMailbox,
    Recipient,
    lookup_parameters,
)
from .host import HostError, HostTimeout
from .per_command import HostPerCommand
from .protocol import ErrorRecord
from .supply import HostOptions, HostSupply, PoolEvents, PoolLimits, PoolStatus
from .warm_pool import HostPool

#: The one host script, shipped as package data next to this module; never generated.
HOST_SCRIPT: Final = Path(__file__).with_name("host.ps1")

#: Switches of every host start; the script path is the only thing after -File.
HOST_SWITCHES: Final = (
    "-NoLogo",
    "-NoProfile",
    "-NonInteractive",
    "-ExecutionPolicy",
    "Bypass",
    "-File",
)


def host_argv(powershell_path: str) -> list[str]:
    """The host's command line: constant switches and the shipped script. No user data."""
    return [powershell_path, *HOST_SWITCHES, str(HOST_SCRIPT)]


def open_hosts(
    argv: Sequence[str],
    remote_exchange_path: str,
    limits: PoolLimits,
    *,
    events: PoolEvents | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    options: HostOptions | None = None,
) -> HostSupply:
    """The warm pool, or a host per command when `pool_size` is 0; not started yet."""
    kind = HostPool if limits.pool_size else HostPerCommand
    return kind(
        argv, remote_exchange_path, limits, events=events, monotonic=monotonic, options=options
    )


class LocalExchange:
    """Implements `ExchangePort` by running cmdlets on a `HostPool` (or a host per command)."""

    def __init__(self, pool: HostSupply) -> None:
        self._pool = pool

    @property
    def pool(self) -> HostSupply:
        """The pool behind this port (readiness detail, tests, the benchmark)."""
        return self._pool

    def get_user(self, identity: str, domain_controller: str | None = None) -> DirectoryUser:
        found = self._one("Get-User", lookup_parameters(identity, domain_controller))
        return DirectoryUser(
            guid=self._required(found, "Guid", "Get-User"),
            distinguished_name=self._required(found, "DistinguishedName", "Get-User"),
            sam_account_name=found.get("SamAccountName") or "",
            user_principal_name=found.get("UserPrincipalName") or "",
            name=found.get("Name") or "",
            display_name=found.get("DisplayName") or "",
            recipient_type_details=self._required(found, "RecipientTypeDetails", "Get-User"),
        )

    def get_recipient(self, identity: str, domain_controller: str | None = None) -> Recipient:
        return self._recipient(
            "Get-Recipient",
            lookup_parameters(identity, domain_controller),
        )

    def enable_mailbox(self, request: EnableMailbox) -> Recipient:
        return self._recipient(
            "Enable-Mailbox",
            request.parameters(),
        )

    def enable_remote_mailbox(self, request: EnableRemoteMailbox) -> Recipient:
        return self._recipient(
            "Enable-RemoteMailbox",
            request.parameters(),
        )

    def wait_started(self, timeout: float) -> PoolStatus:
        """Wait (at most `timeout`) until a host is warm or a start has failed: for probe and
        doctor, which look once."""
        return self._pool.wait_for(
            lambda s: s.size == 0 or s.warm > 0 or s.failed_starts > 0, timeout=timeout
        )

    def probe(self) -> str:
        """The pool's state; BackendUnavailable when no host is warm (pool_size > 0)."""
        status = self._pool.status()
        if status.size and not status.warm:
            raise BackendUnavailable(status.describe())
        return status.describe()

    def close(self) -> None:
        self._pool.close()

    # ---- internals --------------------------------------------------------------------------

    def _run(
        self, cmdlet: str, parameters: Mapping[str, str]
    ) -> tuple[Mapping[str, str | None], ...]:
        try:
            outcome = self._pool.run(cmdlet, parameters)
        except HostTimeout as exc:
            raise ExchangeTimeout(exc.message) from None
        except HostError as exc:
            raise UnexpectedExchangeError(exc.message) from None
        if isinstance(outcome, ErrorRecord):
            raise classify(
                outcome.message,
                reason=outcome.reason,
                error_id=outcome.error_id,
                exception_type=outcome.exception_type,
            )
        return outcome.objects

    def _one(self, cmdlet: str, parameters: Mapping[str, str]) -> Mapping[str, str | None]:
        objects = self._run(cmdlet, parameters)
        if len(objects) != 1:
            raise UnexpectedExchangeError(
                f"{cmdlet} returned {len(objects)} objects where Exchange returns exactly one"
            )
        return objects[0]

    def _recipient(self, cmdlet: str, parameters: Mapping[str, str]) -> Recipient:
        found = self._one(cmdlet, parameters)
        return Recipient(
            guid=self._required(found, "Guid", cmdlet),
            distinguished_name=self._required(found, "DistinguishedName", cmdlet),
            alias=found.get("Alias") or "",
            primary_smtp_address=found.get("PrimarySmtpAddress") or "",
            recipient_type_details=self._required(found, "RecipientTypeDetails", cmdlet),
            database=found.get("Database") or None,
        )

    @staticmethod
    def _required(found: Mapping[str, str | None], name: str, cmdlet: str) -> str:
        value = found.get(name)
        if not value:
            raise UnexpectedExchangeError(f"{cmdlet} returned an object without {name}")
        return value

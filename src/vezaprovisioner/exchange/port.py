"""The narrow interface the provisioning flow needs from Exchange, and the typed values it returns.

Every backend (simulated, local PowerShell, remote pypsrp) implements `ExchangePort`. Each method
corresponds to one allow-listed cmdlet; parameters travel as typed values, never as script text.
Failures are raised as the classes in `vezaprovisioner.exchange.errors`.

An Enable-* request may carry `before_send`: every backend calls it (through `announce()`) once
the command has its PowerShell host or remote session and is about to be sent, never while it
still waits for one. The journal commits "Enable-* sent" there; if it raises, the backend sends
nothing, frees the host and lets the exception through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

#: RecipientTypeDetails of a user that has an AD account but no mail attributes yet.
ENABLEABLE_USER_TYPES = frozenset({"User", "DisabledUser"})

#: RecipientTypeDetails that Exchange reports once Enable-Mailbox / Enable-RemoteMailbox succeeded.
LOCAL_MAILBOX_TYPE = "UserMailbox"
REMOTE_MAILBOX_TYPE = "RemoteUserMailbox"


@dataclass(frozen=True)
class Capacity:
    """How many commands a backend runs at once, and how many more requests its queue holds."""

    running: int
    waiting: int


#: For a backend without limits of its own (the simulated Exchange).
DEFAULT_CAPACITY = Capacity(running=16, waiting=16)


def capacity_of(port: object) -> Capacity:
    """The backend's `capacity()` where it has one, else DEFAULT_CAPACITY."""
    capacity = getattr(port, "capacity", None)
    if callable(capacity):
        value = capacity()
        if isinstance(value, Capacity):
            return value
    return DEFAULT_CAPACITY


@dataclass(frozen=True)
class DirectoryUser:
    """What Get-User reports about an AD user (Get-User returns no mail properties)."""

    guid: str
    distinguished_name: str
    sam_account_name: str
    user_principal_name: str
    name: str
    display_name: str
    recipient_type_details: str


@dataclass(frozen=True)
class Recipient:
    """What Get-Recipient (or the object Enable-* writes) reports about a mail-enabled object."""

    guid: str
    distinguished_name: str
    alias: str
    primary_smtp_address: str
    recipient_type_details: str
    database: str | None = None


def bound_parameters(identity: str, **options: str | None) -> dict[str, str]:
    """The parameters a cmdlet is called with: Identity always, an option only when it is set.

    Every backend binds exactly these (as data, never as script text), so an unset option is
    never passed as an empty value to Exchange.
    """
    return {"Identity": identity, **{name: value for name, value in options.items() if value}}


def lookup_parameters(identity: str, domain_controller: str | None) -> dict[str, str]:
    """Get-User / Get-Recipient parameters."""
    return bound_parameters(identity, DomainController=domain_controller)


@dataclass(frozen=True)
class EnableMailbox:
    """Parameters for Enable-Mailbox (User parameter set). Empty options are not passed."""

    identity: str
    alias: str | None = None
    database: str | None = None
    address_book_policy: str | None = None
    retention_policy: str | None = None
    domain_controller: str | None = None
    before_send: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def announce(self) -> None:
        """Call `before_send` (the backend has a host or session for this command)."""
        if self.before_send is not None:
            self.before_send()

    def parameters(self) -> dict[str, str]:
        """Enable-Mailbox's bound parameters."""
        return bound_parameters(
            self.identity,
            Alias=self.alias,
            Database=self.database,
            AddressBookPolicy=self.address_book_policy,
            RetentionPolicy=self.retention_policy,
            DomainController=self.domain_controller,
        )


@dataclass(frozen=True)
class EnableRemoteMailbox:
    """Parameters for Enable-RemoteMailbox (hybrid). Empty options are not passed."""

    identity: str
    alias: str | None = None
    remote_routing_address: str | None = None
    domain_controller: str | None = None
    before_send: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def announce(self) -> None:
        """Call `before_send` (the backend has a host or session for this command)."""
        if self.before_send is not None:
            self.before_send()

    def parameters(self) -> dict[str, str]:
        """Enable-RemoteMailbox's bound parameters."""
        return bound_parameters(
            self.identity,
            Alias=self.alias,
            RemoteRoutingAddress=self.remote_routing_address,
            DomainController=self.domain_controller,
        )


class ExchangePort(Protocol):
    """What the provisioning flow may ask of Exchange. Nothing else is ever run."""

    def get_user(self, identity: str, domain_controller: str | None = None) -> DirectoryUser:
        """Get-User -Identity <identity>: one user, or IdentityNotFound / AmbiguousIdentity."""
        ...

    def get_recipient(self, identity: str, domain_controller: str | None = None) -> Recipient:
        """Get-Recipient -Identity <identity>: the mail-enabled object, or IdentityNotFound."""
        ...

    def enable_mailbox(self, request: EnableMailbox) -> Recipient:
        """Enable-Mailbox: returns the mailbox Exchange created."""
        ...

    def enable_remote_mailbox(self, request: EnableRemoteMailbox) -> Recipient:
        """Enable-RemoteMailbox: returns the remote mailbox Exchange created."""
        ...

    def probe(self) -> str:
        """A cheap read-only check that Exchange answers; returns a one-line description."""
        ...

    def close(self) -> None:
        """Release processes, sessions and pools. Safe to call more than once."""
        ...

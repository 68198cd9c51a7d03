"""The simulated Exchange: an in-process `ExchangePort` over a simulated directory.

`SimulatedExchange` implements `ExchangePort` against an Active Directory described by a JSON file
(`directory`, which also documents the file format), applying Exchange's naming rules (`naming`),
so the whole service can be run and tested without Windows, Exchange or PowerShell. It behaves
the way Exchange 2013-SE does where that matters to the service, and says so the way Exchange
does: every failure is built from Exchange's real message text, CategoryInfo.Reason and a
FullyQualifiedErrorId of Exchange's shape, then turned into the error tree by
`vezaprovisioner.exchange.errors.classify` - the same path a real backend takes. Changes
(Enable-Mailbox, Enable-RemoteMailbox) live in memory only; the file is never written.

What it simulates
-----------------
* Identity resolution (Get-User, Get-Recipient, Enable-*): a value matches a user when it equals,
  case-insensitively, its GUID (any formatting `uuid.UUID` accepts), distinguished name, canonical
  name (``contoso.com/Users/John Doe``), UPN, ``DOMAIN\\sam``, sam, Name, DisplayName, Alias, or -
  when the value looks like an SMTP address - one of its SMTP proxy addresses. A leading or
  trailing ``*`` is a wildcard, as in Exchange; an empty identity matches every object. Several
  users match: ManagementObjectAmbiguousException; none: ManagementObjectNotFoundException.
* Get-Recipient sees mail-enabled objects only (a plain User/DisabledUser is "not found").
* Enable-Mailbox accepts User, DisabledUser and MailUser (a MailUser keeps its alias: real
  Exchange behaviour), Enable-RemoteMailbox accepts User and DisabledUser; anything else fails
  with "... is of type <RecipientTypeDetails> ...".
* Without -Alias the alias is derived from the user's Name exactly like Exchange's
  ``AliasHelper.GenerateAlias``: characters are first mapped to Windows-1252 (best-fit for
  letters such as ``Ā``; anything else becomes ``?``), spaces are dropped, characters outside the
  alias set become ``?``, periods must be embedded, at most 64 characters; the result is made
  unique forest-wide by appending 1..9 (then 10, 11, ... - Exchange uses a time-based number
  there). An explicit -Alias is validated but not made unique (Exchange on-premises does not).
* The primary SMTP address is the alias mapped to best-fit ASCII (``ö`` -> ``oe``, ``ß`` -> ``ss``,
  accents stripped) ``@`` smtp_domain. If another object already has that proxy address the
  cmdlet fails with ProxyAddressExistsException and nothing changes.
* ``appears_after_seconds`` hides a user from every cmdlet until that many seconds (of the
  clock's monotonic time) after the backend was created: AD replication lag.
* ``fault`` makes Enable-Mailbox / Enable-RemoteMailbox of that user fail: ``timeout`` (waits the
  command timeout, raises ExchangeTimeout), ``unavailable`` (BackendUnavailable, retry after 5 s),
  ``permission_denied`` (Exchange's AD INSUFF_ACCESS_RIGHTS error), ``exchange_error`` (an AD
  error the service has no specific handling for).
* Latency: every cmdlet sleeps ``latency_ms`` on the injected clock, Enable-* sleeps
  ``enable_latency_ms`` on top; a command that would take longer than ``command_timeout_seconds``
  sleeps the timeout and raises ExchangeTimeout. The lock is never held while sleeping.
* Every cmdlet run is recorded in ``calls`` as ``(cmdlet, {parameter: value})``.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Final, NoReturn

from ...clock import Clock
from ..errors import BackendUnavailable, ExchangeError, ExchangeTimeout, classify
from ..port import (
    LOCAL_MAILBOX_TYPE,
    REMOTE_MAILBOX_TYPE,
    DirectoryUser,
    EnableMailbox,
    EnableRemoteMailbox,
    Recipient,
    bound_parameters,
    lookup_parameters,
)
from .directory import (
    DEFAULT_DATABASE,
    LOCAL_MAILBOX_TYPES,
    MAIL_USER_TYPES,
    NON_MAIL_TYPES,
    Fault,
    SimulatedDirectory,
    SimulatedUser,
)
from .naming import (
    MAX_ALIAS_LENGTH,
    SMTP_ADDRESS,
    alias_problem,
    canonical_name,
    generate_alias,
    primary_of,
    smtp_local_part,
    smtp_proxies,
    text_matcher,
    with_primary,
)

__all__ = ["SimulatedExchange"]

_ENABLE_MAILBOX_TYPES: Final = frozenset({"User", "DisabledUser", "MailUser"})
_ENABLE_REMOTE_MAILBOX_TYPES: Final = frozenset({"User", "DisabledUser"})

#: The cmdlets `calls` keeps (the most recent); a demo server that runs for weeks must not grow
#: by every command it ever ran. `count()` counts all of them.
CALLS_KEPT: Final = 10_000

_TASK_NAMESPACE: Final = "Microsoft.Exchange.Management.RecipientTasks"
_NOT_FOUND_TYPE: Final = "Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException"
_AMBIGUOUS_TYPE: Final = "Microsoft.Exchange.Configuration.Tasks.ManagementObjectAmbiguousException"
_RECIPIENT_TASK_TYPE: Final = "Microsoft.Exchange.Management.Tasks.RecipientTaskException"
_PROXY_EXISTS_TYPE: Final = (
    "Microsoft.Exchange.Configuration.ObjectModel.ProxyAddressExistsException"
)
_AD_OPERATION_TYPE: Final = "Microsoft.Exchange.Data.Directory.ADOperationException"
_DATA_VALIDATION_TYPE: Final = "Microsoft.Exchange.Data.DataValidationException"
_BINDING_TYPE: Final = "System.Management.Automation.ParameterBindingValidationException"
# Error-site ids of real FullyQualifiedErrorIds for the wrong-type error.
_WRONG_TYPE_SITE: Final = {"EnableMailbox": "3CD6CA39", "EnableRemoteMailbox": "2882FF3D"}


@dataclass
class _Entry:
    """A user's current (mutable) state inside one SimulatedExchange."""

    user: SimulatedUser
    guid: uuid.UUID
    canonical_name: str
    recipient_type_details: str
    alias: str | None
    email_addresses: list[str]
    database: str | None

    @property
    def mail_enabled(self) -> bool:
        return self.recipient_type_details not in NON_MAIL_TYPES


def _timestamp() -> str:
    """UTC now as Exchange writes it in error ids: 5/25/2019 6:06:56 PM."""
    now = datetime.now(timezone.utc)
    hour = now.hour % 12 or 12
    half = "AM" if now.hour < 12 else "PM"
    return f"{now.month}/{now.day}/{now.year} {hour}:{now.minute:02d}:{now.second:02d} {half}"


class SimulatedExchange:
    """An in-memory Exchange over a `SimulatedDirectory`; implements `ExchangePort`."""

    def __init__(
        self,
        directory: SimulatedDirectory,
        *,
        clock: Clock,
        latency_ms: int = 0,
        enable_latency_ms: int = 0,
        command_timeout_seconds: float = 120.0,
        server: str = "EXSIM01",
    ) -> None:
        if latency_ms < 0 or enable_latency_ms < 0:
            raise ValueError("latency_ms and enable_latency_ms must be >= 0")
        if command_timeout_seconds <= 0:
            raise ValueError("command_timeout_seconds must be > 0")
        self.directory = directory
        self.server = server
        self._clock = clock
        self._latency = latency_ms / 1000
        self._enable_latency = enable_latency_ms / 1000
        self._timeout = command_timeout_seconds
        self._lock = threading.Lock()
        self._started = clock.monotonic()
        self._entries = [
            _Entry(
                user=user,
                guid=uuid.UUID(user.guid),
                canonical_name=canonical_name(user.distinguished_name),
                recipient_type_details=user.recipient_type_details,
                alias=user.alias,
                email_addresses=list(user.email_addresses),
                database=user.database,
            )
            for user in directory.users
        ]
        self._by_key: dict[str, list[_Entry]] = {}
        self._by_smtp: dict[str, list[_Entry]] = {}
        self._by_alias: dict[str, list[_Entry]] = {}
        for entry in self._entries:
            self._index(entry)
        #: The cmdlets run, in order: (cmdlet name, bound parameters); the most recent
        #: `CALLS_KEPT` to twice that many (older ones are dropped in one go).
        self.calls: list[tuple[str, dict[str, str]]] = []
        self._counts: Counter[str] = Counter()

    # ---- ExchangePort -----------------------------------------------------------------------

    def get_user(self, identity: str, domain_controller: str | None = None) -> DirectoryUser:
        """Get-User: users, mailboxes and mail users alike."""
        self._begin("Get-User", lookup_parameters(identity, domain_controller))
        self._pause("Get-User", self._latency)
        with self._lock:
            entry = self._resolve(identity, "GetUser", domain_controller, mail_enabled_only=False)
            return self._directory_user(entry)

    def get_recipient(self, identity: str, domain_controller: str | None = None) -> Recipient:
        """Get-Recipient: mail-enabled objects only."""
        self._begin("Get-Recipient", lookup_parameters(identity, domain_controller))
        self._pause("Get-Recipient", self._latency)
        with self._lock:
            entry = self._resolve(
                identity, "GetRecipient", domain_controller, mail_enabled_only=True
            )
            return self._recipient(entry)

    def enable_mailbox(self, request: EnableMailbox) -> Recipient:
        """Enable-Mailbox (User parameter set)."""
        cmdlet, task = "Enable-Mailbox", "EnableMailbox"
        request.announce()
        self._begin(cmdlet, request.parameters())
        slept = self._pause(cmdlet, self._latency + self._enable_latency)
        dc = request.domain_controller
        with self._lock:
            entry = self._resolve_for_enable(request.identity, cmdlet, task, dc)
            self._check_type(entry, _ENABLE_MAILBOX_TYPES, task)
            self._check_alias(request.alias, task)
            fault = entry.user.fault
            if fault is None:
                if request.alias:
                    alias = request.alias
                elif entry.recipient_type_details in MAIL_USER_TYPES and entry.alias:
                    alias = entry.alias  # Exchange keeps a mail user's alias
                else:
                    alias = self._unique_alias(entry)
                primary = f"{smtp_local_part(alias)}@{self.directory.smtp_domain}"
                self._check_proxy_free(f"SMTP:{primary}", entry, task)
                self._index(entry, remove=True)
                entry.alias = alias
                entry.recipient_type_details = LOCAL_MAILBOX_TYPE
                entry.database = request.database or DEFAULT_DATABASE
                entry.email_addresses = with_primary(entry.email_addresses, primary)
                self._index(entry)
                return self._recipient(entry)
        self._raise_fault(fault, cmdlet, task, slept, dc)

    def enable_remote_mailbox(self, request: EnableRemoteMailbox) -> Recipient:
        """Enable-RemoteMailbox (Default parameter set)."""
        cmdlet, task = "Enable-RemoteMailbox", "EnableRemoteMailbox"
        request.announce()
        self._begin(cmdlet, request.parameters())
        slept = self._pause(cmdlet, self._latency + self._enable_latency)
        dc = request.domain_controller
        with self._lock:
            entry = self._resolve_for_enable(request.identity, cmdlet, task, dc)
            self._check_type(entry, _ENABLE_REMOTE_MAILBOX_TYPES, task)
            self._check_alias(request.alias, task)
            fault = entry.user.fault
            if fault is None:
                alias = request.alias or self._unique_alias(entry)
                primary = f"{smtp_local_part(alias)}@{self.directory.smtp_domain}"
                self._check_proxy_free(f"SMTP:{primary}", entry, task)
                addresses = with_primary(entry.email_addresses, primary)
                routing = request.remote_routing_address
                if routing:
                    if routing[:5].casefold() == "smtp:":
                        routing = routing[5:]
                    if routing.casefold() != primary.casefold():
                        self._check_proxy_free(f"smtp:{routing}", entry, task)
                        addresses.append(f"smtp:{routing}")
                self._index(entry, remove=True)
                entry.alias = alias
                entry.recipient_type_details = REMOTE_MAILBOX_TYPE
                entry.database = None
                entry.email_addresses = addresses
                self._index(entry)
                return self._recipient(entry)
        self._raise_fault(fault, cmdlet, task, slept, dc)

    def probe(self) -> str:
        """A cheap read: how many users are visible now."""
        self._begin("Get-ExchangeServer", bound_parameters(self.server))
        self._pause("Get-ExchangeServer", self._latency)
        with self._lock:
            visible = len(self._visible())
        return f"simulated Exchange {self.server}: {visible} users in {self.directory.domain}"

    def close(self) -> None:
        """Nothing to release."""

    # ---- for tests --------------------------------------------------------------------------

    def count(self, cmdlet: str) -> int:
        """How often `cmdlet` (e.g. "Enable-Mailbox") was run."""
        with self._lock:
            return self._counts[cmdlet]

    def snapshot(self) -> dict[str, object]:
        """The current state as a directory document `parse_directory` accepts.

        Lets several processes (the fake PowerShell hosts of the local backend's tests) share
        one simulated forest through a file. Replication lag is not carried over.
        """
        with self._lock:
            users: list[dict[str, object]] = []
            for entry in self._entries:
                user = entry.user
                document: dict[str, object] = {
                    "sam_account_name": user.sam_account_name,
                    "user_principal_name": user.user_principal_name,
                    "name": user.name,
                    "display_name": user.display_name,
                    "distinguished_name": user.distinguished_name,
                    "guid": user.guid,
                    "recipient_type_details": entry.recipient_type_details,
                }
                if entry.alias and entry.mail_enabled:
                    document["alias"] = entry.alias
                if entry.email_addresses:
                    document["email_addresses"] = list(entry.email_addresses)
                if entry.database and entry.recipient_type_details in LOCAL_MAILBOX_TYPES:
                    document["database"] = entry.database
                if user.fault:
                    document["fault"] = user.fault
                users.append(document)
            return {
                "domain": self.directory.domain,
                "upn_suffix": self.directory.upn_suffix,
                "smtp_domain": self.directory.smtp_domain,
                "domain_controller": self.directory.domain_controller,
                "users": users,
            }

    # ---- internals --------------------------------------------------------------------------

    def _begin(self, cmdlet: str, parameters: dict[str, str]) -> None:
        with self._lock:
            self._counts[cmdlet] += 1
            self.calls.append((cmdlet, parameters))
            if len(self.calls) >= 2 * CALLS_KEPT:
                del self.calls[:-CALLS_KEPT]

    def _pause(self, cmdlet: str, seconds: float) -> float:
        """Sleep the simulated latency (lock not held); time out like a stuck command."""
        if seconds > self._timeout:
            self._clock.sleep(self._timeout)
            raise self._timeout_error(cmdlet)
        if seconds > 0:
            self._clock.sleep(seconds)
        return seconds

    def _timeout_error(self, cmdlet: str) -> ExchangeTimeout:
        return ExchangeTimeout(
            f"{cmdlet} did not finish within the command timeout of {self._timeout:g} seconds "
            f"on {self.server}; its outcome is unknown"
        )

    def _is_visible(self, entry: _Entry) -> bool:
        """False while the user is still 'replicating' (appears_after_seconds)."""
        return self._clock.monotonic() - self._started >= entry.user.appears_after_seconds

    def _visible(self) -> list[_Entry]:
        return [entry for entry in self._entries if self._is_visible(entry)]

    def _names(self, entry: _Entry) -> list[str]:
        """Every value Exchange matches an identity against, but the GUID and SMTP addresses."""
        user = entry.user
        names = [
            user.distinguished_name,
            entry.canonical_name,
            user.user_principal_name,
            f"{self.directory.domain}\\{user.sam_account_name}",
            user.sam_account_name,
            user.name,
            user.display_name,
        ]
        if entry.alias:
            names.append(entry.alias)
        return names

    def _index(self, entry: _Entry, *, remove: bool = False) -> None:
        """Adds (or removes) an entry's exact-match keys; an entry is re-indexed on change."""
        keys = {name.casefold() for name in self._names(entry)} | {str(entry.guid)}
        proxies = {p.casefold() for p in smtp_proxies(entry.email_addresses)}
        aliases = {entry.alias.casefold()} if entry.alias else set()
        for index, values in (
            (self._by_key, keys),
            (self._by_smtp, proxies),
            (self._by_alias, aliases),
        ):
            for value in values:
                entries = index.setdefault(value, [])
                if remove:
                    entries.remove(entry)
                else:
                    entries.append(entry)

    def _matching(self, identity: str) -> list[_Entry]:
        """The visible entries an identity matches, as Exchange's resolution would find them."""
        if identity == "":
            return self._visible()  # Exchange: an empty Identity returns every object
        by_smtp = bool(SMTP_ADDRESS.fullmatch(identity))
        if identity.startswith("*") or identity.endswith("*"):
            match = text_matcher(identity)
            return [
                entry
                for entry in self._visible()
                if any(match(name) for name in self._names(entry))
                or (by_smtp and any(match(p) for p in smtp_proxies(entry.email_addresses)))
            ]
        hits = list(self._by_key.get(identity.casefold(), []))
        with contextlib.suppress(ValueError):  # not a GUID
            hits += self._by_key.get(str(uuid.UUID(identity)), [])
        if by_smtp:
            hits += self._by_smtp.get(identity.casefold(), [])
        unique = {id(entry): entry for entry in hits}.values()
        return [entry for entry in unique if self._is_visible(entry)]

    def _resolve(
        self, identity: str, task: str, dc: str | None, *, mail_enabled_only: bool
    ) -> _Entry:
        found = [
            entry
            for entry in self._matching(identity)
            if entry.mail_enabled or not mail_enabled_only
        ]
        if not found:
            raise self._error(
                f"The operation couldn't be performed because object '{identity}' couldn't be "
                f"found on '{dc or self.directory.domain_controller}'.",
                reason="ManagementObjectNotFoundException",
                exception_type=_NOT_FOUND_TYPE,
                task=task,
            )
        if len(found) > 1:
            raise self._error(
                f"The operation couldn't be performed because '{identity}' matches multiple "
                "entries.",
                reason="ManagementObjectAmbiguousException",
                exception_type=_AMBIGUOUS_TYPE,
                task=task,
            )
        return found[0]

    def _resolve_for_enable(self, identity: str, cmdlet: str, task: str, dc: str | None) -> _Entry:
        if identity == "":
            # PowerShell rejects an empty mandatory parameter before Exchange runs.
            raise classify(
                "Cannot bind argument to parameter 'Identity' because it is an empty string.",
                reason="ParameterBindingValidationException",
                error_id=f"ParameterArgumentValidationErrorEmptyStringNotAllowed,{cmdlet}",
                exception_type=_BINDING_TYPE,
            )
        return self._resolve(identity, task, dc, mail_enabled_only=False)

    def _check_type(self, entry: _Entry, allowed: frozenset[str], task: str) -> None:
        kind = entry.recipient_type_details
        if kind not in allowed:
            raise self._error(
                "This task does not support recipients of this type. The specified recipient "
                f"{entry.canonical_name} is of type {kind}. Please make sure that this recipient "
                "matches the required recipient type for this task.",
                reason="RecipientTaskException",
                exception_type=_RECIPIENT_TASK_TYPE,
                task=task,
                site=_WRONG_TYPE_SITE[task],
            )

    def _check_alias(self, alias: str | None, task: str) -> None:
        if alias and (problem := alias_problem(alias)) is not None:
            raise self._error(
                problem,
                reason="DataValidationException",
                exception_type=_DATA_VALIDATION_TYPE,
                task=task,
            )

    def _unique_alias(self, entry: _Entry) -> str:
        """GenerateUniqueAlias: Name -> alias, then 1..9 appended until no object has it."""
        preferred = generate_alias(entry.user.name) or "User"
        count = 0
        while True:
            suffix = str(count) if count else ""
            candidate = preferred[: MAX_ALIAS_LENGTH - len(suffix)] + suffix
            holders = self._by_alias.get(candidate.casefold(), [])
            if not any(e is not entry and self._is_visible(e) for e in holders):
                return candidate
            count += 1

    def _check_proxy_free(self, proxy: str, entry: _Entry, task: str) -> None:
        address = proxy.partition(":")[2].casefold()
        for other in self._by_smtp.get(address, []):
            if other is not entry and self._is_visible(other):
                raise self._error(
                    f'The proxy address "{proxy}" is already being used by the proxy addresses '
                    f'or LegacyExchangeDN of "{other.canonical_name}". Please choose another '
                    "proxy address.",
                    reason="ProxyAddressExistsException",
                    exception_type=_PROXY_EXISTS_TYPE,
                    task=task,
                )

    def _raise_fault(
        self, fault: Fault, cmdlet: str, task: str, slept: float, dc: str | None
    ) -> NoReturn:
        dc = dc or self.directory.domain_controller
        if fault == "timeout":
            self._clock.sleep(max(0.0, self._timeout - slept))
            raise self._timeout_error(cmdlet)
        if fault == "unavailable":
            raise BackendUnavailable(
                f"no Exchange session on {self.server} is available right now (simulated); "
                "retry in 5 seconds",
                retry_after_seconds=5,
            )
        if fault == "permission_denied":
            message = (
                f"Active Directory operation failed on {dc}. This error is not retriable. "
                "Additional information: Insufficient access rights to perform the operation. "
                "Active directory response: 00002098: SecErr: DSID-03150BB9, problem 4003 "
                "(INSUFF_ACCESS_RIGHTS), data 0"
            )
        else:
            message = (
                f"Active Directory operation failed on {dc}. The server is unwilling to "
                "process the request."
            )
        raise self._error(
            message, reason="ADOperationException", exception_type=_AD_OPERATION_TYPE, task=task
        )

    def _error(
        self,
        message: str,
        *,
        reason: str,
        exception_type: str,
        task: str,
        site: str | None = None,
    ) -> ExchangeError:
        """Classify an Exchange error record built like a real one."""
        site = site or f"{zlib.crc32(f'{reason}/{task}'.encode()):08X}"
        error_id = (
            f"[Server={self.server},RequestId={uuid.uuid4()},TimeStamp={_timestamp()}] "
            f"[FailureCategory=Cmdlet-{reason}] {site},{_TASK_NAMESPACE}.{task}"
        )
        return classify(message, reason=reason, error_id=error_id, exception_type=exception_type)

    @staticmethod
    def _directory_user(entry: _Entry) -> DirectoryUser:
        user = entry.user
        return DirectoryUser(
            guid=user.guid,
            distinguished_name=user.distinguished_name,
            sam_account_name=user.sam_account_name,
            user_principal_name=user.user_principal_name,
            name=user.name,
            display_name=user.display_name,
            recipient_type_details=entry.recipient_type_details,
        )

    @staticmethod
    def _recipient(entry: _Entry) -> Recipient:
        return Recipient(
            guid=entry.user.guid,
            distinguished_name=entry.user.distinguished_name,
            alias=entry.alias or "",
            primary_smtp_address=primary_of(entry.email_addresses) or "",
            recipient_type_details=entry.recipient_type_details,
            database=entry.database,
        )

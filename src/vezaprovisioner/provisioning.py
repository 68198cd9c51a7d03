"""The one CREATE_EMAIL flow: resolve the user, decide by recipient type, enable, report.

No HTTP here: the API and the CLI both call `Provisioner`. Exchange is reached only through the
`ExchangePort`; the flow passes the resolved GUID to Enable-*, never the caller's free text.
With a journal, every step is committed before the Exchange call it announces (see
`journal.records`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import PureWindowsPath
from typing import Literal

from .aliases import AliasChoice, NoAlias, choose_alias
from .audit import AuditEvent, AuditTrail
from .clock import Clock
from .config import Settings
from .exchange.errors import ExchangeError, ExchangeTimeout, IdentityNotFound, WrongRecipientType
from .exchange.port import (
    ENABLEABLE_USER_TYPES,
    LOCAL_MAILBOX_TYPE,
    REMOTE_MAILBOX_TYPE,
    DirectoryUser,
    EnableMailbox,
    EnableRemoteMailbox,
    ExchangePort,
    Recipient,
)
from .failures import Failure, as_failure
from .journal.claims import ClaimGate, ClaimLost, ClaimTable, InProcessClaims, UserClaims
from .journal.records import Journal, RequestContext
from .journal.store import JournalUnavailable
from .validation import InvalidValue, validate_alias

log = logging.getLogger(__name__)

_FIRST_RETRY_DELAY_SECONDS = 0.5
_MAX_RETRY_DELAY_SECONDS = 5.0


class ProvisioningError(Failure):
    """The flow refuses a request for a reason of its own (not an Exchange error)."""


class PathMismatch(ProvisioningError):
    """The caller named a PowerShell or RemoteExchange.ps1 path other than the configured one."""

    code = "PATH_MISMATCH"
    status = 400
    title = "Path differs from the configured one"

    def __init__(self, field: str, given: str, configured: str) -> None:
        super().__init__(
            f"{field} {given!r} is not the configured {configured!r}; this service only ever runs "
            f"the configured path. Make the integration's setting match exchange.{field}."
        )
        self.field = field


class AliasMismatch(ProvisioningError):
    """The user already has a mailbox, with an alias other than the one requested."""

    code = "ALIAS_MISMATCH"
    status = 409
    title = "Mailbox exists with another alias"

    def __init__(self, identity: str, existing: Recipient, requested_alias: str) -> None:
        super().__init__(
            f"{identity!r} already has a mailbox with alias {existing.alias!r}, not the requested "
            f"{requested_alias!r}; change the alias in Exchange or request the existing one."
        )
        self.existing = existing


class AliasRequired(ProvisioningError):
    """No alias was sent and none may be derived: by exchange.alias_policy, or in hybrid mode
    for the remote routing address."""

    code = "ALIAS_REQUIRED"
    status = 422
    title = "An alias is required"


@dataclass(frozen=True)
class CreateEmail:
    """A validated CREATE_EMAIL request."""

    identity: str
    alias: str | None = None
    powershell_path: str | None = None
    remote_exchange_path: str | None = None


@dataclass(frozen=True)
class MailboxResult:
    """The mailbox the user has after CREATE_EMAIL."""

    status: Literal["created", "already_exists"]
    identity: str
    guid: str
    distinguished_name: str
    alias: str
    primary_smtp_address: str
    recipient_type_details: str
    database: str | None
    #: Things the caller should know, e.g. that the service chose the alias.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecipientState:
    """What Exchange knows about a user's mail state (for GET /emails/{identity})."""

    identity: str
    guid: str
    distinguished_name: str
    user_principal_name: str
    recipient_type_details: str
    has_mailbox: bool
    provisionable: bool
    alias: str | None
    primary_smtp_address: str | None
    database: str | None


class _Entry:
    """One request's journal record, and the claim it took when Enable-* was sent."""

    def __init__(self, journal: Journal, row: int) -> None:
        self._journal = journal
        self._row = row
        self._gate: ClaimGate | None = None
        #: The user's GUID once resolved (recorded with a failure too).
        self.guid: str | None = None

    def sending(self, guid: str, gate: ClaimGate | None) -> None:
        """(b): claim + running + enable_sent_at in one commit, as Enable-* is handed over."""
        if gate is None:  # no cross-process claim: only the sent mark
            self._journal.mark_sent(self._row, guid)
            return
        ClaimTable(self._journal).send(self._row, guid, gate)
        self._gate = gate

    def finish(self, result: MailboxResult) -> None:
        """(c): the outcome, and the claim released, in one commit."""
        self._journal.finish(
            self._row,
            result.status,
            guid=result.guid,
            alias=result.alias,
            primary_smtp_address=result.primary_smtp_address,
            claim=self._gate.claim if self._gate else None,
        )

    def fail(self, error: Exception) -> None:
        self._journal.fail(
            self._row, error, claim=self._gate.claim if self._gate else None, guid=self.guid
        )


def _same_windows_path(a: str, b: str) -> bool:
    """Case-insensitive, with `/` and `\\` alike, as Windows compares paths."""
    return str(PureWindowsPath(a.strip())).casefold() == str(PureWindowsPath(b.strip())).casefold()


class Provisioner:
    """Runs CREATE_EMAIL and state look-ups against one Exchange port."""

    def __init__(
        self,
        settings: Settings,
        exchange: ExchangePort,
        clock: Clock,
        claims: UserClaims | None = None,
        journal: Journal | None = None,
        audit: AuditTrail | None = None,
        outcomes: Callable[[str, Exception | None], None] | None = None,
    ) -> None:
        self._settings = settings
        #: Told every CREATE_EMAIL outcome: created / already_exists / failed (with the error).
        self._outcomes = outcomes
        self._exchange = exchange
        self._clock = clock
        self._claims = claims or InProcessClaims()
        self._journal = journal
        self._audit = audit
        self._dc = settings.exchange.domain_controller or None
        remote = settings.mailbox_kind == "remote"
        self._mailbox_type = REMOTE_MAILBOX_TYPE if remote else LOCAL_MAILBOX_TYPE

    def create_email(
        self, request: CreateEmail, context: RequestContext | None = None
    ) -> MailboxResult:
        """Give the user a mailbox of the configured kind, or report the one it already has.

        With a journal, the `received` record is committed first; if it cannot be, this raises
        JournalUnavailable and Exchange is not called at all. With an audit trail, every outcome
        (success or failure) is written to it.
        """
        context = context or RequestContext(
            request_id=str(uuid.uuid4()), caller="(not given)", caller_method="none"
        )
        started = self._clock.monotonic()
        try:
            result = self._journalled(request, context)
        except Exception as exc:
            self._audited(request, context, started, error=exc)
            if self._outcomes is not None:
                self._outcomes("failed", exc)
            raise
        self._audited(request, context, started, result=result)
        if self._outcomes is not None:
            self._outcomes(result.status, None)
        return result

    def _journalled(self, request: CreateEmail, context: RequestContext) -> MailboxResult:
        journal = self._journal
        if journal is None:
            return self._create_email(request, None)
        row = journal.receive(context, "CREATE_EMAIL", request.identity, request.alias)
        entry = _Entry(journal, row)
        try:
            result = self._create_email(request, entry)
        except Exception as exc:
            _best_effort(partial(entry.fail, exc))
            raise
        _best_effort(partial(entry.finish, result))
        return result

    def _audited(
        self,
        request: CreateEmail,
        context: RequestContext,
        started: float,
        *,
        result: MailboxResult | None = None,
        error: Exception | None = None,
    ) -> None:
        if self._audit is None:
            return
        exchange = error if isinstance(error, ExchangeError) and error.from_exchange else None
        self._audit.write(
            AuditEvent(
                event="request_finished",
                request_id=context.request_id,
                caller=context.caller,
                caller_method=context.caller_method,
                client_address=context.client_address,
                action="CREATE_EMAIL",
                identity=request.identity,
                alias=request.alias,
                outcome=result.status if result else "failed",
                code=as_failure(error).code if error else None,
                guid=result.guid if result else None,
                primary_smtp_address=result.primary_smtp_address if result else None,
                exchange_reason=exchange.reason if exchange else None,
                exchange_error_id=exchange.error_id if exchange else None,
                duration_ms=round((self._clock.monotonic() - started) * 1000),
            )
        )

    def _create_email(self, request: CreateEmail, entry: _Entry | None) -> MailboxResult:
        self._check_declared_paths(request)
        # Journal time before the first read: the gate tells whether any request sharing the
        # journal may have enabled the user since, i.e. whether this read is still current.
        since = self._journal.now() if self._journal is not None else None
        user = self._resolve_waiting_for_replication(request.identity)
        if entry is not None:
            entry.guid = user.guid
        while True:
            with self._claims.gate(user.guid, since) as gate:
                try:
                    return self._decide_and_enable(request, user, entry, gate)
                except ClaimLost as lost:
                    # Another process took the user between our read and our Enable-*: nothing
                    # was sent; wait for it at the gate and read the user again.
                    log.info("%s; reading user %s again", lost, user.guid)
                    since = None

    def _decide_and_enable(
        self,
        request: CreateEmail,
        user: DirectoryUser,
        entry: _Entry | None,
        gate: ClaimGate | None,
    ) -> MailboxResult:
        if gate is None or not gate.read_is_current:
            # Re-read past the gate: a request that held the claim before us, or finished an
            # Enable-* since our first read, may have enabled the user. Otherwise that read is
            # still current and a second Get-User would only cost Exchange a round trip.
            user = self._exchange.get_user(user.guid, self._dc)
        kind = user.recipient_type_details
        if kind == self._mailbox_type:
            return self._existing(request, user.guid)
        if kind not in ENABLEABLE_USER_TYPES:
            raise self._refuse(request.identity, kind)
        choice = AliasChoice(request.alias) if request.alias else self._choose_alias(user)
        before_send = None if entry is None else partial(entry.sending, user.guid, gate)
        try:
            recipient = self._enable(user, choice.alias, before_send)
        except WrongRecipientType as exc:
            if exc.recipient_type != self._mailbox_type:
                raise
            # Another provisioner (another server) enabled the user between our read and our
            # Enable-*: Exchange itself is the arbiter, so answer as for an existing mailbox.
            return self._existing(request, user.guid)
        except ExchangeTimeout:
            if not self._now_has_mailbox(user.guid):
                raise
            recipient = self._exchange.get_recipient(user.guid, self._dc)
        warnings = (choice.warning,) if choice.warning else ()
        return _result("created", request.identity, recipient, warnings)

    def _choose_alias(self, user: DirectoryUser) -> AliasChoice:
        try:
            return choose_alias(user, self._settings.exchange.alias_policy)
        except NoAlias as exc:
            raise AliasRequired(str(exc)) from exc

    def read_state(self, identity: str) -> RecipientState:
        """The user's current recipient state; IdentityNotFound when no user matches."""
        user = self._exchange.get_user(identity, self._dc)
        kind = user.recipient_type_details
        recipient = None
        if kind not in ENABLEABLE_USER_TYPES:
            recipient = self._exchange.get_recipient(user.guid, self._dc)
        return RecipientState(
            identity=identity,
            guid=user.guid,
            distinguished_name=user.distinguished_name,
            user_principal_name=user.user_principal_name,
            recipient_type_details=kind,
            has_mailbox=kind.endswith("Mailbox"),
            provisionable=kind in ENABLEABLE_USER_TYPES,
            alias=recipient.alias if recipient else None,
            primary_smtp_address=recipient.primary_smtp_address if recipient else None,
            database=recipient.database if recipient else None,
        )

    def _check_declared_paths(self, request: CreateEmail) -> None:
        declared = {
            "powershell_path": (request.powershell_path, self._settings.exchange.powershell_path),
            "remote_exchange_path": (
                request.remote_exchange_path,
                self._settings.exchange.remote_exchange_path,
            ),
        }
        for field, (given, configured) in declared.items():
            if given is not None and not _same_windows_path(given, configured):
                raise PathMismatch(field, given, configured)

    def _resolve_waiting_for_replication(self, identity: str) -> DirectoryUser:
        """Get-User, retried with backoff for `not_found_retry_seconds` (AD replication lag)."""
        deadline = self._clock.monotonic() + self._settings.not_found_retry_seconds
        delay = _FIRST_RETRY_DELAY_SECONDS
        while True:
            try:
                return self._exchange.get_user(identity, self._dc)
            except IdentityNotFound:
                remaining = deadline - self._clock.monotonic()
                if remaining <= 0:
                    raise
                self._clock.sleep(min(delay, remaining))
                delay = min(delay * 2, _MAX_RETRY_DELAY_SECONDS)

    def _existing(self, request: CreateEmail, guid: str) -> MailboxResult:
        recipient = self._exchange.get_recipient(guid, self._dc)
        if request.alias and request.alias.casefold() != recipient.alias.casefold():
            raise AliasMismatch(request.identity, recipient, request.alias)
        return _result("already_exists", request.identity, recipient)

    def _refuse(self, identity: str, kind: str) -> WrongRecipientType:
        cmdlet = (
            "Enable-RemoteMailbox"
            if self._mailbox_type == REMOTE_MAILBOX_TYPE
            else ("Enable-Mailbox")
        )
        return WrongRecipientType(
            f"{identity!r} is a {kind}, not a plain user; this service runs {cmdlet} only for "
            f"users without mail attributes (User, DisabledUser) and does not convert a {kind}. "
            f"Fix the recipient in Exchange, or provision another user.",
            recipient_type=kind,
        )

    def _enable(
        self, user: DirectoryUser, alias: str | None, before_send: Callable[[], None] | None
    ) -> Recipient:
        options = self._settings.exchange
        if self._mailbox_type == LOCAL_MAILBOX_TYPE:
            return self._exchange.enable_mailbox(
                EnableMailbox(
                    identity=user.guid,
                    alias=alias,
                    database=options.database or None,
                    address_book_policy=options.address_book_policy or None,
                    retention_policy=options.retention_policy or None,
                    domain_controller=self._dc,
                    before_send=before_send,
                )
            )
        routing_address = None
        if options.remote_routing_domain:
            alias = alias or _derived_alias(user)
            routing_address = f"{alias}@{options.remote_routing_domain}"
        return self._exchange.enable_remote_mailbox(
            EnableRemoteMailbox(
                identity=user.guid,
                alias=alias,
                remote_routing_address=routing_address,
                domain_controller=self._dc,
                before_send=before_send,
            )
        )

    def _now_has_mailbox(self, guid: str) -> bool:
        """After an Enable-* of unknown outcome: did it take effect? Never retried blindly."""
        try:
            kind = self._exchange.get_user(guid, self._dc).recipient_type_details
        except ExchangeError:
            return False
        return kind == self._mailbox_type


def _best_effort(write: Callable[[], object]) -> None:
    """A journal write after the outcome is known: Exchange already decided, so the caller still
    gets the answer; the failure is counted and logged by the journal's error hook."""
    try:
        write()
    except JournalUnavailable:
        log.exception("the outcome of a request could not be journalled")


def _derived_alias(user: DirectoryUser) -> str:
    """The alias for a remote routing address when the caller gave none: UPN prefix, else sam."""
    for candidate in (user.user_principal_name.partition("@")[0], user.sam_account_name):
        try:
            return validate_alias(candidate)
        except InvalidValue:
            continue
    raise AliasRequired(
        f"no valid alias can be derived from {user.user_principal_name!r} or "
        f"{user.sam_account_name!r} for the remote routing address; pass an alias explicitly."
    )


def _result(
    status: Literal["created", "already_exists"],
    identity: str,
    r: Recipient,
    warnings: tuple[str, ...] = (),
) -> MailboxResult:
    return MailboxResult(
        status=status,
        identity=identity,
        guid=r.guid,
        distinguished_name=r.distinguished_name,
        alias=r.alias,
        primary_smtp_address=r.primary_smtp_address,
        recipient_type_details=r.recipient_type_details,
        database=r.database,
        warnings=warnings,
    )

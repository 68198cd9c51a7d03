"""Exchange failures as one documented tree, and the one place that classifies Exchange's errors.

    ExchangeError                 502 EXCHANGE_ERROR      anything Exchange (or the way to it) said
    ├── IdentityNotFound          404 IDENTITY_NOT_FOUND  ManagementObjectNotFoundException
    ├── AmbiguousIdentity         409 AMBIGUOUS_IDENTITY  ManagementObjectAmbiguousException
    ├── WrongRecipientType        409 WRONG_RECIPIENT_TYPE  RecipientTaskException "... is of type"
    ├── AddressInUse              409 ADDRESS_IN_USE      ProxyAddressExistsException
    ├── PermissionDenied          502 EXCHANGE_PERMISSION_DENIED  RBAC role, write scope, AD ACLs
    ├── ExchangeTimeout           504 EXCHANGE_TIMEOUT    a command did not finish in time
    ├── BackendUnavailable        503 BACKEND_UNAVAILABLE no session right now; retry later
    └── UnexpectedExchangeError   502 EXCHANGE_ERROR      anything else Exchange said

Every class carries what Exchange said: the message, CategoryInfo.Reason, FullyQualifiedErrorId
and the exception type, so callers and logs can show them. Backends turn a raw error record into
one of these with `classify()`; nothing else inspects Exchange's texts. The tree is one branch of
`vezaprovisioner.failures.Failure`: each class carries its own `code`, status, title and advice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from ..failures import Failure

_IS_OF_TYPE = re.compile(r"\bis of type (?P<type>[A-Za-z]+)\b")
_FAILURE_CATEGORY = re.compile(r"\[FailureCategory=Cmdlet-(?P<reason>[A-Za-z.]+)\]")


class ExchangeError(Failure):
    """Base class: Exchange, or the way to it, reported a failure."""

    code: ClassVar[str] = "EXCHANGE_ERROR"
    status: ClassVar[int] = 502
    title: ClassVar[str] = "Exchange reported an error"
    advice: ClassVar[str] = (
        "Exchange reported an error this service does not recognise; see exchange.message, "
        "exchange.reason and exchange.error_id."
    )

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        error_id: str | None = None,
        exception_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.error_id = error_id
        self.exception_type = exception_type

    @property
    def from_exchange(self) -> bool:
        """True when Exchange itself produced the error (it has a reason or an error id)."""
        return bool(self.reason or self.error_id)

    @property
    def detail(self) -> str:
        """What to do, when Exchange's own text travels beside it; else the backend's sentence."""
        return self.advice if self.from_exchange else self.message


class IdentityNotFound(ExchangeError):
    """No AD object matches the identity (ManagementObjectNotFoundException)."""

    code = "IDENTITY_NOT_FOUND"
    status = 404
    title = "Identity not found"
    advice = (
        "No Active Directory user matches the identity, even after waiting for AD replication. "
        "Check the identity, or retry once a newly created account has replicated."
    )


class AmbiguousIdentity(ExchangeError):
    """The identity matches several AD objects (ManagementObjectAmbiguousException)."""

    code = "AMBIGUOUS_IDENTITY"
    status = 409
    title = "Identity is ambiguous"
    advice = (
        "The identity matches several Active Directory objects; send a unique form: the UPN, "
        "DOMAIN\\sAMAccountName, the distinguished name or the GUID."
    )


class WrongRecipientType(ExchangeError):
    """The object is a recipient type the requested operation must not touch."""

    code = "WRONG_RECIPIENT_TYPE"
    status = 409
    title = "Wrong recipient type"
    advice = "Exchange refused the recipient's type for this operation; see exchange.message."

    def __init__(self, message: str, *, recipient_type: str | None = None, **details: str | None):
        super().__init__(message, **details)
        self.recipient_type = recipient_type


class AddressInUse(ExchangeError):
    """The email (proxy) address Exchange would assign belongs to another recipient."""

    code = "ADDRESS_IN_USE"
    status = 409
    title = "Email address already in use"
    advice = (
        "The email address Exchange would assign already belongs to another recipient; "
        "request a different alias."
    )


class PermissionDenied(ExchangeError):
    """The service account may not do this: a missing RBAC role, write scope or AD permission."""

    code = "EXCHANGE_PERMISSION_DENIED"
    status = 502
    title = "Exchange denied the service account"
    advice = (
        "The service account lacks an Exchange permission: Enable-Mailbox needs the Mail "
        "Recipients role (for example via Recipient Management) and the user must be within "
        "its write scope. See exchange.message for what Exchange said."
    )


class ExchangeTimeout(ExchangeError):
    """A command did not finish within its deadline; its outcome is unknown."""

    code = "EXCHANGE_TIMEOUT"
    status = 504
    title = "Exchange did not answer in time"
    advice = (
        "Exchange did not answer within the command timeout, so the outcome is unknown; read "
        "the state with GET .../api/v1/emails/{identity} before retrying."
    )

    @property
    def detail(self) -> str:
        if self.from_exchange:
            return self.advice
        return f"{self.message.rstrip('.')}. {self.advice}"  # the backend's facts, then what to do


class BackendUnavailable(ExchangeError):
    """No Exchange session is available right now (starting, broken or all busy)."""

    code = "BACKEND_UNAVAILABLE"
    status = 503
    title = "Exchange is unavailable"
    advice = "No Exchange session is available right now; retry after Retry-After."
    retry_after_seconds: int

    def __init__(self, message: str, *, retry_after_seconds: int = 5, **details: str | None):
        super().__init__(message, **details)
        self.retry_after_seconds = retry_after_seconds

    @property
    def detail(self) -> str:
        if self.from_exchange:
            return self.advice
        return f"{self.message.rstrip('.')}. {self.advice}"  # the backend's facts, then what to do


class UnexpectedExchangeError(ExchangeError):
    """Exchange reported something this service has no specific handling for."""


@dataclass(frozen=True)
class _Rule:
    reasons: frozenset[str]
    message_fragments: tuple[str, ...]
    error: type[ExchangeError]


# Order matters: the first rule whose reason or message fragment matches wins.
_RULES = (
    _Rule(frozenset({"ManagementObjectNotFoundException"}), (), IdentityNotFound),
    _Rule(
        frozenset({"ManagementObjectAmbiguousException"}),
        ("matches multiple entries", "multiple recipients matching the identity"),
        AmbiguousIdentity,
    ),
    _Rule(
        frozenset({"ProxyAddressExistsException", "WLCDManagedMemberExistsException"}),
        ("is already being used by the proxy addresses",),
        AddressInUse,
    ),
    _Rule(
        frozenset({"CommandNotFoundException"}),
        (
            "out of the current user's write scope",
            "INSUFF_ACCESS_RIGHTS",
            "Insufficient access rights",
            "A parameter cannot be found that matches parameter name",
        ),
        PermissionDenied,
    ),
)


def _short_reason(reason: str | None, error_id: str | None, exception_type: str | None) -> str:
    """CategoryInfo.Reason, else the FailureCategory in the error id, else the type's short name."""
    if reason:
        return reason.rsplit(".", 1)[-1]
    if error_id and (match := _FAILURE_CATEGORY.search(error_id)):
        return match.group("reason").rsplit(".", 1)[-1]
    if exception_type:
        return exception_type.rsplit(".", 1)[-1]
    return ""


def classify(
    message: str,
    *,
    reason: str | None = None,
    error_id: str | None = None,
    exception_type: str | None = None,
) -> ExchangeError:
    """Turn one Exchange error record into the matching class of the tree above."""
    details: dict[str, str | None] = {
        "reason": reason,
        "error_id": error_id,
        "exception_type": exception_type,
    }
    short = _short_reason(reason, error_id, exception_type)
    if short == "RecipientTaskException" and (match := _IS_OF_TYPE.search(message)):
        return WrongRecipientType(message, recipient_type=match.group("type"), **details)
    for rule in _RULES:
        if short in rule.reasons or any(f in message for f in rule.message_fragments):
            return rule.error(message, **details)
    return UnexpectedExchangeError(message, **details)

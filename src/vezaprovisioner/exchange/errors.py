"""Exchange failures as one documented tree, and the one place that classifies Exchange's errors.

    ExchangeError                 anything Exchange (or the way to it) reported
    ├── IdentityNotFound          ManagementObjectNotFoundException
    ├── AmbiguousIdentity         ManagementObjectAmbiguousException / "matches multiple entries"
    ├── WrongRecipientType        RecipientTaskException "... is of type <X>" (or a refused type)
    ├── AddressInUse              ProxyAddressExistsException "The proxy address ... is already"
    ├── PermissionDenied          cmdlet/parameter missing from the RBAC role, write scope, AD ACLs
    ├── ExchangeTimeout           a command did not finish within its deadline
    ├── BackendUnavailable        no session could be had right now; retry later
    └── UnexpectedExchangeError   anything else Exchange said

Every class carries what Exchange said: the message, CategoryInfo.Reason, FullyQualifiedErrorId
and the exception type, so callers and logs can show them. Backends turn a raw error record into
one of these with `classify()`; nothing else inspects Exchange's texts. The HTTP status and `code`
for each class live in `vezaprovisioner.api.problems`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_IS_OF_TYPE = re.compile(r"\bis of type (?P<type>[A-Za-z]+)\b")
_FAILURE_CATEGORY = re.compile(r"\[FailureCategory=Cmdlet-(?P<reason>[A-Za-z.]+)\]")


class ExchangeError(Exception):
    """Base class: Exchange, or the way to it, reported a failure."""

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        error_id: str | None = None,
        exception_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.error_id = error_id
        self.exception_type = exception_type

    @property
    def from_exchange(self) -> bool:
        """True when Exchange itself produced the error (it has a reason or an error id)."""
        return bool(self.reason or self.error_id)


class IdentityNotFound(ExchangeError):
    """No AD object matches the identity (ManagementObjectNotFoundException)."""


class AmbiguousIdentity(ExchangeError):
    """The identity matches several AD objects (ManagementObjectAmbiguousException)."""


class WrongRecipientType(ExchangeError):
    """The object is a recipient type the requested operation must not touch."""

    def __init__(self, message: str, *, recipient_type: str | None = None, **details: str | None):
        super().__init__(message, **details)
        self.recipient_type = recipient_type


class AddressInUse(ExchangeError):
    """The email (proxy) address Exchange would assign belongs to another recipient."""


class PermissionDenied(ExchangeError):
    """The service account may not do this: a missing RBAC role, write scope or AD permission."""


class ExchangeTimeout(ExchangeError):
    """A command did not finish within its deadline; its outcome is unknown."""


class BackendUnavailable(ExchangeError):
    """No Exchange session is available right now (starting, broken or all busy)."""

    def __init__(self, message: str, *, retry_after_seconds: int = 5, **details: str | None):
        super().__init__(message, **details)
        self.retry_after_seconds = retry_after_seconds


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

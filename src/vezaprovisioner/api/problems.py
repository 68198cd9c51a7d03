"""RFC 9457 problem+json: the one table that maps every failure to an HTTP status and `code`.

Routes and middleware never pick a status for a failure themselves: they raise (or hand over) an
exception and `problem_for()` decides. Each problem carries a stable `code`, a sentence the admin
or caller can act on, the request id, and what Exchange said when it said something.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

from ..auth import AuthenticationError, CallerNotAllowed, HttpsRequired, NotAuthenticated
from ..exchange.errors import (
    AddressInUse,
    AmbiguousIdentity,
    BackendUnavailable,
    ExchangeError,
    ExchangeTimeout,
    IdentityNotFound,
    PermissionDenied,
    UnexpectedExchangeError,
    WrongRecipientType,
)
from ..journal.claims import IdentityBusy
from ..journal.records import JournalUnavailable
from ..provisioning import AliasMismatch, AliasRequired, PathMismatch, ProvisioningError

PROBLEM_CONTENT_TYPE = "application/problem+json"


@dataclass(frozen=True)
class ProblemKind:
    """The fixed part of a problem: status, stable code, short title."""

    status: int
    code: str
    title: str

    @property
    def type_uri(self) -> str:
        return "urn:vezaprovisioner:problem:" + self.code.lower().replace("_", "-")


VALIDATION_FAILED = ProblemKind(422, "VALIDATION_FAILED", "The request is not valid")
PAYLOAD_TOO_LARGE = ProblemKind(413, "PAYLOAD_TOO_LARGE", "The request body is too large")
UNSUPPORTED_MEDIA_TYPE = ProblemKind(415, "UNSUPPORTED_MEDIA_TYPE", "The body must be JSON")
ACTION_NOT_SUPPORTED = ProblemKind(501, "ACTION_NOT_SUPPORTED", "The action is not supported")
NOT_FOUND = ProblemKind(404, "NOT_FOUND", "No such resource")
METHOD_NOT_ALLOWED = ProblemKind(405, "METHOD_NOT_ALLOWED", "Method not allowed")
INTERNAL_ERROR = ProblemKind(500, "INTERNAL_ERROR", "Internal error")
SERVICE_NOT_STARTED = ProblemKind(503, "SERVICE_NOT_STARTED", "The service could not start")
IDEMPOTENCY_KEY_MISMATCH = ProblemKind(
    422, "IDEMPOTENCY_KEY_MISMATCH", "The Idempotency-Key was used with another body"
)
IDEMPOTENCY_KEY_IN_USE = ProblemKind(
    409, "IDEMPOTENCY_KEY_IN_USE", "A request with this Idempotency-Key is still running"
)

# Most specific class first is not needed: lookup walks each exception's MRO.
_KINDS: dict[type[Exception], ProblemKind] = {
    NotAuthenticated: ProblemKind(401, "AUTHENTICATION_REQUIRED", "Authentication required"),
    CallerNotAllowed: ProblemKind(403, "CALLER_NOT_ALLOWED", "Caller not allowed"),
    HttpsRequired: ProblemKind(403, "HTTPS_REQUIRED", "HTTPS required"),
    PathMismatch: ProblemKind(400, "PATH_MISMATCH", "Path differs from the configured one"),
    AliasMismatch: ProblemKind(409, "ALIAS_MISMATCH", "Mailbox exists with another alias"),
    AliasRequired: ProblemKind(422, "ALIAS_REQUIRED", "An alias is required"),
    IdentityNotFound: ProblemKind(404, "IDENTITY_NOT_FOUND", "Identity not found"),
    AmbiguousIdentity: ProblemKind(409, "AMBIGUOUS_IDENTITY", "Identity is ambiguous"),
    WrongRecipientType: ProblemKind(409, "WRONG_RECIPIENT_TYPE", "Wrong recipient type"),
    AddressInUse: ProblemKind(409, "ADDRESS_IN_USE", "Email address already in use"),
    PermissionDenied: ProblemKind(
        502, "EXCHANGE_PERMISSION_DENIED", "Exchange denied the service account"
    ),
    ExchangeTimeout: ProblemKind(504, "EXCHANGE_TIMEOUT", "Exchange did not answer in time"),
    BackendUnavailable: ProblemKind(503, "BACKEND_UNAVAILABLE", "Exchange is unavailable"),
    UnexpectedExchangeError: ProblemKind(502, "EXCHANGE_ERROR", "Exchange reported an error"),
    JournalUnavailable: ProblemKind(
        503, "JOURNAL_UNAVAILABLE", "The request journal cannot be written"
    ),
    IdentityBusy: ProblemKind(503, "IDENTITY_BUSY", "Another request for this user is running"),
    ExchangeError: ProblemKind(502, "EXCHANGE_ERROR", "Exchange reported an error"),
}

# What the admin or caller can do, for errors whose own message is Exchange's raw text.
_EXCHANGE_ADVICE: dict[type[ExchangeError], str] = {
    IdentityNotFound: (
        "No Active Directory user matches the identity, even after waiting for AD replication. "
        "Check the identity, or retry once a newly created account has replicated."
    ),
    AmbiguousIdentity: (
        "The identity matches several Active Directory objects; send a unique form: the UPN, "
        "DOMAIN\\sAMAccountName, the distinguished name or the GUID."
    ),
    WrongRecipientType: (
        "Exchange refused the recipient's type for this operation; see exchange.message."
    ),
    AddressInUse: (
        "The email address Exchange would assign already belongs to another recipient; "
        "request a different alias."
    ),
    PermissionDenied: (
        "The service account lacks an Exchange permission: Enable-Mailbox needs the Mail "
        "Recipients role (for example via Recipient Management) and the user must be within "
        "its write scope. See exchange.message for what Exchange said."
    ),
    ExchangeTimeout: (
        "Exchange did not answer within the command timeout, so the outcome is unknown; read "
        "the state with GET .../api/v1/emails/{identity} before retrying."
    ),
    BackendUnavailable: "No Exchange session is available right now; retry after Retry-After.",
    ExchangeError: (
        "Exchange reported an error this service does not recognise; see exchange.message, "
        "exchange.reason and exchange.error_id."
    ),
}


@dataclass
class Problem(Exception):
    """A problem to send: raise it from a route, or build it with `problem_for()`."""

    kind: ProblemKind
    detail: str
    errors: list[dict[str, Any]] | None = None
    exchange: dict[str, str | None] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def response(self, request_id: str) -> JSONResponse:
        body: dict[str, Any] = {
            "type": self.kind.type_uri,
            "title": self.kind.title,
            "status": self.kind.status,
            "detail": self.detail,
            "code": self.kind.code,
            "request_id": request_id,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        if self.exchange is not None:
            body["exchange"] = self.exchange
        return JSONResponse(
            body,
            status_code=self.kind.status,
            headers=self.headers,
            media_type=PROBLEM_CONTENT_TYPE,
        )


def all_problem_kinds() -> tuple[ProblemKind, ...]:
    """Every problem this service can send (the OpenAPI document's `code` enum)."""
    named = [value for value in globals().values() if isinstance(value, ProblemKind)]
    return tuple(dict.fromkeys([*named, *_KINDS.values()]))


def advice_for_code(code: str) -> str | None:
    """What to do about a failure with this code, where the table has advice (status page)."""
    for cls, kind in _KINDS.items():
        if kind.code == code and issubclass(cls, ExchangeError):
            return next((_EXCHANGE_ADVICE[c] for c in cls.__mro__ if c in _EXCHANGE_ADVICE), None)
    return None


def _kind_for(exc: Exception) -> ProblemKind:
    for cls in type(exc).__mro__:
        if cls in _KINDS:
            return _KINDS[cls]
    return INTERNAL_ERROR


def _exchange_detail(exc: ExchangeError) -> str:
    advice = next((_EXCHANGE_ADVICE[c] for c in type(exc).__mro__ if c in _EXCHANGE_ADVICE), "")
    if exc.from_exchange:
        return advice  # Exchange's own text travels in the `exchange` member
    if isinstance(exc, ExchangeTimeout | BackendUnavailable):
        return f"{exc.message.rstrip('.')}. {advice}"  # the backend's facts, then what to do
    return exc.message  # the flow's own sentence already says what to do


def problem_for(exc: Exception, *, basic_realm: str | None = None) -> Problem:
    """The problem for any exception the flow, the port or authentication raised."""
    if isinstance(exc, Problem):
        return exc
    kind = _kind_for(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, ExchangeError):
        exchange = None
        if exc.from_exchange:
            exchange = {"reason": exc.reason, "error_id": exc.error_id, "message": exc.message}
        if isinstance(exc, BackendUnavailable):
            headers["Retry-After"] = str(exc.retry_after_seconds)
        return Problem(kind, _exchange_detail(exc), exchange=exchange, headers=headers)
    if isinstance(exc, NotAuthenticated) and basic_realm:
        headers["WWW-Authenticate"] = f'Basic realm="{basic_realm}", charset="UTF-8"'
    if isinstance(exc, IdentityBusy):
        headers["Retry-After"] = str(exc.retry_after_seconds)
    if isinstance(exc, JournalUnavailable):
        headers["Retry-After"] = "30"
        detail = f"{exc} Nothing was sent to Exchange; retry after Retry-After."
        return Problem(kind, detail, headers=headers)
    if isinstance(exc, AuthenticationError | ProvisioningError | IdentityBusy):
        return Problem(kind, str(exc), headers=headers)
    return Problem(INTERNAL_ERROR, "An internal error occurred; the service log has details.")

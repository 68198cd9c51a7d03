"""Every failure the service reports, as one tree; each class carries its own code and status.

    Failure                       500 INTERNAL_ERROR    the root; anything unforeseen
    ├── BadRequest                400 BAD_REQUEST       the body cannot be read (not UTF-8,
    │                                                    JSON nested too deep)
    ├── NotFound                  404 NOT_FOUND         no such route or resource
    ├── MethodNotAllowed          405 METHOD_NOT_ALLOWED   (`allowed`: the route's methods)
    ├── PayloadTooLarge           413 PAYLOAD_TOO_LARGE
    ├── UnsupportedMediaType      415 UNSUPPORTED_MEDIA_TYPE
    ├── ValidationFailed          422 VALIDATION_FAILED (`errors`: one entry per bad field)
    ├── ActionNotSupported        501 ACTION_NOT_SUPPORTED
    ├── ServiceNotStarted         503 SERVICE_NOT_STARTED
    │   └── ConfigError               (config.py) the configuration is not valid
    ├── AuthenticationError           (auth.py)
    │   ├── NotAuthenticated      401 AUTHENTICATION_REQUIRED
    │   ├── CallerNotAllowed      403 CALLER_NOT_ALLOWED
    │   ├── HttpsRequired         403 HTTPS_REQUIRED
    │   ├── MultipleAuthorizations    400 MULTIPLE_AUTHORIZATION_HEADERS
    │   └── TooManyFailedLogins   429 TOO_MANY_FAILED_LOGINS  (with Retry-After)
    ├── ProvisioningError             (provisioning.py) the flow refuses the request
    │   ├── PathMismatch          400 PATH_MISMATCH
    │   ├── AliasMismatch         409 ALIAS_MISMATCH
    │   └── AliasRequired         422 ALIAS_REQUIRED
    ├── JournalUnavailable        503 JOURNAL_UNAVAILABLE  (journal/store.py)
    ├── IdentityBusy              503 IDENTITY_BUSY        (journal/claims.py)
    └── ExchangeError             502 EXCHANGE_ERROR       (exchange/errors.py: Exchange's branch)

Each class says its stable `code`, HTTP `status`, short `title` and `advice` (what the caller or
admin can do); an instance adds its `message` and, where a retry can help, `retry_after_seconds`.
`detail` is the one sentence shown to the caller, logged and journalled. Whoever needs a code reads
`as_failure(exc).code`: the journal, the audit trail, the access log, the CLI and recovery alike.
Only `api/problems.py` knows HTTP: it renders a failure as RFC 9457 problem+json.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

__all__ = [
    "INTERNAL_DETAIL",
    "ActionNotSupported",
    "BadRequest",
    "Failure",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "ServiceNotStarted",
    "UnsupportedMediaType",
    "ValidationFailed",
    "advice_for_code",
    "as_failure",
    "failure_classes",
]

#: The detail of a failure nobody foresaw (its traceback goes to the service log).
INTERNAL_DETAIL = "An internal error occurred; the service log has details."


class Failure(Exception):
    """The root: a failure the service reports with a stable code. Used as is for the unforeseen."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    advice: ClassVar[str] = ""
    #: Seconds after which a retry may succeed (sent as Retry-After); None when it would not help.
    retry_after_seconds: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def detail(self) -> str:
        """The sentence for the caller or admin: what happened and what to do about it."""
        return self.message


def failure_classes() -> list[type[Failure]]:
    """The whole tree, root first (the classes of every imported module): the OpenAPI code enum
    and the status page's advice read it."""
    found: list[type[Failure]] = []
    pending: list[type[Failure]] = [Failure]
    while pending:
        cls = pending.pop(0)
        if cls not in found:
            found.append(cls)
            pending.extend(cls.__subclasses__())
    return found


def advice_for_code(code: str) -> str:
    """What to do about a failure with this code ("" when its classes give no advice)."""
    return next((c.advice for c in failure_classes() if c.code == code and c.advice), "")


def as_failure(exc: BaseException) -> Failure:
    """`exc` itself when it is a Failure; else the internal error that stands for it."""
    return exc if isinstance(exc, Failure) else Failure(INTERNAL_DETAIL)


# ---- the request as sent --------------------------------------------------------------------


class BadRequest(Failure):
    """The request cannot be read at all (a body that is not UTF-8, JSON nested too deep)."""

    code = "BAD_REQUEST"
    status = 400
    title = "The request cannot be read"


class NotFound(Failure):
    """No such route, or no such resource (a request id without a journal record)."""

    code = "NOT_FOUND"
    status = 404
    title = "No such resource"


class MethodNotAllowed(Failure):
    """The route exists, but not for this method; `allowed` lists the methods it takes."""

    code = "METHOD_NOT_ALLOWED"
    status = 405
    title = "Method not allowed"

    def __init__(self, message: str, *, allowed: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.allowed = tuple(allowed)


class PayloadTooLarge(Failure):
    """The body is over the size limit; nothing of it was parsed."""

    code = "PAYLOAD_TOO_LARGE"
    status = 413
    title = "The request body is too large"


class UnsupportedMediaType(Failure):
    """The body is not declared as JSON."""

    code = "UNSUPPORTED_MEDIA_TYPE"
    status = 415
    title = "The body must be JSON"


class ValidationFailed(Failure):
    """Fields are missing, unknown or invalid; `errors` has one {field, message, type} each."""

    code = "VALIDATION_FAILED"
    status = 422
    title = "The request is not valid"

    def __init__(self, errors: Sequence[Mapping[str, Any]]) -> None:
        self.errors = [dict(error) for error in errors]
        fields = ", ".join(dict.fromkeys(str(error["field"]) for error in self.errors))
        super().__init__(f"Fix these fields and retry: {fields}.")


class ActionNotSupported(Failure):
    """The platform asked for an action this service does not implement."""

    code = "ACTION_NOT_SUPPORTED"
    status = 501
    title = "The action is not supported"


class ServiceNotStarted(Failure):
    """The service could not start (under IIS: answered to every request until it can)."""

    code = "SERVICE_NOT_STARTED"
    status = 503
    title = "The service could not start"

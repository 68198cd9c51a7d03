"""RFC 9457 problem+json: renders any failure; the failure itself says its status and `code`.

Routes and middleware never pick a status: they raise (or hand over) a `Failure` and one of these
functions renders it. Each problem carries the failure's stable `code`, a sentence the admin or
caller can act on (`detail`), the request id, and what Exchange said when it said something. The
code of every rendered problem is left in the request's scope state for the access log.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Scope

from ..auth import NotAuthenticated
from ..exchange.errors import ExchangeError
from ..failures import Failure, MethodNotAllowed, ValidationFailed, as_failure

PROBLEM_CONTENT_TYPE = "application/problem+json"
#: The scope-state key under which the code of the problem sent for a request is left.
FAILURE_CODE_STATE = "failure_code"


def type_uri(failure: Failure) -> str:
    """The problem's `type`: a stable URN derived from its code."""
    return "urn:vezaprovisioner:problem:" + failure.code.lower().replace("_", "-")


def problem_document(failure: Failure, request_id: str) -> dict[str, Any]:
    """The problem+json body of a failure."""
    body: dict[str, Any] = {
        "type": type_uri(failure),
        "title": failure.title,
        "status": failure.status,
        "detail": failure.detail,
        "code": failure.code,
        "request_id": request_id,
    }
    if isinstance(failure, ValidationFailed):
        body["errors"] = failure.errors
    if isinstance(failure, ExchangeError) and failure.from_exchange:
        body["exchange"] = {
            "reason": failure.reason,
            "error_id": failure.error_id,
            "message": failure.message,
        }
    return body


def problem_headers(failure: Failure, *, basic_realm: str | None = None) -> dict[str, str]:
    """Retry-After, Allow and (Basic mode) WWW-Authenticate, where the failure calls for them."""
    headers: dict[str, str] = {}
    if failure.retry_after_seconds is not None:
        headers["Retry-After"] = str(failure.retry_after_seconds)
    if isinstance(failure, MethodNotAllowed) and failure.allowed:
        headers["Allow"] = ", ".join(failure.allowed)
    if isinstance(failure, NotAuthenticated) and basic_realm:
        headers["WWW-Authenticate"] = f'Basic realm="{basic_realm}", charset="UTF-8"'
    return headers


def problem_response(
    exc: BaseException, request_id: str, *, basic_realm: str | None = None
) -> JSONResponse:
    """The response for any exception: a Failure as it says, anything else as INTERNAL_ERROR."""
    failure = as_failure(exc)
    return JSONResponse(
        problem_document(failure, request_id),
        status_code=failure.status,
        headers=problem_headers(failure, basic_realm=basic_realm),
        media_type=PROBLEM_CONTENT_TYPE,
    )


def problem_for_request(
    exc: BaseException, scope: Scope, *, basic_realm: str | None = None
) -> JSONResponse:
    """`problem_response` for a request of the app; leaves the code for the access log."""
    failure = as_failure(exc)
    state = scope.setdefault("state", {})
    state[FAILURE_CODE_STATE] = failure.code
    return problem_response(failure, str(state["request_id"]), basic_realm=basic_realm)

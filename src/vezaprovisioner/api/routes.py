"""API v1 routes: health, readiness, CREATE_EMAIL (direct and as a platform action), state look-up.

Routes stay thin: validate, call the provisioning flow, shape the response. Failures are raised
(`vezaprovisioner.failures`) and rendered as problem+json by the app's exception handler.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from .. import __version__, logs
from ..auth import Caller
from ..exchange.backends import wait_for_warm_up
from ..failures import ActionNotSupported, NotFound
from ..journal.records import JournalUnavailable, RequestContext
from ..metrics import CONTENT_TYPE
from ..services import Services
from ..validation import InvalidValue, validate_identity
from .access import client_address
from .models import (
    SUPPORTED_ACTIONS,
    ActionRequest,
    CheckSummary,
    EmailRequest,
    HealthResponse,
    MailboxResponse,
    ProblemDocument,
    ReadinessCheck,
    ReadinessResponse,
    ReadinessSummary,
    RecipientStateResponse,
    RequestRecordResponse,
)
from .validation_errors import validation_failure

router = APIRouter()


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem+json answers a route can give."""
    return {
        status: {
            "model": ProblemDocument,
            "content": {"application/problem+json": {}},
            "description": "Problem (RFC 9457); see `code`",
        }
        for status in statuses
    }


_AUTH_AND_BODY = (401, 403, 413, 415, 422)
_EXCHANGE = (502, 503, 504)

# Readiness probes run here, so a hung backend cannot tie up the request threads.
_probe_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="readiness-probe")


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_request_id(request: Request) -> str:
    return str(request.state.request_id)


ServicesDep = Annotated[Services, Depends(get_services)]
RequestIdDep = Annotated[str, Depends(get_request_id)]


@router.get("/health", tags=["health"])
def health() -> HealthResponse:
    """Liveness: the process answers. Touches no backend."""
    return HealthResponse(status="ok", version=__version__)


#: The warm-up's longest wait: below IIS's FastCGI activityTimeout (70 s by default), so IIS never
#: kills a process in its warm-up; hosts still connecting after it go on in the background.
WARM_UP_WAIT_SECONDS = 60.0


@router.get(
    "/warmup",
    tags=["health"],
    status_code=204,
    response_class=Response,
    responses={204: {"description": "The service is started; nothing else is said"}},
)
def warmup(request: Request, services: ServicesDep) -> Response:
    """IIS Application Initialization's page: warm the service before the first caller.

    IIS requests it when the application pool starts (startMode AlwaysRunning, preloadEnabled),
    anonymously and over plain HTTP, the only way Application Initialization sends it: the
    request itself builds the app in this FastCGI process; the first one waits, at most
    `WARM_UP_WAIT_SECONDS`, until the backend's hosts have connected or failed, and later ones
    answer at once (an anonymous caller cannot hold a process). It reads no input and says
    nothing (204, no body), so it is safe without credentials.
    """
    state = request.app.state
    if not getattr(state, "warmed_up", False):
        limit = min(services.settings.local.longest_start_seconds, WARM_UP_WAIT_SECONDS)
        wait_for_warm_up(services.exchange, limit)
        state.warmed_up = True
    return Response(status_code=204, headers={"Cache-Control": "no-store"})


@router.get(
    "/health/ready",
    tags=["health"],
    responses={503: {"model": ReadinessSummary, "description": "Not ready"}},
)
def ready(services: ServicesDep) -> JSONResponse:
    """Readiness, public: the overall status and whether each check passed, nothing more.

    The details (paths, backend hosts, error text) are for authenticated callers only, at
    `/health/ready/details`.
    """
    checks = _readiness_checks(services)
    ok = all(check.ok for check in checks.values())
    body = ReadinessSummary(
        status="ready" if ok else "not_ready",
        checks={name: CheckSummary(ok=check.ok) for name, check in checks.items()},
    )
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/health/ready/details",
    tags=["health"],
    responses={503: {"model": ReadinessResponse, "description": "Not ready"}},
)
def ready_details(services: ServicesDep) -> JSONResponse:
    """Readiness with each check's detail: the configuration file, the backend's hosts or
    session, the journal's path and any error text. Authenticated like the API."""
    checks = _readiness_checks(services)
    ok = all(check.ok for check in checks.values())
    body = ReadinessResponse(status="ready" if ok else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


def _readiness_checks(services: Services) -> dict[str, ReadinessCheck]:
    """The configuration is valid and the backend answers a cheap probe in time."""
    settings = services.settings
    source = str(settings.source) if settings.source else "built in code"
    return {
        "configuration": ReadinessCheck(ok=True, detail=f"valid ({source})"),
        "backend": _probe(services),
        "journal": _journal_writable(services),
        "logs": _logs_written(),
    }


def _probe(services: Services) -> ReadinessCheck:
    timeout = services.settings.readiness_timeout_seconds
    future = _probe_executor.submit(services.exchange.probe)
    try:
        return ReadinessCheck(ok=True, detail=future.result(timeout=timeout))
    except FutureTimeout:
        return ReadinessCheck(
            ok=False,
            detail=f"{services.settings.backend} backend did not answer within {timeout:g} s",
        )
    except Exception as exc:  # any failure means "not ready"; the detail says which
        return ReadinessCheck(ok=False, detail=f"{type(exc).__name__}: {exc}")


def _logs_written() -> ReadinessCheck:
    """Not ready when the configured log file could not be opened (lines go to stderr)."""
    found = logs.status()
    return ReadinessCheck(ok=found.ok, detail=found.detail)


def _journal_writable(services: Services) -> ReadinessCheck:
    try:
        return ReadinessCheck(ok=True, detail=services.journal.check_writable())
    except JournalUnavailable as exc:
        return ReadinessCheck(ok=False, detail=str(exc))


@router.post(
    "/api/v1/emails",
    status_code=201,
    tags=["emails"],
    response_model=MailboxResponse,
    responses={
        200: {"model": MailboxResponse, "description": "The user already has the mailbox"},
        **_problems(400, 404, 409, *_AUTH_AND_BODY, *_EXCHANGE),
    },
)
def create_email(
    body: EmailRequest, request: Request, services: ServicesDep, request_id: RequestIdDep
) -> JSONResponse:
    """CREATE_EMAIL: give an existing AD user a mailbox (201), or report the one it has (200)."""
    return _create(body, request, services, request_id)


@router.post(
    "/api/v1/actions",
    status_code=201,
    tags=["actions"],
    response_model=MailboxResponse,
    responses={
        200: {"model": MailboxResponse, "description": "The user already has the mailbox"},
        **_problems(400, 404, 409, 501, *_AUTH_AND_BODY, *_EXCHANGE),
    },
)
def run_action(
    body: ActionRequest, request: Request, services: ServicesDep, request_id: RequestIdDep
) -> JSONResponse:
    """The platform's action envelope; CREATE_EMAIL behaves exactly like POST /api/v1/emails."""
    if body.action not in SUPPORTED_ACTIONS:
        raise ActionNotSupported(
            f"{body.action} is not supported by VezaProvisioner; supported: "
            f"{', '.join(SUPPORTED_ACTIONS)}.",
        )
    try:
        email = EmailRequest.model_validate(body.attributes)
    except ValidationError as exc:
        raise validation_failure(exc.errors(), prefix=("attributes",)) from exc
    return _create(email, request, services, request_id)


def _create(
    body: EmailRequest, request: Request, services: ServicesDep, request_id: str
) -> JSONResponse:
    result = services.provisioner.create_email(body.to_command(), _context(request, request_id))
    response = MailboxResponse.build(result, request_id)
    created = result.status == "created"
    headers = {}
    if created:
        headers["Location"] = request.url_for("read_email", identity=result.guid).path
    return JSONResponse(
        response.model_dump(mode="json"), status_code=201 if created else 200, headers=headers
    )


@router.get(
    "/api/v1/emails/{identity:path}",
    tags=["emails"],
    name="read_email",
    responses=_problems(401, 403, 404, 409, 422, *_EXCHANGE),
)
def read_email(
    identity: Annotated[str, Path(description="The user's AD identity (URL-encoded)")],
    services: ServicesDep,
    request_id: RequestIdDep,
) -> RecipientStateResponse:
    """The user's current mail state; 404 when no AD user matches."""
    try:
        identity = validate_identity(identity)
    except InvalidValue as exc:
        raise validation_failure(
            [{"loc": ("path", "identity"), "msg": exc.message, "type": exc.kind}]
        ) from exc
    return RecipientStateResponse.build(services.provisioner.read_state(identity), request_id)


def _context(request: Request, request_id: str) -> RequestContext:
    """Who asked: the caller the authentication middleware identified, and from where."""
    caller = request.scope["state"].get("caller")
    return RequestContext(
        request_id=request_id,
        caller=caller.name if isinstance(caller, Caller) else "(unauthenticated)",
        caller_method=caller.method if isinstance(caller, Caller) else "none",
        client_address=client_address(request.scope),
    )


@router.get(
    "/api/v1/requests/{request_id}",
    tags=["requests"],
    responses={404: {"description": "No journal record has this request id"}},
)
def read_request(
    request_id: Annotated[str, Path(max_length=128, description="The X-Request-ID of a request")],
    services: ServicesDep,
) -> RequestRecordResponse:
    """The journal record of a request: who asked, what, its state and what Exchange said."""
    record = services.journal.get(request_id)
    if record is None:
        raise NotFound(
            f"No journal record has request id {request_id!r}; records older than "
            f"journal.retention_days ({services.settings.journal.retention_days}) are deleted.",
        )
    return RequestRecordResponse.build(record)


@router.get("/metrics", tags=["metrics"], response_class=Response)
def metrics(services: ServicesDep) -> Response:
    """Prometheus text format."""
    if not services.settings.metrics.enabled:
        raise NotFound("Metrics are disabled (metrics.enabled = false).")
    return Response(services.metrics.exposition(), media_type=CONTENT_TYPE)

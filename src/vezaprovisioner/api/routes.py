"""API v1 routes: health, readiness, CREATE_EMAIL (direct and as a platform action), state look-up.

Routes stay thin: validate, call the provisioning flow, shape the response. Failures are raised
(`vezaprovisioner.failures`) and rendered as problem+json by the app's exception handler.
"""

from __future__ import annotations

from datetime import datetime, timezone
from functools import partial
from typing import Annotated
from urllib.parse import quote

from fastapi import Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..auth import Caller
from ..exchange.backends import wait_for_warm_up
from ..failures import ActionNotSupported, NotFound
from ..journal.idempotency import IdempotencyKeys
from ..journal.records import RequestContext, State
from ..metrics import CONTENT_TYPE
from ..services import Services
from ..validation import InvalidValue, validate_identity
from .access import client_address
from .idempotency import OPENAPI_PARAMETER as IDEMPOTENCY_PARAMETER
from .idempotency import idempotency_key, run_once
from .models import (
    SUPPORTED_ACTIONS,
    ActionRequest,
    CheckSummary,
    EmailRequest,
    HealthResponse,
    MailboxResponse,
    ReadinessResponse,
    ReadinessSummary,
    RecipientStateResponse,
    RequestListResponse,
    RequestRecordResponse,
)
from .openapi import problem_responses
from .readiness import Readiness
from .route_table import RouteTable
from .status_page import render as render_status
from .validation_errors import validation_failure

#: Added to each app under its base path by create_app (route_table.py says why not a router).
routes = RouteTable()


MAX_PAGE = 500
_AUTH_AND_BODY = (401, 403, 413, 415, 422)
_EXCHANGE = (502, 503, 504)


# Plain look-ups, not FastAPI dependencies: each dependency costs FastAPI a round of
# dependency solving per request, for what is one attribute read.
def services_of(request: Request) -> Services:
    """The app's services (create_app puts them on the app's state)."""
    services: Services = request.app.state.services
    return services


def readiness_of(request: Request) -> Readiness:
    """The app's readiness checks (create_app puts them on the app's state)."""
    readiness: Readiness = request.app.state.readiness
    return readiness


def request_id_of(request: Request) -> str:
    """The id RequestContextMiddleware gave this request."""
    return str(request.scope["state"]["request_id"])


@routes.get("/health", tags=["health"], operation_id="health")
async def health() -> HealthResponse:
    """Liveness: the process answers. Touches no backend."""
    return HealthResponse(status="ok", version=__version__)


#: The warm-up's longest wait: below IIS's FastCGI activityTimeout (70 s by default), so IIS never
#: kills a process in its warm-up; hosts still connecting after it go on in the background.
WARM_UP_WAIT_SECONDS = 60.0


@routes.get(
    "/warmup",
    tags=["health"],
    status_code=204,
    response_class=Response,
    responses={204: {"description": "The service is started; nothing else is said"}},
)
def warmup(request: Request) -> Response:
    """IIS Application Initialization's page: warm the service before the first caller.

    IIS requests it when the application pool starts (startMode AlwaysRunning, preloadEnabled),
    anonymously and over plain HTTP, the only way Application Initialization sends it: the
    request itself builds the app in this FastCGI process; the first one waits, at most
    `WARM_UP_WAIT_SECONDS`, until the backend's hosts have connected or failed, and later ones
    answer at once (an anonymous caller cannot hold a process). It reads no input and says
    nothing (204, no body), so it is safe without credentials.
    """
    services = services_of(request)
    state = request.app.state
    if not getattr(state, "warmed_up", False):
        limit = min(services.settings.local.longest_start_seconds, WARM_UP_WAIT_SECONDS)
        wait_for_warm_up(services.exchange, limit)
        state.warmed_up = True
    return Response(status_code=204, headers={"Cache-Control": "no-store"})


@routes.get(
    "/health/ready",
    tags=["health"],
    operation_id="ready",
    response_model=ReadinessSummary,
    responses={503: {"model": ReadinessSummary, "description": "Not ready"}},
)
async def ready(request: Request) -> JSONResponse:
    """Readiness, public: the overall status and whether each check passed, nothing more.

    The details (paths, backend hosts, error text) are for authenticated callers only, at
    `/health/ready/details`. Answered from a run of the checks at most `readiness_cache_seconds`
    old (api/readiness.py says why).
    """
    max_age = services_of(request).settings.readiness_cache_seconds
    checks = await readiness_of(request).checks(max_age)
    ok = all(check.ok for check in checks.values())
    body = ReadinessSummary(
        status="ready" if ok else "not_ready",
        checks={name: CheckSummary(ok=check.ok) for name, check in checks.items()},
    )
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@routes.get(
    "/health/ready/details",
    tags=["health"],
    operation_id="readyDetails",
    response_model=ReadinessResponse,
    responses={503: {"model": ReadinessResponse, "description": "Not ready"}},
)
async def ready_details(request: Request) -> JSONResponse:
    """Readiness with each check's detail: the configuration file, the backend's hosts or
    session, the journal's path and any error text. Authenticated like the API."""
    checks = await readiness_of(request).checks()
    ok = all(check.ok for check in checks.values())
    body = ReadinessResponse(status="ready" if ok else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@routes.post(
    "/api/v1/emails",
    operation_id="createEmail",
    openapi_extra={"parameters": [IDEMPOTENCY_PARAMETER]},
    status_code=201,
    tags=["emails"],
    response_model=MailboxResponse,
    responses={
        200: {"model": MailboxResponse, "description": "The user already has the mailbox"},
        **problem_responses(400, 404, 409, *_AUTH_AND_BODY, *_EXCHANGE),
    },
)
async def create_email(body: EmailRequest, request: Request) -> Response:
    """CREATE_EMAIL: give an existing AD user a mailbox (201), or report the one it has (200)."""
    return await _create(body, request)


@routes.post(
    "/api/v1/actions",
    operation_id="runAction",
    openapi_extra={"parameters": [IDEMPOTENCY_PARAMETER]},
    status_code=201,
    tags=["actions"],
    response_model=MailboxResponse,
    responses={
        200: {"model": MailboxResponse, "description": "The user already has the mailbox"},
        **problem_responses(400, 404, 409, 501, *_AUTH_AND_BODY, *_EXCHANGE),
    },
)
async def run_action(body: ActionRequest, request: Request) -> Response:
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
    return await _create(email, request)


async def _create(body: EmailRequest, request: Request) -> Response:
    services, request_id = services_of(request), request_id_of(request)
    command, context = body.to_command(), _context(request, request_id)

    def run() -> Response:
        result = services.provisioner.create_email(command, context)
        response = MailboxResponse.build(result, request_id)
        created = result.status == "created"
        headers = {}
        if created:
            headers["Location"] = _email_path(request, result.guid)
        # Serialized by pydantic-core straight to JSON (no dict, then json.dumps).
        return Response(
            response.model_dump_json(),
            status_code=201 if created else 200,
            headers=headers,
            media_type="application/json",
        )

    key = idempotency_key(request)
    if key is None:
        return await services.flows.run(run)
    keys = IdempotencyKeys(services.journal)
    return await services.flows.run(
        partial(run_once, keys, context.caller, key, command, request, run)
    )


@routes.get(
    "/api/v1/emails/{identity:path}",
    tags=["emails"],
    name="read_email",
    operation_id="getEmailState",
    responses=problem_responses(401, 403, 404, 409, 422, *_EXCHANGE),
)
async def read_email(
    identity: Annotated[str, Path(description="The user's AD identity (URL-encoded)")],
    request: Request,
) -> RecipientStateResponse:
    """The user's current mail state; 404 when no AD user matches."""
    services, request_id = services_of(request), request_id_of(request)
    try:
        identity = validate_identity(identity)
    except InvalidValue as exc:
        raise validation_failure(
            [{"loc": ("path", "identity"), "msg": exc.message, "type": exc.kind}]
        ) from exc
    state = await services.flows.run(partial(services.provisioner.read_state, identity))
    return RecipientStateResponse.build(state, request_id)


def _email_path(request: Request, guid: str) -> str:
    """The path of `read_email` for this mailbox (the Location of a 201), built directly:
    `request.url_for` walks every route and builds a whole URL for each response."""
    base = request.scope.get("root_path", "") + services_of(request).settings.base_path
    return f"{base}/api/v1/emails/{quote(guid, safe='')}"


def _context(request: Request, request_id: str) -> RequestContext:
    """Who asked: the caller the authentication middleware identified, and from where."""
    caller = request.scope["state"].get("caller")
    return RequestContext(
        request_id=request_id,
        caller=caller.name if isinstance(caller, Caller) else "(unauthenticated)",
        caller_method=caller.method if isinstance(caller, Caller) else "none",
        client_address=client_address(request.scope),
    )


@routes.get(
    "/api/v1/requests",
    tags=["requests"],
    operation_id="listRequests",
    responses=problem_responses(401, 403, 422),
)
def list_requests(
    request: Request,
    since: Annotated[
        datetime | None, Query(description="Received at or after (ISO 8601; no zone: UTC)")
    ] = None,
    until: Annotated[datetime | None, Query(description="Received before (ISO 8601)")] = None,
    state: Annotated[State | None, Query(description="The record's state")] = None,
    code: Annotated[
        str | None, Query(pattern=r"^[A-Z_]{1,64}$", description="The problem code")
    ] = None,
    identity: Annotated[
        str | None,
        Query(min_length=1, max_length=1024, description="The identity as sent, or the GUID"),
    ] = None,
    caller: Annotated[
        str | None, Query(min_length=1, max_length=256, description="Who asked")
    ] = None,
    request_id: Annotated[
        str | None,
        Query(min_length=1, max_length=128, description="An X-Request-ID (may hold '/')"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Records per page")] = 50,
    cursor: Annotated[
        str | None,
        Query(pattern=r"^[0-9]{1,19}$", description="next_cursor of the previous page"),
    ] = None,
) -> RequestListResponse:
    """Journal records, newest first, one page at a time; follow `next_cursor` for more."""
    records = services_of(request).journal.page(
        since=_epoch(since),
        until=_epoch(until),
        state=state,
        code=code,
        identity=identity,
        caller=caller,
        request_id=request_id,
        before_id=int(cursor) if cursor else None,
        limit=limit + 1,  # one more tells whether there is a next page
    )
    more = len(records) > limit
    records = records[:limit]
    return RequestListResponse(
        items=[RequestRecordResponse.build(record) for record in records],
        next_cursor=str(records[-1].id) if more else None,
    )


def _epoch(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


@routes.get(
    "/api/v1/requests/{request_id:path}",
    tags=["requests"],
    operation_id="getRequest",
    responses=problem_responses(401, 403, 404, 422),
)
def read_request(
    request_id: Annotated[
        str,
        Path(
            min_length=1,
            max_length=128,
            description="The X-Request-ID of a request; one holding '/' may be sent as is or "
            "percent-encoded, or use GET /api/v1/requests?request_id=",
        ),
    ],
    request: Request,
) -> RequestRecordResponse:
    """The journal record of a request: who asked, what, its state and what Exchange said."""
    services = services_of(request)
    record = services.journal.get(request_id)
    if record is None:
        raise NotFound(
            f"No journal record has request id {request_id!r}; records older than "
            f"journal.retention_days ({services.settings.journal.retention_days}) are deleted.",
        )
    return RequestRecordResponse.build(record)


@routes.get("/status", include_in_schema=False, response_class=HTMLResponse)
async def status_page(request: Request) -> HTMLResponse:
    """The admin's page: readiness, backend, the last 24 hours and the last requests."""
    checks = await readiness_of(request).checks()
    html = await run_in_threadpool(render_status, services_of(request), checks)
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


@routes.get(
    "/metrics",
    tags=["metrics"],
    operation_id="metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}},
        **problem_responses(401, 403, 404),
    },
)
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    services = services_of(request)
    if not services.settings.metrics.enabled:
        raise NotFound("Metrics are disabled (metrics.enabled = false).")
    return Response(services.metrics.exposition(), media_type=CONTENT_TYPE)

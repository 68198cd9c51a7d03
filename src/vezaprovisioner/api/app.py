"""The app factory: `create_app(settings)` builds a complete, independent FastAPI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .. import __version__, logs
from ..auth import REALM
from ..clock import Clock
from ..config import Settings
from ..exchange.port import ExchangePort
from ..failures import (
    INTERNAL_DETAIL,
    BadRequest,
    Failure,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from ..services import Services, build_services
from ..validation import visible
from .access import AccessLogMiddleware
from .middleware import AuthenticationMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from .openapi import DOCS_ASSETS, add_docs_routes, install_openapi
from .problems import problem_for_request
from .readiness import readiness_for
from .routes import routes
from .validation_errors import validation_failure


def create_app(
    settings: Settings, *, exchange: ExchangePort | None = None, clock: Clock | None = None
) -> FastAPI:
    """An app serving every route under `settings.base_path`; tests may inject port and clock."""
    # The process's one logging setup, before build_services: the local pool logs as its hosts
    # start.
    logs.configure_logging(settings)
    return create_app_from_services(build_services(settings, exchange=exchange, clock=clock))


def create_app_from_services(services: Services) -> FastAPI:
    base = services.settings.base_path

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        services.close()  # e.g. stops the local backend's PowerShell hosts
        logs.shutdown()  # writes what is queued, then ends the writer thread

    app = FastAPI(
        lifespan=lifespan,
        title="VezaProvisioner",
        version=__version__,
        summary="Gives existing Active Directory users an Exchange mailbox (CREATE_EMAIL).",
        openapi_url=f"{base}/openapi.json",
        docs_url=None,  # served by add_docs_routes from packaged files, not from a CDN
        redoc_url=None,
    )
    app.state.services = services
    app.state.readiness = readiness_for(services)
    # On the app's own router, not included (route_table.py says why).
    routes.add_to(app.router, prefix=base)
    add_docs_routes(app.router, app.title, f"{base}/openapi.json", f"{base}/docs", f"{base}/redoc")

    public_paths = ["/health", "/health/ready", "/warmup", "/docs", "/redoc", "/openapi.json"]
    public_paths += [f"/docs/assets/{name}" for name in DOCS_ASSETS]
    if not services.settings.metrics.require_auth:
        public_paths.append("/metrics")
    public = frozenset(f"{base}{path}" for path in public_paths)
    install_openapi(app, public)
    basic_realm = REALM if services.settings.auth.mode == "basic" else None
    # Added innermost first: the access log wraps the request context, which wraps
    # authentication, which wraps body limits.
    app.add_middleware(BodyLimitMiddleware, routes=app.router.routes)
    app.add_middleware(
        AuthenticationMiddleware,
        authenticator=services.authenticator,
        public_paths=public,
        basic_realm=basic_realm,
    )
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(AccessLogMiddleware, metrics=services.metrics, base_path=base)
    services.maintenance.start()

    async def send_failure(request: Request, exc: Exception) -> Response:
        return problem_for_request(exc, request.scope)

    async def send_validation_failure(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return problem_for_request(validation_failure(exc.errors()), request.scope)

    async def send_http_failure(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        failure = http_failure(exc, request.method, request.url.path, base)
        return problem_for_request(failure, request.scope)

    app.add_exception_handler(Failure, send_failure)
    app.add_exception_handler(RequestValidationError, send_validation_failure)
    app.add_exception_handler(StarletteHTTPException, send_http_failure)
    return app


def http_failure(exc: StarletteHTTPException, method: str, path: str, base: str) -> Failure:
    """The failure for an HTTP error Starlette or FastAPI raised: each status its own failure.

    404 only when no route has this path; 405 keeps the route's Allow header; a body FastAPI
    could not parse (not UTF-8, JSON nested too deep) is 400.
    """
    status = exc.status_code
    if status == 404:
        return NotFound(f"There is nothing at {visible(path)}; see {base}/docs.")
    if status == 405:
        allowed = [m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()]
        return MethodNotAllowed(
            f"{method} is not allowed here; use {', '.join(allowed) or 'another method'}.",
            allowed=allowed,
        )
    if status == 413:
        return PayloadTooLarge(f"The request body is too large ({exc.detail}).")
    if status == 415:
        return UnsupportedMediaType(
            "Send the body as JSON with the header Content-Type: application/json."
        )
    if status == 422:
        return ValidationFailed([{"field": "body", "message": str(exc.detail), "type": "http"}])
    if status >= 500:
        return Failure(INTERNAL_DETAIL)
    return BadRequest(
        f"The request cannot be read ({exc.detail}); send the body as UTF-8 JSON, e.g. "
        '{"identity": "CONTOSO\\jdoe"}.'
    )

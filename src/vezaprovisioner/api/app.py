"""The app factory: `create_app(settings)` builds a complete, independent FastAPI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .. import __version__
from ..auth import REALM
from ..clock import Clock
from ..config import Settings
from ..exchange.errors import ExchangeError
from ..exchange.port import ExchangePort
from ..journal.claims import IdentityBusy
from ..journal.records import JournalUnavailable
from ..logs import configure_logging
from ..provisioning import ProvisioningError
from ..services import Services, build_services
from .access import AccessLogMiddleware
from .middleware import (
    AuthenticationMiddleware,
    BodyLimitMiddleware,
    RequestContextMiddleware,
    request_id_of,
)
from .openapi import DOCS_ASSETS, docs_router, install_openapi
from .problems import METHOD_NOT_ALLOWED, NOT_FOUND, Problem, problem_for
from .routes import router
from .validation_errors import validation_problem


def create_app(
    settings: Settings, *, exchange: ExchangePort | None = None, clock: Clock | None = None
) -> FastAPI:
    """An app serving every route under `settings.base_path`; tests may inject port and clock."""
    configure_logging(settings)  # before build_services: the local pool logs as its hosts start
    return create_app_from_services(build_services(settings, exchange=exchange, clock=clock))


def create_app_from_services(services: Services) -> FastAPI:
    base = services.settings.base_path

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        services.close()  # e.g. stops the local backend's PowerShell hosts

    app = FastAPI(
        lifespan=lifespan,
        title="VezaProvisioner",
        version=__version__,
        summary="Gives existing Active Directory users an Exchange mailbox (CREATE_EMAIL).",
        openapi_url=f"{base}/openapi.json",
        docs_url=None,  # served by docs_router from packaged files, not from a CDN
        redoc_url=None,
    )
    app.state.services = services
    app.include_router(router, prefix=base)
    app.include_router(
        docs_router(app.title, f"{base}/openapi.json", f"{base}/docs", f"{base}/redoc")
    )

    public_paths = ["/health", "/health/ready", "/docs", "/redoc", "/openapi.json"]
    public_paths += [f"/docs/assets/{name}" for name in DOCS_ASSETS]
    if not services.settings.metrics.require_auth:
        public_paths.append("/metrics")
    public = frozenset(f"{base}{path}" for path in public_paths)
    install_openapi(app, public)
    basic_realm = REALM if services.settings.auth.mode == "basic" else None
    # Added innermost first: the access log wraps the request context, which wraps
    # authentication, which wraps body limits.
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(
        AuthenticationMiddleware,
        authenticator=services.authenticator,
        public_paths=public,
        basic_realm=basic_realm,
    )
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(AccessLogMiddleware, metrics=services.metrics, base_path=base)
    configure_logging(services.settings)
    services.start_maintenance()

    async def send_problem(request: Request, exc: Exception) -> Response:
        return problem_for(exc).response(request_id_of(request.scope))

    async def send_validation_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_problem(exc.errors()).response(request_id_of(request.scope))

    async def send_http_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 405:
            problem = Problem(METHOD_NOT_ALLOWED, f"{request.method} is not allowed here.")
        else:
            problem = Problem(
                NOT_FOUND, f"There is nothing at {request.url.path}; see {base}/docs."
            )
        return problem.response(request_id_of(request.scope))

    for handled in (Problem, ExchangeError, ProvisioningError, JournalUnavailable, IdentityBusy):
        app.add_exception_handler(handled, send_problem)
    app.add_exception_handler(RequestValidationError, send_validation_problem)
    app.add_exception_handler(StarletteHTTPException, send_http_problem)
    return app

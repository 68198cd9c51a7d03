"""The OpenAPI document a client can generate from, and the offline docs pages that show it.

FastAPI writes the paths and schemas from the routes and models; `openapi_document()` adds what
it cannot know: HTTP Basic as the security scheme of every protected operation, the problem
schema (with its `code` enum) as the only body of every error, and the response headers this
service always or sometimes sends (X-Request-ID, Location, Retry-After, WWW-Authenticate).

Swagger UI and ReDoc are served from the files the `fastapi-offline` package ships, so /docs
works on an Exchange server without internet access.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse

from ..failures import failure_classes
from .models import ProblemDocument

SECURITY_SCHEME = "basicAuth"
PROBLEM_SCHEMA = "Problem"
_PROBLEM_REF = f"#/components/schemas/{PROBLEM_SCHEMA}"
_ASSETS = Path(fastapi_offline.__file__).parent / "static"
#: The files /docs and /redoc load, all from the package (nothing from a CDN).
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
_MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}

_REQUEST_ID_HEADER = {
    "description": "The request id: the caller's X-Request-ID when it was sane, else a new UUID.",
    "schema": {"type": "string", "maxLength": 128},
}
_RETRY_AFTER_HEADER = {
    "description": "Seconds to wait before retrying.",
    "schema": {"type": "integer", "minimum": 0},
}
_LOCATION_HEADER = {
    "description": "The created mailbox's state: GET it for the user's current mail attributes.",
    "schema": {"type": "string", "format": "uri-reference"},
}
_REPLAYED_HEADER = {
    "description": "true when this is the stored answer to an earlier request with the same "
    "Idempotency-Key (Exchange was not called).",
    "schema": {"type": "string", "enum": ["true"]},
}
_WWW_AUTHENTICATE_HEADER = {
    "description": "The Basic challenge (auth.mode = basic).",
    "schema": {"type": "string"},
}


def problem_codes() -> list[str]:
    """Every `code` a problem can carry: the codes of the failure tree."""
    return sorted({cls.code for cls in failure_classes()})


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entries of a route for the problem+json answers it can give."""
    classes = failure_classes()
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        codes = sorted({cls.code for cls in classes if cls.status == status})
        responses[status] = {
            "description": f"Problem (RFC 9457); code: {', '.join(codes) or 'see code'}",
            "content": {"application/problem+json": {"schema": {"$ref": _PROBLEM_REF}}},
        }
    return responses


def _problem_schema(codes: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The problem document's schema and the schemas it refers to, `code` as an enum."""
    schema = ProblemDocument.model_json_schema(ref_template="#/components/schemas/{model}")
    nested: dict[str, dict[str, Any]] = schema.pop("$defs", {})
    schema["title"] = PROBLEM_SCHEMA
    schema["properties"]["code"]["enum"] = sorted(codes)
    return {PROBLEM_SCHEMA: schema, **nested}


def _headers_for(status: str, response: dict[str, Any]) -> dict[str, Any]:
    headers: dict[str, Any] = {"X-Request-ID": _REQUEST_ID_HEADER}
    if status == "201":
        headers["Location"] = _LOCATION_HEADER
    if status == "503":
        headers["Retry-After"] = _RETRY_AFTER_HEADER
    if status == "401":
        headers["WWW-Authenticate"] = _WWW_AUTHENTICATE_HEADER
    return {**headers, **response.get("headers", {})}


def openapi_document(app: FastAPI, public_paths: frozenset[str]) -> dict[str, Any]:
    """The complete document: FastAPI's, plus security, problem schema and headers."""
    document = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(_problem_schema(problem_codes()))
    # FastAPI's own 422 shapes are never sent: every route declares its 422 as a problem.
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    components["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "basic",
            "description": "HTTP Basic: checked by this service (auth.mode = basic) or by IIS.",
        }
    }
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            if path not in public_paths:
                operation["security"] = [{SECURITY_SCHEME: []}]
            idempotent = any(
                parameter.get("name") == "Idempotency-Key"
                for parameter in operation.get("parameters", [])
            )
            for status, response in operation.get("responses", {}).items():
                response["headers"] = _headers_for(status, response)
                if idempotent and status != "503":
                    response["headers"]["Idempotent-Replayed"] = _REPLAYED_HEADER
    return document


def install_openapi(app: FastAPI, public_paths: frozenset[str]) -> None:
    """Replace FastAPI's generator with `openapi_document()` (built once, then cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app, public_paths)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_docs_routes(
    router: APIRouter, title: str, openapi_url: str, docs_url: str, redoc_url: str
) -> None:
    """/docs (Swagger UI), /redoc (ReDoc) and their assets, served from the installed package,
    added to `router` (the app's own: see route_table.py)."""
    assets = f"{docs_url}/assets"

    @router.get(docs_url, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
        )

    @router.get(redoc_url, include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=f"{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/favicon.png",
            with_google_fonts=False,
        )

    for name in DOCS_ASSETS:
        router.add_api_route(
            f"{assets}/{name}", _asset(name), methods=["GET"], include_in_schema=False
        )


def _asset(name: str) -> Any:
    path = _ASSETS / name
    media_type = _MEDIA_TYPES[path.suffix]

    def serve() -> FileResponse:
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "max-age=86400"})

    return serve

"""What runs around every route, outermost first: request id and last-resort errors,
authentication, then body limits.

Pure ASGI middleware (no BaseHTTPMiddleware), so the request id reaches every response, including
the problem responses the middleware sends itself, and authentication happens before the body is
even read.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..auth import AuthenticationError, Authenticator
from ..failures import Failure, PayloadTooLarge, UnsupportedMediaType
from ..logs import REQUEST_ID
from .access import client_address
from .problems import problem_for_request

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


class RequestContextMiddleware:
    """Assigns the request id, echoes it on every response, and turns crashes into problems."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        incoming = headers.get(REQUEST_ID_HEADER, "")
        request_id = incoming if _SANE_REQUEST_ID.fullmatch(incoming) else str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        # Every line logged while this request is served carries its id (logs.py).
        token = REQUEST_ID.set(request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if started:
                raise
            failure = Failure("An internal error occurred; the log has details.")
            await problem_for_request(failure, scope)(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class AuthenticationMiddleware:
    """Fails closed: every path except the public ones needs an authenticated caller."""

    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator,
        public_paths: frozenset[str],
        basic_realm: str | None,
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.public_paths = public_paths
        self.basic_realm = basic_realm

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        try:
            caller = await self.authenticator.authenticate(
                scope, Headers(scope=scope).getlist("authorization"), client_address(scope)
            )
        except AuthenticationError as exc:
            response = problem_for_request(exc, scope, basic_realm=self.basic_realm)
            await response(scope, receive, send)
            return
        scope["state"]["caller"] = caller
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Accepts only JSON bodies of at most `max_body_bytes`, refused before any route runs.

    Only requests a route takes (path and method) are checked: anything else goes on to the
    router untouched, which answers 404 or 405 (a PUT to a GET route is 405, not 415). Of the
    app's `routes` only those with a body method are kept (the stack is built at the first
    request, when every route exists), and a request is matched against their path patterns.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[BaseRoute] = (),
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.routes = [
            (route.path_regex, route.methods)
            for route in routes
            if isinstance(route, Route) and route.methods and route.methods & _BODY_METHODS
        ]
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _BODY_METHODS
            or not self._routed(scope)
        ):
            await self.app(scope, receive, send)
            return
        failure, receive = await self._read_body(Headers(scope=scope), receive)
        if failure is not None:
            await problem_for_request(failure, scope)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _routed(self, scope: Scope) -> bool:
        """Whether a route takes this path with this method."""
        path, method = scope["path"], scope["method"]
        return any(method in methods and regex.match(path) for regex, methods in self.routes)

    async def _read_body(
        self, headers: Headers, receive: Receive
    ) -> tuple[Failure | None, Receive]:
        """Reads the (small) body up front, so a too-large one never reaches a route."""
        if not _is_json(headers.get("content-type", "")):
            return UnsupportedMediaType(
                "Send the body as JSON with the header Content-Type: application/json."
            ), receive
        too_large = PayloadTooLarge(
            f"The request body must be at most {self.max_body_bytes} bytes."
        )
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return too_large, receive
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return too_large, receive
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay

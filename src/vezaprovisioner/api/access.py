"""The outermost middleware: one structured log line and the metrics for every HTTP request.

It sits outside the request-context middleware, so it sees the final status (a crash already
turned into a 500 problem) and reads the request id, caller, matched route and the code of the
failure it was answered with (left by `problems.problem_for_request`) from the scope after the
app ran.
"""

from __future__ import annotations

import logging
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..auth import Caller
from ..iis import iis_server_variables
from ..logs import event
from ..metrics import Metrics
from .problems import FAILURE_CODE_STATE

log = logging.getLogger("vezaprovisioner.access")


#: Metric labels come only from closed sets, whatever a caller sends: the route's template or
#: this, a method of this list or "other", a status code, a failure code or "other".
UNMATCHED_ROUTE = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"
_FAILURE_CODE = re.compile(r"[A-Z][A-Z_]{0,63}")


def _route_of(scope: Scope, base_path: str) -> str:
    """The matched route's template (bounded label values), not the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED_ROUTE
    # FastAPI versions differ on whether an included router's routes carry the prefix.
    return path if path.startswith(base_path + "/") else base_path + path


def metric_labels(route: str, method: str, status: int, code: str | None) -> tuple[str, ...]:
    """The labels of `vezaprovisioner_requests_total`, each from a closed set."""
    return (
        route,
        method if method in METHODS else OTHER,
        str(status) if 100 <= status <= 599 else OTHER,
        (code if _FAILURE_CODE.fullmatch(code) else OTHER) if code else "",
    )


def client_address(scope: Scope) -> str | None:
    """Where the request came from: IIS's REMOTE_ADDR under IIS, else the socket peer."""
    variables = iis_server_variables(scope)
    if variables is not None and variables.remote_addr:
        return variables.remote_addr
    client = scope.get("client")
    return str(client[0]) if client else None


class AccessLogMiddleware:
    """Logs `request finished` with request id, caller, route, status, code and duration
    (README, Logs: the field names)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, base_path: str) -> None:
        self.app = app
        self.metrics = metrics
        self.base_path = base_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            self._finished(scope, status, time.perf_counter() - started)

    def _finished(self, scope: Scope, status: int, seconds: float) -> None:
        state = scope.get("state", {})
        code = state.get(FAILURE_CODE_STATE)
        caller = state.get("caller")
        route = _route_of(scope, self.base_path)
        self.metrics.requests_by(*metric_labels(route, scope["method"], status, code)).inc()
        self.metrics.request_seconds_by(route).observe(seconds)
        event(
            log,
            "request finished",
            {
                "event.action": "request",
                "http.request.id": state.get("request_id"),
                "user.name": caller.name if isinstance(caller, Caller) else None,
                "http.request.method": scope["method"],
                "http.route": route,
                "url.path": scope["path"],
                "http.response.status_code": status,
                "vezaprovisioner.code": code,
                "event.duration": round(seconds * 1e9),
                "client.address": client_address(scope),
            },
            logging.WARNING if status >= 500 else logging.INFO,
        )

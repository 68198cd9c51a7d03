"""Routes declared once, with FastAPI's decorators, and added to each app under its base path.

`APIRouter.include_router` in FastAPI 0.165 keeps an included router as one entry that every
request walks through: a version check over the included routers and a second layer of route
matching, about 0.45M instructions per request under callgrind, more than a bare FastAPI
endpoint's whole request (0.78M). The base path is the app's setting, so the API's routes cannot
be declared with it at import; a `RouteTable` records what each decorator was given and
`add_to(router, prefix)` adds the routes to the app's own router through FastAPI's public
`add_api_route`, with exactly those arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter

_F = TypeVar("_F", bound=Callable[..., Any])


class RouteTable:
    """`@table.get(path, ...)` / `@table.post(path, ...)`, as on an APIRouter."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []

    def get(self, path: str, **options: Any) -> Callable[[_F], _F]:
        return self._route(path, ["GET"], options)

    def post(self, path: str, **options: Any) -> Callable[[_F], _F]:
        return self._route(path, ["POST"], options)

    def _route(self, path: str, methods: list[str], options: dict[str, Any]) -> Callable[[_F], _F]:
        def record(endpoint: _F) -> _F:
            self._routes.append((path, endpoint, {**options, "methods": methods}))
            return endpoint

        return record

    def add_to(self, router: APIRouter, prefix: str = "") -> None:
        """Adds every route to `router` (the app's own), each path behind `prefix`."""
        for path, endpoint, options in self._routes:
            router.add_api_route(prefix + path, endpoint, **options)

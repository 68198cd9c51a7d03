"""The WSGI entry IIS runs through wfastcgi: `application`, the service's only module-level app.

web.config names it in WSGI_HANDLER. wfastcgi copies web.config's appSettings into the
environment before the first request, so VEZAPROVISIONER_CONFIG names the configuration file.
a2wsgi serves the ASGI app and hands the whole environ (IIS's server variables included) to it as
`scope["wsgi_environ"]`; it runs no lifespan events, so the app and its Exchange backend are built
on the first request, once per process. A start that fails is answered with a problem and tried
again on the next request. Logs go to the daily file under `data_dir/logs` (`config.for_iis`),
because wfastcgi replaces stdout and stderr with a fresh buffer for every request; logs.py holds
the one logging setup.

Shutdown: once started, the entry registers its `close` with wfastcgi's `on_exit`. wfastcgi then
waits on IIS's shutdown event (`_FCGI_SHUTDOWN_EVENT_`, signalled `signalBeforeTerminateSeconds`
before IIS terminates the process) and runs it, then ends the process; it also runs it when IIS
closes the pipe. `close` closes the services: every warm PowerShell host gets its grace period to
remove its Exchange session. IIS runs `python.exe wfastcgi.py`, so wfastcgi is the `__main__`
module, not an importable `wfastcgi` (importing it would run a second copy whose exit tasks
nobody runs).
"""

from __future__ import annotations

import http
import logging
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from a2wsgi import ASGIMiddleware
from fastapi import FastAPI

from . import logs
from .api.app import create_app
from .api.middleware import REQUEST_ID_HEADER
from .api.problems import problem_response
from .config import Settings, for_iis, load_settings
from .failures import ServiceNotStarted
from .services import Services

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)

#: Where a start that failed before the configuration was read is logged, in the app pool
#: account's temporary folder (there is no data_dir yet).
START_LOG_NAME = "vezaprovisioner-start.log"
#: How long a2wsgi waits for a request's ASGI task after the response has been sent.
_ASGI_WAIT_SECONDS = 5.0


def routed_environ(environ: Mapping[str, Any], base_path: str) -> dict[str, Any]:
    """The environ with SCRIPT_NAME blank and the request's full path in PATH_INFO.

    wfastcgi blanks SCRIPT_NAME and passes the full path; other WSGI servers split it at the
    application's root. The app's routes include `base_path`, so both become the full path, with
    the prefix spelled as configured (IIS matched it case-insensitively). wfastcgi lets a request
    header, X-Original-URL, replace PATH_INFO; this deployment uses no URL Rewrite, so the path
    IIS itself routed (its URL variable) wins over that header.
    """
    routed = dict(environ)
    if "HTTP_X_ORIGINAL_URL" in environ and environ.get("URL"):
        path = str(environ["URL"])
    else:
        path = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
    prefix = path[: len(base_path)]
    if prefix.lower() == base_path.lower() and path[len(base_path) :][:1] in ("", "/"):
        path = base_path + path[len(base_path) :]
    routed["SCRIPT_NAME"] = ""
    routed["PATH_INFO"] = path
    return routed


def running_wfastcgi() -> ModuleType | None:
    """The wfastcgi module serving this process, or None (uvicorn, the CLI, tests).

    IIS runs `python.exe ...\\wfastcgi.py`: wfastcgi is `__main__`. Its `wfastcgi` console
    script imports it as `wfastcgi`. Recognised by its functions, never imported here.
    """
    for name in ("__main__", "wfastcgi"):
        module = sys.modules.get(name)
        if module is not None and all(
            callable(getattr(module, attribute, None))
            for attribute in ("on_exit", "run_exit_tasks", "read_fastcgi_record")
        ):
            return module
    return None


@dataclass(frozen=True)
class _Started:
    settings: Settings
    serve: Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]
    services: Services | None


class IisApplication:
    """A WSGI callable that builds the service on its first request, once per process."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        build: Callable[[Settings], FastAPI] = create_app,
        start_log: Path | None = None,
    ) -> None:
        # None: read os.environ at the first request, after wfastcgi has applied the appSettings.
        self._environ = environ
        self._build = build
        self._start_log = start_log
        self._lock = threading.Lock()
        self._started: _Started | None = None
        self._middleware: ASGIMiddleware | None = None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            started = self._start()
        except Exception:
            return self._not_started(start_response)
        return started.serve(routed_environ(environ, started.settings.base_path), start_response)

    def close(self) -> None:
        """Close the services (every warm host removes its Exchange session), then stop a2wsgi's
        event loop thread. wfastcgi runs it at IIS's shutdown event or when the pipe closes."""
        with self._lock:
            started, self._started = self._started, None
            middleware, self._middleware = self._middleware, None
        if started is not None and started.services is not None:
            log.info("VezaProvisioner stopping: closing the Exchange backend")
            started.services.close()
        if middleware is not None:
            middleware.loop.call_soon_threadsafe(middleware.loop.stop)

    def _start(self) -> _Started:
        started = self._started
        if started is not None:
            return started
        with self._lock:
            if self._started is None:
                settings = for_iis(load_settings(None, self._environ))
                app = self._build(settings)  # create_app configures logging (logs.py)
                services = getattr(app.state, "services", None)
                # a2wsgi starts its event loop thread here, on the first request, not at import.
                middleware = ASGIMiddleware(cast(Any, app), wait_time=_ASGI_WAIT_SECONDS)
                self._middleware = middleware
                self._started = _Started(
                    settings,
                    cast(Any, middleware),
                    services if isinstance(services, Services) else None,
                )
                wfastcgi = running_wfastcgi()
                if wfastcgi is not None:
                    wfastcgi.on_exit(self.close)
                log.info(
                    "VezaProvisioner started under IIS: %s backend, base path %s, config %s, "
                    "logs: %s",
                    settings.backend,
                    settings.base_path,
                    settings.source,
                    logs.status().detail,
                )
            return self._started

    def _not_started(self, start_response: StartResponse) -> Iterable[bytes]:
        """Log why the start failed (to a file: stderr goes nowhere) and answer 503."""
        request_id = str(uuid.uuid4())
        self._log_start_failure(request_id)
        failure = ServiceNotStarted(
            "VezaProvisioner could not start on this server. The administrator finds the reason "
            "in its start log (deploy/iis/README.md, Troubleshooting); `vezaprovisioner doctor` "
            "checks the installation."
        )
        response = problem_response(failure, request_id)
        status = http.HTTPStatus(response.status_code)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers]
        start_response(
            f"{status.value} {status.phrase}", [*headers, (REQUEST_ID_HEADER, request_id)]
        )
        return [bytes(response.body)]

    def _log_start_failure(self, request_id: str) -> None:
        handler: logging.Handler | None = None
        path = self._start_log or Path(tempfile.gettempdir()) / START_LOG_NAME
        try:
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError:
            handler = None  # nowhere to write; the 503 still tells the caller
        if handler is not None:
            handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(message)s"))
            log.addHandler(handler)
        try:
            log.exception("VezaProvisioner could not start (request %s)", request_id)
        finally:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()


#: Server variables whose values are secrets: shown as "***" by `server_variables`.
_SECRET_VARIABLES = frozenset({"AUTH_PASSWORD", "HTTP_AUTHORIZATION", "HTTP_COOKIE"})


def server_variables(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """A diagnostic WSGI handler: lists the variables IIS passed, secrets masked.

    To see them once on the server, set web.config's WSGI_HANDLER to
    `vezaprovisioner.iis_entry.server_variables`, request any URL of the application, and set it
    back (deploy/iis/README.md, Troubleshooting).
    """
    lines = [
        f"{name}={'***' if name in _SECRET_VARIABLES else value}"
        for name, value in sorted(environ.items())
        if isinstance(value, str)
    ]
    body = ("\n".join(lines) + "\n").encode("utf-8", "replace")
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [body]


#: What web.config's WSGI_HANDLER names. Building nothing at import: the first request starts it.
application = IisApplication()

"""The WSGI entry IIS runs, called the way wfastcgi calls it, with IIS's own server variables.

Each environ below is what wfastcgi hands to WSGI_HANDLER: IIS's FastCGI parameters as they are
(REMOTE_USER / AUTH_USER / LOGON_USER, AUTH_TYPE, AUTH_PASSWORD, HTTPS, SERVER_PORT_SECURE,
APPL_PHYSICAL_PATH, URL, HTTP_* request headers), SCRIPT_NAME blanked and the full path in
PATH_INFO (or the split form other WSGI servers use), wsgi.url_scheme from HTTPS.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import TEST_DIRECTORY
from vezaprovisioner.api.app import create_app
from vezaprovisioner.config import Settings
from vezaprovisioner.iis_entry import (
    DailyFileHandler,
    IisApplication,
    log_to_daily_file,
    routed_environ,
    server_variables,
)

BASE = "/VezaProvisioner"
EMAILS = f"{BASE}/api/v1/emails"
IIS_PASSWORD = "Sup3r-secret-IIS-password"
SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    exc_info: Any = None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Request:
    """One request as IIS + wfastcgi present it to the WSGI callable."""

    method: str
    path: str
    user: str | None = "CONTOSO\\svc-veza"
    https: bool = True
    split_script_name: bool = False  # SCRIPT_NAME=/VezaProvisioner, PATH_INFO=the rest
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, Any]:
        path, _, query = self.path.partition("?")
        script_name, path_info = ("", path)
        if self.split_script_name and path.lower().startswith(BASE.lower()):
            script_name, path_info = path[: len(BASE)], path[len(BASE) :]
        user = self.user or ""
        environ: dict[str, Any] = {
            "REQUEST_METHOD": self.method,
            "SCRIPT_NAME": script_name,
            "PATH_INFO": path_info,
            "URL": path,
            "QUERY_STRING": query,
            "SERVER_NAME": "ex01.contoso.com",
            "SERVER_PORT": "443" if self.https else "80",
            "SERVER_PORT_SECURE": "1" if self.https else "0",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "SERVER_SOFTWARE": "Microsoft-IIS/10.0",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "HTTPS": "on" if self.https else "off",
            "REMOTE_ADDR": "10.0.0.5",
            "REMOTE_HOST": "10.0.0.5",
            "REMOTE_PORT": "50123",
            "LOCAL_ADDR": "10.0.0.10",
            "INSTANCE_ID": "1",
            "APPL_MD_PATH": "/LM/W3SVC/1/ROOT/VezaProvisioner",
            "APPL_PHYSICAL_PATH": "C:\\VezaProvisioner\\app\\",
            # IIS sends these empty when Anonymous authentication let the request in.
            "AUTH_TYPE": "Basic" if user else "",
            "AUTH_USER": user,
            "REMOTE_USER": user,
            "LOGON_USER": user,
            "AUTH_PASSWORD": IIS_PASSWORD if user else "",
            "HTTP_HOST": "ex01.contoso.com",
            "HTTP_USER_AGENT": "Veza/1.0",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if self.https else "http",
            "wsgi.input": io.BytesIO(self.body),
            "wsgi.errors": io.StringIO(),
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        if user:
            token = base64.b64encode(f"{user}:{IIS_PASSWORD}".encode()).decode()
            environ["HTTP_AUTHORIZATION"] = f"Basic {token}"
        if self.body:
            environ["CONTENT_TYPE"] = "application/json"
            environ["CONTENT_LENGTH"] = str(len(self.body))
        for name, value in self.headers.items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        return environ


def call(app: IisApplication, request: Request, environ: dict[str, Any] | None = None) -> Reply:
    """Run the WSGI callable like wfastcgi: start_response, iterate, close."""
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured.update(status=int(status.split()[0]), headers=headers, exc_info=exc_info)
        return lambda data: None

    result = app(environ or request.environ(), start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    headers = {name.lower(): value for name, value in captured["headers"]}
    return Reply(captured["status"], headers, body, captured["exc_info"])


def post(path: str, payload: dict[str, Any], **kwargs: Any) -> Request:
    return Request("POST", path, body=json.dumps(payload).encode(), **kwargs)


def write_config(tmp_path: Path, **auth: Any) -> Path:
    config = tmp_path / "vezaprovisioner.toml"
    lines = [
        'backend = "simulated"',
        "not_found_retry_seconds = 0",
        f"data_dir = {json.dumps(str(tmp_path / 'data'))}",
        "[simulated]",
        f"directory = {json.dumps(str(TEST_DIRECTORY))}",
        "[auth]",
        'mode = "iis"',
        *(f"{key} = {json.dumps(value)}" for key, value in auth.items()),
    ]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


@pytest.fixture(autouse=True)
def _detach_file_logging() -> Iterator[None]:
    """log_to_daily_file() adds a handler to the root logger; take it off after each test."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, DailyFileHandler)]:
        root.removeHandler(handler)
        handler.close()


@pytest.fixture
def make_iis(tmp_path: Path) -> Iterator[Callable[..., IisApplication]]:
    """An IisApplication over a config file in tmp_path, as web.config's appSetting names it."""
    apps: list[IisApplication] = []

    def make(**auth: Any) -> IisApplication:
        environ = {"VEZAPROVISIONER_CONFIG": str(write_config(tmp_path, **auth))}
        app = IisApplication(environ, start_log=tmp_path / "start.log")
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


# --- routing: both SCRIPT_NAME styles ------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["wfastcgi-full-path-info", "split"])
def test_routes_work_with_either_script_name_style(
    make_iis: Callable[..., IisApplication], split: bool
) -> None:
    app = make_iis()
    health = call(app, Request("GET", f"{BASE}/health", split_script_name=split))
    assert health.status == 200
    assert health.json()["status"] == "ok"
    created = call(app, post(EMAILS, {"identity": "plain"}, split_script_name=split))
    assert created.status == 201, created.body
    assert created.headers["location"] == f"{EMAILS}/{created.json()['guid']}"
    again = call(app, post(EMAILS, {"identity": "plain"}, split_script_name=split))
    assert again.status == 200
    assert again.json()["status"] == "already_exists"
    state = call(app, Request("GET", f"{EMAILS}/plain@contoso.com", split_script_name=split))
    assert state.status == 200
    assert state.json()["has_mailbox"] is True


def test_the_base_path_matches_case_insensitively_like_iis(
    make_iis: Callable[..., IisApplication],
) -> None:
    app = make_iis()
    assert call(app, Request("GET", "/vezaprovisioner/health")).status == 200
    assert (
        call(app, Request("GET", "/VEZAPROVISIONER/health", split_script_name=True)).status == 200
    )
    missing = call(app, Request("GET", f"{BASE}/nothing-here"))
    assert missing.status == 404
    assert missing.headers["content-type"] == "application/problem+json"


def test_non_ascii_paths_arrive_as_wfastcgi_decodes_them(
    make_iis: Callable[..., IisApplication],
) -> None:
    """wfastcgi decodes FastCGI parameters as latin-1; IIS sent the path's UTF-8 bytes."""
    app = make_iis()
    name = "山田太郎"
    wire = f"{EMAILS}/{name}".encode().decode("latin-1")
    request = Request("GET", f"{EMAILS}/x")
    environ = {**request.environ(), "PATH_INFO": wire, "URL": wire}
    reply = call(app, request, environ)
    assert reply.status == 200, reply.body
    assert reply.json()["identity"] == name
    assert reply.json()["provisionable"] is True


def test_routed_environ_keeps_the_server_variables() -> None:
    environ = Request("GET", f"{BASE}/health", split_script_name=True).environ()
    routed = routed_environ(environ, BASE)
    assert (routed["SCRIPT_NAME"], routed["PATH_INFO"]) == ("", f"{BASE}/health")
    assert routed["REMOTE_USER"] == "CONTOSO\\svc-veza"
    assert routed["wsgi.input"] is environ["wsgi.input"]
    # A path that merely starts with the same letters is not the base path.
    other = routed_environ({"SCRIPT_NAME": "", "PATH_INFO": "/vezaprovisionerX/a"}, BASE)
    assert other["PATH_INFO"] == "/vezaprovisionerX/a"


# --- authentication outcomes through the real entry ----------------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["wfastcgi-full-path-info", "split"])
def test_no_iis_user_is_401_and_iis_sends_the_challenge(
    make_iis: Callable[..., IisApplication], split: bool
) -> None:
    app = make_iis()
    reply = call(app, post(EMAILS, {"identity": "plain"}, user=None, split_script_name=split))
    assert reply.status == 401
    assert reply.json()["code"] == "AUTHENTICATION_REQUIRED"
    assert reply.headers["content-type"] == "application/problem+json"
    assert "www-authenticate" not in reply.headers
    # The public routes stay public (IIS itself still asks for credentials in production).
    assert call(app, Request("GET", f"{BASE}/health", user=None)).status == 200


@pytest.mark.parametrize(
    "forged",
    [
        {"X-Remote-User": "CONTOSO\\administrator"},
        {"Remote-User": "CONTOSO\\administrator"},  # arrives as HTTP_REMOTE_USER, not REMOTE_USER
        {"Auth-User": "CONTOSO\\administrator", "Logon-User": "CONTOSO\\administrator"},
        {"X-Forwarded-User": "CONTOSO\\administrator", "X-Forwarded-Proto": "https"},
    ],
)
def test_client_headers_never_stand_in_for_the_iis_user(
    make_iis: Callable[..., IisApplication], forged: dict[str, str]
) -> None:
    app = make_iis()
    reply = call(app, post(EMAILS, {"identity": "plain"}, user=None, headers=forged))
    assert reply.status == 401
    assert reply.json()["code"] == "AUTHENTICATION_REQUIRED"


def test_a_forged_https_header_does_not_make_plain_http_secure(
    make_iis: Callable[..., IisApplication],
) -> None:
    app = make_iis()
    reply = call(app, post(EMAILS, {"identity": "plain"}, https=False, headers={"Https": "on"}))
    assert reply.status == 403
    assert reply.json()["code"] == "HTTPS_REQUIRED"


def test_https_off_is_403_unless_require_https_is_off(
    make_iis: Callable[..., IisApplication],
) -> None:
    strict = make_iis()
    reply = call(strict, post(EMAILS, {"identity": "plain"}, https=False))
    assert reply.status == 403
    assert reply.json()["code"] == "HTTPS_REQUIRED"
    relaxed = make_iis(require_https=False)
    assert call(relaxed, post(EMAILS, {"identity": "plain"}, https=False)).status == 201


def test_allowed_users_gate_the_iis_user(make_iis: Callable[..., IisApplication]) -> None:
    app = make_iis(allowed_users=["CONTOSO\\svc-veza"])
    assert call(app, post(EMAILS, {"identity": "plain"}, user="contoso\\SVC-VEZA")).status == 201
    refused = call(app, post(EMAILS, {"identity": "plain"}, user="CONTOSO\\mallory"))
    assert refused.status == 403
    assert refused.json()["code"] == "CALLER_NOT_ALLOWED"


def test_a_client_x_original_url_header_cannot_pick_the_route(
    make_iis: Callable[..., IisApplication],
) -> None:
    """wfastcgi copies a request's X-Original-URL over PATH_INFO; the URL IIS routed wins."""
    app = make_iis()
    request = Request("GET", f"{EMAILS}/plain", user=None)
    environ = request.environ()
    environ["HTTP_X_ORIGINAL_URL"] = f"{BASE}/health"
    environ["PATH_INFO"] = f"{BASE}/health"  # what wfastcgi did with the header
    reply = call(app, request, environ)
    assert reply.status == 401  # the emails route, not the public health route


def test_request_bodies_arrive_through_wsgi_input(make_iis: Callable[..., IisApplication]) -> None:
    app = make_iis()
    too_large = post(EMAILS, {"identity": "plain", "alias": "x" * 20_000})
    assert call(app, too_large).status == 413
    bad = call(app, post(EMAILS, {"identity": "plain", "alias": "bad alias"}))
    assert bad.status == 422
    assert bad.json()["code"] == "VALIDATION_FAILED"


# --- lazy start, once per process ----------------------------------------------------------------


def test_nothing_is_built_at_import_and_the_app_is_built_once(tmp_path: Path) -> None:
    import vezaprovisioner.iis_entry as entry

    assert isinstance(entry.application, IisApplication)
    builds: list[Settings] = []
    ready = threading.Event()

    def build(settings: Settings) -> FastAPI:
        builds.append(settings)
        ready.wait(timeout=10)  # hold the first start while the others queue on the lock
        return create_app(settings)

    environ = {"VEZAPROVISIONER_CONFIG": str(write_config(tmp_path))}
    app = IisApplication(environ, build=build, start_log=tmp_path / "start.log")
    try:
        replies: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: replies.append(call(app, Request("GET", f"{BASE}/health")).status)
            )
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        ready.set()
        for thread in threads:
            thread.join(timeout=30)
        assert replies == [200, 200, 200, 200]
        assert call(app, Request("GET", f"{BASE}/health")).status == 200
        assert len(builds) == 1
    finally:
        app.close()


def test_a_failed_start_answers_503_logs_why_and_is_retried(tmp_path: Path) -> None:
    environ: dict[str, str] = {}  # web.config's VEZAPROVISIONER_CONFIG appSetting is missing
    start_log = tmp_path / "start.log"
    app = IisApplication(environ, start_log=start_log)
    try:
        reply = call(app, Request("GET", f"{BASE}/health"))
        assert reply.status == 503
        assert reply.headers["content-type"] == "application/problem+json"
        problem = reply.json()
        assert problem["code"] == "SERVICE_NOT_STARTED"
        assert reply.headers["x-request-id"] == problem["request_id"]
        logged = start_log.read_text(encoding="utf-8")
        assert problem["request_id"] in logged
        assert "VEZAPROVISIONER_CONFIG" in logged  # the reason, for the admin
        assert "VEZAPROVISIONER_CONFIG" not in problem["detail"]  # not for the caller
        assert str(start_log) not in problem["detail"]  # names the service account's profile

        environ["VEZAPROVISIONER_CONFIG"] = str(write_config(tmp_path))
        assert call(app, Request("GET", f"{BASE}/health")).status == 200
    finally:
        app.close()


# --- logging to a file ---------------------------------------------------------------------------


def test_logs_go_to_a_file_under_data_dir_without_secrets(tmp_path: Path) -> None:
    def broken(settings: Settings) -> FastAPI:
        app = create_app(settings)

        @app.get(f"{BASE}/api/v1/boom")
        def boom() -> None:
            raise RuntimeError("kaboom in a route")

        return app

    environ = {"VEZAPROVISIONER_CONFIG": str(write_config(tmp_path))}
    app = IisApplication(environ, build=broken, start_log=tmp_path / "start.log")
    try:
        assert call(app, post(EMAILS, {"identity": "plain"})).status == 201
        crashed = call(app, Request("GET", f"{BASE}/api/v1/boom"))
        assert crashed.status == 500
        assert crashed.json()["code"] == "INTERNAL_ERROR"
        assert "kaboom" not in crashed.body.decode()
    finally:
        app.close()
        for handler in logging.getLogger().handlers:
            handler.flush()
    files = list((tmp_path / "data" / "logs").glob("vezaprovisioner-*.log"))
    assert len(files) == 1
    logged = files[0].read_text(encoding="utf-8")
    assert "started under IIS" in logged
    assert "kaboom in a route" in logged  # the traceback, for the admin
    assert IIS_PASSWORD not in logged
    assert base64.b64encode(f"CONTOSO\\svc-veza:{IIS_PASSWORD}".encode()).decode() not in logged


def test_the_daily_log_file_switches_at_midnight_without_renaming(tmp_path: Path) -> None:
    directory = log_to_daily_file(tmp_path)
    handler = next(h for h in logging.getLogger().handlers if isinstance(h, DailyFileHandler))
    try:
        today = logging.LogRecord("vezaprovisioner", logging.INFO, __file__, 1, "today", None, None)
        tomorrow = logging.LogRecord(
            "vezaprovisioner", logging.INFO, __file__, 1, "next", None, None
        )
        tomorrow.created = today.created + 86_400
        handler.handle(today)
        handler.handle(tomorrow)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    days = [time.strftime("%Y-%m-%d", time.localtime(r.created)) for r in (today, tomorrow)]
    assert sorted(p.name for p in directory.iterdir()) == [
        f"vezaprovisioner-{day}.log" for day in days
    ]
    assert "next" in (directory / f"vezaprovisioner-{days[1]}.log").read_text(encoding="utf-8")


# --- the only module-level app ------------------------------------------------------------------


def test_the_iis_entry_holds_the_only_module_level_app() -> None:
    builders = {"create_app", "create_app_from_services", "FastAPI", "IisApplication"}
    found = []
    for module in sorted(SRC.rglob("*.py")):
        for node in ast.parse(module.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Call):
                func = node.value.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if name in builders:
                    found.append(f"{module.relative_to(SRC)}:{node.lineno}")
    assert len(found) == 1
    assert found[0].startswith("vezaprovisioner/iis_entry.py:")


def test_the_server_variable_dump_masks_secrets() -> None:
    captured: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured.append(status)
        return lambda data: None

    environ = Request("GET", f"{BASE}/health", headers={"Cookie": "session=abc"}).environ()
    text = b"".join(server_variables(environ, start_response)).decode()
    assert captured == ["200 OK"]
    assert "REMOTE_USER=CONTOSO\\svc-veza" in text
    assert "HTTPS=on" in text
    assert "AUTH_PASSWORD=***" in text
    assert "HTTP_AUTHORIZATION=***" in text
    assert "HTTP_COOKIE=***" in text
    assert IIS_PASSWORD not in text
    assert "session=abc" not in text


_PATHS = st.text(alphabet=st.characters(codec="latin-1", exclude_characters="?#"), max_size=40)


@given(tail=_PATHS, split=st.integers(min_value=0, max_value=80), upper=st.booleans())
def test_every_split_of_a_path_routes_the_same(tail: str, split: int, upper: bool) -> None:
    prefix = BASE.upper() if upper else BASE
    path = f"{prefix}/{tail}"
    full = routed_environ({"SCRIPT_NAME": "", "PATH_INFO": path}, BASE)
    divided = routed_environ({"SCRIPT_NAME": path[:split], "PATH_INFO": path[split:]}, BASE)
    assert full == divided
    assert full["SCRIPT_NAME"] == ""
    assert full["PATH_INFO"] == f"{BASE}/{tail}"  # the prefix as configured, the rest untouched


@given(path=_PATHS)
def test_paths_outside_the_base_are_left_alone(path: str) -> None:
    routed = routed_environ({"SCRIPT_NAME": "", "PATH_INFO": path}, BASE)
    lowered = path.lower()
    if not (lowered == BASE.lower() or lowered.startswith(BASE.lower() + "/")):
        assert routed["PATH_INFO"] == path

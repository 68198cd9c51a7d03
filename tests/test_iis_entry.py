"""The WSGI entry's own parts, called in-process: the one-time build, file logging, the path
rules for every SCRIPT_NAME split, the variable dump.

Everything a request does under IIS is tested through the real wfastcgi in
tests/test_iis_wfastcgi.py; the environs here only need the keys each unit reads.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import TEST_DIRECTORY
from tests.harness.iis import BASE, DEFAULT_USER, IIS_PASSWORD, iis_server_variables
from vezaprovisioner import logs
from vezaprovisioner.api.app import create_app
from vezaprovisioner.config import Settings
from vezaprovisioner.iis_entry import (
    IisApplication,
    routed_environ,
    server_variables,
)

EMAILS = f"{BASE}/api/v1/emails"
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
    user: str | None = DEFAULT_USER
    https: bool = True
    split_script_name: bool = False  # SCRIPT_NAME=/VezaProvisioner, PATH_INFO=the rest
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = iis_server_variables(
            self.method,
            self.path,
            self.user,
            https=self.https,
            physical_path="C:\\VezaProvisioner\\app\\",
            headers=self.headers,
        )
        path = environ["URL"]
        script_name, path_info = ("", path)
        if self.split_script_name and path.lower().startswith(BASE.lower()):
            script_name, path_info = path[: len(BASE)], path[len(BASE) :]
        environ["SCRIPT_NAME"], environ["PATH_INFO"] = script_name, path_info
        environ.update(
            {
                "wsgi.version": (1, 0),
                "wsgi.url_scheme": "https" if self.https else "http",
                "wsgi.input": io.BytesIO(self.body),
                "wsgi.errors": io.StringIO(),
                "wsgi.multithread": False,
                "wsgi.multiprocess": True,
                "wsgi.run_once": False,
            }
        )
        if self.body:
            environ["CONTENT_TYPE"] = "application/json"
            environ["CONTENT_LENGTH"] = str(len(self.body))
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


def test_routed_environ_keeps_the_server_variables() -> None:
    environ = Request("GET", f"{BASE}/health", split_script_name=True).environ()
    routed = routed_environ(environ, BASE)
    assert (routed["SCRIPT_NAME"], routed["PATH_INFO"]) == ("", f"{BASE}/health")
    assert routed["REMOTE_USER"] == "CONTOSO\\svc-veza"
    assert routed["wsgi.input"] is environ["wsgi.input"]
    # A path that merely starts with the same letters is not the base path.
    other = routed_environ({"SCRIPT_NAME": "", "PATH_INFO": "/vezaprovisionerX/a"}, BASE)
    assert other["PATH_INFO"] == "/vezaprovisionerX/a"


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
        assert logs.flush()
    files = list((tmp_path / "data" / "logs").glob("vezaprovisioner-*.log"))
    assert len(files) == 1
    logged = files[0].read_text(encoding="utf-8")
    assert "started under IIS" in logged
    assert "kaboom in a route" in logged  # the traceback, for the admin
    assert IIS_PASSWORD not in logged
    assert base64.b64encode(f"CONTOSO\\svc-veza:{IIS_PASSWORD}".encode()).decode() not in logged


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

"""The service under IIS, served by the real wfastcgi 3.0.0 (tests/harness/): the test plays IIS.

Each process is `wfastcgi.py` itself (only ctypes.windll stubbed) reading the shipped web.config
from its application folder and importing WSGI_HANDLER; each request is FastCGI records carrying
IIS's server variables. What the harness models and what it does not is listed at the top of
tests/harness/iis.py and tests/harness/wfastcgi_runner.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AUTH, TEST_DIRECTORY
from tests.fakes.local_host import FakePowerShell, wait_gone
from tests.harness.iis import (
    BASE,
    DEFAULT_USER,
    IIS_PASSWORD,
    IisRequest,
    IisSite,
    WfastcgiProcess,
    get,
    post,
)

EMAILS = f"{BASE}/api/v1/emails"

pytestmark = pytest.mark.slow


def write_config(
    path: Path, *, data_dir: Path, backend: dict[str, Any] | None = None, **auth: Any
) -> Path:
    """A configuration file as install.ps1 writes one: IIS authentication, data under data_dir."""
    lines = [
        "not_found_retry_seconds = 0",
        f"data_dir = {json.dumps(str(data_dir))}",
    ]
    sections: dict[str, dict[str, Any]] = {}
    for key, value in (backend or {"backend": "simulated"}).items():
        if isinstance(value, dict):
            sections[key] = value
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    sections.setdefault("simulated", {"directory": str(TEST_DIRECTORY)})
    sections["auth"] = {"mode": "iis", **auth}
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def local_backend(fake: FakePowerShell, **local: Any) -> dict[str, Any]:
    """`backend = "local"` over the fake PowerShell (tests/fakes/powershell.py)."""
    values = fake.settings(**local)
    chosen = {key: value for key, value in values["local"].items() if value is not None}
    return {"backend": "local", "exchange": values["exchange"], "local": chosen}


class Sites:
    """Application folders and the wfastcgi processes started in them; all ended at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.processes: list[WfastcgiProcess] = []
        self.count = 0

    def site(self, backend: dict[str, Any] | None = None, **auth: Any) -> IisSite:
        self.count += 1
        root = self.tmp / f"iis{self.count}"
        root.mkdir()
        config = write_config(
            root / "vezaprovisioner.toml", data_dir=root / "data", backend=backend, **auth
        )
        return IisSite.create(root / "app", config)

    def start(self, site: IisSite, env: dict[str, str] | None = None) -> WfastcgiProcess:
        process = site.start({"TMPDIR": str(site.folder.parent), **(env or {})})
        self.processes.append(process)
        return process

    def serve(self, backend: dict[str, Any] | None = None, **auth: Any) -> WfastcgiProcess:
        return self.start(self.site(backend, **auth))

    def close(self) -> None:
        for process in self.processes:
            process.kill()


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    made = Sites(tmp_path)
    yield made
    made.close()


@pytest.fixture(scope="module")
def iis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WfastcgiProcess]:
    """One FastCGI process over the simulated backend, shared by the read-mostly tests."""
    made = Sites(tmp_path_factory.mktemp("shared-iis"))
    yield made.serve()
    made.close()


# --- routing and bodies through wfastcgi ----------------------------------------------------------


def test_the_app_named_in_web_config_serves_every_route(iis: WfastcgiProcess) -> None:
    health = iis.request(get(f"{BASE}/health"))
    assert health.status == 200
    assert health.json()["status"] == "ok"
    created = iis.request(post(EMAILS, {"identity": "jose"}))
    assert created.status == 201, created.body
    assert created.headers["location"] == f"{EMAILS}/{created.json()['guid']}"
    again = iis.request(post(EMAILS, {"identity": "jose"}))
    assert again.status == 200
    assert again.json()["status"] == "already_exists"
    state = iis.request(get(f"{EMAILS}/jose@contoso.com"))
    assert state.status == 200
    assert state.json()["has_mailbox"] is True


def test_the_base_path_matches_case_insensitively_like_iis(iis: WfastcgiProcess) -> None:
    assert iis.request(get("/vezaprovisioner/health")).status == 200
    assert iis.request(get("/VEZAPROVISIONER/health?x=1")).status == 200
    missing = iis.request(get(f"{BASE}/nothing-here"))
    assert missing.status == 404
    assert missing.headers["content-type"] == "application/problem+json"


def test_non_ascii_paths_arrive_as_iis_sends_them(iis: WfastcgiProcess) -> None:
    """IIS sends the path's UTF-8 bytes; wfastcgi decodes parameters as latin-1."""
    reply = iis.request(get(f"{EMAILS}/山田太郎"))
    assert reply.status == 200, reply.body
    assert reply.json()["identity"] == "山田太郎"
    assert reply.json()["provisionable"] is True


def test_request_bodies_arrive_through_fcgi_stdin(iis: WfastcgiProcess) -> None:
    too_large = iis.request(post(EMAILS, {"identity": "plain", "alias": "x" * 20_000}))
    assert too_large.status == 413
    bad = iis.request(post(EMAILS, {"identity": "plain", "alias": "bad alias"}))
    assert bad.status == 422
    assert bad.json()["code"] == "VALIDATION_FAILED"


# --- who is calling: IIS's variables, never the client's headers --------------------------------


def test_no_iis_user_is_401_and_iis_sends_the_challenge(iis: WfastcgiProcess) -> None:
    reply = iis.request(post(EMAILS, {"identity": "plain"}, user=None))
    assert reply.status == 401
    assert reply.json()["code"] == "AUTHENTICATION_REQUIRED"
    assert reply.headers["content-type"] == "application/problem+json"
    assert "www-authenticate" not in reply.headers
    # The public routes stay public (IIS itself still asks for credentials in production).
    assert iis.request(get(f"{BASE}/health", user=None)).status == 200


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
    iis: WfastcgiProcess, forged: dict[str, str]
) -> None:
    reply = iis.request(post(EMAILS, {"identity": "plain"}, user=None, headers=forged))
    assert reply.status == 401
    assert reply.json()["code"] == "AUTHENTICATION_REQUIRED"


def test_a_forged_https_header_does_not_make_plain_http_secure(iis: WfastcgiProcess) -> None:
    reply = iis.request(post(EMAILS, {"identity": "plain"}, https=False, headers={"Https": "on"}))
    assert reply.status == 403
    assert reply.json()["code"] == "HTTPS_REQUIRED"


def test_a_client_x_original_url_header_cannot_pick_the_route(iis: WfastcgiProcess) -> None:
    """wfastcgi copies a request's X-Original-URL over PATH_INFO; the URL IIS routed wins."""
    request = get(f"{EMAILS}/plain", user=None, headers={"X-Original-URL": f"{BASE}/health"})
    assert iis.request(request).status == 401  # the emails route, not the public health route


def test_https_off_passes_only_with_require_https_off(sites: Sites) -> None:
    relaxed = sites.serve(require_https=False)
    assert relaxed.request(post(EMAILS, {"identity": "plain"}, https=False)).status == 201


@pytest.mark.parametrize(
    ("typed", "logon"),
    [
        ("CONTOSO\\veza", "CONTOSO\\veza"),  # DOMAIN\user typed
        ("veza@contoso.com", "CONTOSO\\veza"),  # a UPN typed, the account in LOGON_USER
        ("veza@contoso.com", "veza@contoso.com"),  # a UPN in every variable
        ("contoso\\VEZA", "contoso\\VEZA"),  # any case
    ],
)
def test_allowed_users_match_the_account_in_either_spelling(
    sites: Sites, typed: str, logon: str
) -> None:
    process = sites.serve(allowed_users=["CONTOSO\\veza", "veza@contoso.com"])
    reply = process.request(post(EMAILS, {"identity": "plain"}, user=typed, logon_user=logon))
    assert reply.status == 201, reply.body


def test_only_the_account_iis_logged_on_is_allowed(sites: Sites) -> None:
    process = sites.serve(allowed_users=["CONTOSO\\veza"])
    other = process.request(post(EMAILS, {"identity": "plain"}, user="CONTOSO\\mallory"))
    assert other.status == 403
    assert other.json()["code"] == "CALLER_NOT_ALLOWED"
    # A UPN login whose account IIS names only by the UPN: that spelling must be listed too.
    upn = process.request(
        post(EMAILS, {"identity": "plain"}, user="veza@contoso.com", logon_user="veza@contoso.com")
    )
    assert upn.status == 403
    assert "veza@contoso.com" in upn.json()["detail"]


def test_the_caller_recorded_is_the_account_not_the_typed_name(sites: Sites) -> None:
    site = sites.site()
    process = sites.start(site)
    reply = process.request(
        post(EMAILS, {"identity": "plain"}, user="veza@contoso.com", logon_user="CONTOSO\\veza")
    )
    assert reply.status == 201
    record = process.request(get(f"{BASE}/api/v1/requests/{reply.json()['request_id']}"))
    assert record.status == 200, record.body
    assert record.json()["caller"] == "CONTOSO\\veza"


# --- a start that fails, and what it logs ---------------------------------------------------------


def test_a_failed_start_answers_503_logs_why_and_is_retried(sites: Sites) -> None:
    site = sites.site()
    good = site.config.read_text(encoding="utf-8")
    site.config.unlink()  # web.config names a configuration file that is not there yet
    process = sites.start(site)
    reply = process.request(get(f"{BASE}/health"))
    assert reply.status == 503
    assert reply.headers["content-type"] == "application/problem+json"
    problem = reply.json()
    assert problem["code"] == "SERVICE_NOT_STARTED"
    assert reply.headers["x-request-id"] == problem["request_id"]
    start_log = site.folder.parent / "vezaprovisioner-start.log"  # TMPDIR of the process
    logged = start_log.read_text(encoding="utf-8")
    assert problem["request_id"] in logged
    assert str(site.config) in logged  # the reason, for the admin
    assert str(site.config) not in problem["detail"]  # not for the caller

    site.config.write_text(good, encoding="utf-8")
    assert process.request(get(f"{BASE}/health")).status == 200


def test_the_log_file_says_the_service_started_and_holds_no_secret(sites: Sites) -> None:
    site = sites.site()
    process = sites.start(site)
    assert process.request(post(EMAILS, {"identity": "plain"})).status == 201
    process.close_pipe()
    assert process.wait() == 0
    files = list((site.config.parent / "data" / "logs").glob("vezaprovisioner-*.log"))
    assert len(files) == 1
    logged = files[0].read_text(encoding="utf-8")
    assert "started under IIS" in logged
    assert IIS_PASSWORD not in logged
    assert base64.b64encode(f"{DEFAULT_USER}:{IIS_PASSWORD}".encode()).decode() not in logged


def test_every_requests_json_line_is_in_the_daily_file_with_its_request_id(
    sites: Sites,
) -> None:
    """wfastcgi gives every request a fresh sys.stderr. Before, the JSON handler was bound to the
    first request's buffer and the file got only plain `request finished` lines; now every
    request's JSON line, with its id and fields, is in data_dir/logs, and so is its audit line."""
    site = sites.site()
    process = sites.start(site)
    identities = ["plain", "plain", "Alex Smith", "nobody-at-all"]
    statuses = []
    for number, identity in enumerate(identities):
        request = post(EMAILS, {"identity": identity}, headers={"X-Request-ID": f"wf-{number}"})
        statuses.append(process.request(request, request_id=number + 1).status)
    assert statuses == [201, 200, 409, 404]
    assert process.request(get(f"{BASE}/health", headers={"X-Request-ID": "wf-h"})).status == 200
    process.close_pipe()
    assert process.wait() == 0
    data = site.config.parent / "data"
    lines = [
        json.loads(line)
        for file in sorted((data / "logs").glob("vezaprovisioner-*.log"))
        for line in file.read_text(encoding="utf-8").splitlines()
    ]
    access = {
        line["http.request.id"]: line for line in lines if line.get("event.action") == "request"
    }
    assert set(access) == {"wf-0", "wf-1", "wf-2", "wf-3", "wf-h"}
    assert [access[f"wf-{n}"]["http.response.status_code"] for n in range(4)] == statuses
    assert access["wf-2"]["vezaprovisioner.code"] == "AMBIGUOUS_IDENTITY"
    assert access["wf-0"]["user.name"] == DEFAULT_USER
    assert access["wf-0"]["http.route"] == EMAILS
    assert access["wf-0"]["client.address"] == "10.0.0.5"  # IIS's REMOTE_ADDR
    assert access["wf-0"]["event.duration"] > 0
    audit = [
        json.loads(line)
        for file in sorted(data.glob("audit-*.jsonl"))
        for line in file.read_text(encoding="utf-8").splitlines()
    ]
    assert [line["http.request.id"] for line in audit] == ["wf-0", "wf-1", "wf-2", "wf-3"]


# --- lifecycle: IIS's shutdown event and a closed pipe ------------------------------------------


def _warm(process: WfastcgiProcess) -> None:
    """Application Initialization's request: anonymous, plain HTTP; it returns once warm."""
    request = get(
        f"{BASE}/warmup",
        user=None,
        https=False,
        content_type=None,
        headers={"User-Agent": "IIS Application Initialization Preload"},  # as field traces show
    )
    reply = process.request(request)
    assert reply.status == 204, reply.body
    assert reply.body == b""


@pytest.mark.parametrize("ending", ["shutdown_event", "closed_pipe"])
def test_iis_ending_the_process_removes_every_hosts_session(
    sites: Sites, fake_powershell: FakePowerShell, ending: str
) -> None:
    process = sites.serve(local_backend(fake_powershell, pool_size=2))
    _warm(process)
    assert process.request(get(f"{EMAILS}/plain")).status == 200
    hosts = fake_powershell.start_pids()
    assert len(hosts) == 2
    assert fake_powershell.records("session_removed") == []

    if ending == "shutdown_event":
        process.signal_shutdown()  # wfastcgi's on_exit thread runs the exit tasks, ExitProcess(0)
    else:
        process.close_pipe()  # wfastcgi's main loop reads end-of-file and runs the exit tasks
    assert process.wait() == 0
    removed = {row["pid"] for row in fake_powershell.records("session_removed")}
    assert removed == set(hosts)
    assert wait_gone(hosts) == []


def test_without_a_request_nothing_is_started_and_the_process_still_ends(
    sites: Sites, fake_powershell: FakePowerShell
) -> None:
    process = sites.serve(local_backend(fake_powershell))
    process.close_pipe()
    assert process.wait() == 0
    assert fake_powershell.start_pids() == []


def test_iis_defaults_to_one_warm_host_per_fastcgi_process(
    sites: Sites, fake_powershell: FakePowerShell
) -> None:
    process = sites.serve(local_backend(fake_powershell, pool_size=None))
    _warm(process)
    ready = process.request(get(f"{BASE}/health/ready/details"))
    assert ready.status == 200, ready.body
    assert "1/1 PowerShell hosts warm" in ready.json()["checks"]["backend"]["detail"]
    assert len(fake_powershell.start_pids()) == 1


# --- warm before the first caller ---------------------------------------------------------------


def test_the_warm_up_starts_the_pool_so_the_first_caller_finds_a_warm_host(
    sites: Sites, fake_powershell: FakePowerShell
) -> None:
    fake_powershell.set(connect_seconds=1)  # a connect the first caller would otherwise wait for
    process = sites.serve(local_backend(fake_powershell, pool_size=1))
    _warm(process)
    ready = process.request(get(f"{BASE}/health/ready"))
    assert ready.status == 200, ready.body  # 503 while a host is still connecting
    assert process.request(post(EMAILS, {"identity": "plain"})).status == 201
    assert len(fake_powershell.start_pids()) == 1  # the caller used the host the warm-up started


def test_the_warm_up_says_nothing_and_needs_no_credentials(iis: WfastcgiProcess) -> None:
    reply = iis.request(get(f"{BASE}/warmup", user=None, https=False, content_type=None))
    assert reply.status == 204
    assert reply.body == b""
    assert reply.headers.get("cache-control") == "no-store"
    assert set(reply.headers) <= {"cache-control", "x-request-id", "content-type"}


def _until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Polls another process's state until `check` returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)  # poll interval for another process's state, not a synchronisation guess
    pytest.fail(f"timed out waiting for {what}")


def test_crash_recovery_runs_in_the_next_processs_first_request(
    sites: Sites, fake_powershell: FakePowerShell
) -> None:
    """IIS kills a FastCGI process in the middle of Enable-Mailbox (its last resort after the
    shutdown wait); the replacement's first request, the warm-up, starts maintenance, and crash
    recovery reconciles the dead process's record from what Exchange now reports. (Whether the
    killed host's enable landed is a race here; tests/test_processes.py pins each case.)"""
    fake_powershell.set(fault="hang", fault_cmdlet="Enable-Mailbox")
    site = sites.site(local_backend(fake_powershell))
    doomed = sites.start(site)
    _warm(doomed)
    request = post(EMAILS, {"identity": "plain"}, headers={"X-Request-ID": "killed-under-iis"})

    def send() -> None:
        with contextlib.suppress(ConnectionError):  # the process dies under it
            doomed.request(request)

    threading.Thread(target=send, daemon=True).start()
    _until(
        "Enable-Mailbox to start",
        lambda: any(cmdlet == "Enable-Mailbox" for cmdlet, _ in fake_powershell.calls()),
    )
    doomed.kill()
    fake_powershell.set(fault="")

    replacement = sites.start(site)
    _warm(replacement)  # no caller has asked anything yet

    def reconciled() -> dict[str, Any] | None:
        reply = replacement.request(get(f"{BASE}/api/v1/requests/killed-under-iis"))
        body: dict[str, Any] = reply.json()
        return body if body.get("state") not in ("received", "running") else None

    record = _until("recovery to reconcile the record", reconciled)
    assert record["recovered"] is True
    assert record["state"] in ("created", "not_created")
    assert "Exchange" in record["detail"]


# --- errors through wfastcgi: a bad body is never "nothing here" --------------------------------

# Issue 10 ("One failure tree below HTTP") fixed the mapping at its root in api/app.py; these
# prove it through wfastcgi (before it, the first three answered 404 "There is nothing at ...").
_NOT_JSON_TEXT = {
    "non-utf8": b'{"identity": "pl\xffain"}',
    "deep-array": b"[" * 1000 + b"]" * 1000,
    "deep-object": b'{"a":' * 1000 + b"1" + b"}" * 1000,
}


@pytest.mark.parametrize("body", list(_NOT_JSON_TEXT.values()), ids=list(_NOT_JSON_TEXT))
def test_a_body_that_cannot_be_read_is_400_or_422_never_404(
    iis: WfastcgiProcess, body: bytes
) -> None:
    reply = iis.request(IisRequest("POST", EMAILS, body=body))
    assert reply.status in (400, 422), reply.body
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["code"] != "NOT_FOUND"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", EMAILS, "POST"), ("POST", f"{BASE}/health", "GET")],
)
def test_405_says_which_methods_are_allowed(
    iis: WfastcgiProcess, method: str, path: str, allowed: str
) -> None:
    body = b"{}" if method == "POST" else b""
    reply = iis.request(IisRequest(method, path, body=body))
    assert reply.status == 405
    assert reply.headers["content-type"] == "application/problem+json"
    allow = {name.strip() for name in reply.headers.get("allow", "").split(",")}
    assert allowed in allow
    assert method not in allow


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize("content_type", ["application/json", None], ids=["json", "no-body"])
def test_put_or_patch_on_a_get_route_is_405_not_415(
    iis: WfastcgiProcess, method: str, content_type: str | None
) -> None:
    """IIS's request filtering (web.config: GET, HEAD, POST only) refuses these first on the
    server; the app must still answer them right (uvicorn, or a changed web.config)."""
    body = b"{}" if content_type else b""
    request = IisRequest(method, f"{EMAILS}/plain", body=body, content_type=content_type)
    reply = iis.request(request)
    assert reply.status == 405
    assert "GET" in reply.headers.get("allow", "")


def test_only_the_first_warm_up_waits_so_anonymous_callers_cannot_hold_a_process(
    make_settings: Callable[..., Any], fake_powershell: FakePowerShell
) -> None:
    """In-process (the wait is the app's, not wfastcgi's): after the first warm-up, a host being
    replaced does not make /warmup wait for it."""
    from fastapi.testclient import TestClient

    from vezaprovisioner.api.app import create_app

    settings = make_settings(
        not_found_retry_seconds=0,
        **fake_powershell.settings(pool_size=1, max_commands=1, startup_timeout_seconds=20),
    )
    app = create_app(settings)
    try:
        client = TestClient(app, headers=AUTH)
        assert client.get(f"{BASE}/warmup").status_code == 204  # waits for the first host
        # The replacement connects for longer than the startup timeout: waiting for it would
        # end with the slot broken; not waiting leaves it starting.
        fake_powershell.set(connect_seconds=60)
        assert client.get(f"{EMAILS}/plain").status_code == 200  # max_commands 1: recycled
        assert client.get(f"{BASE}/warmup").status_code == 204
        detail = client.get(f"{BASE}/health/ready/details").json()["checks"]["backend"]["detail"]
        assert "1 starting, 0 broken" in detail
    finally:
        app.state.services.close()


def test_the_harness_runs_only_the_pinned_wfastcgi(tmp_path: Path) -> None:
    """The runner refuses any wfastcgi.py but 3.0.0's, byte for byte (an edited copy first on
    the path here), so no test can pass against a modified bridge."""
    import importlib.util
    import os
    import subprocess
    import sys

    from tests.harness.iis import RUNNER

    spec = importlib.util.find_spec("wfastcgi")
    assert spec is not None
    assert spec.origin is not None
    real = Path(spec.origin).read_text(encoding="utf-8")
    assert '__version__ = "3.0.0"' in real
    edited = real.replace("response[FCGI_MAX_REQS] = '1'", "response[FCGI_MAX_REQS] = '2'")
    assert edited != real
    (tmp_path / "wfastcgi.py").write_text(edited)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(RUNNER)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "is not wfastcgi 3.0.0's wfastcgi.py" in done.stderr

"""`backend = "local"` end to end: HTTP → flow → pool → fake PowerShell → simulated Exchange."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import AUTH
from tests.fakes.local_host import FakePowerShell, wait_gone, wait_warm
from tests.test_logs import log_lines
from tests.test_metrics import samples, value
from vezaprovisioner.api.app import create_app
from vezaprovisioner.cli import main
from vezaprovisioner.config import Settings
from vezaprovisioner.exchange.local import warm_pool
from vezaprovisioner.exchange.local.backend import LocalExchange, host_argv
from vezaprovisioner.services import Services
from vezaprovisioner.validation import InvalidValue, validate_alias, validate_identity

WARM_POOL_LOGGER = warm_pool.__name__
EMAILS = "/VezaProvisioner/api/v1/emails"
READY = "/VezaProvisioner/health/ready/details"
METRICS = "/VezaProvisioner/metrics"
LocalClient = Callable[..., TestClient]


@pytest.fixture
def local_client(
    make_settings: Callable[..., Settings], fake_powershell: FakePowerShell
) -> Iterator[LocalClient]:
    """An app over `backend = "local"` and the fake; waits until the pool is warm."""
    services: list[Services] = []

    def make(*, warm: bool = True, **local: Any) -> TestClient:
        settings = make_settings(not_found_retry_seconds=0, **fake_powershell.settings(**local))
        app = create_app(settings)
        services.append(app.state.services)
        exchange = app.state.services.exchange
        assert isinstance(exchange, LocalExchange)
        if warm:
            size = settings.local.pool_size
            exchange.pool.wait_for(lambda s: s.warm >= size, timeout=20)
        return TestClient(app, headers=AUTH)

    yield make
    for service in services:
        service.close()


def test_create_email_makes_two_cmdlet_calls_and_state_is_shared(
    local_client: LocalClient, fake_powershell: FakePowerShell
) -> None:
    client = local_client(pool_size=2)
    created = client.post(EMAILS, json={"identity": "CONTOSO\\jose", "alias": "José"})
    assert created.status_code == 201, created.text
    assert created.json()["primary_smtp_address"] == "Jose@contoso.com"
    assert created.json()["alias"] == "José"
    # The user is read once: no request sharing the journal enabled it since, so the flow does
    # not read it again past the gate.
    assert [cmdlet for cmdlet, _ in fake_powershell.calls()] == ["Get-User", "Enable-Mailbox"]
    # Another host of the pool sees the new mailbox: one forest behind every host.
    again = client.post(EMAILS, json={"identity": "CONTOSO\\jose"})
    assert again.status_code == 200
    assert again.json()["status"] == "already_exists"
    assert len({row["pid"] for row in fake_powershell.records("call")}) == 2


def test_exchange_errors_keep_reason_and_error_id(local_client: LocalClient) -> None:
    client = local_client()
    ambiguous = client.post(EMAILS, json={"identity": "Alex Smith"})
    assert ambiguous.status_code == 409
    assert ambiguous.json()["exchange"]["reason"] == "ManagementObjectAmbiguousException"
    problem = client.post(EMAILS, json={"identity": "denied"}).json()
    assert problem["code"] == "EXCHANGE_PERMISSION_DENIED"
    assert problem["exchange"]["reason"] == "ADOperationException"
    assert "INSUFF_ACCESS_RIGHTS" in problem["exchange"]["message"]
    assert "[FailureCategory=Cmdlet-ADOperationException]" in problem["exchange"]["error_id"]


def test_enable_timeout_rereads_state_and_never_retries(
    local_client: LocalClient, fake_powershell: FakePowerShell
) -> None:
    client = local_client(command_timeout_seconds=1)
    response = client.post(EMAILS, json={"identity": "slow"})
    assert response.status_code == 504
    assert response.json()["code"] == "EXCHANGE_TIMEOUT"
    assert [cmdlet for cmdlet, _ in fake_powershell.calls()] == [
        "Get-User",
        "Enable-Mailbox",
        "Get-User",  # the flow's re-read on a replacement host; Enable-Mailbox is not re-run
    ]


def test_crash_during_enable_is_502_without_retry(
    local_client: LocalClient, fake_powershell: FakePowerShell
) -> None:
    fake_powershell.set(fault="crash", fault_cmdlet="Enable-Mailbox")
    client = local_client()
    response = client.post(EMAILS, json={"identity": "plain"})
    assert response.status_code == 502
    body = response.json()
    assert body["code"] == "EXCHANGE_ERROR"
    assert "failed during Enable-Mailbox" in body["detail"]
    assert "outcome is unknown" in body["detail"]
    assert [c for c, _ in fake_powershell.calls()].count("Enable-Mailbox") == 1


def test_busy_pool_answers_503_with_retry_after(
    local_client: LocalClient, fake_powershell: FakePowerShell
) -> None:
    fake_powershell.set(fault="hang", fault_identity="mailbox")
    client = local_client(queue_size=0)
    exchange = client.app.state.services.exchange  # type: ignore[attr-defined]
    occupied = threading.Thread(target=lambda: client.post(EMAILS, json={"identity": "mailbox"}))
    occupied.start()
    exchange.pool.wait_for(lambda s: s.busy == 1, timeout=20)
    response = client.post(EMAILS, json={"identity": "plain"})
    assert response.status_code == 503
    assert response.json()["code"] == "BACKEND_UNAVAILABLE"
    assert int(response.headers["Retry-After"]) >= 1
    exchange.close()
    occupied.join(timeout=20)


def test_readiness_reports_warm_and_broken_hosts(
    local_client: LocalClient, fake_powershell: FakePowerShell
) -> None:
    ready = local_client(pool_size=2).get(READY)
    assert ready.status_code == 200
    assert "2/2 PowerShell hosts warm" in ready.json()["checks"]["backend"]["detail"]

    fake_powershell.set(fault="rbac")
    # A long backoff keeps the broken slot broken while readiness is read: with the fake's
    # 0.05 s backoff the slot is often "starting" again by then (seen on a loaded machine).
    client = local_client(warm=False, restart_backoff_seconds=600, restart_backoff_max_seconds=600)
    exchange = client.app.state.services.exchange  # type: ignore[attr-defined]
    # Sign in first: the scrypt check would widen the window for the host's restart.
    assert client.get("/VezaProvisioner/api/v1/requests/none").status_code == 404
    exchange.pool.wait_for(lambda s: s.broken == 1, timeout=20)
    broken = client.get(READY)
    assert broken.status_code == 503
    detail = broken.json()["checks"]["backend"]["detail"]
    assert "0/1 PowerShell hosts warm" in detail
    assert "1 broken" in detail
    assert "Mail Recipients" in detail
    refused = client.post(EMAILS, json={"identity": "plain"})
    assert refused.status_code == 503
    assert "Mail Recipients" in refused.json()["detail"]


_NASTY = st.sampled_from(
    [
        "'",
        '"',
        "\u2018",
        "\u2019",
        "\u201c",
        "\u201d",
        "`",
        "$(",
        ")",
        "$env:PATH",
        ";",
        "|",
        "&",
        "\n",
        "\r",
        "\x00",
        "{",
        "}",
        "@",
        "#",
        " ",
        "\\",
        "/",
        "-",
        "José",
        "山田",
        "Remove-Mailbox",
        "x" * 1030,
    ]
)
_HOSTILE = st.lists(_NASTY | st.text(max_size=5), min_size=1, max_size=6).map("".join)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(identity=_HOSTILE, alias=_HOSTILE.filter(bool))  # "" means "no alias"
@example(identity="O\u2019Brien $(Remove-Mailbox x); `whoami` \u201cq\u201d", alias="a`$b'c{}")
@example(identity="\u2018" * 1024, alias="Jos\u00e9.O'Neil")
@example(identity="a\x00b", alias="a\nb")
def test_hostile_input_is_refused_or_reaches_the_host_as_exact_data(
    local_client: LocalClient, fake_powershell: FakePowerShell, identity: str, alias: str
) -> None:
    client = getattr(fake_powershell, "hostile_client", None)
    if client is None:
        client = local_client()
        fake_powershell.hostile_client = client  # type: ignore[attr-defined]
    fake_powershell.state.unlink(missing_ok=True)  # a fresh forest: "plain" has no mailbox
    seen = len(fake_powershell.calls())

    by_identity = client.post(EMAILS, json={"identity": identity})
    by_alias = client.post(EMAILS, json={"identity": "plain", "alias": alias})
    calls = fake_powershell.calls()[seen:]

    try:
        expected_identity: str | None = validate_identity(identity)
    except InvalidValue:
        expected_identity = None
    try:
        expected_alias: str | None = validate_alias(alias)
    except InvalidValue:
        expected_alias = None

    if expected_identity is None:
        assert by_identity.status_code == 422
    else:
        assert by_identity.status_code != 422, by_identity.text
        assert calls[0] == ("Get-User", {"Identity": expected_identity})
    if expected_alias is None:
        assert by_alias.status_code == 422
        assert all(params.get("Alias") is None for _, params in calls)
    else:
        assert by_alias.status_code == 201, by_alias.text
        enables = [params for cmdlet, params in calls if cmdlet == "Enable-Mailbox"]
        assert enables[-1]["Alias"] == expected_alias
    constant = host_argv(fake_powershell.path)
    for start in fake_powershell.records("start"):
        assert start["argv"] == constant


def _local_config(fake: FakePowerShell, tmp_path: Path) -> Path:
    config = tmp_path / "local.toml"
    config.write_text(
        "backend = 'local'\n"
        f"[exchange]\npowershell_path = '{fake.path}'\n"
        f"remote_exchange_path = '{fake.remote_exchange}'\n"
        "[local]\npool_size = 1\nrestart_backoff_seconds = 5\n",
        encoding="utf-8",
    )
    return config


def test_probe_command_starts_a_host_and_reads_a_user(
    fake_powershell: FakePowerShell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _local_config(fake_powershell, tmp_path)
    assert main(["probe", "--config", str(config), "--identity", "山田太郎"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["probe"].startswith("1/1 PowerShell hosts warm")
    assert report["get_user"]["sam_account_name"] == "山田太郎"
    assert wait_gone(fake_powershell.start_pids()) == []


def test_probe_command_reports_a_missing_role(
    fake_powershell: FakePowerShell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_powershell.set(fault="rbac")
    config = _local_config(fake_powershell, tmp_path)
    assert main(["probe", "--config", str(config)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["code"] == "BACKEND_UNAVAILABLE"
    assert "Mail Recipients" in report["detail"]


def test_app_shutdown_stops_every_host(
    make_settings: Callable[..., Settings], fake_powershell: FakePowerShell
) -> None:
    app = create_app(make_settings(**fake_powershell.settings(pool_size=2)))
    with TestClient(app, headers=AUTH) as client:  # runs the app's lifespan
        exchange = app.state.services.exchange
        exchange.pool.wait_for(lambda s: s.warm == 2, timeout=20)
        assert client.post(EMAILS, json={"identity": "plain"}).status_code == 201
    assert exchange.pool.status().warm == 0
    assert wait_gone(fake_powershell.start_pids()) == []


def test_host_lifecycle_reaches_metrics_and_the_log(
    make_settings: Callable[..., Settings], fake_powershell: FakePowerShell, tmp_path: Path
) -> None:
    # One host; a CREATE_EMAIL of a new user makes 2 cmdlet calls, so max_commands = 2 recycles
    # the host after it; a Get-User of "mailbox" crashes whichever host runs it.
    fake_powershell.set(fault="crash", fault_identity="mailbox", fault_cmdlet="Get-User")
    settings = make_settings(
        not_found_retry_seconds=0,
        logging={"file": "service.log"},
        **fake_powershell.settings(max_commands=2),
    )
    app = create_app(settings)
    pool = app.state.services.exchange.pool
    with TestClient(app, headers=AUTH) as client:
        assert wait_warm(pool).starts == 1
        assert client.post(EMAILS, json={"identity": "plain"}).status_code == 201
        assert pool.wait_for(lambda s: s.starts == 2 and s.warm - s.busy == 1, 20).starts == 2
        crash = client.post(
            EMAILS, json={"identity": "mailbox"}, headers={"X-Request-ID": "crash-1"}
        )
        assert crash.status_code == 502
        assert pool.wait_for(lambda s: s.starts == 3 and s.warm - s.busy == 1, 20).starts == 3
        parsed = samples(client.get(METRICS).text)
    events = "vezaprovisioner_backend_host_events_total"
    assert value(parsed, events, backend="local", event="started") == 3
    assert value(parsed, events, backend="local", event="recycled") == 1
    assert value(parsed, events, backend="local", event="killed") == 1
    hosts = "vezaprovisioner_backend_hosts"
    assert {
        state: value(parsed, hosts, backend="local", state=state)
        for state in ("idle", "busy", "starting", "broken")
    } == {"idle": 1, "busy": 0, "starting": 0, "broken": 0}
    assert value(parsed, "vezaprovisioner_backend_queue_depth", backend="local") == 0

    first, second, third = fake_powershell.start_pids()
    lifecycle = [
        (line["event.action"], line["vezaprovisioner.host.name"], line.get("event.reason"))
        for line in log_lines(tmp_path / "data" / "service.log")
        if line.get("event.action", "").startswith("host_")
    ]
    assert lifecycle == [
        ("host_started", f"ps-{first}", None),
        ("host_recycled", f"ps-{first}", "max_commands"),
        ("host_started", f"ps-{second}", None),
        ("host_killed", f"ps-{second}", "crashed"),
        ("host_started", f"ps-{third}", None),
    ]
    # The pool's own line about the crash was logged while serving the request that hit it, in
    # the worker thread: it carries that request's id without being handed it.
    lines = log_lines(tmp_path / "data" / "service.log")
    pool_lines = [line for line in lines if line["log.logger"].startswith(WARM_POOL_LOGGER)]
    crashed = [line for line in pool_lines if line["log.level"] == "WARNING"]
    assert crashed
    assert {line.get("http.request.id") for line in crashed} == {"crash-1"}


def test_a_failed_start_is_reported_as_a_broken_host(
    make_settings: Callable[..., Settings], fake_powershell: FakePowerShell
) -> None:
    fake_powershell.set(fault="rbac")
    app = create_app(
        make_settings(
            **fake_powershell.settings(restart_backoff_seconds=30, restart_backoff_max_seconds=30)
        )
    )
    pool = app.state.services.exchange.pool
    with TestClient(app, headers=AUTH) as client:
        pool.wait_for(lambda s: s.broken == 1, 20)
        parsed = samples(client.get(METRICS).text)
    events = "vezaprovisioner_backend_host_events_total"
    assert value(parsed, events, backend="local", event="killed") == 1
    assert value(parsed, events, backend="local", event="started") == 0
    assert value(parsed, "vezaprovisioner_backend_hosts", backend="local", state="broken") == 1

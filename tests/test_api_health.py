"""Health, readiness and the OpenAPI document."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import AUTH
from tests.fakes.clock import FakeClock
from vezaprovisioner import __version__
from vezaprovisioner.api.app import create_app
from vezaprovisioner.config import Settings
from vezaprovisioner.exchange.errors import BackendUnavailable
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange


def test_health_touches_no_backend(client: TestClient, exchange: SimulatedExchange) -> None:
    response = client.get("/VezaProvisioner/health")
    assert response.json() == {"status": "ok", "version": __version__}
    assert exchange.calls == []


READY = "/VezaProvisioner/health/ready"
DETAILS = "/VezaProvisioner/health/ready/details"


def test_ready_when_the_backend_answers(client: TestClient) -> None:
    response = client.get(DETAILS)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["configuration"]["ok"] is True
    assert body["checks"]["backend"] == {"ok": True, "detail": body["checks"]["backend"]["detail"]}
    assert "simulated" in body["checks"]["backend"]["detail"]


def test_public_readiness_says_only_what_passed(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    anonymous = make_client(authenticated=False)
    public = anonymous.get(READY)
    assert public.status_code == 200
    assert public.json() == {
        "status": "ready",
        "checks": {
            "configuration": {"ok": True},
            "backend": {"ok": True},
            "journal": {"ok": True},
            "logs": {"ok": True},
        },
    }
    assert str(tmp_path) not in public.text
    assert anonymous.get(DETAILS).status_code == 401


class ProbeOverride:
    """The simulated Exchange with another probe (all other operations delegate)."""

    def __init__(self, inner: SimulatedExchange, probe: Callable[[], str]) -> None:
        self._inner = inner
        self.probe = probe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_not_ready_when_the_probe_fails(
    make_settings: Callable[..., Settings], exchange: SimulatedExchange, clock: FakeClock
) -> None:
    def failing() -> str:
        raise BackendUnavailable("all PowerShell hosts are starting")

    port: Any = ProbeOverride(exchange, failing)
    client = TestClient(create_app(make_settings(), exchange=port, clock=clock))
    public = client.get(READY)
    assert public.status_code == 503
    assert public.json() == {
        "status": "not_ready",
        "checks": {
            "configuration": {"ok": True},
            "backend": {"ok": False},
            "journal": {"ok": True},
            "logs": {"ok": True},
        },
    }
    assert "starting" not in public.text
    response = client.get(DETAILS, headers=AUTH)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["configuration"]["ok"] is True
    assert body["checks"]["backend"]["ok"] is False
    assert "all PowerShell hosts are starting" in body["checks"]["backend"]["detail"]


def test_not_ready_when_the_probe_hangs(
    make_settings: Callable[..., Settings], exchange: SimulatedExchange, clock: FakeClock
) -> None:
    release = threading.Event()

    def hanging() -> str:
        release.wait()
        return "too late"

    port: Any = ProbeOverride(exchange, hanging)
    settings = make_settings(readiness_timeout_seconds=0.05)
    try:
        response = TestClient(create_app(settings, exchange=port, clock=clock)).get(
            DETAILS, headers=AUTH
        )
    finally:
        release.set()
    assert response.status_code == 503
    assert "did not answer within 0.05 s" in response.json()["checks"]["backend"]["detail"]


def test_openapi_and_docs_live_under_the_base_path(client: TestClient) -> None:
    spec = client.get("/VezaProvisioner/openapi.json").json()
    assert "/VezaProvisioner/api/v1/emails" in spec["paths"]
    assert "/VezaProvisioner/api/v1/actions" in spec["paths"]
    create = spec["paths"]["/VezaProvisioner/api/v1/emails"]["post"]["responses"]
    assert create["201"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/MailboxResponse"
    )
    assert {"409", "502", "503", "504"} <= set(create)
    assert "application/problem+json" in create["409"]["content"]
    assert "text/html" in client.get("/VezaProvisioner/docs").headers["content-type"]

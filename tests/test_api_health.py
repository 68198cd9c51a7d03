"""Health, readiness and the OpenAPI document."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import AUTH
from tests.fakes.clock import FakeClock
from vezaprovisioner import __version__
from vezaprovisioner.api.app import create_app
from vezaprovisioner.api.models import ReadinessCheck
from vezaprovisioner.api.readiness import Readiness
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


class Counted:
    """Counts calls of the backend probe and of the journal's readiness write in one app."""

    def __init__(self, client: TestClient, exchange: SimulatedExchange) -> None:
        self.probes = 0
        self.journal_writes = 0
        services = client.app.state.services  # type: ignore[attr-defined]
        check_writable = services.journal.check_writable

        def probe() -> str:
            self.probes += 1
            return exchange.probe()

        def journal_write() -> str:
            self.journal_writes += 1
            return str(check_writable())

        services.exchange = ProbeOverride(exchange, probe)
        services.journal.check_writable = journal_write

    def __call__(self) -> tuple[int, int]:
        return self.probes, self.journal_writes


def test_public_readiness_reuses_a_recent_run(
    make_client: Callable[..., TestClient], exchange: SimulatedExchange, clock: FakeClock
) -> None:
    client = make_client(authenticated=False)
    counted = Counted(client, exchange)
    for _ in range(20):
        assert client.get(READY).status_code == 200
    assert counted() == (1, 1)  # twenty anonymous calls: one probe, one journal write
    clock.advance(1.9)
    assert client.get(READY).status_code == 200
    assert counted() == (1, 1)
    clock.advance(0.1)  # readiness_cache_seconds = 2 by default
    assert client.get(READY).status_code == 200
    assert counted() == (2, 2)
    # The authenticated details always run the checks, and the public answer reuses that run.
    assert client.get(DETAILS, headers=AUTH).status_code == 200
    assert client.get(DETAILS, headers=AUTH).status_code == 200
    assert counted() == (4, 4)
    assert client.get(READY).status_code == 200
    assert counted() == (4, 4)


def test_public_readiness_without_reuse_runs_every_time(
    make_client: Callable[..., TestClient], exchange: SimulatedExchange
) -> None:
    client = make_client(authenticated=False, readiness_cache_seconds=0)
    counted = Counted(client, exchange)
    for _ in range(3):
        assert client.get(READY).status_code == 200
    assert counted() == (3, 3)


def test_public_readiness_shows_a_failure_once_the_reused_run_is_old(
    make_client: Callable[..., TestClient], exchange: SimulatedExchange, clock: FakeClock
) -> None:
    client = make_client(authenticated=False)
    assert client.get(READY).status_code == 200

    def failing() -> str:
        raise BackendUnavailable("all PowerShell hosts are starting")

    client.app.state.services.exchange = ProbeOverride(exchange, failing)  # type: ignore[attr-defined]
    assert client.get(READY).status_code == 200  # the run of a moment ago
    clock.advance(2)
    assert client.get(READY).status_code == 503


def test_a_hung_probe_is_not_sent_again_while_it_runs(
    make_settings: Callable[..., Settings], exchange: SimulatedExchange, clock: FakeClock
) -> None:
    release = threading.Event()
    probes: list[str] = []

    def hanging() -> str:
        probes.append("sent")
        release.wait()
        return "too late"

    port: Any = ProbeOverride(exchange, hanging)
    settings = make_settings(readiness_timeout_seconds=0.05)
    client = TestClient(create_app(settings, exchange=port, clock=clock), headers=AUTH)
    try:
        first = client.get(DETAILS).json()["checks"]["backend"]
        clock.advance(30)
        second = client.get(DETAILS).json()["checks"]["backend"]
    finally:
        release.set()
    assert probes == ["sent"]
    assert first == {"ok": False, "detail": "simulated backend did not answer within 0.05 s"}
    assert second["ok"] is False
    assert "has not answered the previous probe, sent 30 s ago" in second["detail"]


READY_CHECKS = {"backend": ReadinessCheck(ok=True, detail="answered")}


class BlockingRun:
    """Checks that wait for `release`; `entered` is set when a run starts."""

    def __init__(self) -> None:
        self.runs = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> dict[str, ReadinessCheck]:
        self.runs += 1
        self.entered.set()
        assert self.release.wait(10)
        return READY_CHECKS


async def _callers_join(readiness: Readiness, run: BlockingRun, cancel_first: bool) -> list[Any]:
    first = asyncio.ensure_future(readiness.checks())
    assert await asyncio.to_thread(run.entered.wait, 10)
    if cancel_first:
        first.cancel()  # the caller hangs up: the run goes on for the others
    later = [asyncio.ensure_future(readiness.checks()) for _ in range(5)]
    await asyncio.sleep(0)  # one turn of the loop: each later caller reaches the run in flight
    run.release.set()
    return await asyncio.gather(first, *later, return_exceptions=True)


def test_callers_during_a_run_share_it(clock: FakeClock) -> None:
    run = BlockingRun()
    answers = asyncio.run(_callers_join(Readiness(run, clock), run, cancel_first=False))
    assert run.runs == 1
    assert answers == [READY_CHECKS] * 6


def test_a_caller_who_hangs_up_does_not_cancel_the_shared_run(clock: FakeClock) -> None:
    run = BlockingRun()
    readiness = Readiness(run, clock)
    answers = asyncio.run(_callers_join(readiness, run, cancel_first=True))
    assert run.runs == 1
    assert isinstance(answers[0], asyncio.CancelledError)
    assert answers[1:] == [READY_CHECKS] * 5
    # That run's result is the one a public caller may reuse.
    assert asyncio.run(readiness.checks(max_age=1)) == READY_CHECKS
    assert run.runs == 1


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

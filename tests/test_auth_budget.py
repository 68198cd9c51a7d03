"""Wrong passwords cost the caller, not the service: scrypt runs off the event loop and only
within the failed-login budget; beyond it, 429 with Retry-After and no scrypt work at all."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import AUTH, USER, basic
from tests.fakes.clock import FakeClock
from vezaprovisioner.api.app import create_app_from_services
from vezaprovisioner.auth import Authenticator, verify_password
from vezaprovisioner.auth_budget import FailedLoginBudget
from vezaprovisioner.config import Settings
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange
from vezaprovisioner.services import build_services

EMAILS = "/VezaProvisioner/api/v1/emails"
WRONG = basic(USER, "wrong password")


class CountingVerifier:
    """The real scrypt check, counted."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, password: str, encoded: str) -> bool:
        with self._lock:
            self.calls += 1
        return verify_password(password, encoded)


@pytest.fixture
def make_app(
    make_settings: Callable[..., Settings], exchange: SimulatedExchange, clock: FakeClock
) -> Callable[..., FastAPI]:
    def make(verify: Callable[[str, str], bool], **auth: Any) -> FastAPI:
        settings = make_settings(auth=auth)
        services = build_services(settings, exchange=exchange, clock=clock)
        services.authenticator.close()
        services.authenticator = Authenticator(settings.auth, clock=clock, verify=verify)
        return create_app_from_services(services)

    return make


def test_over_the_client_budget_429_comes_before_any_password_check(
    make_app: Callable[..., FastAPI], clock: FakeClock
) -> None:
    verifier = CountingVerifier()
    app = make_app(verifier, failed_logins_per_client_per_minute=3)
    with TestClient(app) as client:
        for _ in range(3):
            assert client.post(EMAILS, json={"identity": "plain"}, headers=WRONG).status_code == 401
        assert verifier.calls == 3
        refused = client.post(EMAILS, json={"identity": "plain"}, headers=WRONG)
        assert refused.status_code == 429
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["code"] == "TOO_MANY_FAILED_LOGINS"
        assert refused.headers["retry-after"] == "20"  # 3 a minute: one token every 20 s
        # Even the right password waits: checking it would be scrypt work like any other.
        assert client.post(EMAILS, json={"identity": "plain"}, headers=AUTH).status_code == 429
        assert verifier.calls == 3
        clock.advance(20)
        assert client.post(EMAILS, json={"identity": "plain"}, headers=AUTH).status_code == 201
        assert verifier.calls == 4


def test_a_verified_caller_is_not_locked_out_by_a_flood(
    make_app: Callable[..., FastAPI],
) -> None:
    verifier = CountingVerifier()
    app = make_app(verifier, failed_logins_per_client_per_minute=2)
    with TestClient(app) as client:
        assert client.post(EMAILS, json={"identity": "plain"}, headers=AUTH).status_code == 201
        for _ in range(5):
            client.post(EMAILS, json={"identity": "plain"}, headers=WRONG)
        assert verifier.calls == 3  # one success, then two failures, then 429s
        again = client.post(EMAILS, json={"identity": "plain"}, headers=AUTH)
        assert again.status_code == 200  # remembered: no scrypt, so no budget needed
        assert verifier.calls == 3


def test_over_the_global_budget_every_client_waits(make_app: Callable[..., FastAPI]) -> None:
    verifier = CountingVerifier()
    app = make_app(verifier, failed_logins_per_client_per_minute=50, failed_logins_per_minute=3)
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        client = TestClient(app, client=(address, 50000))
        assert client.post(EMAILS, json={}, headers=WRONG).status_code == 401
    refused = TestClient(app, client=("10.0.0.4", 50000)).post(EMAILS, json={}, headers=WRONG)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "20"
    assert verifier.calls == 3


def test_the_password_check_runs_off_the_event_loop(make_app: Callable[..., FastAPI]) -> None:
    """While one password check is stuck, the same event loop still answers /health."""
    entered = threading.Event()
    release = threading.Event()

    def stuck(password: str, encoded: str) -> bool:
        entered.set()
        release.wait(timeout=30)  # bound for the failure case: the loop itself would be stuck
        return False

    app = make_app(stuck)

    async def scenario() -> tuple[int, bool, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            login = asyncio.create_task(client.post(EMAILS, json={}, headers=WRONG))
            while not entered.is_set():
                await asyncio.sleep(0)  # let the login request reach the check
            health = await client.get("/VezaProvisioner/health")
            still_stuck = not release.is_set()
            release.set()
            return health.status_code, still_stuck, (await login).status_code

    health_status, answered_while_stuck, login_status = asyncio.run(scenario())
    assert health_status == 200
    assert answered_while_stuck
    assert login_status == 401


# --- the budget alone ---------------------------------------------------------------------------


def test_budget_refunds_successes_and_refills_over_the_minute() -> None:
    clock = FakeClock()
    budget = FailedLoginBudget(per_client_per_minute=2, total_per_minute=100, clock=clock)
    assert budget.spend("a") is None
    budget.refund("a")  # a success costs nothing
    assert budget.spend("a") is None
    assert budget.spend("a") is None
    assert budget.spend("a") == 30
    assert budget.spend("b") is None  # another client has its own bucket
    clock.advance(29)
    assert budget.spend("a") == 1
    clock.advance(1)
    assert budget.spend("a") is None


def test_budget_keeps_a_bounded_number_of_clients() -> None:
    budget = FailedLoginBudget(1, 1_000_000, FakeClock(), max_clients=100)
    for n in range(1000):
        budget.spend(f"10.0.{n // 256}.{n % 256}")
    assert budget.tracked_clients == 100


def test_parallel_requests_with_the_same_credentials_share_one_check(
    make_app: Callable[..., FastAPI],
) -> None:
    """A client's first requests often come in parallel: one scrypt check, one token."""
    verifier = CountingVerifier()
    release = threading.Event()

    def slow(password: str, encoded: str) -> bool:
        release.wait(timeout=30)
        return verifier(password, encoded)

    app = make_app(slow, failed_logins_per_client_per_minute=1)

    async def scenario() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            requests = [
                asyncio.create_task(client.get("/VezaProvisioner/metrics", headers=AUTH))
                for _ in range(8)
            ]
            for _ in range(50):
                await asyncio.sleep(0)  # let them all reach the check
            release.set()
            return [response.status_code for response in await asyncio.gather(*requests)]

    assert asyncio.run(scenario()) == [200] * 8
    assert verifier.calls == 1

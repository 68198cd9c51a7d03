"""Parallel CREATE_EMAIL requests for one user reach Enable-Mailbox exactly once, and requests
beyond the flow's threads are refused at once with 503 and Retry-After."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import httpx
from fastapi.testclient import TestClient

from tests.conftest import AUTH, TEST_DIRECTORY
from vezaprovisioner.api.app import create_app
from vezaprovisioner.clock import SystemClock
from vezaprovisioner.config import Settings
from vezaprovisioner.exchange.port import Capacity, DirectoryUser
from vezaprovisioner.exchange.simulated.directory import load_directory
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange
from vezaprovisioner.flow_threads import HEAD_ROOM

EMAILS = "/VezaProvisioner/api/v1/emails"


def test_twenty_parallel_requests_for_one_identity_enable_once(
    make_settings: Callable[..., Settings],
) -> None:
    # Real time and real threads: each cmdlet takes 20 ms, so the requests overlap in Exchange.
    exchange = SimulatedExchange(
        load_directory(TEST_DIRECTORY), clock=SystemClock(), latency_ms=20, enable_latency_ms=20
    )
    app = create_app(make_settings(), exchange=exchange)
    # Several spellings of the same user: the claim is keyed by the resolved GUID.
    identities = ["CONTOSO\\plain", "plain@contoso.com", "plain", "Pat Plain"] * 5

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH) as c:
            return await asyncio.gather(
                *(c.post(EMAILS, json={"identity": identity}) for identity in identities)
            )

    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 19 + [201]
    assert exchange.count("Enable-Mailbox") == 1
    assert len({r.json()["guid"] for r in responses}) == 1


class HeldExchange:
    """A backend that runs 1 command at once and queues 1 (its `capacity`); Get-User waits at a
    gate the test opens, so the test decides when the flows in progress may finish."""

    def __init__(self, inner: SimulatedExchange) -> None:
        self.inner = inner
        self.entered = 0
        self.changed = threading.Condition()
        self.gate = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def capacity(self) -> Capacity:
        return Capacity(running=1, waiting=1)

    def get_user(self, identity: str, domain_controller: str | None = None) -> DirectoryUser:
        with self.changed:
            self.entered += 1
            self.changed.notify_all()
        self.gate.wait(30)
        return self.inner.get_user(identity, domain_controller)


def test_three_times_the_flow_threads_get_503_at_once_not_an_unbounded_wait(
    make_settings: Callable[..., Settings],
) -> None:
    exchange = HeldExchange(SimulatedExchange(load_directory(TEST_DIRECTORY), clock=SystemClock()))
    app = create_app(make_settings(), exchange=exchange)
    size = app.state.services.flows.size
    assert size == 1 + 1 + HEAD_ROOM  # sized from the backend's capacity and queue
    responses: list[httpx.Response] = []
    done = threading.Condition()

    with TestClient(app, headers=AUTH) as client:

        def send() -> None:
            response = client.post(EMAILS, json={"identity": "CONTOSO\\plain"})
            with done:
                responses.append(response)
                done.notify_all()

        threads = [threading.Thread(target=send) for _ in range(3 * size)]
        for thread in threads:
            thread.start()
        with exchange.changed:
            running = exchange.changed.wait_for(lambda: exchange.entered >= size, 30)
        with done:  # everything beyond the pool is answered while the pool is still busy
            refused_at_once = done.wait_for(lambda: len(responses) >= 2 * size, 30)
        in_flight = exchange.entered  # never more flows at once than the pool has threads
        exchange.gate.set()
        for thread in threads:
            thread.join(30)

    assert running
    assert refused_at_once
    assert in_flight == size
    refused = [r for r in responses if r.status_code == 503]
    assert len(refused) == 2 * size
    for response in refused:
        assert response.json()["code"] == "BACKEND_UNAVAILABLE"
        assert int(response.headers["Retry-After"]) > 0
    assert sorted(r.status_code for r in responses if r.status_code != 503) == [200] * (
        size - 1
    ) + [201]

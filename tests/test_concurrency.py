"""Parallel CREATE_EMAIL requests for one user reach Enable-Mailbox exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from tests.conftest import AUTH, TEST_DIRECTORY
from vezaprovisioner.api.app import create_app
from vezaprovisioner.clock import SystemClock
from vezaprovisioner.config import Settings
from vezaprovisioner.exchange.simulated.directory import load_directory
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange

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

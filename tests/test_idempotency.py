"""Idempotency-Key on CREATE_EMAIL: replay without Exchange, mismatch, in progress, expiry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import Request

from tests.conftest import PASSWORD, basic
from vezaprovisioner.api.idempotency import fingerprint, idempotency_key
from vezaprovisioner.config import JournalSettings
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange
from vezaprovisioner.failures import Failure
from vezaprovisioner.journal.idempotency import IdempotencyKeys
from vezaprovisioner.journal.records import Journal
from vezaprovisioner.provisioning import CreateEmail

EMAILS = "/VezaProvisioner/api/v1/emails"
ACTIONS = "/VezaProvisioner/api/v1/actions"


def post(client: TestClient, key: str, body: dict[str, Any], path: str = EMAILS) -> Any:
    return client.post(path, json=body, headers={"Idempotency-Key": key})


def test_same_key_same_body_replays_without_exchange(
    client: TestClient, exchange: SimulatedExchange
) -> None:
    first = post(client, "k-1", {"identity": "CONTOSO\\plain", "alias": "pat"})
    assert first.status_code == 201
    calls = len(exchange.calls)
    again = post(client, "k-1", {"identity": " CONTOSO\\plain", "alias": "pat"})  # same command
    assert again.status_code == 201
    assert again.json() == first.json()  # including the first request's request_id
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-request-id"] != first.headers["x-request-id"]
    assert len(exchange.calls) == calls  # not even a Get-User
    assert "idempotent-replayed" not in first.headers


def test_the_action_envelope_shares_keys_with_emails(
    client: TestClient, exchange: SimulatedExchange
) -> None:
    first = post(client, "k-2", {"identity": "CONTOSO\\plain"})
    calls = len(exchange.calls)
    envelope = {"action": "CREATE_EMAIL", "attributes": {"identity": "CONTOSO\\plain"}}
    again = post(client, "k-2", envelope, ACTIONS)
    assert again.json() == first.json()
    assert len(exchange.calls) == calls


def test_same_key_other_body_is_a_422_problem(
    client: TestClient, exchange: SimulatedExchange
) -> None:
    post(client, "k-3", {"identity": "CONTOSO\\plain"})
    calls = len(exchange.calls)
    response = post(client, "k-3", {"identity": "CONTOSO\\disabled"})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "IDEMPOTENCY_KEY_MISMATCH"
    assert "k-3" in response.json()["detail"]
    assert len(exchange.calls) == calls


def test_the_quoted_draft_form_is_the_same_key(client: TestClient) -> None:
    first = post(client, '"k-4"', {"identity": "CONTOSO\\plain"})
    again = post(client, "k-4", {"identity": "CONTOSO\\plain"})
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()


def test_a_refusal_is_replayed_too(client: TestClient, exchange: SimulatedExchange) -> None:
    first = post(client, "k-5", {"identity": "Alex Smith"})
    assert first.json()["code"] == "AMBIGUOUS_IDENTITY"
    calls = len(exchange.calls)
    again = post(client, "k-5", {"identity": "Alex Smith"})
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    assert again.json() == first.json()
    assert len(exchange.calls) == calls
    metrics = client.get("/VezaProvisioner/metrics").text  # the replay is counted with its code
    assert (
        'vezaprovisioner_requests_total{code="AMBIGUOUS_IDENTITY",method="POST",'
        'route="/VezaProvisioner/api/v1/emails",status="409"} 2.0'
    ) in metrics


def test_a_5xx_is_not_stored_so_a_retry_runs_again(
    client: TestClient, exchange: SimulatedExchange
) -> None:
    first = post(client, "k-6", {"identity": "busy@contoso.com"})
    assert first.status_code == 503
    before = exchange.count("Enable-Mailbox")
    again = post(client, "k-6", {"identity": "busy@contoso.com"})
    assert again.status_code == 503
    assert "idempotent-replayed" not in again.headers
    assert exchange.count("Enable-Mailbox") == before + 1


def test_keys_belong_to_their_caller(
    make_client: Callable[..., TestClient], password_hash: str
) -> None:
    client = make_client(auth={"users": {"veza-svc": password_hash, "other": password_hash}})
    first = post(client, "k-7", {"identity": "CONTOSO\\plain"})
    other = client.post(
        EMAILS,
        json={"identity": "CONTOSO\\disabled"},
        headers={"Idempotency-Key": "k-7", **basic("other", PASSWORD)},
    )
    assert first.status_code == 201
    assert other.status_code == 201  # another caller's k-7 is another key


def test_a_running_request_answers_409_with_retry_after(client: TestClient) -> None:
    journal = client.app.state.services.journal  # type: ignore[attr-defined]
    body = {"identity": "CONTOSO\\plain"}
    keys = IdempotencyKeys(journal)
    assert keys.begin("veza-svc", "k-8", fingerprint(CreateEmail("CONTOSO\\plain")), "r-0").kind
    response = post(client, "k-8", body)
    assert response.status_code == 409
    assert response.json()["code"] == "IDEMPOTENCY_KEY_IN_USE"
    assert response.headers["retry-after"] == "5"


@pytest.mark.parametrize(
    "key", [b"", b'""', b"a" * 256, b"with space", b"tab\tkey", "ü".encode(), b'"a"b"']
)
def test_bad_keys_are_validation_problems(client: TestClient, key: bytes) -> None:
    response = client.post(
        EMAILS, json={"identity": "CONTOSO\\plain"}, headers=[(b"Idempotency-Key", key)]
    )
    assert response.status_code == 422, key
    problem = response.json()
    assert problem["code"] == "VALIDATION_FAILED"
    assert problem["errors"][0]["field"] == "Idempotency-Key"


def _request(raw: bytes) -> Request:
    return Request({"type": "http", "headers": [(b"idempotency-key", raw)]})


@given(st.binary(max_size=300))
def test_any_header_value_is_a_sane_key_or_a_validation_problem(raw: bytes) -> None:
    refused: str | None = None
    try:
        key = idempotency_key(_request(raw))
    except Failure as failure:
        refused, key = failure.code, None
    if key is None:
        assert refused == "VALIDATION_FAILED"
        return
    assert 1 <= len(key) <= 255
    assert all(0x21 <= ord(c) <= 0x7E and c != '"' for c in key)


# ---- storage: expiry and abandoned keys, on a journal with a hand-moved clock -----------------


class Wall:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_keys_expire_with_the_journals_retention(tmp_path: Path) -> None:
    wall = Wall()
    journal = Journal(tmp_path, JournalSettings(retention_days=1), wall=wall)
    keys = IdempotencyKeys(journal)
    assert keys.begin("c", "k", "f1", "r1").kind == "new"
    keys.finish("c", "k", 201, "{}")
    wall.now += 86_399
    assert keys.begin("c", "k", "f1", "r2").kind == "replay"
    assert keys.begin("c", "k", "f2", "r2").kind == "mismatch"
    wall.now += 2
    assert keys.begin("c", "k", "f2", "r3").kind == "new"
    journal.close()


def test_an_abandoned_running_key_is_taken_over(tmp_path: Path) -> None:
    wall = Wall()
    journal = Journal(tmp_path, JournalSettings(stale_claim_seconds=60), wall=wall)
    keys = IdempotencyKeys(journal)
    assert keys.begin("c", "k", "f", "r1").kind == "new"
    assert keys.begin("c", "k", "f", "r2").kind == "running"
    wall.now += 61
    assert keys.begin("c", "k", "f", "r3").kind == "new"
    journal.close()

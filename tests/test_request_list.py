"""GET /api/v1/requests: journal records newest first, filtered and paginated; ids holding '/'."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

EMAILS = "/VezaProvisioner/api/v1/emails"
REQUESTS = "/VezaProvisioner/api/v1/requests"


def post(client: TestClient, request_id: str, identity: str, **headers: str) -> None:
    client.post(
        EMAILS, json={"identity": identity}, headers={"X-Request-ID": request_id, **headers}
    )


def listed(client: TestClient, **query: Any) -> dict[str, Any]:
    response = client.get(REQUESTS, params=query)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def ids(page: dict[str, Any]) -> list[str]:
    return [item["request_id"] for item in page["items"]]


@pytest.fixture
def filled(client: TestClient) -> TestClient:
    post(client, "r1", "CONTOSO\\plain")  # created
    post(client, "r2", "CONTOSO\\plain")  # already_exists
    post(client, "r3", "Alex Smith")  # failed: AMBIGUOUS_IDENTITY
    post(client, "r4", "CONTOSO\\disabled")  # created
    post(client, "r5", "mailuser@contoso.com")  # failed: WRONG_RECIPIENT_TYPE
    return client


def test_newest_first_with_every_record(filled: TestClient) -> None:
    page = listed(filled)
    assert ids(page) == ["r5", "r4", "r3", "r2", "r1"]
    assert page["next_cursor"] is None
    assert page["items"][0]["code"] == "WRONG_RECIPIENT_TYPE"
    assert page["items"][0]["state"] == "failed"


def test_pages_follow_the_cursor_without_gaps_or_repeats(filled: TestClient) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = listed(filled, limit=2, **({"cursor": cursor} if cursor else {}))
        seen += ids(page)
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["r5", "r4", "r3", "r2", "r1"]
    assert pages == 3


def test_a_new_request_does_not_shift_the_next_page(filled: TestClient) -> None:
    first = listed(filled, limit=2)
    post(filled, "r6", "CONTOSO\\plain")
    assert ids(listed(filled, limit=2, cursor=first["next_cursor"])) == ["r3", "r2"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"state": "created"}, ["r4", "r1"]),
        ({"state": "failed", "code": "AMBIGUOUS_IDENTITY"}, ["r3"]),
        ({"code": "WRONG_RECIPIENT_TYPE"}, ["r5"]),
        ({"identity": "contoso\\PLAIN"}, ["r2", "r1"]),
        ({"identity": "00000000-0000-0000-0000-000000001001"}, ["r2", "r1"]),
        ({"caller": "VEZA-SVC"}, ["r5", "r4", "r3", "r2", "r1"]),
        ({"caller": "someone-else"}, []),
        ({"request_id": "r3"}, ["r3"]),
    ],
)
def test_filters(filled: TestClient, query: dict[str, str], expected: list[str]) -> None:
    assert ids(listed(filled, **query)) == expected


def test_since_and_until_bound_the_received_time(client: TestClient) -> None:
    post(client, "old", "CONTOSO\\plain")
    received = datetime.fromisoformat(listed(client)["items"][0]["received_at"])
    later = received + timedelta(milliseconds=1)
    assert ids(listed(client, since=received.isoformat())) == ["old"]
    assert ids(listed(client, since=later.isoformat())) == []
    assert ids(listed(client, until=received.isoformat())) == []
    assert ids(listed(client, until=later.isoformat())) == ["old"]
    naive_utc = later.astimezone(timezone.utc).replace(tzinfo=None)
    assert ids(listed(client, until=naive_utc.isoformat())) == ["old"]


@pytest.mark.parametrize(
    "query",
    [
        {"limit": 0},
        {"limit": 501},
        {"state": "exploded"},
        {"cursor": "abc"},
        {"since": "yesterday"},
        {"code": "lower-case"},
    ],
)
def test_bad_parameters_are_validation_problems(client: TestClient, query: dict[str, Any]) -> None:
    response = client.get(REQUESTS, params=query)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "VALIDATION_FAILED"


def test_the_list_needs_authentication(make_client: Callable[..., TestClient]) -> None:
    response = make_client(authenticated=False).get(REQUESTS)
    assert response.status_code == 401


@pytest.mark.parametrize(
    "path",
    [
        "veza/run-7/step:1",  # as is
        quote("veza/run-7/step:1", safe=""),  # percent-encoded, %2F
    ],
)
def test_a_request_id_with_slashes_reads_back(client: TestClient, path: str) -> None:
    post(client, "veza/run-7/step:1", "CONTOSO\\plain")
    response = client.get(f"{REQUESTS}/{path}")
    assert response.status_code == 200, response.text
    assert response.json()["request_id"] == "veza/run-7/step:1"
    assert ids(listed(client, request_id="veza/run-7/step:1")) == ["veza/run-7/step:1"]


def test_an_unknown_id_with_slashes_is_a_404_problem(client: TestClient) -> None:
    response = client.get(f"{REQUESTS}/no/such/id")
    assert response.status_code == 404
    assert response.json()["code"] == "NOT_FOUND"

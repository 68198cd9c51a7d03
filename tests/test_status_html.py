"""The status page's HTML without a browser: authentication, escaping, self-contained."""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi.testclient import TestClient

STATUS = "/VezaProvisioner/status"


def test_the_status_page_needs_authentication(make_client: Callable[..., TestClient]) -> None:
    response = make_client(authenticated=False).get(STATUS)
    assert response.status_code == 401
    assert response.json()["code"] == "AUTHENTICATION_REQUIRED"


def test_journal_values_are_escaped(client: TestClient) -> None:
    client.post(
        "/VezaProvisioner/api/v1/emails",
        json={"identity": "<img src=x onerror=alert(1)>"},
        headers={"X-Request-ID": "r<b>1"},  # not sane: replaced by a UUID
    )
    html = client.get(STATUS).text
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_the_page_is_self_contained_and_refreshes(client: TestClient) -> None:
    response = client.get(STATUS)
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-store"
    html = response.text
    assert re.search(r'<meta http-equiv="refresh" content="\d+">', html)
    assert "<script" not in html
    assert "<link" not in html
    assert not re.search(r"""(?:src|href)=["']https?://""", html)


def test_a_failure_shows_what_to_do(client: TestClient) -> None:
    client.post("/VezaProvisioner/api/v1/emails", json={"identity": "Alex Smith"})
    html = client.get(STATUS).text
    assert "matches multiple entries" in html  # what Exchange said
    assert "send a unique form" in html  # what to do about it

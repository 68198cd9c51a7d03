"""CREATE_EMAIL over HTTP against the simulated Exchange: every status and code of API v1."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.fakes.clock import FakeClock
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange

EMAILS = "/VezaProvisioner/api/v1/emails"
ACTIONS = "/VezaProvisioner/api/v1/actions"
PS_PATH = r"C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe"
RX_PATH = r"C:\Program Files\Microsoft\Exchange Server\V15\bin\RemoteExchange.ps1"


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].startswith("urn:vezaprovisioner:problem:")
    assert body["title"]
    assert body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def test_creates_a_mailbox(client: TestClient, exchange: SimulatedExchange) -> None:
    response = client.post(EMAILS, json={"identity": "CONTOSO\\plain", "alias": "pat.plain"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "created"
    assert body["identity"] == "CONTOSO\\plain"
    assert body["guid"] == "00000000-0000-0000-0000-000000001001"
    assert body["alias"] == "pat.plain"
    assert body["primary_smtp_address"] == "pat.plain@contoso.com"
    assert body["recipient_type_details"] == "UserMailbox"
    assert body["distinguished_name"] == "CN=Pat Plain,OU=Staff,DC=contoso,DC=com"
    assert body["database"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert response.headers["location"] == f"{EMAILS}/{body['guid']}"
    # Enable-Mailbox got the resolved GUID, never the caller's free text.
    assert [params for name, params in exchange.calls if name == "Enable-Mailbox"] == [
        {"Identity": body["guid"], "Alias": "pat.plain"}
    ]


def test_location_answers_with_the_new_state(client: TestClient) -> None:
    created = client.post(EMAILS, json={"identity": "plain@contoso.com"})
    state = client.get(created.headers["location"])
    assert state.status_code == 200
    assert state.json()["has_mailbox"] is True
    assert state.json()["alias"] == created.json()["alias"]


def test_disabled_user_is_enabled(client: TestClient) -> None:
    assert client.post(EMAILS, json={"identity": "disabled"}).status_code == 201


def test_repeat_is_idempotent(client: TestClient, exchange: SimulatedExchange) -> None:
    first = client.post(EMAILS, json={"identity": "CONTOSO\\plain", "alias": "pat"})
    second = client.post(EMAILS, json={"identity": "plain@contoso.com", "alias": "PAT"})
    third = client.post(EMAILS, json={"identity": "CONTOSO\\plain"})
    assert first.status_code == 201
    assert (second.status_code, third.status_code) == (200, 200)
    assert second.json()["status"] == "already_exists"
    assert second.json()["guid"] == first.json()["guid"]
    assert exchange.count("Enable-Mailbox") == 1


def test_existing_mailbox_with_the_same_alias(client: TestClient) -> None:
    response = client.post(EMAILS, json={"identity": "mailbox", "alias": "Max.Mailbox"})
    assert response.status_code == 200
    assert response.json()["status"] == "already_exists"
    assert response.json()["primary_smtp_address"] == "max.mailbox@contoso.com"
    assert "location" not in response.headers


def test_existing_mailbox_with_another_alias(client: TestClient) -> None:
    response = client.post(EMAILS, json={"identity": "mailbox", "alias": "maximilian"})
    body = assert_problem(response, 409, "ALIAS_MISMATCH")
    assert "max.mailbox" in body["detail"]
    assert "exchange" not in body


@pytest.mark.parametrize("identity", ["mailuser", "remote", "shared", "room"])
def test_wrong_recipient_types_are_refused_before_any_change(
    client: TestClient, exchange: SimulatedExchange, identity: str
) -> None:
    body = assert_problem(
        client.post(EMAILS, json={"identity": identity}), 409, "WRONG_RECIPIENT_TYPE"
    )
    assert exchange.count("Enable-Mailbox") == 0
    assert "not a plain user" in body["detail"]


def test_remote_mailbox_kind_treats_remote_user_mailbox_as_existing(
    make_client: Callable[..., TestClient], exchange: SimulatedExchange
) -> None:
    client = make_client(
        mailbox_kind="remote",
        exchange={"remote_routing_domain": "contoso.mail.onmicrosoft.com"},
    )
    existing = client.post(EMAILS, json={"identity": "remote"})
    assert existing.status_code == 200
    assert existing.json()["recipient_type_details"] == "RemoteUserMailbox"
    created = client.post(EMAILS, json={"identity": "CONTOSO\\plain"})
    assert created.status_code == 201
    assert created.json()["recipient_type_details"] == "RemoteUserMailbox"
    assert exchange.calls[-1] == (
        "Enable-RemoteMailbox",
        {
            "Identity": created.json()["guid"],
            "Alias": "plain",
            "RemoteRoutingAddress": "plain@contoso.mail.onmicrosoft.com",
        },
    )
    # A local mailbox is the wrong kind in hybrid mode.
    assert_problem(client.post(EMAILS, json={"identity": "mailbox"}), 409, "WRONG_RECIPIENT_TYPE")


def test_configured_defaults_are_passed_to_enable_mailbox(
    make_client: Callable[..., TestClient], exchange: SimulatedExchange
) -> None:
    client = make_client(
        exchange={
            "database": "DB07",
            "address_book_policy": "ABP Staff",
            "retention_policy": "Default MRM Policy",
            "domain_controller": "dc02.contoso.com",
            "alias_policy": "exchange",
        }
    )
    response = client.post(EMAILS, json={"identity": "plain"})
    assert response.json()["database"] == "DB07"
    enable = [params for name, params in exchange.calls if name == "Enable-Mailbox"]
    assert enable == [
        {
            "Identity": response.json()["guid"],
            "Database": "DB07",
            "AddressBookPolicy": "ABP Staff",
            "RetentionPolicy": "Default MRM Policy",
            "DomainController": "dc02.contoso.com",
        }
    ]


def test_ambiguous_identity(client: TestClient) -> None:
    body = assert_problem(
        client.post(EMAILS, json={"identity": "Alex Smith"}), 409, "AMBIGUOUS_IDENTITY"
    )
    assert body["exchange"]["reason"] == "ManagementObjectAmbiguousException"
    assert "matches multiple entries" in body["exchange"]["message"]
    assert body["exchange"]["error_id"]


def test_not_found_after_the_replication_window(client: TestClient, clock: FakeClock) -> None:
    started = clock.monotonic()
    body = assert_problem(
        client.post(EMAILS, json={"identity": "CONTOSO\\ghost"}), 404, "IDENTITY_NOT_FOUND"
    )
    assert body["exchange"]["reason"] == "ManagementObjectNotFoundException"
    assert "couldn't be found" in body["exchange"]["message"]
    assert clock.monotonic() - started >= 3  # not_found_retry_seconds in the test settings
    assert len(clock.sleeps) > 1  # retried with backoff, not once


def test_found_within_the_replication_window(
    make_client: Callable[..., TestClient], clock: FakeClock
) -> None:
    client = make_client(not_found_retry_seconds=30)
    response = client.post(EMAILS, json={"identity": "CONTOSO\\newhire"})  # appears after 10 s
    assert response.status_code == 201, response.text
    assert 10 <= clock.monotonic() - 1000.0 < 30


def test_no_retry_window_answers_at_once(
    make_client: Callable[..., TestClient], clock: FakeClock
) -> None:
    client = make_client(not_found_retry_seconds=0)
    assert_problem(client.post(EMAILS, json={"identity": "newhire"}), 404, "IDENTITY_NOT_FOUND")
    assert clock.sleeps == []


def test_address_in_use(client: TestClient) -> None:
    body = assert_problem(
        client.post(EMAILS, json={"identity": "taken", "alias": "sales.team"}),
        409,
        "ADDRESS_IN_USE",
    )
    assert body["exchange"]["reason"] == "ProxyAddressExistsException"
    assert "SMTP:sales.team@contoso.com" in body["exchange"]["message"]


@pytest.mark.parametrize(
    ("identity", "status", "code", "reason"),
    [
        ("slow", 504, "EXCHANGE_TIMEOUT", None),
        ("busy", 503, "BACKEND_UNAVAILABLE", None),
        ("denied", 502, "EXCHANGE_PERMISSION_DENIED", "ADOperationException"),
        ("weird", 502, "EXCHANGE_ERROR", "ADOperationException"),
    ],
)
def test_exchange_failures(
    client: TestClient, identity: str, status: int, code: str, reason: str | None
) -> None:
    body = assert_problem(client.post(EMAILS, json={"identity": identity}), status, code)
    if reason:
        assert body["exchange"]["reason"] == reason
        assert body["exchange"]["message"]
        assert body["exchange"]["error_id"]
    else:
        assert "exchange" not in body


def test_timeout_says_the_outcome_is_unknown_and_how_to_check(client: TestClient) -> None:
    body = client.post(EMAILS, json={"identity": "slow"}).json()
    assert "outcome is unknown" in body["detail"]
    assert "GET .../api/v1/emails/{identity}" in body["detail"]


def test_unavailable_says_when_to_retry(client: TestClient) -> None:
    response = client.post(EMAILS, json={"identity": "busy"})
    assert int(response.headers["retry-after"]) > 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("powershell_path", PS_PATH),
        ("powershell_path", PS_PATH.upper().replace("\\", "/")),
        ("remote_exchange_path", RX_PATH.lower()),
    ],
)
def test_declared_paths_equal_to_the_configured_ones_are_accepted(
    client: TestClient, field: str, value: str
) -> None:
    assert client.post(EMAILS, json={"identity": "plain", field: value}).status_code == 201


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("powershell_path", r"C:\Windows\System32\WindowsPowerShell\v1.0\pwsh.exe"),
        ("remote_exchange_path", r"D:\Exchange\bin\RemoteExchange.ps1"),
    ],
)
def test_other_paths_are_refused_and_nothing_runs(
    client: TestClient, exchange: SimulatedExchange, field: str, value: str
) -> None:
    body = assert_problem(
        client.post(EMAILS, json={"identity": "plain", field: value}), 400, "PATH_MISMATCH"
    )
    assert field in body["detail"]
    assert exchange.calls == []


def test_validation_lists_every_bad_field(client: TestClient, exchange: SimulatedExchange) -> None:
    response = client.post(EMAILS, json={"identity": "a*b", "alias": "j doe", "colour": "red"})
    body = assert_problem(response, 422, "VALIDATION_FAILED")
    by_field = {entry["field"]: entry["message"] for entry in body["errors"]}
    assert set(by_field) == {"identity", "alias", "colour"}
    assert "position 2" in by_field["identity"]
    assert "position 2" in by_field["alias"]
    assert exchange.calls == []


@pytest.mark.parametrize(
    "payload",
    [{}, {"identity": ""}, {"identity": "   "}, {"identity": 42}, {"identity": "x" * 1025}, []],
)
def test_invalid_identity_values(client: TestClient, payload: Any) -> None:
    assert_problem(client.post(EMAILS, json=payload), 422, "VALIDATION_FAILED")


def test_empty_alias_means_no_alias(
    make_client: Callable[..., TestClient], exchange: SimulatedExchange
) -> None:
    client = make_client(exchange={"alias_policy": "exchange"})
    assert client.post(EMAILS, json={"identity": "plain", "alias": ""}).status_code == 201
    assert "Alias" not in exchange.calls[-1][1]


def test_malformed_json(client: TestClient) -> None:
    response = client.post(
        EMAILS, content=b'{"identity": ', headers={"Content-Type": "application/json"}
    )
    body = assert_problem(response, 422, "VALIDATION_FAILED")
    assert body["errors"][0]["field"] == "body"


def test_oversize_body(client: TestClient, exchange: SimulatedExchange) -> None:
    response = client.post(EMAILS, json={"identity": "plain", "alias": "a" * 17_000})
    assert_problem(response, 413, "PAYLOAD_TOO_LARGE")
    assert exchange.calls == []


def test_oversize_body_without_content_length(client: TestClient) -> None:
    def chunks() -> Any:
        yield b'{"identity": "'
        for _ in range(20):
            yield b"a" * 1024
        yield b'"}'

    response = client.post(EMAILS, content=chunks(), headers={"Content-Type": "application/json"})
    assert_problem(response, 413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_non_json_body(client: TestClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(EMAILS, content=b'{"identity": "plain"}', headers=headers)
    assert_problem(response, 415, "UNSUPPORTED_MEDIA_TYPE")


def test_action_create_email_behaves_like_the_route(client: TestClient) -> None:
    response = client.post(
        ACTIONS, json={"action": "CREATE_EMAIL", "attributes": {"identity": "plain", "alias": "pp"}}
    )
    assert response.status_code == 201
    assert response.json()["alias"] == "pp"
    again = client.post(
        ACTIONS, json={"action": "CREATE_EMAIL", "attributes": {"identity": "plain"}}
    )
    assert again.json()["status"] == "already_exists"


def test_action_validation_names_attribute_fields(client: TestClient) -> None:
    response = client.post(ACTIONS, json={"action": "CREATE_EMAIL", "attributes": {"alias": ".x"}})
    body = assert_problem(response, 422, "VALIDATION_FAILED")
    assert {e["field"] for e in body["errors"]} == {"attributes.identity", "attributes.alias"}


@pytest.mark.parametrize(
    "action", ["SYNC_IDENTITIES", "MANAGE_RELATIONSHIPS", "DEPROVISION_IDENTITY"]
)
def test_unsupported_actions(client: TestClient, action: str) -> None:
    response = client.post(ACTIONS, json={"action": action, "attributes": {"identity": "plain"}})
    body = assert_problem(response, 501, "ACTION_NOT_SUPPORTED")
    assert "CREATE_EMAIL" in body["detail"]


@pytest.mark.parametrize(
    "payload", [{"action": "DELETE_EVERYTHING"}, {"action": "create_email"}, {}]
)
def test_unknown_actions(client: TestClient, payload: dict[str, str]) -> None:
    body = assert_problem(client.post(ACTIONS, json=payload), 422, "VALIDATION_FAILED")
    assert body["errors"][0]["field"] == "action"


def test_read_state(client: TestClient) -> None:
    response = client.get(f"{EMAILS}/mailbox@contoso.com")
    assert response.status_code == 200
    body = response.json()
    assert body["has_mailbox"] is True
    assert body["provisionable"] is False
    assert body["alias"] == "max.mailbox"
    assert body["recipient_type_details"] == "UserMailbox"
    plain = client.get(f"{EMAILS}/CONTOSO%5Cplain").json()
    assert (plain["has_mailbox"], plain["provisionable"], plain["alias"]) == (False, True, None)


def test_read_state_of_a_dn_with_slashes_and_commas(client: TestClient) -> None:
    response = client.get(f"{EMAILS}/CN=Pat Plain,OU=Staff,DC=contoso,DC=com")
    assert response.json()["guid"] == "00000000-0000-0000-0000-000000001001"


def test_read_state_not_found_and_invalid(client: TestClient) -> None:
    assert_problem(client.get(f"{EMAILS}/nobody"), 404, "IDENTITY_NOT_FOUND")
    assert_problem(client.get(f"{EMAILS}/a*"), 422, "VALIDATION_FAILED")


def test_request_id_is_echoed_when_sane_and_replaced_otherwise(client: TestClient) -> None:
    echoed = client.get("/VezaProvisioner/health", headers={"X-Request-ID": "veza-1234"})
    assert echoed.headers["x-request-id"] == "veza-1234"
    replaced = client.get("/VezaProvisioner/health", headers={"X-Request-ID": "bad id\twith tab"})
    assert replaced.headers["x-request-id"] not in ("", "bad id\twith tab")
    problem = client.post(EMAILS, json={}, headers={"X-Request-ID": "veza-5678"})
    assert problem.json()["request_id"] == "veza-5678"


def test_unknown_route_and_method_are_problems(client: TestClient) -> None:
    assert_problem(client.get("/VezaProvisioner/api/v1/nothing"), 404, "NOT_FOUND")
    assert_problem(client.delete(EMAILS), 405, "METHOD_NOT_ALLOWED")


def test_configurable_base_path(make_client: Callable[..., TestClient]) -> None:
    client = make_client(base_path="/Provisioning/Exchange")
    assert client.get("/Provisioning/Exchange/health").status_code == 200
    assert client.get("/VezaProvisioner/health").status_code == 404
    created = client.post("/Provisioning/Exchange/api/v1/emails", json={"identity": "plain"})
    assert created.headers["location"].startswith("/Provisioning/Exchange/api/v1/emails/")


INVISIBLES = ["\u200b", "\u202e", "\u2066", "\ufeff", "\u00ad", "\x00", "\x1b", "\ud800"]


def _raw_text_shows_none_of(response: Any, characters: str) -> bool:
    text = response.content.decode("utf-8", "surrogatepass")
    return not any(ch in text for ch in characters)


@pytest.mark.parametrize("char", INVISIBLES)
def test_invisible_characters_are_refused_by_name_and_never_reflected(
    client: TestClient, exchange: SimulatedExchange, char: str
) -> None:
    shown = f"U+{ord(char):04X}"
    body = json.dumps({"identity": f"jd{char}oe", "alias": f"j{char}d"})  # "\ud800" escapes
    response = client.post(EMAILS, content=body, headers={"Content-Type": "application/json"})
    problem = assert_problem(response, 422, "VALIDATION_FAILED")
    messages = {entry["field"]: entry["message"] for entry in problem["errors"]}
    assert shown in messages["identity"]
    assert shown in messages["alias"]
    assert {entry["type"] for entry in problem["errors"]} == {"invisible_character"}
    assert _raw_text_shows_none_of(response, char)
    assert exchange.calls == []


@pytest.mark.parametrize("char", ["\u202e", "\x00"])
def test_an_unknown_field_is_named_without_reflecting_its_invisible_characters(
    client: TestClient, char: str
) -> None:
    response = client.post(EMAILS, json={"identity": "plain", f"x{char}": 1})
    problem = assert_problem(response, 422, "VALIDATION_FAILED")
    assert [entry["field"] for entry in problem["errors"]] == [f"x<U+{ord(char):04X}>"]
    assert _raw_text_shows_none_of(response, char)


@pytest.mark.parametrize("char", ["\u202e", "\u200b", "\x7f"])
def test_invisible_characters_in_paths_are_never_reflected(client: TestClient, char: str) -> None:
    encoded = "".join(f"%{b:02X}" for b in char.encode())
    state = client.get(f"{EMAILS}/jd{encoded}oe")
    assert (
        f"U+{ord(char):04X}"
        in assert_problem(state, 422, "VALIDATION_FAILED")["errors"][0]["message"]
    )
    nowhere = client.get(f"/VezaProvisioner/no{encoded}where")
    assert f"<U+{ord(char):04X}>" in assert_problem(nowhere, 404, "NOT_FOUND")["detail"]
    for response in (state, nowhere):
        assert _raw_text_shows_none_of(response, char)


def test_a_path_identity_that_is_not_utf8_is_refused(
    client: TestClient, exchange: SimulatedExchange
) -> None:
    response = client.get(f"{EMAILS}/jd%ED%A0%80oe")  # a surrogate, encoded as bytes
    problem = assert_problem(response, 422, "VALIDATION_FAILED")
    assert "U+FFFD" in problem["errors"][0]["message"]
    assert exchange.calls == []

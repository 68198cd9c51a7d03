"""exchange.alias_policy: an alias for every name, never Exchange's "????"."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from vezaprovisioner.aliases import NoAlias, ascii_alias, choose_alias
from vezaprovisioner.exchange.port import DirectoryUser
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange
from vezaprovisioner.validation import validate_alias

EMAILS = "/VezaProvisioner/api/v1/emails"
YAMADA_GUID = "00000000-0000-0000-0000-000000001012"


def user(name: str, upn_prefix: str | None = None, sam: str | None = None) -> DirectoryUser:
    return DirectoryUser(
        guid="00000000-0000-0000-0000-0000000000aa",
        distinguished_name=f"CN={name},OU=Staff,DC=contoso,DC=com",
        sam_account_name=sam if sam is not None else (upn_prefix or name),
        user_principal_name=f"{upn_prefix or name}@contoso.com",
        name=name,
        display_name=name,
        recipient_type_details="User",
    )


@pytest.mark.parametrize(
    ("name", "alias"),
    [
        ("José Álvarez", "JoseAlvarez"),
        ("józef.müller", "jozef.muller"),
        ("Łukasz", "Lukasz"),
        ("Müller", "Muller"),
        ("山田", "ShanTian"),
        ("Дмитрий", "Dmitriy"),
        ("Anne-Marie O'Neil", "Anne-MarieONeil"),
        (".a..b.", "a.b"),
        ("x" * 70, "x" * 64),
    ],
)
def test_names_transliterate_to_ascii_aliases(name: str, alias: str) -> None:
    assert ascii_alias(name) == alias


@pytest.mark.parametrize("name", ["", "   ", "\u200b\u200b", "؟؟", "・・・", "...", "\u0301"])
def test_names_that_transliterate_to_nothing_give_no_alias(name: str) -> None:
    assert ascii_alias(name) is None


@given(st.text(max_size=100))
def test_any_derived_alias_is_a_valid_pure_ascii_exchange_alias(text: str) -> None:
    alias = ascii_alias(text)
    if alias is not None:
        assert validate_alias(alias) == alias
        assert alias.isascii()
        assert any(c.isalnum() for c in alias)


@given(st.text(max_size=30), st.text(max_size=30), st.text(max_size=30))
def test_transliterate_gives_a_valid_alias_or_refuses(name: str, upn: str, sam: str) -> None:
    try:
        choice = choose_alias(user(name, upn, sam), "transliterate")
    except NoAlias:
        return
    assert choice.alias is not None
    assert validate_alias(choice.alias).isascii()
    assert choice.warning


def test_transliterate_prefers_the_upn_prefix() -> None:
    choice = choose_alias(user("山田太郎", "tyamada"), "transliterate")
    assert choice.alias == "tyamada"
    assert choice.warning is not None
    assert "UPN prefix 'tyamada'" in choice.warning
    assert "transliterated" not in choice.warning


def test_transliterate_falls_back_to_the_name() -> None:
    choice = choose_alias(user("Дмитрий Иванов", "\u200b", sam="؟"), "transliterate")
    assert choice.alias == "DmitriyIvanov"
    assert choice.warning is not None
    assert "transliterated" in choice.warning


def test_transliterate_refuses_when_nothing_is_left() -> None:
    with pytest.raises(NoAlias, match="Send an alias"):
        choose_alias(user("؟؟", "\u200b", sam="・"), "transliterate")


@pytest.mark.parametrize("name", ["José Álvarez", "Łukasz Nowak", "Müller", "山田", "Дмитрий"])
def test_require_refuses_names_exchange_would_mangle(name: str) -> None:
    with pytest.raises(NoAlias, match="not pure ASCII"):
        choose_alias(user(name, "someone"), "require")


def test_require_lets_exchange_derive_an_ascii_alias() -> None:
    assert choose_alias(user("John Doe", "jdoe"), "require").alias is None


def test_exchange_policy_never_chooses() -> None:
    assert choose_alias(user("山田", "山田"), "exchange").alias is None


# Through the API, against the simulated Exchange (a port of Exchange's own alias generation).


def test_transliterated_alias_is_passed_and_warned_about(
    client: TestClient, exchange: SimulatedExchange
) -> None:
    response = client.post(EMAILS, json={"identity": "CONTOSO\\山田太郎"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["alias"] == "ShanTianTaiLang"
    assert body["primary_smtp_address"] == "ShanTianTaiLang@contoso.com"
    assert len(body["warnings"]) == 1
    assert "ShanTianTaiLang" in body["warnings"][0]
    assert exchange.calls[-1] == (
        "Enable-Mailbox",
        {"Identity": YAMADA_GUID, "Alias": "ShanTianTaiLang"},
    )


def test_an_alias_from_the_caller_gives_no_warning(client: TestClient) -> None:
    response = client.post(EMAILS, json={"identity": "jose@contoso.com", "alias": "jose.alvarez"})
    assert response.status_code == 201
    assert response.json()["warnings"] == []


def test_require_answers_alias_required_before_enable(
    make_client: Callable[..., TestClient], exchange: SimulatedExchange
) -> None:
    client = make_client(exchange={"alias_policy": "require"})
    response = client.post(EMAILS, json={"identity": "jose@contoso.com"})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "ALIAS_REQUIRED"
    assert "José Álvarez" in response.json()["detail"]
    assert exchange.count("Enable-Mailbox") == 0


def test_exchange_policy_keeps_exchanges_question_marks(
    make_client: Callable[..., TestClient],
) -> None:
    """What the default setting prevents: Exchange's own alias for 山田太郎."""
    client = make_client(exchange={"alias_policy": "exchange"})
    body = client.post(EMAILS, json={"identity": "CONTOSO\\山田太郎"}).json()
    assert body["alias"] == "????"
    assert body["warnings"] == []

"""Authentication fails closed, in both modes; IIS's variables are trusted, headers never."""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import AUTH, PASSWORD, USER, basic
from tests.fakes.clock import FakeClock
from vezaprovisioner.api.app import create_app
from vezaprovisioner.auth import (
    AuthenticationError,
    NotAuthenticated,
    _basic_credentials,
    hash_password,
    verify_password,
)
from vezaprovisioner.config import Settings
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange
from vezaprovisioner.iis import iis_server_variables

EMAILS = "/VezaProvisioner/api/v1/emails"


def test_scrypt_hash_verifies_only_the_right_password() -> None:
    hashed = hash_password("pa:ss wörd")
    assert hashed.startswith("scrypt$16384$8$1$")
    assert verify_password("pa:ss wörd", hashed)
    assert not verify_password("pa:ss word", hashed)
    assert hash_password("same") != hash_password("same")  # salted
    assert not verify_password("x", "scrypt$garbage")


# --- basic mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic(USER, "wrong"),
        basic("nobody", PASSWORD),
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic !!!notbase64"},
        {"Authorization": "Basic dXNlcm5hbWVvbmx5"},  # "usernameonly": no colon
    ],
)
def test_basic_mode_refuses_without_valid_credentials(
    make_client: Callable[..., TestClient], exchange: SimulatedExchange, headers: dict[str, str]
) -> None:
    client = make_client(authenticated=False)
    response = client.post(EMAILS, json={"identity": "plain"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["code"] == "AUTHENTICATION_REQUIRED"
    assert response.headers["www-authenticate"].startswith('Basic realm="VezaProvisioner"')
    assert exchange.calls == []


def test_basic_mode_matches_user_names_exactly_by_default(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(authenticated=False)
    upper = client.post(EMAILS, json={"identity": "plain"}, headers=basic(USER.upper(), PASSWORD))
    assert upper.status_code == 401
    ok = client.post(EMAILS, json={"identity": "plain"}, headers=AUTH)
    assert ok.status_code == 201
    again = client.post(EMAILS, json={"identity": "plain"}, headers=AUTH)  # verified-password cache
    assert again.status_code == 200
    wrong = client.post(EMAILS, json={"identity": "plain"}, headers=basic(USER, PASSWORD + "x"))
    assert wrong.status_code == 401  # the cache never accepts another password


def test_case_insensitive_users_names_the_caller_as_configured(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vezaprovisioner.access")
    client = make_client(authenticated=False, auth={"case_insensitive_users": True})
    created = client.post(EMAILS, json={"identity": "plain"}, headers=basic(USER.upper(), PASSWORD))
    assert created.status_code == 201
    logged = [getattr(r, "fields", {}).get("user.name") for r in caplog.records]
    assert logged == [USER]
    request_id = created.json()["request_id"]
    record = client.get(f"/VezaProvisioner/api/v1/requests/{request_id}", headers=AUTH)
    assert record.json()["caller"] == USER  # not "VEZA-SVC" as typed


def test_case_insensitive_users_refuses_names_that_differ_only_in_case(
    make_settings: Callable[..., Settings], password_hash: str
) -> None:
    doubled = {"users": {"VEZA-SVC": password_hash}}  # beside the fixture's "veza-svc"
    assert make_settings(auth=doubled).auth.users.keys() == {USER, "VEZA-SVC"}
    with pytest.raises(ValueError, match="same user"):
        make_settings(auth={"case_insensitive_users": True, **doubled})


@pytest.mark.parametrize(
    ("user", "password"),
    [(USER, PASSWORD + "\0"), (USER, "\0" + PASSWORD), (USER + "\0", PASSWORD), (USER, "a\x7fb")],
)
def test_basic_mode_refuses_control_characters_in_credentials(
    make_client: Callable[..., TestClient], user: str, password: str
) -> None:
    client = make_client(authenticated=False)
    response = client.post(EMAILS, json={"identity": "plain"}, headers=basic(user, password))
    assert response.status_code == 401
    assert "control character" in response.json()["detail"]


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", AUTH["Authorization"]), ("Authorization", AUTH["Authorization"])],
        [("Authorization", AUTH["Authorization"]), ("Authorization", "Basic Zm9vOmJhcg==")],
        [("Authorization", f"{AUTH['Authorization']}, Basic Zm9vOmJhcg==")],  # joined by a server
    ],
)
def test_basic_mode_refuses_more_than_one_authorization_header(
    make_client: Callable[..., TestClient],
    exchange: SimulatedExchange,
    headers: list[tuple[str, str]],
) -> None:
    client = make_client(authenticated=False)
    response = client.post(EMAILS, json={"identity": "plain"}, headers=headers)
    assert response.status_code == 400
    assert response.json()["code"] == "MULTIPLE_AUTHORIZATION_HEADERS"
    assert exchange.calls == []


def test_authentication_happens_before_the_body_is_read(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(authenticated=False)
    response = client.post(EMAILS, content=b"not json", headers={"Content-Type": "text/plain"})
    assert response.status_code == 401


def test_every_non_public_path_needs_authentication(make_client: Callable[..., TestClient]) -> None:
    client = make_client(authenticated=False)
    assert client.get(f"{EMAILS}/plain").status_code == 401
    assert client.get("/VezaProvisioner/api/v1/anything").status_code == 401
    assert client.get("/elsewhere").status_code == 401
    for public in ("/health", "/health/ready", "/openapi.json", "/docs"):
        assert client.get(f"/VezaProvisioner{public}").status_code == 200


def test_allowed_users_applies_in_basic_mode(make_client: Callable[..., TestClient]) -> None:
    client = make_client(auth={"allowed_users": ["someone-else"]})
    response = client.post(EMAILS, json={"identity": "plain"})
    assert response.status_code == 403
    assert response.json()["code"] == "CALLER_NOT_ALLOWED"


def test_passwords_and_authorization_headers_are_never_logged(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client(authenticated=False)
    client.post(EMAILS, json={"identity": "plain"}, headers=basic(USER, "wrong-secret"))
    client.post(EMAILS, json={"identity": "weird"}, headers=AUTH)
    logged = caplog.text
    assert "wrong-secret" not in logged
    assert PASSWORD not in logged
    assert AUTH["Authorization"].split()[1] not in logged


# --- iis mode -----------------------------------------------------------------------------------


class IisEnviron:
    """Plays the IIS entry: hands an IIS-like WSGI environ to the app as scope["wsgi_environ"]."""

    def __init__(self, app: FastAPI, environ: dict[str, str]) -> None:
        self.app = app
        self.environ = environ

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "wsgi_environ": dict(self.environ)}
        await self.app(scope, receive, send)


def iis_environ(user: str | None, https: str = "on") -> dict[str, str]:
    """The server variables IIS sets after Basic authentication (research iis-pypsrp §2)."""
    environ = {
        "HTTPS": https,
        "SERVER_PORT_SECURE": "1" if https == "on" else "0",
        "REMOTE_ADDR": "10.0.0.5",
        "APPL_PHYSICAL_PATH": "C:\\inetpub\\VezaProvisioner\\",
        "SCRIPT_NAME": "",
        "PATH_INFO": EMAILS,
    }
    if user is not None:
        environ.update(AUTH_TYPE="Basic", AUTH_USER=user, REMOTE_USER=user, LOGON_USER=user)
    return environ


@pytest.fixture
def iis_client(
    make_settings: Callable[..., Settings], exchange: SimulatedExchange, clock: FakeClock
) -> Callable[..., TestClient]:
    def make(environ: dict[str, str] | None, **auth: Any) -> TestClient:
        settings = make_settings(auth={"mode": "iis", **auth})
        app = create_app(settings, exchange=exchange, clock=clock)
        return TestClient(IisEnviron(app, environ) if environ is not None else app)

    return make


def test_iis_mode_trusts_the_iis_authenticated_user(iis_client: Callable[..., TestClient]) -> None:
    client = iis_client(iis_environ("CONTOSO\\svc-veza"))
    assert client.post(EMAILS, json={"identity": "plain"}).status_code == 201


@pytest.mark.parametrize("environ", [None, iis_environ(None), iis_environ("")])
def test_iis_mode_without_an_iis_user_is_401(
    iis_client: Callable[..., TestClient], environ: dict[str, str] | None
) -> None:
    client = iis_client(environ)
    response = client.post(EMAILS, json={"identity": "plain"})
    assert response.status_code == 401
    assert "www-authenticate" not in response.headers  # IIS does the challenge, not us


def test_iis_mode_ignores_client_headers_and_basic_credentials(
    iis_client: Callable[..., TestClient],
) -> None:
    client = iis_client(iis_environ(None))
    spoofed = {"X-Remote-User": "CONTOSO\\admin", "Remote-User": "CONTOSO\\admin", **AUTH}
    assert client.post(EMAILS, json={"identity": "plain"}, headers=spoofed).status_code == 401


def test_iis_mode_allowed_users(iis_client: Callable[..., TestClient]) -> None:
    allowed = ["CONTOSO\\svc-veza", "veza@contoso.com"]
    for user in ("contoso\\SVC-VEZA", "VEZA@contoso.com"):
        client = iis_client(iis_environ(user), allowed_users=allowed)
        assert client.post(EMAILS, json={"identity": "plain"}).status_code in (200, 201)
    other = iis_client(iis_environ("CONTOSO\\mallory"), allowed_users=allowed)
    response = other.post(EMAILS, json={"identity": "plain"})
    assert response.status_code == 403
    assert response.json()["code"] == "CALLER_NOT_ALLOWED"


def test_iis_mode_requires_https_by_default(iis_client: Callable[..., TestClient]) -> None:
    client = iis_client(iis_environ("CONTOSO\\svc-veza", https="off"))
    response = client.post(EMAILS, json={"identity": "plain"})
    assert response.status_code == 403
    assert response.json()["code"] == "HTTPS_REQUIRED"
    upper = iis_client(iis_environ("CONTOSO\\svc-veza", https="ON"))
    assert upper.post(EMAILS, json={"identity": "plain"}).status_code == 201
    relaxed = iis_client(iis_environ("CONTOSO\\svc-veza", https="off"), require_https=False)
    assert relaxed.post(EMAILS, json={"identity": "plain"}).status_code == 200


def test_iis_variables_are_read_from_the_wsgi_environ_only() -> None:
    assert iis_server_variables({"headers": [(b"remote_user", b"x")]}) is None
    variables = iis_server_variables({"wsgi_environ": {"AUTH_USER": " CONTOSO\\a ", "HTTPS": "on"}})
    assert variables is not None
    assert variables.authenticated_user == "CONTOSO\\a"
    assert variables.https


# --- parsing the Authorization header (properties) ----------------------------------------------

_NO_SURROGATES = st.characters(codec="utf-8")  # no lone surrogates: they cannot be sent


@given(st.text(_NO_SURROGATES), st.text(_NO_SURROGATES))
def test_basic_credentials_come_back_exactly_or_are_refused(user: str, password: str) -> None:
    header = basic(user, password)["Authorization"]
    has_control = any(unicodedata.category(ch) == "Cc" for ch in user + password)
    try:
        parsed = _basic_credentials([header])
    except NotAuthenticated:
        assert has_control
        return
    assert not has_control
    if ":" not in user:
        assert parsed == (user, password)
    else:  # the first colon separates them, as RFC 7617 says
        assert parsed == tuple(f"{user}:{password}".split(":", 1))


@given(st.lists(st.text(), max_size=3))
def test_any_authorization_headers_give_credentials_or_an_authentication_error(
    headers: list[str],
) -> None:
    try:
        name, password = _basic_credentials(headers)
    except AuthenticationError:
        return
    assert len(headers) == 1
    assert not any(unicodedata.category(ch) == "Cc" for ch in name + password)


def test_the_iis_caller_is_the_account_and_the_typed_name_is_its_alias() -> None:
    typed_upn = {"AUTH_USER": "veza@contoso.com", "REMOTE_USER": "veza@contoso.com"}
    variables = iis_server_variables({"wsgi_environ": {**typed_upn, "LOGON_USER": "CONTOSO\\veza"}})
    assert variables is not None
    assert variables.authenticated_user == "CONTOSO\\veza"
    assert variables.user_names == ("CONTOSO\\veza", "veza@contoso.com")
    same = iis_server_variables({"wsgi_environ": {**typed_upn, "LOGON_USER": "VEZA@contoso.com"}})
    assert same is not None
    assert same.user_names == ("VEZA@contoso.com",)  # one account, one name, whatever the case
    no_logon = iis_server_variables({"wsgi_environ": typed_upn})
    assert no_logon is not None
    assert no_logon.authenticated_user == "veza@contoso.com"

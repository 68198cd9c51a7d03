"""The failure tree through the HTTP layer: every class answers with its documented status and code.

The README's error table is the contract. Every subclass of `Failure` in the package is thrown from
a route of a real app and must come back as problem+json with its own status, code, title and
detail; every row of the table must belong to some class. Bodies the API cannot read never get a
404, and Starlette's own HTTP errors keep their status (405 with Allow, never 415 or 404).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vezaprovisioner
from tests.conftest import REPO_ROOT
from vezaprovisioner.auth import (
    AuthenticationError,
    CallerNotAllowed,
    HttpsRequired,
    MultipleAuthorizations,
    NotAuthenticated,
    TooManyFailedLogins,
)
from vezaprovisioner.config import ConfigError
from vezaprovisioner.exchange.errors import (
    AddressInUse,
    AmbiguousIdentity,
    BackendUnavailable,
    ExchangeError,
    ExchangeTimeout,
    IdentityNotFound,
    PermissionDenied,
    UnexpectedExchangeError,
    WrongRecipientType,
)
from vezaprovisioner.exchange.port import Recipient
from vezaprovisioner.failures import (
    ActionNotSupported,
    BadRequest,
    Failure,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceNotStarted,
    UnsupportedMediaType,
    ValidationFailed,
)
from vezaprovisioner.journal.claims import IdentityBusy
from vezaprovisioner.journal.idempotency import IdempotencyKeyInUse, IdempotencyKeyMismatch
from vezaprovisioner.journal.store import JournalUnavailable
from vezaprovisioner.provisioning import (
    AliasMismatch,
    AliasRequired,
    PathMismatch,
    ProvisioningError,
)

BASE = "/VezaProvisioner"
RAISE = f"{BASE}/test-only/raise"
EMAILS = f"{BASE}/api/v1/emails"
ACTIONS = f"{BASE}/api/v1/actions"
PROBLEM = "application/problem+json"


def documented_table() -> set[tuple[int, str]]:
    """(status, code) of every row of the README's error table."""
    text = (REPO_ROOT / "README.md").read_text("utf-8")
    section = text.split("### Errors", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| (\d{3}) \| `([A-Z_]+)` \|", section, flags=re.MULTILINE)
    return {(int(status), code) for status, code in rows}


DOCUMENTED = documented_table()


def every_failure_class() -> set[type[Failure]]:
    """Failure and all its subclasses, after importing every module of the package."""
    for module in pkgutil.walk_packages(vezaprovisioner.__path__, "vezaprovisioner."):
        if not module.name.endswith("__main__"):  # that one runs the CLI
            importlib.import_module(module.name)
    found: set[type[Failure]] = set()
    pending: list[type[Failure]] = [Failure]
    while pending:
        cls = pending.pop()
        if cls.__module__.startswith("vezaprovisioner") and cls not in found:
            found.add(cls)
            pending.extend(cls.__subclasses__())
    return found


text = st.text(min_size=1, max_size=80)
maybe = st.none() | text
exchange_details = st.fixed_dictionaries(
    {"reason": maybe, "error_id": maybe, "exception_type": maybe}
)


def exchange_error(cls: type[ExchangeError]) -> st.SearchStrategy[Failure]:
    return st.builds(lambda message, details: cls(message, **details), text, exchange_details)


recipients = st.builds(
    Recipient,
    guid=st.uuids().map(str),
    distinguished_name=text,
    alias=text,
    primary_smtp_address=text,
    recipient_type_details=st.just("UserMailbox"),
    database=maybe,
)
field_errors = st.lists(
    st.fixed_dictionaries({"field": text, "message": text, "type": text}), min_size=1, max_size=3
)
methods = st.lists(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"]), unique=True)

#: How to build an instance of each class; a new class without an entry fails the tests below.
BUILDERS: dict[type[Failure], st.SearchStrategy[Failure]] = {
    Failure: st.builds(Failure, text),
    BadRequest: st.builds(BadRequest, text),
    NotFound: st.builds(NotFound, text),
    MethodNotAllowed: st.builds(lambda m, a: MethodNotAllowed(m, allowed=a), text, methods),
    PayloadTooLarge: st.builds(PayloadTooLarge, text),
    UnsupportedMediaType: st.builds(UnsupportedMediaType, text),
    ValidationFailed: st.builds(ValidationFailed, field_errors),
    ActionNotSupported: st.builds(ActionNotSupported, text),
    ServiceNotStarted: st.builds(ServiceNotStarted, text),
    ConfigError: st.builds(ConfigError, text),
    AuthenticationError: st.builds(AuthenticationError, text),
    NotAuthenticated: st.builds(NotAuthenticated, text),
    CallerNotAllowed: st.builds(CallerNotAllowed, text),
    HttpsRequired: st.builds(HttpsRequired, text),
    MultipleAuthorizations: st.builds(MultipleAuthorizations, text),
    TooManyFailedLogins: st.builds(
        lambda m, s: TooManyFailedLogins(m, retry_after_seconds=s), text, st.integers(1, 3600)
    ),
    ProvisioningError: st.builds(ProvisioningError, text),
    PathMismatch: st.builds(
        PathMismatch, st.sampled_from(["powershell_path", "remote_exchange_path"]), text, text
    ),
    AliasMismatch: st.builds(AliasMismatch, text, recipients, text),
    AliasRequired: st.builds(AliasRequired, text),
    JournalUnavailable: st.builds(JournalUnavailable, text),
    IdentityBusy: st.builds(
        lambda m, s: IdentityBusy(m, retry_after_seconds=s), text, st.integers(1, 3600)
    ),
    ExchangeError: exchange_error(ExchangeError),
    IdentityNotFound: exchange_error(IdentityNotFound),
    AmbiguousIdentity: exchange_error(AmbiguousIdentity),
    WrongRecipientType: st.builds(
        lambda m, d, t: WrongRecipientType(m, recipient_type=t, **d), text, exchange_details, maybe
    ),
    AddressInUse: exchange_error(AddressInUse),
    PermissionDenied: exchange_error(PermissionDenied),
    ExchangeTimeout: exchange_error(ExchangeTimeout),
    BackendUnavailable: st.builds(
        lambda m, d, s: BackendUnavailable(m, retry_after_seconds=s, **d),
        text,
        exchange_details,
        st.integers(1, 3600),
    ),
    UnexpectedExchangeError: exchange_error(UnexpectedExchangeError),
    IdempotencyKeyMismatch: st.builds(IdempotencyKeyMismatch, text),
    IdempotencyKeyInUse: st.builds(IdempotencyKeyInUse, text),
}


def test_every_failure_class_has_a_builder_here() -> None:
    assert every_failure_class() == set(BUILDERS)


def test_every_class_is_in_the_documented_table_and_every_row_has_a_class() -> None:
    produced = {(cls.status, cls.code) for cls in BUILDERS}
    assert produced <= DOCUMENTED, produced - DOCUMENTED
    assert produced >= DOCUMENTED, DOCUMENTED - produced


class Thrower:
    """Holds the exception the test-only route raises next."""

    def __init__(self) -> None:
        self.exception: BaseException = RuntimeError("unset")

    def __call__(self) -> None:
        raise self.exception


@pytest.fixture
def thrower_client(make_client: Callable[..., TestClient]) -> tuple[TestClient, Thrower]:
    client = make_client()
    thrower = Thrower()
    client.app.add_api_route(RAISE, thrower, methods=["GET"])  # type: ignore[attr-defined]
    return client, thrower


def expected_document(failure: Failure, request_id: str) -> dict[str, Any]:
    """The problem+json body the README describes, built here independently of the renderer."""
    document: dict[str, Any] = {
        "type": "urn:vezaprovisioner:problem:" + failure.code.lower().replace("_", "-"),
        "title": failure.title,
        "status": failure.status,
        "detail": failure.detail,
        "code": failure.code,
        "request_id": request_id,
    }
    if isinstance(failure, ValidationFailed):
        document["errors"] = failure.errors
    if isinstance(failure, ExchangeError) and (failure.reason or failure.error_id):
        document["exchange"] = {
            "reason": failure.reason,
            "error_id": failure.error_id,
            "message": failure.message,
        }
    return document


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    failure=st.sampled_from(sorted(BUILDERS, key=lambda c: c.__name__)).flatmap(
        BUILDERS.__getitem__
    )
)
def test_every_failure_answers_with_its_documented_status_code_and_body(
    thrower_client: tuple[TestClient, Thrower], failure: Failure
) -> None:
    client, thrower = thrower_client
    thrower.exception = failure
    response = client.get(RAISE)
    assert (response.status_code, failure.code) in DOCUMENTED
    assert response.status_code == type(failure).status
    assert response.headers["content-type"] == PROBLEM
    assert response.json() == expected_document(failure, response.headers["X-Request-ID"])
    retry = failure.retry_after_seconds
    assert response.headers.get("Retry-After") == (None if retry is None else str(retry))
    if isinstance(failure, MethodNotAllowed) and failure.allowed:
        assert response.headers["Allow"] == ", ".join(failure.allowed)


def test_an_exception_outside_the_tree_is_a_500_internal_error(
    thrower_client: tuple[TestClient, Thrower],
) -> None:
    client, thrower = thrower_client
    thrower.exception = KeyError("secret internals")
    response = client.get(RAISE)
    assert response.status_code == 500
    assert response.json()["code"] == "INTERNAL_ERROR"
    assert "secret internals" not in response.text


# ---- bodies and methods the API cannot take ------------------------------------------------------

non_utf8 = st.binary(min_size=1, max_size=200).map(
    lambda b: b'{"identity": "' + b"\xff" + b + b'"}'
)
deeply_nested = st.integers(2_000, 7_000).map(lambda n: b"[" * n + b"]" * n)
content_types = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "application/x+json", "text/plain", ""]
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.binary(max_size=20_000) | non_utf8 | deeply_nested,
    content_type=content_types,
    path=st.sampled_from([EMAILS, ACTIONS]),
)
def test_a_body_the_api_cannot_take_is_a_documented_client_error_never_404(
    client: TestClient, body: bytes, content_type: str, path: str
) -> None:
    response = client.post(path, content=body, headers={"Content-Type": content_type})
    assert response.status_code in {400, 413, 415, 422}, response.text
    assert response.headers["content-type"] == PROBLEM
    assert (response.status_code, response.json()["code"]) in DOCUMENTED


@pytest.mark.parametrize(
    "body",
    [b'{"identity": "CONTOSO\\\\jdoe\xff"}', b'{"alias": "\xc3\x28"}', b"[" * 5000 + b"]" * 5000],
    ids=["not-utf8", "broken-utf8-sequence", "nested-too-deep"],
)
def test_an_unreadable_json_body_is_400_bad_request(client: TestClient, body: bytes) -> None:
    response = client.post(EMAILS, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "BAD_REQUEST"


def test_malformed_json_stays_a_422_validation_failure(client: TestClient) -> None:
    response = client.post(
        EMAILS, content=b'{"identity": ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["code"] == "VALIDATION_FAILED"


@pytest.mark.parametrize("method", ["PUT", "PATCH", "POST", "DELETE"])
def test_a_wrong_method_on_a_get_route_is_405_with_allow(client: TestClient, method: str) -> None:
    response = client.request(
        method, f"{BASE}/health", content=b"not json", headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 405, response.text
    assert response.json()["code"] == "METHOD_NOT_ALLOWED"
    assert "GET" in response.headers["Allow"].split(", ")


@pytest.mark.parametrize("method", ["PUT", "PATCH", "GET"])
def test_a_wrong_method_on_a_post_route_is_405_with_allow(client: TestClient, method: str) -> None:
    response = client.request(method, ACTIONS, content=json.dumps({"action": "CREATE_EMAIL"}))
    assert response.status_code == 405, response.text
    assert response.headers["Allow"] == "POST"


def test_only_a_missing_route_is_404(client: TestClient) -> None:
    response = client.post(f"{BASE}/api/v1/nothing-here", content=b"\xff")
    assert response.status_code == 404
    assert response.json()["code"] == "NOT_FOUND"

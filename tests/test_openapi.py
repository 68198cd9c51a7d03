"""The OpenAPI document: valid, enough to generate a client from, and docs served offline."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from tests.conftest import REPO_ROOT
from vezaprovisioner.api.app import create_app
from vezaprovisioner.api.openapi import DOCS_ASSETS
from vezaprovisioner.config import load_settings
from vezaprovisioner.failures import failure_classes

BASE = "/VezaProvisioner"
OPERATION_IDS = {
    ("post", f"{BASE}/api/v1/emails"): "createEmail",
    ("post", f"{BASE}/api/v1/actions"): "runAction",
    ("get", f"{BASE}/api/v1/emails/{{identity}}"): "getEmailState",
    ("get", f"{BASE}/api/v1/requests/{{request_id}}"): "getRequest",
    ("get", f"{BASE}/api/v1/requests"): "listRequests",
    ("get", f"{BASE}/health"): "health",
    ("get", f"{BASE}/health/ready"): "ready",
}
PUBLIC = {f"{BASE}/health", f"{BASE}/health/ready", f"{BASE}/warmup"}


@pytest.fixture
def spec(client: TestClient) -> dict[str, Any]:
    response = client.get(f"{BASE}/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield method, path, operation


def test_the_document_is_valid_openapi(spec: dict[str, Any]) -> None:
    validate(spec)  # raises with the JSON path of the first violation


def test_operations_have_the_documented_ids(spec: dict[str, Any]) -> None:
    ids = {(method, path): op["operationId"] for method, path, op in operations(spec)}
    for key, operation_id in OPERATION_IDS.items():
        assert ids[key] == operation_id
    assert len(set(ids.values())) == len(ids)


def test_every_protected_operation_names_http_basic(spec: dict[str, Any]) -> None:
    assert spec["components"]["securitySchemes"]["basicAuth"] == {
        "type": "http",
        "scheme": "basic",
        "description": spec["components"]["securitySchemes"]["basicAuth"]["description"],
    }
    for _, path, operation in operations(spec):
        if path in PUBLIC:
            assert "security" not in operation, path
        else:
            assert operation["security"] == [{"basicAuth": []}], path


def test_every_error_is_problem_json_with_the_problem_schema(spec: dict[str, Any]) -> None:
    for method, path, operation in operations(spec):
        for status, response in operation["responses"].items():
            if int(status) < 400 or operation["operationId"] in {"ready", "readyDetails"}:
                continue  # readiness answers 503 with its checks, not a problem
            assert response["content"] == {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            }, (method, path, status)
    assert "HTTPValidationError" not in json.dumps(spec)


def test_the_problem_code_is_an_enum_of_every_code(spec: dict[str, Any]) -> None:
    problem = spec["components"]["schemas"]["Problem"]
    assert problem["properties"]["code"]["enum"] == sorted({cls.code for cls in failure_classes()})
    assert {
        "VALIDATION_FAILED",
        "IDENTITY_NOT_FOUND",
        "ALIAS_REQUIRED",
        "IDEMPOTENCY_KEY_MISMATCH",
    } <= set(problem["properties"]["code"]["enum"])


def test_response_headers_are_declared(spec: dict[str, Any]) -> None:
    for method, path, operation in operations(spec):
        for status, response in operation["responses"].items():
            assert "X-Request-ID" in response["headers"], (method, path, status)
            if status == "503":
                assert "Retry-After" in response["headers"], (method, path)
    created = spec["paths"][f"{BASE}/api/v1/emails"]["post"]["responses"]["201"]
    assert "Location" in created["headers"]
    assert "Idempotent-Replayed" in created["headers"]


def test_create_operations_take_an_idempotency_key(spec: dict[str, Any]) -> None:
    for path in (f"{BASE}/api/v1/emails", f"{BASE}/api/v1/actions"):
        parameters = spec["paths"][path]["post"]["parameters"]
        assert [(p["name"], p["in"], p["required"]) for p in parameters] == [
            ("Idempotency-Key", "header", False)
        ]


def test_identity_and_alias_carry_their_constraints(spec: dict[str, Any]) -> None:
    fields = spec["components"]["schemas"]["EmailRequest"]["properties"]
    identity, alias = fields["identity"], fields["alias"]
    assert (identity["minLength"], identity["maxLength"]) == (1, 1024)
    assert re.fullmatch(identity["pattern"], "CONTOSO\\jdoe")
    assert not re.fullmatch(identity["pattern"], "j*")
    alias_string = next(s for s in alias["anyOf"] if s["type"] == "string")
    assert alias_string["maxLength"] == 64
    assert re.fullmatch(alias_string["pattern"], "john.doe")
    assert re.fullmatch(alias_string["pattern"], "")
    assert not re.fullmatch(alias_string["pattern"], "john..doe")


def test_docs_and_redoc_load_only_packaged_assets(client: TestClient) -> None:
    anonymous = TestClient(client.app)
    for page in ("docs", "redoc"):
        html = anonymous.get(f"{BASE}/{page}")
        assert html.status_code == 200
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
        urls += re.findall(r"""url: ?["']([^"']+)["']""", html.text)
        assert urls, html.text
        for url in urls:
            assert url.startswith(f"{BASE}/"), url  # nothing from a CDN or font service
        assert "https://" not in html.text
        assert "http://" not in html.text
    for name in DOCS_ASSETS:
        asset = anonymous.get(f"{BASE}/docs/assets/{name}")
        assert asset.status_code == 200, name
        assert len(asset.content) > 1000


@pytest.mark.slow
def test_a_generated_client_creates_an_email(tmp_path: Path) -> None:
    """openapi-python-client generates a package from the demo's document; it creates a mailbox."""
    settings = load_settings(
        REPO_ROOT / "examples" / "demo.toml",
        {
            "VEZAPROVISIONER_DATA_DIR": str(tmp_path / "data"),
            "VEZAPROVISIONER_SIMULATED__LATENCY_MS": "0",
            "VEZAPROVISIONER_NOT_FOUND_RETRY_SECONDS": "0",
        },
    )
    app = create_app(settings)
    document = tmp_path / "openapi.json"
    with TestClient(app) as http:
        document.write_text(http.get(f"{BASE}/openapi.json").text)
        config = tmp_path / "generator.json"
        config.write_text(json.dumps({"package_name_override": "veza_client", "post_hooks": []}))
        generated = subprocess.run(
            [
                str(Path(sys.executable).parent / "openapi-python-client"),
                "generate",
                "--path",
                str(document),
                "--output-path",
                str(tmp_path / "veza_client"),
                "--meta",
                "none",
                "--config",
                str(config),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "NO_COLOR": "1"},
            check=False,
        )
        assert generated.returncode == 0, generated.stdout + generated.stderr
        sys.path.insert(0, str(tmp_path))
        try:
            client_module: Any = importlib.import_module("veza_client")
            create_email: Any = importlib.import_module("veza_client.api.emails.create_email")
            models: Any = importlib.import_module("veza_client.models")
        finally:
            sys.path.remove(str(tmp_path))
        demo_auth = {"Authorization": "Basic ZGVtbzpkZW1vLXBhc3N3b3Jk"}  # demo:demo-password
        client = client_module.Client(base_url="http://testserver")
        client.set_httpx_client(http)
        http.headers.update(demo_auth)
        answer = create_email.sync_detailed(
            client=client, body=models.EmailRequest(identity="CONTOSO\\mbowen", alias="megan.b")
        )
        assert answer.status_code == 201, answer.content
        assert isinstance(answer.parsed, models.MailboxResponse)
        assert answer.parsed.primary_smtp_address == "megan.b@contoso.com"
        missing = create_email.sync_detailed(
            client=client, body=models.EmailRequest(identity="nobody@contoso.com")
        )
        assert isinstance(missing.parsed, models.Problem)
        assert missing.parsed.code == models.ProblemCode.IDENTITY_NOT_FOUND


def test_the_api_routes_are_on_the_apps_own_router(client: TestClient) -> None:
    """No included router: FastAPI 0.165 walks an included router's entry on every request
    (route_table.py). Every API path is a route of the app's router, base path in front."""
    app = client.app
    paths = {getattr(route, "path", None) for route in app.router.routes}  # type: ignore[attr-defined]
    for path in ("/api/v1/emails", "/api/v1/actions", "/health", "/docs", "/openapi.json"):
        assert f"/VezaProvisioner{path}" in paths
    assert all(type(route).__name__ != "_IncludedRouter" for route in app.router.routes)  # type: ignore[attr-defined]

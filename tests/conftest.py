"""Shared test wiring: settings over the test directory, a fake clock, authenticated clients."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.fakes.clock import FakeClock
from tests.fakes.local_host import FakePowerShell
from vezaprovisioner.api.app import create_app
from vezaprovisioner.auth import hash_password
from vezaprovisioner.config import Settings
from vezaprovisioner.exchange.simulated.directory import load_directory
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DIRECTORY = Path(__file__).resolve().parent / "fakes" / "directory.json"
USER = "veza-svc"
PASSWORD = "correct horse battery staple"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


AUTH = basic(USER, PASSWORD)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def password_hash() -> str:
    return hash_password(PASSWORD)


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture
def make_settings(password_hash: str, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "backend": "simulated",
            "data_dir": str(tmp_path / "data"),
            "not_found_retry_seconds": 3,
            "simulated": {"directory": str(TEST_DIRECTORY)},
            "auth": {"mode": "basic", "users": {USER: password_hash}},
        }
        return Settings.model_validate(deep_merge(base, overrides))

    return make


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def exchange(clock: FakeClock) -> SimulatedExchange:
    return SimulatedExchange(load_directory(TEST_DIRECTORY), clock=clock)


@pytest.fixture
def make_client(
    make_settings: Callable[..., Settings], exchange: SimulatedExchange, clock: FakeClock
) -> Iterator[Callable[..., TestClient]]:
    """A client for an app over the shared simulated Exchange; settings overrides as kwargs."""
    clients: list[TestClient] = []

    def make(*, authenticated: bool = True, **overrides: Any) -> TestClient:
        app = create_app(make_settings(**overrides), exchange=exchange, clock=clock)
        client = TestClient(app, headers=AUTH if authenticated else {})
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def fake_powershell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePowerShell]:
    """The fake `powershell` for the local backend (tests/fakes/powershell.py), with its log."""
    fake = FakePowerShell(tmp_path, monkeypatch)
    yield fake
    fake.close()

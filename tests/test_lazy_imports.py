"""What an IIS worker must not pay for at start: checked in fresh interpreters.

Every FastCGI process imports the service and builds it on its first request
(bench/import_time.py measures both). Code only other commands or other pages use stays out of
that path: the CLI's commands (doctor, iis-settings, the standalone server), the backends that
are not configured, and the OpenAPI document's identity pattern (a scan of the 65,536 BMP
characters). The remote backend's pypsrp has its own check in test_remote.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TEST_DIRECTORY = Path(__file__).resolve().parent / "fakes" / "directory.json"

#: Loaded only by the commands, backends or pages that use them.
NOT_AT_START = (
    "vezaprovisioner.cli",
    "vezaprovisioner.doctor",
    "vezaprovisioner.iis_settings",
    "vezaprovisioner.standalone",
    "uvicorn",
    "vezaprovisioner.exchange.local",
    "vezaprovisioner.exchange.remote",
    "pypsrp",
)

_PROBE = """
import sys

import vezaprovisioner.api.app
import vezaprovisioner.iis_entry
from vezaprovisioner import validation

def unexpected(names):
    return [name for name in names if name in sys.modules]

names = sys.argv[2:]
assert not unexpected(names), f"loaded at import: {unexpected(names)}"
assert validation.identity_pattern.cache_info().currsize == 0, "pattern built at import"

from fastapi.testclient import TestClient

from vezaprovisioner.api.app import create_app
from vezaprovisioner.auth import hash_password
from vezaprovisioner.config import Settings

settings = Settings.model_validate({
    "backend": "simulated",
    "data_dir": sys.argv[1] + "/data",
    "simulated": {"directory": %(directory)r},
    "auth": {"mode": "basic", "users": {"veza-svc": hash_password("secret")}},
})
with TestClient(create_app(settings)) as client:
    created = client.post(
        "/VezaProvisioner/api/v1/emails",
        json={"identity": "CONTOSO\\\\plain"},
        auth=("veza-svc", "secret"),
    )
    assert created.status_code == 201, created.text
    assert not unexpected(names), f"loaded by CREATE_EMAIL: {unexpected(names)}"
    assert validation.identity_pattern.cache_info().currsize == 0, "pattern built by a request"
    assert client.get("/VezaProvisioner/openapi.json").status_code == 200
    assert validation.identity_pattern.cache_info().currsize == 1, "the document has no pattern"
"""


def test_a_worker_loads_only_what_creating_a_mailbox_needs(tmp_path: Path) -> None:
    probe = _PROBE % {"directory": str(TEST_DIRECTORY)}
    subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path), *NOT_AT_START], check=True, timeout=120
    )

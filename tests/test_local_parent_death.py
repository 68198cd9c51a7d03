"""A PowerShell host stuck inside a command does not outlive a SIGKILLed service (Linux).

An idle host exits on stdin end-of-file when the service dies; one inside a command never reads
stdin again, so only PR_SET_PDEATHSIG (exchange/local/process_tree.py) ends it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PASSWORD, USER
from tests.fakes.local_host import FakePowerShell, wait_gone


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def poll(condition: Any, what: str, timeout: float = 30.0) -> None:
    """Wait (bounded) for another process to reach a state no event of ours reports."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.05)


def server_ready(base: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{base}/health/ready", timeout=5).status_code == 200
    return False


@pytest.mark.slow
def test_a_host_stuck_in_a_command_dies_with_a_killed_service(
    fake_powershell: FakePowerShell, tmp_path: Path, password_hash: str
) -> None:
    fake_powershell.set(fault="hang", fault_identity="mailbox", fault_cmdlet="Get-User")
    config = tmp_path / "serve.toml"
    config.write_text(
        f"backend = 'local'\ndata_dir = '{tmp_path / 'data'}'\n"
        f"[exchange]\npowershell_path = '{fake_powershell.path}'\n"
        f"remote_exchange_path = '{fake_powershell.remote_exchange}'\n"
        "[local]\npool_size = 1\n"
        "[auth]\nmode = 'basic'\nrequire_https = false\n"
        f"[auth.users]\n{USER} = '{password_hash}'\n",
        encoding="utf-8",
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}/VezaProvisioner"
    serve = ["serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(
        [sys.executable, "-m", "vezaprovisioner", *serve],
        stderr=subprocess.DEVNULL,
    )
    survivors: list[int] = []
    try:
        poll(lambda: server_ready(base), "a warm pool behind the server")

        def post() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the server dies under it
                httpx.post(
                    f"{base}/api/v1/emails",
                    json={"identity": "mailbox"},
                    auth=(USER, PASSWORD),
                    timeout=60,
                )

        request = threading.Thread(target=post, daemon=True)
        request.start()
        # The fake logs "grandchild" from inside the hanging Get-User: the host is mid-command.
        poll(lambda: bool(fake_powershell.records("grandchild")), "a hanging Get-User")
        (host,) = fake_powershell.start_pids()
        assert [row["pid"] for row in fake_powershell.records("grandchild")] == [host]
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        survivors = wait_gone([host], timeout=30)
        assert survivors == []
        request.join(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
        # PR_SET_PDEATHSIG covers the host, not what the host started (see process_tree.py):
        # the fake's hang leaves a sleeping child of its own behind, ended here by its pid.
        children = [row["child"] for row in fake_powershell.records("grandchild")]
        for pid in survivors + children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

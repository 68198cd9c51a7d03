"""Real server processes sharing one data_dir: the journal claim across processes, and crash
recovery after SIGKILL in the middle of a slow Enable-Mailbox.

Each process runs the service's app under uvicorn over `SharedSimulatedExchange`, so the
processes act on one simulated Exchange and every Enable-* any of them starts is counted.
Synchronisation is by readiness signals only: the health endpoint, the journal's rows and the
shared Exchange's files.
"""

from __future__ import annotations

import json
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import AUTH, REPO_ROOT, TEST_DIRECTORY
from tests.fakes.shared_exchange import read_calls, read_changes, read_queued
from vezaprovisioner.journal.store import JOURNAL_FILE
from vezaprovisioner.logs import dated_files

BASE = "/VezaProvisioner"
DEADLINE_SECONDS = 30


def until(what: str, check: Callable[[], Any]) -> Any:
    """Polls `check` until it returns something truthy; fails after DEADLINE_SECONDS."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)  # poll interval of a readiness check, not a synchronisation guess
    pytest.fail(f"timed out waiting for {what}")


class Server:
    """One `python -m tests.fakes.server` process."""

    def __init__(
        self, config: Path, state_dir: Path, log: Path, land: str, enable_slots: int | None = None
    ) -> None:
        self.log = log.open("ab")
        slots = ["--enable-slots", str(enable_slots)] if enable_slots else []
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fakes.server",
                "--config",
                str(config),
                "--state-dir",
                str(state_dir),
                "--land",
                land,
                *slots,
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], DEADLINE_SECONDS)
        line = self.process.stdout.readline().decode() if ready else ""
        if not line.startswith("port "):
            self.stop()
            pytest.fail(f"server did not start; see {log}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}{BASE}"
        until("the health endpoint", self._healthy)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(DEADLINE_SECONDS)  # reaped: the pid is really gone

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(config: Path, land: str = "after_delay", enable_slots: int | None = None) -> Server:
        server = Server(config, tmp_path / "exchange", tmp_path / "servers.log", land, enable_slots)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def write_config(tmp_path: Path, password_hash: str, enable_latency_ms: int) -> Path:
    config = tmp_path / "veza.toml"
    config.write_text(
        'backend = "simulated"\n'
        "not_found_retry_seconds = 0\n"
        f"data_dir = '{tmp_path / 'data'}'\n"
        f"[simulated]\ndirectory = '{TEST_DIRECTORY}'\nenable_latency_ms = {enable_latency_ms}\n"
        '[auth]\nmode = "basic"\n'
        f'[auth.users]\nveza-svc = "{password_hash}"\n',
        encoding="utf-8",
    )
    return config


def journal_rows(tmp_path: Path, sql: str, *parameters: Any) -> list[tuple[Any, ...]]:
    path = tmp_path / "data" / JOURNAL_FILE
    if not path.exists():
        return []
    with closing(sqlite3.connect(path)) as db:
        return db.execute(sql, parameters).fetchall()


def post(url: str, identity: str, request_id: str) -> httpx.Response:
    return httpx.post(
        f"{url}/api/v1/emails",
        json={"identity": identity},
        headers={**AUTH, "X-Request-ID": request_id},
        timeout=DEADLINE_SECONDS,
    )


@pytest.mark.slow
def test_two_processes_racing_on_one_user_send_one_enable(
    tmp_path: Path, password_hash: str, servers: Callable[..., Server]
) -> None:
    # Enable-Mailbox takes 300 ms, so requests that got past the claim would overlap in it.
    config = write_config(tmp_path, password_hash, enable_latency_ms=300)
    a, b = servers(config), servers(config)
    plan = [
        (a, "CONTOSO\\plain"),
        (b, "plain@contoso.com"),
        (a, "plain"),
        (b, "Pat Plain"),
        (a, "plain@contoso.com"),
        (b, "CONTOSO\\plain"),
    ]
    start = threading.Barrier(len(plan))
    responses: dict[int, httpx.Response] = {}

    def send(index: int, server: Server, identity: str) -> None:
        start.wait(DEADLINE_SECONDS)
        responses[index] = post(server.url, identity, f"race-{index}")

    threads = [
        threading.Thread(target=send, args=(i, server, identity))
        for i, (server, identity) in enumerate(plan)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_SECONDS)

    statuses = sorted(r.status_code for r in responses.values())
    assert statuses == [200] * 5 + [201], [r.text for r in responses.values()]
    calls = read_calls(tmp_path / "exchange")
    assert [c["cmdlet"] for c in calls].count("Enable-Mailbox") == 1
    # Both processes really took part: each resolved the user itself.
    assert {c["pid"] for c in calls if c["cmdlet"] == "Get-User"} == {a.pid, b.pid}
    rows = journal_rows(tmp_path, "SELECT state, owner_pid FROM requests")
    assert sorted(state for state, _ in rows) == ["already_exists"] * 5 + ["created"]
    assert {pid for _, pid in rows} == {a.pid, b.pid}
    assert journal_rows(tmp_path, "SELECT * FROM claims") == []  # all released


def crash_mid_enable(
    tmp_path: Path, password_hash: str, servers: Callable[..., Server], land: str
) -> tuple[Server, str]:
    """Starts a server whose Enable-Mailbox takes a minute, SIGKILLs it while one runs."""
    config = write_config(tmp_path, password_hash, enable_latency_ms=60_000)
    doomed = servers(config, land)
    request_id = f"crash-{land}"

    def doomed_request() -> None:
        with suppress(httpx.TransportError):  # the server dies under it
            post(doomed.url, "CONTOSO\\plain", request_id)

    threading.Thread(target=doomed_request, daemon=True).start()
    until(
        "the journal to announce Enable-Mailbox",
        lambda: journal_rows(
            tmp_path,
            "SELECT 1 FROM requests WHERE request_id = ? AND enable_sent_at IS NOT NULL",
            request_id,
        ),
    )
    if land == "before_reply":
        until("the mailbox to exist", lambda: read_changes(tmp_path / "exchange"))
    else:
        until(
            "Enable-Mailbox to start",
            lambda: any(c["cmdlet"] == "Enable-Mailbox" for c in read_calls(tmp_path / "exchange")),
        )
    doomed.kill()
    assert journal_rows(
        tmp_path, "SELECT state FROM requests WHERE request_id = ?", request_id
    ) == [("running",)]
    assert_sent_marks_match_the_calls(tmp_path)
    return servers(write_config(tmp_path, password_hash, enable_latency_ms=0)), request_id


def assert_sent_marks_match_the_calls(tmp_path: Path) -> None:
    """The journal says "Enable-* sent" only for users whose Enable-* reached Exchange."""
    sent = journal_rows(tmp_path, "SELECT guid FROM requests WHERE enable_sent_at IS NOT NULL")
    calls = read_calls(tmp_path / "exchange")
    reached = {c["identity"] for c in calls if str(c["cmdlet"]).startswith("Enable-")}
    assert {guid for (guid,) in sent} <= reached


@pytest.mark.slow
def test_a_crash_with_enables_queued_for_a_host_marks_only_the_sent_one(
    tmp_path: Path, password_hash: str, servers: Callable[..., Server]
) -> None:
    # One "host" for Enable-*, busy for a minute with the first; the others wait for it.
    doomed = servers(
        write_config(tmp_path, password_hash, enable_latency_ms=60_000), enable_slots=1
    )
    users = ["CONTOSO\\plain", "CONTOSO\\disabled", "CONTOSO\\taken", "CONTOSO\\jose"]
    for n, user in enumerate(users):
        threading.Thread(
            target=lambda u=user, n=n: suppress_transport(post, doomed.url, u, f"queued-{n}"),
            daemon=True,
        ).start()
    exchange = tmp_path / "exchange"
    until(
        "one Enable-Mailbox sent and three queued",
        lambda: (
            [c["cmdlet"] for c in read_calls(exchange)].count("Enable-Mailbox") == 1
            and len(read_queued(exchange)) == 3
        ),
    )
    doomed.kill()
    assert_sent_marks_match_the_calls(tmp_path)
    states = journal_rows(
        tmp_path, "SELECT state, enable_sent_at IS NOT NULL FROM requests ORDER BY state"
    )
    assert states == [("received", 0)] * 3 + [("running", 1)]

    restarted = servers(write_config(tmp_path, password_hash, enable_latency_ms=0))
    details = [recovered_record(restarted, f"queued-{n}")["detail"] for n in range(len(users))]
    assert sorted(d.split(":")[0] for d in details) == ["queued, never sent"] * 3 + ["sent"]


def suppress_transport(call: Callable[..., object], *args: object) -> None:
    with suppress(httpx.TransportError):  # the server dies under it
        call(*args)


def recovered_record(server: Server, request_id: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        response = httpx.get(f"{server.url}/api/v1/requests/{request_id}", headers=AUTH)
        body: dict[str, Any] = response.json()
        return body if body["state"] not in ("received", "running") else None

    result: dict[str, Any] = until("recovery to reconcile the record", finished)
    return result


@pytest.mark.slow
def test_crash_after_the_enable_landed_is_recovered_as_created(
    tmp_path: Path, password_hash: str, servers: Callable[..., Server]
) -> None:
    restarted, request_id = crash_mid_enable(tmp_path, password_hash, servers, "before_reply")
    record = recovered_record(restarted, request_id)
    assert record["state"] == "created"
    assert record["recovered"] is True
    assert "Exchange now reports a UserMailbox" in record["detail"]
    # The dead process's claim does not block the user; Exchange is not asked to enable again.
    assert post(restarted.url, "CONTOSO\\plain", "after-crash").status_code == 200
    assert [c["cmdlet"] for c in read_calls(tmp_path / "exchange")].count("Enable-Mailbox") == 1
    audit = [
        json.loads(line)
        for path in dated_files(tmp_path / "data" / "audit.jsonl")
        for line in path.open(encoding="utf-8")
    ]
    recovered = {"event.action": "request_recovered", "vezaprovisioner.outcome": "created"}
    assert recovered.items() <= next(a for a in audit if a["http.request.id"] == request_id).items()


@pytest.mark.slow
def test_crash_before_the_enable_landed_is_recovered_as_not_created(
    tmp_path: Path, password_hash: str, servers: Callable[..., Server]
) -> None:
    restarted, request_id = crash_mid_enable(tmp_path, password_hash, servers, "after_delay")
    record = recovered_record(restarted, request_id)
    assert record["state"] == "not_created"
    assert record["recovered"] is True
    assert "Exchange still reports a User" in record["detail"]
    assert read_changes(tmp_path / "exchange") == []
    # The user can be provisioned now; the dead claim does not block it.
    assert post(restarted.url, "CONTOSO\\plain", "after-crash").status_code == 201
    assert journal_rows(tmp_path, "SELECT * FROM claims") == []

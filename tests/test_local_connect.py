"""The host's connect as Exchange really behaves, through the fake PowerShell.

Every startup error kind is produced by the fake the way Exchange's scripts fail (see the
fake's header for what was read where) and must reach the admin, with its own fix, through the
three places an admin looks: `vezaprovisioner probe`, `vezaprovisioner doctor` and
`/health/ready`. Connects of one account are serialized by a mutex; standard error arrives in
the console's code page; `probe --transcript` records what the connect printed.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import AUTH
from tests.fakes.local_host import FakePowerShell, wait_warm
from tests.fakes.powershell import CONNECT_RECORDS, DENIED_TEXT, DOT_SOURCE_RECORDS
from vezaprovisioner.api.app import create_app
from vezaprovisioner.cli import main
from vezaprovisioner.config import Settings
from vezaprovisioner.doctor import Doctor
from vezaprovisioner.exchange.local.startup import FIXES, TRANSCRIPT_HINT

READY = "/VezaProvisioner/health/ready/details"
EMAILS = "/VezaProvisioner/api/v1/emails"


@contextmanager
def held(mutex: Path) -> Iterator[None]:
    """Hold the account's connect mutex (the fake's flock) from the test."""
    with mutex.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def poll(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait (bounded) for something another process writes; no event exists for it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def write_config(fake: FakePowerShell, tmp_path: Path, **local: Any) -> Path:
    remote_exchange = local.pop("remote_exchange_path", fake.remote_exchange)
    values = {"pool_size": 1, "restart_backoff_seconds": 30, **local}
    lines = "".join(f"{key} = {value}\n" for key, value in values.items())
    config = tmp_path / "local.toml"
    config.write_text(
        f"backend = 'local'\ndata_dir = '{tmp_path / 'data'}'\n"
        f"[exchange]\npowershell_path = '{fake.path}'\n"
        f"remote_exchange_path = '{remote_exchange}'\n"
        f"[local]\n{lines}"
        "[auth]\nmode = 'basic'\n[auth.users]\n"
        'demo = "scrypt$16384$8$1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNo"\n',
        encoding="utf-8",
    )
    return config


# ---- every kind, everywhere the admin looks ---------------------------------------------------

KINDS = ["remote_exchange_path", "dot_source", "connect_lock", "connect", "module_import", "rbac"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_startup_error_reaches_probe_doctor_and_readiness_with_its_fix(
    kind: str,
    fake_powershell: FakePowerShell,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_settings: Callable[..., Settings],
) -> None:
    local: dict[str, Any] = {"connect_lock_wait_seconds": 0.3}
    if kind == "remote_exchange_path":
        local["remote_exchange_path"] = str(tmp_path / "V15" / "bin" / "RemoteExchange.ps1")
    elif kind != "connect_lock":
        fake_powershell.set(fault=kind)
    config = write_config(fake_powershell, tmp_path, **local)
    with held(fake_powershell.mutex) if kind == "connect_lock" else _nothing():
        # probe
        assert main(["probe", "--config", str(config)]) == 1
        probed = json.loads(capsys.readouterr().out)
        assert probed["code"] == "BACKEND_UNAVAILABLE"
        assert f"{kind}: " in probed["detail"]
        assert FIXES[kind] in probed["detail"]
        # doctor
        checks = {check.name: check for check in Doctor(config=config, iis=None).run()}
        exchange = checks["exchange"]
        assert exchange.status == "fail"
        assert f"{kind}: " in exchange.detail
        assert exchange.fix.startswith(FIXES[kind])
        assert TRANSCRIPT_HINT in exchange.fix
        # readiness
        # 30 s between starts (the fake's 0.2 s cap would restart the slot while readiness
        # is read).
        overrides = fake_powershell.settings(
            restart_backoff_seconds=30,
            restart_backoff_max_seconds=30,
            **{k: v for k, v in local.items() if k != "remote_exchange_path"},
        )
        if kind == "remote_exchange_path":
            overrides["exchange"]["remote_exchange_path"] = local["remote_exchange_path"]
        app = create_app(make_settings(**overrides))
        try:
            pool = app.state.services.exchange.pool
            status = pool.wait_for(lambda s: s.broken == 1, 20)
            assert status.last_startup_kind == kind
            ready = TestClient(app, headers=AUTH).get(READY)
        finally:
            app.state.services.close()
    assert ready.status_code == 503
    detail = ready.json()["checks"]["backend"]["detail"]
    assert f"{kind}: " in detail
    assert FIXES[kind] in detail


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def test_a_failed_connect_reports_every_error_record(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(fault="connect")
    status = fake_powershell.pool().wait_for(lambda s: s.broken == 1, 20)
    text = status.last_startup_error or ""
    assert f"{len(CONNECT_RECORDS)} error records" in text
    for number, record in enumerate(CONNECT_RECORDS, 1):
        assert f"[{number}] {record['message'][:80]}" in text
        assert record["error_id"] in text
    # The servers Connect-ExchangeServer tried, and the NonInteractive Read-Host at the end.
    assert "server EX01.contoso.com" in text
    assert "server EX02.contoso.com" in text
    assert "PowerShell is in NonInteractive mode" in text
    # Not mistaken for an RBAC problem or a module import failure.
    assert "Mail Recipients" not in text
    assert "module cache" not in text


def test_access_denied_ends_the_connect_before_read_host(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(fault="connect_denied")
    status = fake_powershell.pool().wait_for(lambda s: s.broken == 1, 20)
    text = status.last_startup_error or ""
    assert status.last_startup_kind == "connect"
    assert "1 error records: [1] Connecting to remote server EX01.contoso.com failed" in text
    assert "AccessDenied,PSSessionOpenFailed; server EX01.contoso.com" in text
    assert "NonInteractive" not in text


def test_a_failed_dot_source_reports_what_remote_exchange_said(
    fake_powershell: FakePowerShell,
) -> None:
    fake_powershell.set(fault="dot_source")
    status = fake_powershell.pool().wait_for(lambda s: s.broken == 1, 20)
    text = status.last_startup_error or ""
    assert "did not define Connect-ExchangeServer" in text
    for record in DOT_SOURCE_RECORDS:
        assert record["error_id"] in text
    # The connect was never tried: nothing took the connect mutex.
    assert fake_powershell.records("connect_lock") == []


def test_no_cmdlets_after_the_connect_is_a_module_import_failure_not_rbac(
    fake_powershell: FakePowerShell,
) -> None:
    fake_powershell.set(fault="module_import")
    status = fake_powershell.pool().wait_for(lambda s: s.broken == 1, 20)
    text = status.last_startup_error or ""
    assert status.last_startup_kind == "module_import"
    assert "RemotePowerShell\\EX01.contoso.com" in text
    assert "being used by another process" in text
    assert "lacks the Mail Recipients" not in text


# ---- the connect mutex ------------------------------------------------------------------------


def _intervals(fake: FakePowerShell) -> list[tuple[int, int]]:
    return sorted((row["enter"], row["leave"]) for row in fake.records("connect_lock"))


def test_hosts_start_together_but_connect_one_at_a_time(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(connect_seconds=0.2)
    with held(fake_powershell.mutex):
        pool = fake_powershell.pool(pool_size=4)
        # All four hosts run at once, each blocked on the mutex after loading RemoteExchange.
        poll(lambda: len(fake_powershell.records("lock_wait")) == 4, "four hosts at the mutex")
        assert pool.status().warm == 0
    status = wait_warm(pool)
    assert status.warm == 4
    intervals = _intervals(fake_powershell)
    assert len(intervals) == 4
    for (_, left), (entered, _) in itertools.pairwise(intervals):
        assert left <= entered, intervals


def test_a_pool_of_four_without_contention_gets_warm(fake_powershell: FakePowerShell) -> None:
    status = wait_warm(fake_powershell.pool(pool_size=4))
    assert status.warm == 4
    assert status.failed_starts == 0
    intervals = _intervals(fake_powershell)
    assert len(intervals) == 4
    assert all(left <= entered for (_, left), (entered, _) in itertools.pairwise(intervals))


def test_a_held_mutex_is_its_own_startup_error_and_the_pool_recovers(
    fake_powershell: FakePowerShell,
) -> None:
    with held(fake_powershell.mutex):
        pool = fake_powershell.pool(connect_lock_wait_seconds=0.2)
        status = pool.wait_for(lambda s: s.broken == 1, 20)
        assert status.last_startup_kind == "connect_lock"
        assert "connect_lock: the connect mutex was not free in time" in (
            status.last_startup_error or ""
        )
    assert wait_warm(pool).warm == 1


# ---- standard error in the console's code page ------------------------------------------------


@pytest.mark.parametrize("code_page", ["cp850", "cp437"])
def test_host_stderr_in_the_oem_code_page_arrives_as_the_right_text(
    fake_powershell: FakePowerShell, code_page: str
) -> None:
    fake_powershell.set(fault="exit", stderr_encoding=code_page)
    status = fake_powershell.pool(stderr_encoding=code_page).wait_for(lambda s: s.broken == 1, 20)
    assert DENIED_TEXT in (status.last_startup_error or "")


def test_the_same_stderr_read_as_utf8_would_be_garbled(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(fault="exit", stderr_encoding="cp850")
    status = fake_powershell.pool(stderr_encoding="utf-8").wait_for(lambda s: s.broken == 1, 20)
    assert DENIED_TEXT not in (status.last_startup_error or "")
    assert "\ufffd" in (status.last_startup_error or "")


# ---- the transcript of the first install ------------------------------------------------------


def test_probe_transcript_records_what_the_connect_printed(
    fake_powershell: FakePowerShell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Stop-Transcript writes the held lines and the end block when the probe closes the host:
    # the probe must wait for the host to exit, not kill it.
    fake_powershell.set(stop_transcript_seconds=0.5)
    config = write_config(fake_powershell, tmp_path, pool_size=4)
    transcript = tmp_path / "connect-transcript.txt"
    assert main(["probe", "--config", str(config), "--transcript", str(transcript)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["transcript"] == str(transcript)
    text = transcript.read_text(encoding="utf-8")
    assert text.startswith("**********************\nWindows PowerShell transcript start\n")
    assert f"Transcript started, output file is {transcript}" in text
    assert "Welcome to the Exchange Management Shell!" in text
    assert "VERBOSE: Connected to EX01.contoso.com." in text
    assert text.splitlines()[-3:-1][0] == "Windows PowerShell transcript end"
    # One host, whatever pool_size says, and only it was asked for a transcript.
    assert [row["transcript"] for row in fake_powershell.records("hello")] == [True]


def test_a_failed_connect_transcript_holds_every_record(
    fake_powershell: FakePowerShell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # host.ps1 sends the startup error, then stops the transcript and exits; a host killed on
    # the startup error left a transcript without its records' tail and its end.
    fake_powershell.set(fault="connect", stop_transcript_seconds=0.5)
    config = write_config(fake_powershell, tmp_path)
    transcript = tmp_path / "connect-transcript.txt"
    assert main(["probe", "--config", str(config), "--transcript", str(transcript)]) == 1
    assert "connect: " in json.loads(capsys.readouterr().out)["detail"]
    text = transcript.read_text(encoding="utf-8")
    for record in CONNECT_RECORDS:
        assert record["message"] in text
        assert f"FullyQualifiedErrorId : {record['error_id']}" in text
    assert "Windows PowerShell transcript end" in text


def test_an_unwritable_transcript_is_its_own_startup_error(
    fake_powershell: FakePowerShell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(fake_powershell, tmp_path)
    missing_folder = tmp_path / "no such folder" / "t.txt"
    assert main(["probe", "--config", str(config), "--transcript", str(missing_folder)]) == 1
    detail = json.loads(capsys.readouterr().out)["detail"]
    assert detail.startswith("0/1 PowerShell hosts warm")
    assert "transcript: Start-Transcript could not write" in detail
    assert FIXES["transcript"] in detail


def test_the_service_never_asks_for_a_transcript(
    make_settings: Callable[..., Settings], fake_powershell: FakePowerShell
) -> None:
    app = create_app(make_settings(**fake_powershell.settings(pool_size=2)))
    with TestClient(app, headers=AUTH) as client:
        wait_warm(app.state.services.exchange.pool)
        assert client.post(EMAILS, json={"identity": "plain"}).status_code == 201
    hellos = fake_powershell.records("hello")
    assert len(hellos) == 2
    assert not any(row["transcript"] for row in hellos)
    assert all(
        row["keys"] == ["connect_lock_ms", "nonce", "remote_exchange_path"] for row in hellos
    )


def test_a_transcript_needs_the_local_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "simulated.toml"
    config.write_text("backend = 'simulated'\n", encoding="utf-8")
    assert main(["probe", "--config", str(config), "--transcript", str(tmp_path / "t")]) == 2
    assert "only the local backend" in capsys.readouterr().err


def test_the_doctor_waits_for_the_hosts_to_connect(
    fake_powershell: FakePowerShell, tmp_path: Path
) -> None:
    # Without the wait the doctor probed a pool still connecting and always failed.
    fake_powershell.set(connect_seconds=0.5)
    checks = {
        check.name: check
        for check in Doctor(config=write_config(fake_powershell, tmp_path), iis=None).run()
    }
    assert checks["exchange"].status == "pass", checks["exchange"]
    assert checks["exchange"].detail.startswith("1/1 PowerShell hosts warm")

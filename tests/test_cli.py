"""The `vezaprovisioner` command, run through its installed entry point."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.conftest import TEST_DIRECTORY
from tests.fakes.local_host import FakePowerShell
from vezaprovisioner.auth import verify_password
from vezaprovisioner.cli import listening_socket, main, parse_since, path_warnings
from vezaprovisioner.config import Settings
from vezaprovisioner.exchange.local.process_tree import ProcessTree
from vezaprovisioner.exchange.local.warm_pool import HostPool
from vezaprovisioner.journal.store import JOURNAL_FILE

EXECUTABLE = Path(sys.executable).with_name("vezaprovisioner")


def run(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXECUTABLE), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "veza.toml"
    path.write_text(
        f'backend = "simulated"\nnot_found_retry_seconds = 0\n'
        f"[simulated]\ndirectory = '{TEST_DIRECTORY}'\n"
        '[auth]\nmode = "basic"\n[auth.users]\n'
        'demo = "scrypt$16384$8$1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNo"\n',
        encoding="utf-8",
    )
    return path


def test_check_prints_the_configuration_with_secrets_masked(config: Path) -> None:
    result = run("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["auth"]["users"] == {"demo": "***"}
    assert "aGFzaGhhc2hoYXNo" not in result.stdout
    assert "configuration OK" in result.stderr


def test_check_fails_with_what_to_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('backend = "simulated"\nbase_path = "nope"\n[auth]\nmode = "basic"\n')
    result = run("check", "--config", str(bad))
    assert result.returncode == 3
    assert "base_path: must start with '/'" in result.stderr
    assert "nobody could call the API" in result.stderr


def test_check_reports_a_broken_directory(tmp_path: Path, config: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text(
        config.read_text().replace(str(TEST_DIRECTORY), str(tmp_path / "missing.json"))
    )
    result = run("check", "--config", str(broken))
    assert result.returncode == 3
    assert "simulated.directory" in result.stderr


def test_create_email_runs_the_flow(config: Path) -> None:
    result = run(
        "create-email", "--config", str(config), "--identity", "CONTOSO\\plain", "--alias", "pat"
    )
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert created["status"] == "created"
    assert created["primary_smtp_address"] == "pat@contoso.com"


def test_create_email_reports_problems_with_their_code(config: Path) -> None:
    result = run("create-email", "--config", str(config), "--identity", "Alex Smith")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["code"] == "AMBIGUOUS_IDENTITY"
    assert report["exchange"]["reason"] == "ManagementObjectAmbiguousException"


def test_create_email_refuses_invalid_input(config: Path) -> None:
    result = run("create-email", "--config", str(config), "--identity", "jdoe*")
    assert result.returncode == 2
    assert "wildcard" in result.stderr


def test_config_from_the_environment(config: Path) -> None:
    env = {"VEZAPROVISIONER_CONFIG": str(config), "PATH": "/usr/bin:/bin"}
    result = run("create-email", "--identity", "mailbox", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "already_exists"


def test_hash_password_reads_stdin_when_piped() -> None:
    result = run("hash-password", stdin="s3cret pass\n")
    assert result.returncode == 0, result.stderr
    hashed = result.stdout.strip()
    assert verify_password("s3cret pass", hashed)
    assert "s3cret" not in hashed


def test_hash_password_refuses_an_empty_password() -> None:
    assert run("hash-password", stdin="\n").returncode == 2


def test_journal_lists_what_create_email_recorded(config: Path) -> None:
    run("create-email", "--config", str(config), "--identity", "CONTOSO\\plain")
    run("create-email", "--config", str(config), "--identity", "Alex Smith")
    table = run("journal", "--config", str(config), "--since", "1d")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split("\t")[:3] == ["received_at", "request_id", "state"]
    assert [row.split("\t")[2] for row in rows] == ["failed", "created"]  # newest first
    assert "2 record(s)" in table.stderr

    failed = run("journal", "--config", str(config), "--state", "failed", "--json")
    records = json.loads(failed.stdout)
    assert [r["code"] for r in records] == ["AMBIGUOUS_IDENTITY"]
    assert records[0]["caller_method"] == "cli"
    assert records[0]["exchange"]["reason"] == "ManagementObjectAmbiguousException"

    by_identity = run("journal", "--config", str(config), "--identity", "contoso\\PLAIN", "--json")
    assert [r["state"] for r in json.loads(by_identity.stdout)] == ["created"]


def test_journal_refuses_a_bad_since(config: Path) -> None:
    result = run("journal", "--config", str(config), "--since", "yesterday")
    assert result.returncode == 2
    assert "like 1d" in result.stderr


def test_journal_without_a_journal_yet(config: Path) -> None:
    result = run("journal", "--config", str(config))
    assert result.returncode == 0
    assert "no journal yet" in result.stderr


@given(amount=st.integers(min_value=0, max_value=10**6), unit=st.sampled_from("smhdw"))
def test_since_accepts_a_number_and_a_unit(amount: int, unit: str) -> None:
    factor = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}[unit]
    assert parse_since(f" {amount}{unit} ") == amount * factor


@given(text=st.text(max_size=12))
def test_since_refuses_anything_else(text: str) -> None:
    assume(not re.fullmatch(r"\s*\d+[smhdw]\s*", text))
    with pytest.raises(argparse.ArgumentTypeError):
        parse_since(text)


def test_check_reports_an_unwritable_data_dir(tmp_path: Path, config: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    broken = tmp_path / "broken.toml"
    broken.write_text(f"data_dir = '{tmp_path / 'blocker' / 'data'}'\n" + config.read_text())
    result = run("check", "--config", str(broken))
    assert result.returncode == 3
    assert "journal" in result.stderr


def test_check_of_a_local_backend_starts_no_powershell(
    fake_powershell: FakePowerShell,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # In process, so that a started pool is seen for sure: a host killed while the fake is
    # still importing would never reach the fake's start log.
    started: list[HostPool] = []
    start = HostPool.start

    def recording_start(pool: HostPool) -> None:
        started.append(pool)
        start(pool)

    monkeypatch.setattr(HostPool, "start", recording_start)
    monkeypatch.setattr(ProcessTree, "__init__", refuse_process)
    config = tmp_path / "local.toml"
    config.write_text(
        f"backend = 'local'\ndata_dir = '{tmp_path / 'data'}'\n"
        f"[exchange]\npowershell_path = '{fake_powershell.path}'\n"
        f"remote_exchange_path = '{fake_powershell.remote_exchange}'\n"
        "[local]\npool_size = 2\n[auth]\nmode = 'basic'\n[auth.users]\n"
        'demo = "scrypt$16384$8$1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNo"\n',
        encoding="utf-8",
    )
    assert main(["check", "--config", str(config)]) == 0
    assert "configuration OK" in capsys.readouterr().err
    assert started == []
    assert fake_powershell.start_pids() == []
    assert (tmp_path / "data" / JOURNAL_FILE).exists()  # the journal was checked


def refuse_process(tree: ProcessTree, argv: Sequence[str]) -> None:
    raise AssertionError(f"check started a process: {list(argv)}")


def test_serve_exits_4_before_starting_when_the_port_is_taken(config: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--config", str(config), "--port", str(port))
    assert result.returncode == 4
    assert f"cannot bind 127.0.0.1:{port}" in result.stderr
    assert "--port" in result.stderr
    assert "VezaProvisioner 0" not in result.stderr  # the app never started


def test_check_warns_about_paths_this_machine_lacks(config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-powershell"
    with_missing = tmp_path / "missing.toml"
    with_missing.write_text(
        config.read_text() + f"[exchange]\npowershell_path = '{missing}'\n", encoding="utf-8"
    )
    result = run("check", "--config", str(with_missing))
    assert result.returncode == 0, result.stderr
    assert f"warning: exchange.powershell_path '{missing}' does not exist" in result.stderr


def test_check_says_windows_paths_cannot_be_checked_off_windows() -> None:
    settings = Settings()
    warnings = path_warnings(settings, on_windows=False)
    assert len(warnings) == 1
    assert "this machine is not Windows" in warnings[0]
    assert "exchange.powershell_path and exchange.remote_exchange_path" in warnings[0]
    on_windows = path_warnings(settings, on_windows=True)  # C:\... is not a file here
    assert any("exchange.powershell_path" in w and "does not exist" in w for w in on_windows)


def test_serve_socket_accepts_connections_with_nodelay() -> None:
    """Responses go out at once, not after the client's delayed ACK (about 40 ms each)."""

    async def accepted_nodelay() -> int:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[int] = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await loop.create_server(Probe, sock=listening_socket("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(seen, timeout=20)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0

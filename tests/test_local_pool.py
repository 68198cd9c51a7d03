"""The host pool through the fake PowerShell: every pool rule, driven by the fake's fault modes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from tests.fakes.clock import FakeClock
from tests.fakes.local_host import FakePowerShell, wait_gone, wait_warm
from vezaprovisioner.exchange.errors import (
    BackendUnavailable,
    ExchangeTimeout,
    IdentityNotFound,
    UnexpectedExchangeError,
)
from vezaprovisioner.exchange.local.backend import (
    HOST_SCRIPT,
    HOST_SWITCHES,
    LocalExchange,
    host_argv,
)
from vezaprovisioner.exchange.local.host import Host, HostStartupFailed
from vezaprovisioner.exchange.local.supply import PoolLimits, PoolStatus
from vezaprovisioner.exchange.local.warm_pool import HostPool, backoff_delay

PLAIN_GUID = "00000000-0000-0000-0000-000000001001"


def _ignore_failure(call: Callable[[str], object], argument: str) -> Callable[[], None]:
    """A thread target that occupies a host; how the call ends is not under test."""

    def run() -> None:
        with contextlib.suppress(Exception):
            call(argument)

    return run


def test_names_round_trip_both_ways(fake_powershell: FakePowerShell) -> None:
    exchange, _ = fake_powershell.exchange()
    assert exchange.get_user("José Álvarez").name == "José Álvarez"
    assert exchange.get_user("山田太郎").sam_account_name == "山田太郎"
    with pytest.raises(IdentityNotFound) as caught:
        exchange.get_user("Łukasz Żółć 😀")
    assert "'Łukasz Żółć 😀'" in caught.value.message
    assert caught.value.reason == "ManagementObjectNotFoundException"
    identities = [params["Identity"] for _, params in fake_powershell.calls()]
    assert identities == ["José Álvarez", "山田太郎", "Łukasz Żółć 😀"]


def test_one_host_serves_many_commands_without_restarting(fake_powershell: FakePowerShell) -> None:
    exchange, pool = fake_powershell.exchange()
    for _ in range(5):
        assert exchange.get_user("plain").guid == PLAIN_GUID
    assert pool.status().starts == 1
    assert len(set(fake_powershell.start_pids())) == 1


def test_banner_and_stray_frames_on_stdout_are_ignored(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(fault="noise")  # banner, a 2 MiB line, a frame with a foreign nonce
    exchange, pool = fake_powershell.exchange()
    assert exchange.get_user("plain").guid == PLAIN_GUID
    assert pool.status().starts == 1


@pytest.mark.parametrize("fault", ["partial", "non_utf8"])
def test_split_writes_and_foreign_bytes_do_not_break_a_host(
    fake_powershell: FakePowerShell, fault: str
) -> None:
    fake_powershell.set(fault=fault)
    exchange, pool = fake_powershell.exchange()
    assert exchange.get_user("José Álvarez").name == "José Álvarez"
    assert exchange.get_user("plain").guid == PLAIN_GUID
    assert pool.status().starts == 1


def test_crash_mid_command_is_502_and_a_replacement_serves_next(
    fake_powershell: FakePowerShell, caplog: pytest.LogCaptureFixture
) -> None:
    fake_powershell.set(fault="crash", fault_identity="mailbox")
    exchange, pool = fake_powershell.exchange()
    with pytest.raises(UnexpectedExchangeError) as caught:
        exchange.get_user("mailbox")
    assert "exit code 255" in caught.value.message
    assert "StackOverflowException" in caught.value.message
    assert "outcome is unknown" in caught.value.message
    assert exchange.get_user("plain").guid == PLAIN_GUID
    assert pool.status().starts == 2
    assert any("StackOverflowException" in r.getMessage() for r in caplog.records)


def test_oversized_answer_is_a_protocol_error_and_the_host_is_replaced(
    fake_powershell: FakePowerShell,
) -> None:
    fake_powershell.set(fault="huge", fault_identity="mailbox")
    exchange, pool = fake_powershell.exchange()
    with pytest.raises(UnexpectedExchangeError, match="protocol error: a protocol line is longer"):
        exchange.get_user("mailbox")
    assert exchange.get_user("plain").guid == PLAIN_GUID
    assert pool.status().starts == 2


def test_hang_is_timeout_and_kills_the_whole_process_tree(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(fault="hang", fault_identity="mailbox")
    exchange, pool = fake_powershell.exchange(command_timeout_seconds=1)
    with pytest.raises(ExchangeTimeout, match="did not finish within 1 s") as caught:
        exchange.get_user("mailbox")
    assert "were killed" in caught.value.message
    [grandchild] = [row["child"] for row in fake_powershell.records("grandchild")]
    [hung_host] = fake_powershell.start_pids()
    assert wait_gone([hung_host, grandchild]) == []
    assert exchange.get_user("plain").guid == PLAIN_GUID
    assert pool.status().starts == 2


def test_host_whose_exchange_session_broke_is_replaced(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(fault="session_broken", fault_identity="mailbox")
    exchange, pool = fake_powershell.exchange()
    with pytest.raises(UnexpectedExchangeError) as caught:
        exchange.get_user("mailbox")
    assert caught.value.reason == "PSRemotingTransportException"
    assert exchange.get_user("plain").guid == PLAIN_GUID
    assert pool.status().starts == 2


def test_idle_host_that_dies_is_replaced(fake_powershell: FakePowerShell) -> None:
    exchange, pool = fake_powershell.exchange()
    [first] = fake_powershell.start_pids()
    os.kill(first, signal.SIGKILL)
    pool.wait_for(lambda s: s.starts == 2 and s.warm == 1, timeout=20)
    assert exchange.get_user("plain").guid == PLAIN_GUID
    assert len(set(fake_powershell.start_pids())) == 2


def test_recycles_after_max_commands(fake_powershell: FakePowerShell) -> None:
    exchange, _ = fake_powershell.exchange(max_commands=2)
    for _ in range(5):
        exchange.get_user("plain")
    pids = [row["pid"] for row in fake_powershell.records("call")]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    # A recycled host is told to stop (stdin closed) and exits by itself.
    assert wait_gone(pids[:4]) == []


def test_recycles_after_max_age(fake_powershell: FakePowerShell) -> None:
    clock = FakeClock()
    exchange, _ = fake_powershell.exchange(max_age_seconds=60, monotonic=clock.monotonic)
    exchange.get_user("plain")
    exchange.get_user("plain")
    clock.advance(61)
    exchange.get_user("plain")
    pids = [row["pid"] for row in fake_powershell.records("call")]
    assert pids[0] == pids[1] != pids[2]


def test_wrong_remote_exchange_path_fails_fast_with_a_clear_error(
    fake_powershell: FakePowerShell, tmp_path: Path
) -> None:
    missing = str(tmp_path / "V15" / "bin" / "RemoteExchange.ps1")
    pool = fake_powershell.pool(remote_exchange_path=missing)
    status = pool.wait_for(lambda s: s.broken == 1, timeout=20)
    assert status.last_startup_error is not None
    assert "RemoteExchange.ps1 was not found" in status.last_startup_error
    assert "exchange.remote_exchange_path" in status.last_startup_error
    exchange = LocalExchange(pool)
    with pytest.raises(BackendUnavailable, match=r"RemoteExchange\.ps1 was not found") as caught:
        exchange.get_user("plain")
    assert caught.value.retry_after_seconds >= 1
    with pytest.raises(BackendUnavailable, match="0/1 PowerShell hosts warm"):
        exchange.probe()


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("connect", "could not connect to Exchange: no session opened, 4 error records: [1] "),
        ("rbac", "lacks the Mail Recipients management role"),
        ("exit", "Die Datei kann nicht geladen werden. Der Zugriff wurde verweigert"),
    ],
)
def test_startup_errors_are_reported(
    fake_powershell: FakePowerShell, fault: str, expected: str
) -> None:
    fake_powershell.set(fault=fault)
    pool = fake_powershell.pool()
    status = pool.wait_for(lambda s: s.broken == 1, timeout=20)
    assert status.last_startup_error is not None
    assert expected in status.last_startup_error
    assert expected in status.describe()


def test_never_ready_hits_the_startup_timeout(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(fault="never_ready")
    pool = fake_powershell.pool(startup_timeout_seconds=0.5)
    status = pool.wait_for(lambda s: s.broken == 1, timeout=20)
    assert "not ready within 0.5 s" in (status.last_startup_error or "")
    assert wait_gone(fake_powershell.start_pids()[:1]) == []


def test_failing_starts_back_off_then_recover(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(fault="connect", fault_starts=3)
    pool = fake_powershell.pool()
    status = wait_warm(pool)
    assert status.warm == 1
    assert status.failed_starts == 3
    assert status.starts == 4
    assert "could not connect" in (status.last_startup_error or "")


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_delay(n, 1.0, 10.0) for n in range(6)] == [0, 1, 2, 4, 8, 10]
    assert backoff_delay(10_000, 1.0, 60.0) == 60


def test_slow_start_makes_requests_wait_not_fail(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(connect_seconds=0.5)
    pool = fake_powershell.pool()
    assert pool.status().warm == 0
    assert LocalExchange(pool).get_user("plain").guid == PLAIN_GUID


def test_full_queue_is_unavailable_at_once(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(fault="hang", fault_identity="mailbox")
    exchange, pool = fake_powershell.exchange(queue_size=0)
    blocked: list[BaseException] = []

    def occupy() -> None:
        try:
            exchange.get_user("mailbox")
        except Exception as exc:
            blocked.append(exc)

    thread = threading.Thread(target=occupy)
    thread.start()
    pool.wait_for(lambda s: s.busy == 1, timeout=20)
    with pytest.raises(BackendUnavailable, match="busy") as caught:
        exchange.get_user("plain")
    assert caught.value.retry_after_seconds >= 1
    pool.close()  # kills the hung host: the occupying request ends as a crash
    thread.join(timeout=20)
    assert len(blocked) == 1


def _one_busy_and_waiting(count: int) -> Callable[[PoolStatus], bool]:
    return lambda status: status.busy == 1 and status.waiting == count


def test_waiting_requests_are_served_in_arrival_order(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(latency_ms=200)
    exchange, pool = fake_powershell.exchange()
    finished: list[str] = []

    def read(identity: str) -> None:
        exchange.get_user(identity)
        finished.append(identity)

    threads = []
    for waiting, identity in enumerate(["plain", "disabled", "asmith1", "asmith2"]):
        thread = threading.Thread(target=read, args=(identity,))
        thread.start()
        threads.append(thread)
        pool.wait_for(_one_busy_and_waiting(waiting), timeout=20)
    for thread in threads:
        thread.join(timeout=20)
    assert finished == ["plain", "disabled", "asmith1", "asmith2"]


def test_waiting_longer_than_queue_wait_is_unavailable(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(fault="hang", fault_identity="mailbox")
    exchange, pool = fake_powershell.exchange(queue_wait_seconds=0.2)
    thread = threading.Thread(target=_ignore_failure(exchange.get_user, "mailbox"))
    thread.start()
    pool.wait_for(lambda s: s.busy == 1, timeout=20)
    with pytest.raises(BackendUnavailable, match=r"within 0\.2 s"):
        exchange.get_user("plain")
    pool.close()
    thread.join(timeout=20)


def test_pool_size_zero_starts_a_host_per_command(fake_powershell: FakePowerShell) -> None:
    exchange, _ = fake_powershell.exchange(pool_size=0)
    assert exchange.get_user("plain").guid == PLAIN_GUID
    assert exchange.get_user("plain").guid == PLAIN_GUID
    pids = fake_powershell.start_pids()
    assert len(set(pids)) == 2
    assert wait_gone(pids) == []
    assert "pool_size 0" in exchange.probe()


def test_close_leaves_no_process_behind(fake_powershell: FakePowerShell) -> None:
    fake_powershell.set(fault="hang", fault_identity="mailbox")
    exchange, pool = fake_powershell.exchange(pool_size=2)
    thread = threading.Thread(target=_ignore_failure(exchange.get_user, "mailbox"))
    thread.start()
    pool.wait_for(lambda s: s.busy == 1, timeout=20)
    pool.close()
    thread.join(timeout=20)
    children = [row["child"] for row in fake_powershell.records("grandchild")]
    assert wait_gone(fake_powershell.start_pids() + children) == []
    with pytest.raises(BackendUnavailable, match="shutting down"):
        exchange.get_user("plain")


def test_shutdown_lets_every_warm_host_remove_its_session(fake_powershell: FakePowerShell) -> None:
    # A host killed instead leaves its Exchange session counting against the account's
    # PowerShell throttling until Exchange expires it.
    _, pool = fake_powershell.exchange(pool_size=2)
    pool.close()
    started = fake_powershell.start_pids()
    assert wait_gone(started) == []
    assert sorted(row["pid"] for row in fake_powershell.records("session_removed")) == sorted(
        started
    )


def test_the_fake_refuses_a_host_script_that_is_not_the_shipped_one(
    fake_powershell: FakePowerShell, tmp_path: Path
) -> None:
    edited = tmp_path / "host.ps1"
    edited.write_bytes(HOST_SCRIPT.read_bytes() + b"\nRemove-Mailbox -Identity x\n")
    host = Host(
        [fake_powershell.path, *HOST_SWITCHES, str(edited)], "C:\\x.ps1", connect_lock_seconds=1
    )
    with pytest.raises(HostStartupFailed, match=r"differs from the shipped host\.ps1"):
        host.wait_ready(20)


_ORPHAN_SCRIPT = """
import sys
from tests.fakes.local_host import FakePowerShell
from vezaprovisioner.exchange.local.backend import host_argv
from vezaprovisioner.exchange.local.supply import PoolLimits
from vezaprovisioner.exchange.local.warm_pool import HostPool
pool = HostPool(host_argv(sys.argv[1]), sys.argv[2], PoolLimits(pool_size=2))
pool.start()
pool.wait_for(lambda s: s.warm == 2, timeout=20)
print("warm", flush=True)
sys.stdin.readline()
"""


@pytest.mark.slow
def test_hosts_exit_when_the_service_process_is_killed(
    fake_powershell: FakePowerShell, repo_root: Path
) -> None:
    service = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _ORPHAN_SCRIPT,
            fake_powershell.path,
            str(fake_powershell.remote_exchange),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=repo_root,
    )
    assert service.stdout is not None
    assert service.stdout.readline() == b"warm\n"
    hosts = fake_powershell.start_pids()
    assert len(hosts) == 2
    service.kill()  # SIGKILL: no cleanup code runs in the service
    service.wait()
    assert wait_gone(hosts) == []


def test_a_wrong_powershell_path_is_a_startup_error(fake_powershell: FakePowerShell) -> None:
    pool = HostPool(
        host_argv("/nonexistent/WindowsPowerShell/v1.0/powershell.exe"),
        str(fake_powershell.remote_exchange),
        PoolLimits(pool_size=1, restart_backoff_seconds=5),
    )
    fake_powershell.pools.append(pool)
    pool.start()
    status = pool.wait_for(lambda s: s.broken == 1, timeout=20)
    assert "check exchange.powershell_path" in (status.last_startup_error or "")


class RecordedEvents:
    """A PoolEvents hook that keeps what the pool reported."""

    def __init__(self) -> None:
        self.lifecycle: list[tuple[str, str, str | None]] = []
        self.states: list[dict[str, int]] = []
        self.queue: list[int] = []

    def host_started(self, host: str, **fields: object) -> None:
        self.lifecycle.append(("started", host, None))

    def host_recycled(self, host: str, reason: str, **fields: object) -> None:
        self.lifecycle.append(("recycled", host, reason))

    def host_killed(self, host: str, reason: str, **fields: object) -> None:
        self.lifecycle.append(("killed", host, reason))

    def hosts(self, by_state: Mapping[str, int]) -> None:
        self.states.append(dict(by_state))

    def queue_depth(self, waiting: int) -> None:
        self.queue.append(waiting)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("hang", "timeout"),
        ("crash", "crashed"),
        ("huge", "protocol_error"),
        ("session_broken", "session_lost"),
    ],
)
def test_a_replaced_host_is_reported_killed_with_its_reason(
    fake_powershell: FakePowerShell, fault: str, reason: str
) -> None:
    fake_powershell.set(fault=fault, fault_identity="mailbox")
    events = RecordedEvents()
    pool = fake_powershell.pool(events=events, command_timeout_seconds=1)
    assert wait_warm(pool).warm == 1
    with contextlib.suppress(ExchangeTimeout, UnexpectedExchangeError):
        LocalExchange(pool).get_user("mailbox")
    assert pool.wait_for(lambda s: s.starts == 2 and s.warm - s.busy == 1, 20).starts == 2
    first, second = (f"ps-{pid}" for pid in fake_powershell.start_pids())
    assert events.lifecycle == [
        ("started", first, None),
        ("killed", first, reason),
        ("started", second, None),
    ]
    assert events.states[-1] == {"idle": 1, "busy": 0, "starting": 0, "broken": 0}
    assert {"idle": 0, "busy": 1, "starting": 0, "broken": 0} in events.states


def test_pool_size_0_reports_each_host_and_the_requests_waiting(
    fake_powershell: FakePowerShell,
) -> None:
    events = RecordedEvents()
    pool = fake_powershell.pool(events=events, pool_size=0, queue_size=1)
    exchange = LocalExchange(pool)
    assert exchange.get_user("plain").guid == PLAIN_GUID
    (host,) = fake_powershell.start_pids()
    assert events.lifecycle == [("started", f"ps-{host}", None)]  # then closed: no failure
    assert {"idle": 0, "busy": 0, "starting": 1, "broken": 0} in events.states
    assert {"idle": 0, "busy": 1, "starting": 0, "broken": 0} in events.states
    assert events.states[-1] == {"idle": 0, "busy": 0, "starting": 0, "broken": 0}
    assert events.queue == [1, 0]  # waiting for one of the queue_size host places, then not

"""Crash recovery in-process: every way a record can be left unfinished, and what it becomes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from typing import Any

import pytest

from tests.fakes.clock import FakeClock
from vezaprovisioner.config import Settings
from vezaprovisioner.exchange.errors import BackendUnavailable
from vezaprovisioner.exchange.port import DirectoryUser, EnableMailbox
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange
from vezaprovisioner.journal.records import Journal, RequestContext
from vezaprovisioner.recovery import recover
from vezaprovisioner.services import Services, build_services

PLAIN_GUID_IDENTITY = "CONTOSO\\plain"


@pytest.fixture(scope="module")
def dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(child.stdout)


@pytest.fixture
def services(
    make_settings: Callable[..., Settings], exchange: SimulatedExchange, clock: FakeClock
) -> Services:
    return build_services(make_settings(), exchange=exchange, clock=clock)


def orphan(
    journal: Journal,
    dead_pid: int,
    *,
    identity: str = PLAIN_GUID_IDENTITY,
    alias: str | None = None,
    guid: str | None = None,
    enable_sent: bool = False,
) -> str:
    """A record as a process that died at that point leaves it."""
    context = RequestContext(f"orphan-{identity}-{guid}-{enable_sent}", "veza", "basic")
    row = journal.receive(context, "CREATE_EMAIL", identity, alias)
    if guid is not None:
        journal.running(row, guid)
        if enable_sent:
            journal.enable_sent(row)
    with closing(sqlite3.connect(journal.path)) as db:
        db.execute("UPDATE requests SET owner_pid = ? WHERE id = ?", (dead_pid, row))
        db.commit()
    return context.request_id


def state_of(journal: Journal, request_id: str) -> tuple[str, str | None, bool]:
    record = journal.get(request_id)
    assert record is not None
    return record.state, record.detail, record.recovered


def run_recovery(services: Services, port: Any = None) -> None:
    recover(services.journal, port or services.exchange, services.settings, services.claims)


def guid_of(exchange: SimulatedExchange, identity: str = PLAIN_GUID_IDENTITY) -> str:
    return exchange.get_user(identity).guid


def test_received_only_is_not_created_without_asking_exchange(
    services: Services, exchange: SimulatedExchange, dead_pid: int
) -> None:
    request_id = orphan(services.journal, dead_pid)
    run_recovery(services)
    state, detail, recovered = state_of(services.journal, request_id)
    assert (state, recovered) == ("not_created", True)
    assert (detail or "").startswith("queued, never sent:")
    assert exchange.calls == []


def test_running_before_enable_is_not_created(
    services: Services, exchange: SimulatedExchange, dead_pid: int
) -> None:
    request_id = orphan(services.journal, dead_pid, guid=guid_of(exchange))
    run_recovery(services)
    assert state_of(services.journal, request_id)[0] == "not_created"


def test_enable_sent_and_landed_is_created(
    services: Services, exchange: SimulatedExchange, dead_pid: int
) -> None:
    guid = guid_of(exchange)
    request_id = orphan(services.journal, dead_pid, guid=guid, alias="pat", enable_sent=True)
    exchange.enable_mailbox(EnableMailbox(identity=guid, alias="pat"))
    run_recovery(services)
    state, detail, recovered = state_of(services.journal, request_id)
    assert (state, recovered) == ("created", True)
    assert "pat@contoso.com" in (detail or "")
    assert (detail or "").startswith("sent: Enable-Mailbox was handed to Exchange")


def test_enable_sent_but_not_landed_is_not_created(
    services: Services, exchange: SimulatedExchange, dead_pid: int
) -> None:
    request_id = orphan(services.journal, dead_pid, guid=guid_of(exchange), enable_sent=True)
    run_recovery(services)
    state, detail, _ = state_of(services.journal, request_id)
    assert state == "not_created"
    assert "still reports a User" in (detail or "")


def test_a_mailbox_with_another_alias_is_unknown(
    services: Services, exchange: SimulatedExchange, dead_pid: int
) -> None:
    guid = guid_of(exchange)
    request_id = orphan(services.journal, dead_pid, guid=guid, alias="pat", enable_sent=True)
    exchange.enable_mailbox(EnableMailbox(identity=guid, alias="someone.else"))
    run_recovery(services)
    state, detail, _ = state_of(services.journal, request_id)
    assert state == "unknown"
    assert "'someone.else', not the requested 'pat'" in (detail or "")


def test_another_recipient_type_is_unknown(
    services: Services, exchange: SimulatedExchange, dead_pid: int
) -> None:
    guid = guid_of(exchange, "mailuser")
    request_id = orphan(
        services.journal, dead_pid, identity="mailuser", guid=guid, enable_sent=True
    )
    run_recovery(services)
    state, detail, _ = state_of(services.journal, request_id)
    assert state == "unknown"
    assert "MailUser" in (detail or "")


def test_a_user_gone_from_ad_is_unknown(services: Services, dead_pid: int) -> None:
    request_id = orphan(
        services.journal,
        dead_pid,
        guid="00000000-0000-0000-0000-000000000001",
        enable_sent=True,
    )
    run_recovery(services)
    state, detail, _ = state_of(services.journal, request_id)
    assert state == "unknown"
    assert "no longer exists" in (detail or "")


class ExchangeDown:
    def __init__(self, inner: SimulatedExchange) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get_user(self, identity: str, domain_controller: str | None = None) -> DirectoryUser:
        raise BackendUnavailable("all PowerShell hosts are starting")


def test_exchange_unreachable_leaves_the_record_for_the_next_start(
    services: Services, exchange: SimulatedExchange, dead_pid: int
) -> None:
    request_id = orphan(services.journal, dead_pid, guid=guid_of(exchange), enable_sent=True)
    run_recovery(services, ExchangeDown(exchange))
    assert state_of(services.journal, request_id)[0] == "running"
    run_recovery(services)
    assert state_of(services.journal, request_id)[0] == "not_created"


def test_records_of_live_processes_are_left_alone(
    services: Services, exchange: SimulatedExchange
) -> None:
    context = RequestContext("live", "veza", "basic")
    row = services.journal.receive(context, "CREATE_EMAIL", PLAIN_GUID_IDENTITY, None)
    services.journal.running(row, guid_of(exchange))
    run_recovery(services)
    assert state_of(services.journal, "live")[0] == "running"


def test_maintenance_runs_recovery_once_in_the_background(
    services: Services, exchange: SimulatedExchange, dead_pid: int
) -> None:
    request_id = orphan(services.journal, dead_pid)
    services.maintenance.start()
    services.maintenance.start()
    assert services.maintenance.first_pass_done.wait(10)
    assert state_of(services.journal, request_id)[0] == "not_created"
    exposition = services.metrics.exposition().decode()
    assert 'vezaprovisioner_recovered_requests_total{state="not_created"} 1.0' in exposition


def test_maintenance_repeats_for_processes_that_die_later(
    make_settings: Callable[..., Settings],
    exchange: SimulatedExchange,
    clock: FakeClock,
    dead_pid: int,
) -> None:
    services = build_services(
        make_settings(journal={"maintenance_interval_seconds": 1}), exchange=exchange, clock=clock
    )
    services.maintenance.start()
    assert services.maintenance.first_pass_done.wait(10)
    # A worker that was alive at our start dies afterwards (an IIS recycle's old worker).
    request_id = orphan(services.journal, dead_pid)
    deadline = time.monotonic() + 10
    while state_of(services.journal, request_id)[0] != "not_created":
        assert time.monotonic() < deadline, "the next maintenance pass never came"
        time.sleep(0.05)  # polling the journal, the readiness signal
    services.close()


class GetUserWaits:
    """The simulated Exchange whose Get-User waits for `release`; `entered` is set on each call."""

    def __init__(self, inner: SimulatedExchange) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get_user(self, identity: str, domain_controller: str | None = None) -> DirectoryUser:
        self.entered.set()
        assert self.release.wait(10)
        return self.inner.get_user(identity, domain_controller)


def test_stopping_maintenance_waits_for_the_record_in_hand_and_leaves_the_rest(
    make_settings: Callable[..., Settings],
    exchange: SimulatedExchange,
    clock: FakeClock,
    dead_pid: int,
) -> None:
    """Closing the services (IIS's shutdown) must not pull the journal and Exchange out from
    under a recovery pass: stop() returns once the pass has finished its record, and the
    records it had not begun wait for the next start."""
    port = GetUserWaits(exchange)
    services = build_services(make_settings(), exchange=port, clock=clock)
    guid = guid_of(exchange)
    first = orphan(services.journal, dead_pid, guid=guid, enable_sent=True)
    second = orphan(services.journal, dead_pid, identity="plain", guid=guid, enable_sent=True)
    services.maintenance.start()
    assert port.entered.wait(10)  # the pass holds the first record, waiting on Exchange

    def release_once_stopping() -> None:
        assert services.maintenance.stopping.wait(10)
        port.release.set()

    releaser = threading.Thread(target=release_once_stopping)
    releaser.start()
    services.maintenance.stop()
    # Without the wait in stop() the first record would still be running here.
    assert state_of(services.journal, first)[0] == "not_created"
    assert state_of(services.journal, second)[0] == "running"
    releaser.join(10)
    services.close()

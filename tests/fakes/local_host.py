"""Test-side control of the fake PowerShell (`tests/fakes/powershell.py`): env, log, pools."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vezaprovisioner.exchange.local.backend import LocalExchange, host_argv, open_hosts
from vezaprovisioner.exchange.local.supply import (
    HostOptions,
    HostSupply,
    PoolEvents,
    PoolLimits,
    PoolStatus,
)

FAKE_POWERSHELL = Path(__file__).resolve().with_name("powershell.py")
TEST_DIRECTORY = Path(__file__).resolve().with_name("directory.json")


def process_gone(pid: int) -> bool:
    """True when `pid` no longer runs (absent, or a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait (bounded) for processes we do not parent to disappear; returns the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if not process_gone(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)  # polling another process's exit; no event exists for a non-child


@dataclass
class FakePowerShell:
    """The fake's environment for one test, and what it recorded."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    pools: list[HostSupply] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.remote_exchange = self.tmp / "RemoteExchange.ps1"
        self.remote_exchange.write_text("# stands in for Exchange's script\n")
        self.log = self.tmp / "fake-log.jsonl"
        self.state = self.tmp / "forest.sqlite3"
        #: Stands for the account's machine-wide connect mutex (the fake flocks it).
        self.mutex = self.tmp / "connect.mutex"
        # The fake's `#!/usr/bin/env python3` must find this interpreter (it imports the package).
        self.monkeypatch.setenv(
            "PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        )
        self.set(
            directory=TEST_DIRECTORY,
            state=self.state,
            log=self.log,
            mutex=self.mutex,
            fault="",
            fault_identity=None,
            fault_cmdlet=None,
        )
        self.monkeypatch.delenv("VZP_FAKE_FAULT_STARTS", raising=False)
        self.monkeypatch.delenv("VZP_FAKE_CONNECT_SECONDS", raising=False)
        self.monkeypatch.delenv("VZP_FAKE_STOP_TRANSCRIPT_SECONDS", raising=False)
        self.monkeypatch.delenv("VZP_FAKE_LATENCY_MS", raising=False)
        self.monkeypatch.delenv("VZP_FAKE_STDERR_ENCODING", raising=False)

    @property
    def path(self) -> str:
        return str(FAKE_POWERSHELL)

    def set(self, **values: object) -> None:
        """Set VZP_FAKE_<NAME> for hosts started from now on (None removes it)."""
        for name, value in values.items():
            key = f"VZP_FAKE_{name.upper()}"
            if value is None:
                self.monkeypatch.delenv(key, raising=False)
            else:
                self.monkeypatch.setenv(key, str(value))

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        rows = [json.loads(line) for line in self.log.read_text("utf-8").splitlines()]
        return [row for row in rows if event is None or row["event"] == event]

    def calls(self) -> list[tuple[str, dict[str, str]]]:
        return [(row["cmdlet"], row["parameters"]) for row in self.records("call")]

    def start_pids(self) -> list[int]:
        return [row["pid"] for row in self.records("start")]

    def pool(
        self,
        *,
        remote_exchange_path: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        events: PoolEvents | None = None,
        stderr_encoding: str | None = None,
        **limits: Any,
    ) -> HostSupply:
        values: dict[str, Any] = {
            "pool_size": 1,
            "startup_timeout_seconds": 20,
            "command_timeout_seconds": 20,
            "queue_wait_seconds": 20,
            "restart_backoff_seconds": 0.05,
            "restart_backoff_max_seconds": 0.2,
        }
        values.update(limits)
        pool = open_hosts(
            host_argv(self.path),
            remote_exchange_path or str(self.remote_exchange),
            PoolLimits(**values),
            monotonic=monotonic,
            events=events,
            options=HostOptions(stderr_codec=stderr_encoding),
        )
        self.pools.append(pool)
        pool.start()
        return pool

    def exchange(self, **limits: Any) -> tuple[LocalExchange, HostSupply]:
        """A started pool (warm when it returns) and the port over it."""
        pool = self.pool(**limits)
        if pool.limits.pool_size:
            status = wait_warm(pool)
            assert status.warm == pool.limits.pool_size, status.describe()
        return LocalExchange(pool), pool

    def settings(self, **local: Any) -> dict[str, Any]:
        """make_settings overrides for `backend = "local"` over this fake."""
        return {
            "backend": "local",
            "exchange": {
                "powershell_path": self.path,
                "remote_exchange_path": str(self.remote_exchange),
                "command_timeout_seconds": local.pop("command_timeout_seconds", 20),
            },
            "local": {
                "pool_size": 1,
                "startup_timeout_seconds": 20,
                "restart_backoff_seconds": 0.05,
                "restart_backoff_max_seconds": 0.2,
                **local,
            },
        }

    def close(self) -> None:
        for pool in self.pools:
            pool.close()


def wait_warm(pool: HostSupply, count: int | None = None, timeout: float = 20.0) -> PoolStatus:
    want = pool.limits.pool_size if count is None else count
    return pool.wait_for(lambda s: s.warm - s.busy >= want, timeout)

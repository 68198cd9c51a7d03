"""One simulated Exchange shared by several server processes, as one real Exchange is.

Each process keeps its own `SimulatedExchange` (which executes the cmdlets, with Exchange's real
texts), and all of them share a folder:

* `calls.jsonl`: every cmdlet any process *started*, with its pid, appended before it runs, so
  a test counts Enable-* across processes (what reached Exchange, whatever the outcome);
* `changes.jsonl`: every Enable-* that took effect, with its result. Before each cmdlet a
  process replays the changes it has not seen yet into its own simulation, under a file lock,
  so every process sees every other's mailboxes, and a restarted process sees what landed
  before a crash.

The fake guarantees nothing about concurrency: two processes that both send Enable-* for one
user both get recorded in calls.jsonl. Only the service's journal claim prevents that.

`land` says when a slow Enable-* takes effect: `after_delay` (the usual: nothing changed until
the command finishes) or `before_reply` (the change is made, then the answer is slow — what a
crash after Exchange acted but before the service heard back looks like).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, TypeVar

from vezaprovisioner.clock import SystemClock
from vezaprovisioner.exchange.port import (
    DirectoryUser,
    EnableMailbox,
    EnableRemoteMailbox,
    Recipient,
)
from vezaprovisioner.exchange.simulated.directory import load_directory
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange

Land = Literal["after_delay", "before_reply"]
_T = TypeVar("_T")


class SharedSimulatedExchange:
    """Implements ExchangePort over a per-process simulation synchronised through files."""

    def __init__(
        self, directory: Path, state_dir: Path, *, enable_delay_seconds: float, land: Land
    ) -> None:
        self.inner = SimulatedExchange(load_directory(directory), clock=SystemClock())
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self._calls = state_dir / "calls.jsonl"
        self._changes = state_dir / "changes.jsonl"
        self._lock_file = state_dir / "lock"
        self._seen = 0  # bytes of changes.jsonl already replayed
        self._delay = enable_delay_seconds
        self._land = land

    # ---- ExchangePort -----------------------------------------------------------------------

    def get_user(self, identity: str, domain_controller: str | None = None) -> DirectoryUser:
        return self._run("Get-User", identity, lambda: self.inner.get_user(identity))

    def get_recipient(self, identity: str, domain_controller: str | None = None) -> Recipient:
        return self._run("Get-Recipient", identity, lambda: self.inner.get_recipient(identity))

    def enable_mailbox(self, request: EnableMailbox) -> Recipient:
        return self._enable(
            "Enable-Mailbox", request.identity, lambda: self.inner.enable_mailbox(request)
        )

    def enable_remote_mailbox(self, request: EnableRemoteMailbox) -> Recipient:
        return self._enable(
            "Enable-RemoteMailbox",
            request.identity,
            lambda: self.inner.enable_remote_mailbox(request),
        )

    def probe(self) -> str:
        with self._locked():
            return self.inner.probe()

    def close(self) -> None:
        self.inner.close()

    # ---- internals --------------------------------------------------------------------------

    def _run(self, cmdlet: str, identity: str, call: Callable[[], _T]) -> _T:
        self._record_call(cmdlet, identity)
        with self._locked():
            return call()

    def _enable(self, cmdlet: str, identity: str, call: Callable[[], Recipient]) -> Recipient:
        self._record_call(cmdlet, identity)
        if self._land == "after_delay":
            time.sleep(self._delay)  # simulated Exchange latency, not synchronisation
        with self._locked():
            result = call()
            with self._changes.open("a", encoding="utf-8") as changes:
                changes.write(json.dumps({"cmdlet": cmdlet, "result": vars(result)}) + "\n")
            self._seen = self._changes.stat().st_size
        if self._land == "before_reply":
            time.sleep(self._delay)
        return result

    def _record_call(self, cmdlet: str, identity: str) -> None:
        line = json.dumps({"cmdlet": cmdlet, "identity": identity, "pid": os.getpid()}) + "\n"
        with self._locked(), self._calls.open("a", encoding="utf-8") as calls:
            calls.write(line)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The folder's lock, with the other processes' changes replayed into this one."""
        with self._lock_file.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._replay()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _replay(self) -> None:
        if not self._changes.exists():
            return
        with self._changes.open("rb") as changes:
            changes.seek(self._seen)
            data = changes.read()
        self._seen += len(data)
        for line in data.decode("utf-8").splitlines():
            change = json.loads(line)
            result = change["result"]
            if change["cmdlet"] == "Enable-Mailbox":
                self.inner.enable_mailbox(
                    EnableMailbox(
                        identity=result["guid"],
                        alias=result["alias"],
                        database=result["database"],
                    )
                )
            else:
                self.inner.enable_remote_mailbox(
                    EnableRemoteMailbox(identity=result["guid"], alias=result["alias"])
                )


def read_calls(state_dir: Path) -> list[dict[str, object]]:
    """Every cmdlet any process started, in order."""
    path = state_dir / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_changes(state_dir: Path) -> list[dict[str, object]]:
    """Every Enable-* that took effect, in order."""
    path = state_dir / "changes.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

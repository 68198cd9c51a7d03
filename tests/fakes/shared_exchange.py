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

`enable_slots` models a backend whose Enable-* waits for one of a few PowerShell hosts: an
Enable-* first waits for a slot (written to `queued.jsonl` while it waits), and only with the
slot is it handed over (`request.announce()`, where the journal marks it sent) and recorded.

`land` says when a slow Enable-* takes effect: `after_delay` (the usual: nothing changed until
the command finishes) or `before_reply` (the change is made, then the answer is slow — what a
crash after Exchange acted but before the service heard back looks like).

`SharedForest` is the same idea for the local backend's fake PowerShell hosts
(`tests/fakes/powershell.py`, VZP_FAKE_STATE), where many hosts run cmdlets at once: the change
log is a SQLite table (WAL), so a read-only cmdlet replays only the changes it has not seen
(an indexed read that never waits for a writer) and an Enable-* holds SQLite's write lock only
while it runs in memory. Nothing re-reads the whole forest per cmdlet, so a benchmark with many
hosts measures the pool, not the fake.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Generic, Literal, TypeVar

from vezaprovisioner.clock import SystemClock
from vezaprovisioner.exchange.port import (
    DirectoryUser,
    EnableMailbox,
    EnableRemoteMailbox,
    Recipient,
)
from vezaprovisioner.exchange.simulated.directory import load_directory
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange

_SHARED_FOREST_SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    cmdlet TEXT NOT NULL,
    parameters TEXT NOT NULL
)
"""

Land = Literal["after_delay", "before_reply"]
_T = TypeVar("_T")


class SharedSimulatedExchange:
    """Implements ExchangePort over a per-process simulation synchronised through files."""

    def __init__(
        self,
        directory: Path,
        state_dir: Path,
        *,
        enable_delay_seconds: float,
        land: Land,
        enable_slots: int | None = None,
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
        self._slots = threading.Semaphore(enable_slots) if enable_slots else None

    # ---- ExchangePort -----------------------------------------------------------------------

    def get_user(self, identity: str, domain_controller: str | None = None) -> DirectoryUser:
        return self._run("Get-User", identity, lambda: self.inner.get_user(identity))

    def get_recipient(self, identity: str, domain_controller: str | None = None) -> Recipient:
        return self._run("Get-Recipient", identity, lambda: self.inner.get_recipient(identity))

    def enable_mailbox(self, request: EnableMailbox) -> Recipient:
        with self._slot(request.identity):
            request.announce()
            return self._enable(
                "Enable-Mailbox",
                request.identity,
                lambda: self.inner.enable_mailbox(replace(request, before_send=None)),
            )

    def enable_remote_mailbox(self, request: EnableRemoteMailbox) -> Recipient:
        with self._slot(request.identity):
            request.announce()
            return self._enable(
                "Enable-RemoteMailbox",
                request.identity,
                lambda: self.inner.enable_remote_mailbox(replace(request, before_send=None)),
            )

    @contextmanager
    def _slot(self, identity: str) -> Iterator[None]:
        """A "host" for an Enable-*, waited for in arrival order (no limit without slots)."""
        if self._slots is None:
            yield
            return
        if not self._slots.acquire(blocking=False):
            line = json.dumps({"identity": identity, "pid": os.getpid()}) + "\n"
            with self._locked(), (self.state_dir / "queued.jsonl").open("a") as queued:
                queued.write(line)
            self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()

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


class SharedForest(Generic[_T]):
    """One simulated forest for many processes: a SQLite log of the cmdlets that changed it.

    Each process builds its `SimulatedExchange` once and keeps it in memory. A change is logged
    with the cmdlet and parameters that made it, inside the write transaction in which it ran on
    a state that had every earlier change replayed, so replaying the log in order rebuilds the
    same state in every process (the simulation is deterministic for a given state).
    """

    def __init__(
        self,
        path: Path,
        build: Callable[[], SimulatedExchange],
        run: Callable[[SimulatedExchange, str, dict[str, str]], _T],
    ) -> None:
        self._path = path
        self._build = build
        self._run = run
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._seen = 0
        self.exchange = build()

    def _open(self) -> sqlite3.Connection:
        """The log's connection; a deleted or replaced file starts a fresh forest (tests do)."""
        try:
            st = os.stat(self._path)
            identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            identity = None
        if self._db is not None and identity == self._identity:
            return self._db
        if self._db is not None:
            self._db.close()
            self.exchange = self._build()
            self._seen = 0
        # A fake: durability is not the point, concurrency is. Each process its own connection.
        db = sqlite3.connect(self._path, timeout=60, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = OFF")
        db.execute(_SHARED_FOREST_SCHEMA)
        st = os.stat(self._path)
        self._db, self._identity = db, (st.st_dev, st.st_ino)
        return db

    def run(self, cmdlet: str, parameters: dict[str, str], *, changes: bool) -> _T:
        """Run the cmdlet on the shared state; `changes` for Enable-* (logged when it succeeds)."""
        db = self._open()
        if not changes:
            self._replay(db)
            return self._run(self.exchange, cmdlet, parameters)
        db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes
        try:
            self._replay(db)
            result = self._run(self.exchange, cmdlet, parameters)
            cursor = db.execute(
                "INSERT INTO changes (cmdlet, parameters) VALUES (?, ?)",
                (cmdlet, json.dumps(parameters)),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._seen = int(cursor.lastrowid or self._seen)
        return result

    def _replay(self, db: sqlite3.Connection) -> None:
        rows = db.execute(
            "SELECT seq, cmdlet, parameters FROM changes WHERE seq > ? ORDER BY seq", (self._seen,)
        ).fetchall()
        for seq, cmdlet, parameters in rows:
            self._run(self.exchange, cmdlet, json.loads(parameters))
            self._seen = seq


def read_calls(state_dir: Path) -> list[dict[str, object]]:
    """Every cmdlet any process started, in order."""
    path = state_dir / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_queued(state_dir: Path) -> list[dict[str, object]]:
    """Every Enable-* that had to wait for a slot (see `enable_slots`)."""
    path = state_dir / "queued.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_changes(state_dir: Path) -> list[dict[str, object]]:
    """Every Enable-* that took effect, in order."""
    path = state_dir / "changes.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

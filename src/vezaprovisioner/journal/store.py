"""The journal's SQLite file and its one writer: open, migrate, group-commit, read, guard.

One file, `<data_dir>/journal.sqlite3`, in WAL mode, shared by every worker process; its schema
is `MIGRATIONS`, brought up to date by whichever connection opens the file first. What the rows
mean lives beside it: `records` (a request's record), `claims` (the per-user claim) and
`idempotency` (Idempotency-Key) run their statements through a `JournalStore`.

Writes are group-committed: concurrent requests' writes queue, and whichever thread finds no
commit in progress runs everything queued in one transaction (one fsync); no Python lock is held
while SQLite waits for another process's writer. Each queued write has its own wake-up: when a
batch is committed only its writers are woken, and only the oldest queued write's thread is woken
to lead the next batch (no thread wakes just to find it has nothing to do). Reads take an idle
read connection.

Before every write transaction (and in readiness) the store checks that its path still names
the file it holds open, and that the WAL does too (device and inode on POSIX, volume serial and
file index on Windows): a journal deleted or replaced under a running server would otherwise
swallow every record until the restart.

If the journal cannot be written the request stops with `JournalUnavailable` before any Exchange
change (the API answers 503 JOURNAL_UNAVAILABLE).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..config import JournalSettings
from ..failures import Failure

JOURNAL_FILE = "journal.sqlite3"

_T = TypeVar("_T")

log = logging.getLogger(__name__)

# Each entry moves the schema from version N to N + 1 (PRAGMA user_version). Never edit a
# released entry: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL,
        action TEXT NOT NULL,
        identity TEXT NOT NULL,
        alias TEXT,
        caller TEXT NOT NULL,
        caller_method TEXT NOT NULL,
        client_address TEXT,
        state TEXT NOT NULL,
        guid TEXT,
        received_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        enable_sent_at REAL,
        finished_at REAL,
        duration_ms INTEGER,
        code TEXT,
        detail TEXT,
        exchange_reason TEXT,
        exchange_error_id TEXT,
        exchange_message TEXT,
        result_alias TEXT,
        primary_smtp_address TEXT,
        recovered INTEGER NOT NULL DEFAULT 0,
        owner_host TEXT NOT NULL,
        owner_pid INTEGER NOT NULL,
        owner_token TEXT NOT NULL
    );
    CREATE INDEX requests_request_id ON requests (request_id);
    CREATE INDEX requests_received_at ON requests (received_at);
    CREATE INDEX requests_state ON requests (state);
    CREATE TABLE claims (
        identity_key TEXT PRIMARY KEY,
        token TEXT NOT NULL,
        owner_host TEXT NOT NULL,
        owner_pid INTEGER NOT NULL,
        owner_token TEXT NOT NULL,
        claimed_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    # The claim transaction counts the Enable-* already sent for a user (claims.ClaimGate).
    """
    CREATE INDEX requests_guid ON requests (guid COLLATE NOCASE);
    """,
    # Idempotency-Key: the outcome of a request, kept to replay it (see idempotency.py).
    """
    CREATE TABLE idempotency_keys (
        caller TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        request_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        status INTEGER,
        body TEXT,
        PRIMARY KEY (caller, key)
    );
    """,
)


class JournalUnavailable(Failure):
    """The journal could not be written, so nothing was (or will be) sent to Exchange."""

    code = "JOURNAL_UNAVAILABLE"
    status = 503
    title = "The request journal cannot be written"
    advice = "Nothing was sent to Exchange; retry after Retry-After."
    retry_after_seconds = 30

    @property
    def detail(self) -> str:
        return f"{self.message} {self.advice}"


class _Write(Generic[_T]):
    """One queued write: its statements, then its result or error once its batch committed.

    `wake` is held from the start; the thread that finished the write's batch (then `done`) or
    that hands it the leader's role releases it. An `exclusive` one has no statements: it waits
    for the leader's role alone (`JournalStore.transaction`, `close`).
    """

    __slots__ = ("done", "durable", "error", "exclusive", "op", "promoted", "result", "wake")

    def __init__(
        self, op: Callable[[sqlite3.Connection], _T], durable: bool, *, exclusive: bool = False
    ) -> None:
        self.op = op
        self.durable = durable
        self.exclusive = exclusive
        self.promoted = False  # handed the leader's role
        self.done = False
        self.result: _T | None = None
        self.error: BaseException | None = None
        self.wake = threading.Lock()
        self.wake.acquire()


class JournalStore:
    """The journal file, its group-committing writer and its readers. Thread-safe."""

    def __init__(self, data_dir: Path, settings: JournalSettings) -> None:
        self.path = data_dir / JOURNAL_FILE
        self._settings = settings
        # Group commit: writes queue here; the thread that finds no leader commits them all.
        # `_mutex` guards the queue and the leader's role and is never held around SQLite.
        self._mutex = threading.Lock()
        self._queued: list[_Write[Any]] = []
        self._leading = False
        self._queue_grew = threading.Condition(self._mutex)  # for wait_queued only
        self._watchers = 0
        #: Write transactions committed by this instance (each may carry many writes).
        self.commits = 0
        self._writer: sqlite3.Connection | None = None  # used by the leader only
        self._writer_sync = self._settings.synchronous.upper()
        self._identity: tuple[tuple[int, int], tuple[int, int]] | None = None
        self._lost: str | None = None  # why the path no longer names our file
        # Idle read connections: a reader takes one (or opens one) and gives it back, so there
        # are as many as reads ever ran at once, not one per thread that ever read.
        self._idle_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()  # only around the list, never around SQLite
        #: Called with the exception whenever a journal operation fails (metrics, logs).
        self.on_error: Callable[[Exception], None] = lambda exc: None

    # ---- connections --------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.path,
            timeout=self._settings.busy_timeout_ms / 1000,
            isolation_level=None,  # explicit BEGIN/COMMIT only
            check_same_thread=False,  # the writer passes from leader to leader
        )
        try:
            mode = _enter_wal_mode(connection, self._settings.busy_timeout_ms / 1000)
            if str(mode).lower() != "wal":
                # SQLite falls back silently where WAL cannot work (a network share).
                raise sqlite3.DatabaseError(
                    f"WAL mode is unavailable here (got {mode!r}); keep data_dir on a local disk"
                )
            connection.execute(f"PRAGMA synchronous={self._settings.synchronous.upper()}")
            connection.execute(f"PRAGMA busy_timeout={self._settings.busy_timeout_ms}")
        except BaseException:
            connection.close()
            raise
        return connection

    def _connect(self) -> sqlite3.Connection:
        """The writer; opens (and migrates) the file on first use, so a broken disk never stops
        the start. Called by the commit leader only."""
        if self._writer is not None:
            return self._writer
        connection = self._open()
        try:
            _migrate(connection)
            self._identity = self._file_identity()
            # The writer waits for another process's write lock in `_begin`, in short steps,
            # not in SQLite's busy handler (which sleeps 5, 10, 15 … 100 ms at a time).
            connection.execute("PRAGMA busy_timeout=0")
        except BaseException:
            connection.close()
            raise
        self._writer = connection
        return connection

    def _file_identity(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(device, inode) of the database and of its WAL; on Windows os.stat gives the volume
        serial number and the file index."""
        main = os.stat(self.path)
        wal = os.stat(f"{self.path}-wal")
        return (main.st_dev, main.st_ino), (wal.st_dev, wal.st_ino)

    def _check_identity(self) -> None:
        """Raises sqlite3.DatabaseError when the path no longer names the file we hold open."""
        assert self._identity is not None
        try:
            now = self._file_identity()
        except FileNotFoundError as exc:
            what = "its WAL" if str(exc.filename).endswith("-wal") else "the journal file"
            problem = f"{what} ({exc.filename}) was deleted while the service held it open"
        else:
            if now == self._identity:
                if self._lost is not None:
                    log.warning("the request journal %s is its own file again", self.path)
                    self._lost = None
                return
            what = "the journal file" if now[0] != self._identity[0] else "its WAL"
            problem = f"{what} at {self.path} was replaced by another file"
        if self._lost is None:
            log.critical(
                "THE REQUEST JOURNAL IS GONE: %s; requests answer 503 until the file is put "
                "back or the service restarts (records written since are in the old file only)",
                problem,
            )
        self._lost = problem
        raise sqlite3.DatabaseError(problem)

    def _take_reader(self) -> sqlite3.Connection:
        with self._readers_lock:
            if self._idle_readers:
                return self._idle_readers.pop()
        reader = self._open()
        try:
            _migrate(reader)  # a read may come first (the CLI, a look-up after a start)
        except BaseException:
            reader.close()
            raise
        return reader

    # ---- writing ------------------------------------------------------------------------------

    def write(
        self, what: str, op: Callable[[sqlite3.Connection], _T], *, durable: bool = True
    ) -> _T:
        """Runs `op` in a write transaction, group-committed with concurrent writes.

        `op` runs under a savepoint: its exception undoes its statements only and is raised
        here; a failure of the transaction itself becomes JournalUnavailable. With
        `synchronous = "full"` a commit carrying a `durable` write is fsynced; one carrying only
        others is not, and reaches the disk with the next fsynced commit (the WAL is sequential).
        """
        item: _Write[_T] = _Write(op, durable)
        if self._enqueue(item):
            self._wait(item)  # until our batch is committed or we are to lead the next one
        if not item.done:
            self._lead(what)
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value] # set when done without an error

    def _enqueue(self, item: _Write[Any]) -> bool:
        """Queues `item`; False if its thread has the leader's role now (no commit running)."""
        with self._mutex:
            self._queued.append(item)
            if self._watchers:
                self._queue_grew.notify_all()
            if self._leading:
                return True
            self._leading = True
            return False

    def _wait(self, item: _Write[Any]) -> None:
        """Blocks until `item`'s batch is done or it is handed the leader's role. Interrupted
        (KeyboardInterrupt in the CLI), it leaves the queue and passes on a role it was handed,
        so no write waits for a thread that is gone."""
        try:
            item.wake.acquire()
        except BaseException:
            with self._mutex:
                queued = item in self._queued
                if queued:
                    self._queued.remove(item)
                promoted = item.promoted and not item.done
            if promoted:
                self._hand_over([])
            raise  # (taken into a batch being committed: its leader finishes it)

    def _lead(self, what: str) -> None:
        """The leader's role: commit the queued writes, wake their threads, and hand the role to
        the oldest write still queued."""
        batch: list[_Write[Any]] = []
        try:
            self._commit(batch, what)
        finally:
            self._hand_over(batch)

    def _take(self, batch: list[_Write[Any]], *, durable_too: bool) -> None:
        """Moves queued writes into `batch`, oldest first, up to an exclusive transaction (and,
        unless `durable_too`, up to a durable write)."""
        with self._mutex:
            taken = 0
            for item in self._queued:
                if item.exclusive or (item.durable and not durable_too):
                    break
                taken += 1
            batch += self._queued[:taken]
            del self._queued[:taken]

    def _hand_over(self, finished: Sequence[_Write[Any]]) -> None:
        """Marks `finished` done, wakes their threads, and passes the leader's role on."""
        with self._mutex:
            for item in finished:
                item.done = True
            successor = self._queued[0] if self._queued else None
            self._leading = successor is not None
            if successor is not None:
                successor.promoted = True
        for item in finished:
            item.wake.release()  # the leader's own write was never waited for: release is harmless
        if successor is not None:
            successor.wake.release()

    def _commit(self, batch: list[_Write[Any]], what: str) -> None:
        """One transaction for the queued writes, which it moves into `batch` (called by the
        leader, no lock held).

        The writes queued when it starts decide whether the commit is fsynced; those queued
        while it waited for the write lock (another process's commit) join the batch once it
        holds the lock, if that does not need a stronger `synchronous` than was set.

        A write whose own statements fail is undone alone (a savepoint, when the batch has
        others) and gets its error; a failure of the transaction fails every write in it. SQLite
        errors become JournalUnavailable either way.
        """
        try:
            self._take(batch, durable_too=True)  # the leader's own write and those queued now
            durable = any(item.durable for item in batch)
            db = self._connect()
            self._check_identity()
            self._synchronous(db, full=durable)
            self._begin(db)
            # What queued meanwhile, unless it needs the fsync this commit will not make.
            self._take(batch, durable_too=durable or self._settings.synchronous != "full")
            try:
                if len(batch) == 1:  # the usual case at low concurrency: no savepoint needed
                    batch[0].result = batch[0].op(db)
                else:
                    for item in batch:
                        db.execute("SAVEPOINT one_write")
                        try:
                            item.result = item.op(db)
                        except (sqlite3.Error, OSError):
                            raise  # the transaction itself is in doubt
                        except BaseException as exc:
                            db.execute("ROLLBACK TO one_write")
                            item.error = exc
                        db.execute("RELEASE one_write")
                db.execute("COMMIT")
                self.commits += 1
            except BaseException:
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            error = self._unavailable(what, exc)
            for item in batch:
                item.error = error
        except BaseException as exc:  # the single write's own refusal (ClaimLost, ...)
            batch[0].error = exc

    def _begin(self, db: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, retried in short steps while another process writes, for up to
        `busy_timeout_ms` (no Python lock is held meanwhile: only the leader's role)."""
        deadline = time.monotonic() + self._settings.busy_timeout_ms / 1000
        delay = 0.0005
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)  # a retry interval: the other side is another process's SQLite
            delay = min(delay * 2, 0.004)

    def _synchronous(self, db: sqlite3.Connection, *, full: bool) -> None:
        """FULL for a commit that must survive a power loss, else NORMAL (outside a transaction)."""
        level = "FULL" if full and self._settings.synchronous == "full" else "NORMAL"
        if level != self._writer_sync:
            db.execute(f"PRAGMA synchronous={level}")
            self._writer_sync = level

    def wait_queued(self, count: int, timeout: float) -> bool:
        """Blocks until `count` writes wait for the next commit (diagnostics and tests)."""
        with self._mutex:
            self._watchers += 1
            try:
                return self._queue_grew.wait_for(lambda: len(self._queued) >= count, timeout)
            finally:
                self._watchers -= 1

    @contextmanager
    def _alone(self) -> Iterator[None]:
        """The leader's role for the block, with no batch running meanwhile (in queue order)."""
        item: _Write[None] = _Write(lambda db: None, True, exclusive=True)
        if self._enqueue(item):
            self._wait(item)  # until the previous leader hands the role to us
        with self._mutex:
            self._queued.remove(item)
        try:
            yield
        finally:
            self._hand_over([item])

    @contextmanager
    def transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction of its own, not grouped (claims of recovery, maintenance)."""
        with self._alone():
            try:
                db = self._connect()
                self._check_identity()
                self._synchronous(db, full=True)
                self._begin(db)
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                raise self._unavailable(what, exc) from exc

    def _unavailable(self, what: str, exc: BaseException) -> JournalUnavailable:
        if self._lost is None:
            self._drop_writer()
        error = JournalUnavailable(
            f"The request journal {self.path} could not be written ({what}: {exc}). "
            "Check the disk, the data_dir permissions and journal.busy_timeout_ms."
        )
        self.on_error(error)
        return error

    def read(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One read on an idle read connection (no lock held while it runs, no write)."""
        return self._read(sql, parameters)

    def _read(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        reader: sqlite3.Connection | None = None
        try:
            reader = self._take_reader()
            rows = reader.execute(sql, parameters).fetchall()
        except (sqlite3.Error, OSError) as exc:
            if reader is not None:
                reader.close()
            error = JournalUnavailable(f"The request journal {self.path} is unreadable: {exc}.")
            self.on_error(error)
            raise error from exc
        with self._readers_lock:
            self._idle_readers.append(reader)
        return rows

    def _drop_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._identity = None
            self._writer_sync = self._settings.synchronous.upper()

    def close(self) -> None:
        with self._alone():
            self._drop_writer()
        with self._readers_lock:
            readers, self._idle_readers = self._idle_readers, []
        for reader in readers:
            reader.close()

    @property
    def settings(self) -> JournalSettings:
        return self._settings

    def check_writable(self) -> str:
        """For readiness: a real write transaction (the schema version is rewritten as is)."""

        def rewrite(db: sqlite3.Connection) -> int:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            db.execute(f"PRAGMA user_version = {version}")
            return version

        version = self.write("readiness check", rewrite)
        return f"writable: {self.path} (schema {version})"


def _enter_wal_mode(connection: sqlite3.Connection, patience_seconds: float) -> str:
    """PRAGMA journal_mode=WAL, retried while another process is creating the same file.

    Switching a new database to WAL needs an exclusive lock, and SQLite answers "database is
    locked" at once instead of calling the busy handler; several IIS workers starting together
    on a fresh data_dir meet exactly there.
    """
    deadline = time.monotonic() + patience_seconds
    while True:
        try:
            return str(connection.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)  # a retry interval, not synchronisation: the other side is SQLite


def _migrate(connection: sqlite3.Connection) -> None:
    """Brings the schema to the newest version; several processes may race here safely."""
    if connection.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS):
        return  # the usual case: no write lock needed just to connect
    connection.execute("BEGIN IMMEDIATE")
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this program knows ({len(MIGRATIONS)}); "
                "upgrade VezaProvisioner"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in filter(str.strip, script.split(";")):
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {number}")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")

"""Logging: the one setup for every way the service runs (uvicorn, IIS through wfastcgi, CLI).

Every record becomes one JSON line with ECS-style field names (README, Logs: the vocabulary the
access log, the audit trail and the journal share). Records do no I/O on the thread that logs
them: a `QueueHandler` on the root logger stamps the request id of the request being served
(the `REQUEST_ID` context variable) and hands them to one writer thread (a `QueueListener`),
which formats each once and appends it to its file. (The audit trail writes its lines itself, on
the request's thread, before the response: audit.py.) Files are named by day and never renamed
(`DatedFileHandler`), so the several FastCGI processes IIS runs can all append to them; whether
a file is due to change (a new day, or `max_bytes` reached) is checked once per `CHECK_SECONDS`,
not per record.

`configure_logging(settings)` picks the destination: `logging.file` under data_dir, or standard
error when it is empty. Standard error is looked up when a line is written, never bound: wfastcgi
gives every request a fresh sys.stderr, so under IIS an empty `logging.file` means
`logs/vezaprovisioner.log` (config.for_iis). A file that cannot be opened is reported and the
service logs to standard error instead, and `status()` (readiness) says so. Anything that is not
printable in a field (control or format characters such as U+202E) is written as a JSON `\\u`
escape, so a log viewer shows it instead of obeying it. Nothing here ever receives a password or
an Authorization header.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .config import Settings

ROOT_LOGGER = "vezaprovisioner"
#: The id of the request being served, stamped on every line logged while it is (contextvars
#: follow the request into the threads Starlette runs the flow in).
REQUEST_ID: ContextVar[str | None] = ContextVar("vezaprovisioner_request_id", default=None)
#: How often a file handler looks at its file's size and the date (stat calls, not per record).
CHECK_SECONDS = 5.0
#: Records waiting for the writer thread; past this, log lines are dropped (and said so on
#: standard error) rather than memory growing without bound.
QUEUE_SIZE = 100_000
_QUEUE_HANDLER_NAME = "vezaprovisioner-queue"

log = logging.getLogger(__name__)


# --- one line: printable JSON ----------------------------------------------------------------


def _escape(char: str) -> str:
    code = ord(char)
    if code > 0xFFFF:  # JSON escapes astral characters as a surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def printable(line: str) -> str:
    """`line` (JSON text) with every non-printable character as a JSON `\\u` escape.

    json.dumps already escapes C0 controls inside strings; this also covers DEL, C1 controls,
    format characters (U+200B, U+202E, U+2066 …), line and paragraph separators, lone surrogates
    and unassigned code points. A JSON reader gets the original value back; a person reading the
    file sees the escape.
    """
    if line.isprintable():
        return line
    return "".join(char if char.isprintable() else _escape(char) for char in line)


def json_line(fields: Mapping[str, Any]) -> str:
    """One JSON object on one line, every value escaped to printable text."""
    return printable(json.dumps(fields, ensure_ascii=False, default=str, separators=(",", ":")))


def timestamp(created: float) -> str:
    """ISO 8601 in UTC with milliseconds (`@timestamp`)."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: @timestamp, log.level, log.logger, process.pid, message,
    http.request.id (while serving a request), then the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "@timestamp": timestamp(record.created),
            "log.level": record.levelname,
            "log.logger": record.name,
            "process.pid": record.process,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["http.request.id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            line.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["error.stack_trace"] = record.exc_text
        return json_line(line)


def event(
    logger: logging.Logger,
    message: str,
    fields: Mapping[str, Any],
    level: int = logging.INFO,
) -> None:
    """Logs `message` with structured `fields` (ECS-style names; None values left out)."""
    kept = {name: value for name, value in fields.items() if value is not None}
    logger.log(level, message, extra={"fields": kept})


# --- files named by day, never renamed ---------------------------------------------------------

_DAY = r"\d{4}-\d{2}-\d{2}"


def _parts(path: Path) -> tuple[str, str]:
    suffix = path.suffix
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name, suffix


def dated_name(path: Path, day: str, sequence: int = 0) -> Path:
    """`logs/vezaprovisioner.log` → `logs/vezaprovisioner-2026-11-29.log` (sequence 1:
    `vezaprovisioner-2026-11-29.1.log`)."""
    stem, suffix = _parts(path)
    middle = f".{sequence}" if sequence else ""
    return path.with_name(f"{stem}-{day}{middle}{suffix}")


def dated_files(path: Path) -> list[Path]:
    """The files written for the configured `path`, oldest first."""
    stem, suffix = _parts(path)
    pattern = re.compile(
        re.escape(stem) + rf"-(?P<day>{_DAY})(?:\.(?P<seq>\d+))?" + re.escape(suffix)
    )
    found = []
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            match = pattern.fullmatch(candidate.name)
            if match:
                found.append((match["day"], int(match["seq"] or 0), candidate))
    return [candidate for _, _, candidate in sorted(found)]


def _utc_day(created: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(created))


def _next_utc_midnight(created: float) -> float:
    day = datetime.fromtimestamp(created, tz=timezone.utc).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    return (day + timedelta(days=1)).timestamp()


#: Lines are written in batches of at most this many bytes, each with one write call.
_BATCH_BYTES = 64 * 1024


def open_for_append(path: Path) -> int:
    """A file descriptor whose every write lands at the end of the file, even when other
    processes append to the same file at the same moment.

    POSIX's O_APPEND guarantees that. Windows' C runtime implements O_APPEND as a seek to the end
    followed by a write, so two processes can overwrite each other's lines (CPython issue
    #86772); a handle with FILE_APPEND_DATA access and without FILE_WRITE_DATA makes the Windows
    kernel append atomically instead, so the runtime's handle is duplicated with exactly that
    access. The Windows branch was verified only by reading (README: What is verified).
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
    descriptor = os.open(path, flags | getattr(os, "O_NOINHERIT", 0) | getattr(os, "O_CLOEXEC", 0))
    if sys.platform != "win32":
        return descriptor
    import _winapi  # pragma: no cover - Windows only
    import msvcrt  # pragma: no cover

    file_append_data, file_read_attributes, synchronize = 0x0004, 0x0080, 0x00100000
    try:  # pragma: no cover
        this = _winapi.GetCurrentProcess()
        handle = _winapi.DuplicateHandle(
            this,
            msvcrt.get_osfhandle(descriptor),
            this,
            file_append_data | file_read_attributes | synchronize,
            False,
            0,
        )
    finally:
        os.close(descriptor)
    return msvcrt.open_osfhandle(handle, os.O_WRONLY)  # pragma: no cover


def _locked(handler: logging.Handler) -> threading.RLock:
    assert handler.lock is not None  # created by Handler.__init__
    return handler.lock


class DatedFileHandler(logging.Handler):
    """Appends to `<stem>-<UTC day>[.<n>]<suffix>` next to `path`; never renames a file.

    Windows refuses to rename a file another process holds open, so rotation by renaming breaks
    with several IIS worker processes. Here each process appends to the file named for today;
    when that file reaches `max_bytes` (seen at the next check) every process continues in the
    next sequence number. Checks happen at most once per `check_seconds` (one stat call) or
    when a record's time passes midnight UTC; in between, the handler counts what it wrote.
    When it moves to a new file it deletes the oldest files past `backup_count` (best effort:
    a file another process still has open stays until a later pass).
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        backup_count: int,
        check_seconds: float = CHECK_SECONDS,
    ) -> None:
        super().__init__()
        self.path = path
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.check_seconds = check_seconds
        self.current: Path | None = None
        self._descriptor: int | None = None
        #: Formatted lines not yet written: written together at a flush (the writer flushes
        #: whenever its queue runs empty), so every write call holds whole lines.
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._day = ""
        self._sequence = 0
        self._size = 0
        self._next_check = 0.0
        self._next_midnight = 0.0

    def open(self, now: float | None = None) -> Path:
        """Opens today's file now (so a start can report that it cannot); returns its path."""
        with _locked(self):
            self._roll(time.time() if now is None else now, 0)
            assert self.current is not None
            return self.current

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            self._append(data, record.created)
            if self._pending_bytes >= _BATCH_BYTES:
                self._write_pending()
        except Exception:
            self.handleError(record)

    def write_now(self, record: logging.LogRecord) -> None:
        """Formats and appends `record` on the calling thread, written when this returns
        (the audit trail's lines); errors are raised, not handed to handleError."""
        with _locked(self):
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            self._append(data, record.created)
            self._write_pending()

    def _append(self, data: bytes, created: float) -> None:
        if (
            self._descriptor is None
            or created >= self._next_check
            or created >= self._next_midnight
            or self._size + len(data) > self.max_bytes
        ):
            self._roll(created, len(data))
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._size += len(data)

    def _write_pending(self) -> None:
        if not self._pending or self._descriptor is None:
            return
        data = memoryview(b"".join(self._pending))
        self._pending.clear()
        self._pending_bytes = 0
        while data:
            data = data[os.write(self._descriptor, data) :]

    def _roll(self, now: float, incoming: int) -> None:
        self._write_pending()  # so that the size on disk includes this process's lines
        # A record logged just before midnight may reach the writer after one logged just
        # after it: the day never goes back.
        day = max(_utc_day(now), self._day)
        sequence = self._sequence if day == self._day else 0
        while True:
            target = dated_name(self.path, day, sequence)
            try:
                size = target.stat().st_size
            except FileNotFoundError:
                size = 0
            if size == 0 or size + incoming <= self.max_bytes:
                break
            sequence += 1
        if target != self.current or self._descriptor is None:
            self._close_descriptor()
            target.parent.mkdir(parents=True, exist_ok=True)
            self._descriptor = open_for_append(target)
            self.current = target
            self._prune()
        self._day, self._sequence, self._size = day, sequence, size
        self._next_check = now + self.check_seconds
        self._next_midnight = _next_utc_midnight(now)

    def _prune(self) -> None:
        files = dated_files(self.path)
        for old in files[: max(0, len(files) - self.backup_count - 1)]:
            if old != self.current:
                # Another process may hold it open (Windows): a later pass deletes it.
                with contextlib.suppress(OSError):
                    old.unlink()

    def flush(self) -> None:
        with _locked(self):
            self._write_pending()

    def _close_descriptor(self) -> None:
        if self._descriptor is not None:
            try:
                self._write_pending()
            finally:
                os.close(self._descriptor)
                self._descriptor = None

    def close(self) -> None:
        with _locked(self):
            self._close_descriptor()
        super().close()


class StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is when the line is written (never a stream bound once:
    wfastcgi replaces sys.stderr with a new buffer for every request)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            if stream is not None:
                stream.write(self.format(record) + "\n")
                stream.flush()
        except Exception:
            self.handleError(record)


# --- the one writer thread ---------------------------------------------------------------------


class _Router(logging.Handler):
    """The listener's only handler: each record goes to the log destination
    `configure_logging` chose."""

    def __init__(self) -> None:
        super().__init__()
        self.sink: logging.Handler = _default_sink()
        self._dirty: set[logging.Handler] = set()

    def emit(self, record: logging.LogRecord) -> None:
        target = self.sink
        target.handle(record)
        self._dirty.add(target)

    def flush(self) -> None:
        with _locked(self):
            dirty, self._dirty = self._dirty, set()
        for handler in dirty:
            try:
                handler.flush()
            except Exception:  # a full disk must not end the writer thread
                _report_failure(f"could not write to {handler}")


def _report_failure(what: str) -> None:
    """Says on the current standard error that lines were lost (as logging's handleError)."""
    if logging.raiseExceptions and sys.stderr is not None:
        traceback.print_exc(file=sys.stderr)
        sys.stderr.write(f"--- VezaProvisioner logging: {what}; lines were lost\n")


def _default_sink() -> logging.Handler:
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter())
    return handler


class _Listener(logging.handlers.QueueListener):
    """Takes records in batches, flushes whenever the queue runs empty, and wakes those waiting
    for their record."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None], router: _Router) -> None:
        super().__init__(records, router)
        self.records = records
        self.router = router
        self.waiting: list[threading.Event] = []

    #: At most this many records wait for their flush while the queue keeps filling.
    GROUP = 256
    #: After a batch the writer looks again this much later instead of waiting on the queue, as
    #: long as it keeps finding records: a busy service's records are then taken in batches and
    #: a logging call finds nobody to wake (each wake-up is a thread switch and a hand-off of
    #: the GIL on the request's thread). An idle writer blocks until the next record.
    LINGER_SECONDS = 0.02
    _busy = False

    def dequeue(self, block: bool) -> logging.LogRecord:  # or None, the stop sentinel
        return self._next(block)  # type: ignore[return-value]

    def _next(self, block: bool) -> logging.LogRecord | None:
        try:
            return self.records.get_nowait()
        except queue.Empty:
            pass
        if self._busy:
            time.sleep(self.LINGER_SECONDS)  # a batching interval: records keep coming meanwhile
            try:
                return self.records.get_nowait()
            except queue.Empty:
                self._busy = False
        record = self.records.get(block)
        self._busy = True
        return record

    def handle(self, record: logging.LogRecord) -> None:
        try:
            if not getattr(record, "flush_only", False):
                self.router.handle(record)
        except Exception:  # nothing a record does may end the writer thread
            _report_failure(f"could not write a record of {record.name}")
        written = getattr(record, "written", None)
        if isinstance(written, threading.Event):
            self.waiting.append(written)
        # One flush for everything written since the last one (a group commit, as several
        # requests finish together), and whoever waits for its line is told after it.
        if self.records.empty() or len(self.waiting) >= self.GROUP:
            self.router.flush()
            for event in self.waiting:
                event.set()
            self.waiting.clear()


class LogWriter:
    """The queue, the writer thread (started on first use, restartable) and the router."""

    def __init__(self) -> None:
        self.queue: queue.Queue[logging.LogRecord | None] = queue.Queue(QUEUE_SIZE)
        self.router = _Router()
        self._listener: _Listener | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._listener is not None:
            return
        with self._lock:
            if self._listener is None:
                self._listener = _Listener(self.queue, self.router)
                self._listener.start()

    def submit(self, record: logging.LogRecord, *, wait_seconds: float | None = None) -> bool:
        """Queues `record`; with `wait_seconds`, returns once it is written and flushed (True)
        or when the time is up (False)."""
        self.start()
        if wait_seconds is None:
            self.queue.put_nowait(record)
            return True
        written = threading.Event()
        record.written = written
        try:
            self.queue.put(record, timeout=wait_seconds)
        except queue.Full:
            return False
        return written.wait(wait_seconds)

    def flush(self, wait_seconds: float = 5.0) -> bool:
        """Waits until every record queued so far is written and flushed."""
        if self._listener is None and self.queue.empty():
            return True
        # A record that is not written: it only asks the writer to flush and say so.
        barrier = logging.makeLogRecord({"name": ROOT_LOGGER, "msg": "flush", "flush_only": True})
        return self.submit(barrier, wait_seconds=wait_seconds)

    def stop(self) -> None:
        """Writes what is queued, flushes, and ends the thread (the next record restarts it).

        Records logged meanwhile wait for the lock in `start`, so no second thread takes the
        first one's end-of-queue marker. (The writer thread itself never logs.)
        """
        with self._lock:
            if self._listener is not None:
                self._listener.stop()
                self._listener = None
            self.router.flush()

    def use_sink(self, handler: logging.Handler) -> logging.Handler:
        """Makes `handler` the log destination; returns the one it replaces."""
        with _locked(self.router):
            old, self.router.sink = self.router.sink, handler
        return old


WRITER = LogWriter()
atexit.register(WRITER.stop)


class _StampingQueueHandler(logging.handlers.QueueHandler):
    """Freezes a record on the logging thread (message, traceback, request id) and queues it."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.args or record.exc_info:
            # Other handlers of the same record must still see its own msg/args/exc_info; a
            # record with neither (the access log's) only gains request_id, so it is not copied.
            record = copy.copy(record)
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        WRITER.submit(record)


_TRACEBACKS = logging.Formatter()


# --- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LogStatus:
    """Where the lines go, for readiness: ok False when the configured file could not be used."""

    ok: bool
    detail: str


_status = LogStatus(ok=True, detail="standard error (not configured yet)")


def status() -> LogStatus:
    """Where this process's log lines go, and whether that is what the configuration asked."""
    return _status


def configure_logging(settings: Settings) -> LogStatus:
    """Sends the process's log records through the writer thread to the configured destination.

    Idempotent: configuring the same file again keeps the open one. The package's loggers log at
    `logging.level`; other libraries' records reach the file from WARNING up.
    """
    global _status
    options = settings.logging
    handler: logging.Handler
    if options.file:
        path = settings.data_dir / options.file
        current = WRITER.router.sink
        if (
            isinstance(current, DatedFileHandler)
            and current.path == path
            and current.max_bytes == options.max_bytes
            and current.backup_count == options.backup_count
        ):
            handler, new_status = current, _status
        else:
            handler = DatedFileHandler(
                path, max_bytes=options.max_bytes, backup_count=options.backup_count
            )
            try:
                opened = handler.open()
                new_status = LogStatus(ok=True, detail=f"writing {opened}")
            except OSError as exc:
                handler = StderrHandler()
                new_status = LogStatus(
                    ok=False,
                    detail=f"the log file {path} cannot be opened ({exc.strerror or exc}); "
                    "logging to standard error instead. Give the service's account Modify "
                    "rights on its folder, or change logging.file.",
                )
    else:
        handler = WRITER.router.sink
        if not isinstance(handler, StderrHandler):
            handler = StderrHandler()
        new_status = LogStatus(ok=True, detail="standard error (logging.file is empty)")
    handler.setFormatter(JsonFormatter())
    old = WRITER.use_sink(handler)
    if old is not handler:
        WRITER.flush()
        old.close()
    # What no line here shows is not collected per record (the logging HOWTO's "Optimization"):
    # the caller's file and line (a walk up the stack), the thread's and the process's names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    if not any(h.get_name() == _QUEUE_HANDLER_NAME for h in root.handlers):
        queued = _StampingQueueHandler(WRITER.queue)
        queued.set_name(_QUEUE_HANDLER_NAME)
        root.addHandler(queued)
    logging.getLogger(ROOT_LOGGER).setLevel(options.level)
    WRITER.start()
    _status = new_status
    if not new_status.ok:
        log.error("%s", new_status.detail)
    return new_status


def flush(wait_seconds: float = 5.0) -> bool:
    """Waits until every line logged so far is in its file (tests, shutdown)."""
    return WRITER.flush(wait_seconds)


def shutdown() -> None:
    """Stops the writer thread after writing what is queued (the service's shutdown)."""
    WRITER.stop()

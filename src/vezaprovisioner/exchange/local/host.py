"""One PowerShell host: its process, and the protocol conversation with it.

`Host` is one running host.ps1: it starts the process (see `process_tree`), sends the hello,
reads framed messages on a thread, and runs one request at a time under a deadline. A command
that times out, a crash or a protocol error kills the host's process tree; the `HostError`
subclasses say which, in a sentence for the admin. Who starts hosts, hands them out and replaces
them is `warm_pool` (and `per_command` for pool_size 0).
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from .process_tree import ProcessTree
from .protocol import (
    Connecting,
    ErrorRecord,
    Message,
    ProtocolError,
    Ready,
    Refused,
    Request,
    Result,
    StartupFailure,
    decode_stderr,
    encode_hello,
    encode_request,
    new_nonce,
    parse_line,
    read_lines,
    stderr_encoding,
)
from .startup import describe

#: How long a recycled or shut-down host may take to release its session, and a host that
#: reported a startup error may take to stop its transcript and exit, before it is killed.
GRACE_SECONDS = 5.0
_STDERR_TAIL_BYTES = 2048


class HostError(Exception):
    """A host could not do what was asked; `message` says what happened, for the admin."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HostStartupFailed(HostError):
    """The host never became ready (bad path, no connection, missing role, timeout, exit).

    `kind` is the startup error kind host.ps1 reported (see `startup`), None when it reported
    none (it timed out, exited or could not be started)."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class HostTimeout(HostError):
    """A command did not finish in time; the host's process tree has been killed."""


class HostCrashed(HostError):
    """The host exited or broke the protocol during a command; it has been killed."""


class HostRefused(HostError):
    """The host refused a request (not allow-listed); the host itself is fine."""


# Error records that mean the host's Exchange session itself is gone (not that the command
# failed): every later command on that host would fail the same way, so the host is replaced.
_SESSION_FAILURES = frozenset({"PSRemotingTransportException", "PSRemotingDataStructureException"})


def session_failed(record: ErrorRecord) -> bool:
    """True when the error record says the host's remote session broke."""
    names = {(record.reason or "").rsplit(".", 1)[-1]}
    names.add((record.exception_type or "").rsplit(".", 1)[-1])
    return not names.isdisjoint(_SESSION_FAILURES)


def backoff_delay(failures: int, first: float, cap: float) -> float:
    """Seconds to wait before the next start after `failures` failed starts in a row."""
    if failures <= 0:
        return 0.0
    return float(min(cap, first * 2 ** min(failures - 1, 30)))


@dataclass(frozen=True)
class _End:
    """The reader reached the end: the host exited or broke the protocol."""

    reason: str


class Host:
    """One host.ps1 process: hello, readiness, then one request at a time."""

    def __init__(
        self,
        argv: Sequence[str],
        remote_exchange_path: str,
        *,
        connect_lock_seconds: float,
        monotonic: Callable[[], float] = time.monotonic,
        on_end: Callable[[Host], None] | None = None,
        transcript: str | None = None,
        stderr_codec: str | None = None,
    ) -> None:
        self.remote_exchange_path = remote_exchange_path
        self.connect_lock_seconds = connect_lock_seconds
        self._stderr_codec = stderr_codec or stderr_encoding()
        self.nonce = new_nonce()
        self.started_at = monotonic()
        self.commands = 0
        self.ready: Ready | None = None
        self.ended = False
        #: Why the host ended (see PoolEvents), set once: by the first kill, else by the reader.
        self.end_reason: str | None = None
        self._in_command = False
        self._on_end = on_end
        self._next_id = 0
        self._inbox: queue.Queue[Message | _End] = queue.Queue()
        self._stderr_tail = bytearray()
        self._stderr_lock = threading.Lock()
        self._kill_lock = threading.Lock()
        try:
            self._tree = ProcessTree(argv)
        except OSError as exc:
            raise HostStartupFailed(
                f"cannot start {argv[0]!r} ({exc.strerror or exc}); check exchange.powershell_path"
            ) from None
        process = self._tree.process
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        self._stdin = process.stdin
        threading.Thread(
            target=self._read, args=(process.stdout,), name=f"host-{self.pid}-out", daemon=True
        ).start()
        self._stderr_reader = threading.Thread(
            target=self._drain, args=(process.stderr,), name=f"host-{self.pid}-err", daemon=True
        )
        self._stderr_reader.start()
        try:
            self._stdin.write(
                encode_hello(
                    self.nonce,
                    remote_exchange_path,
                    connect_lock_seconds=connect_lock_seconds,
                    transcript=transcript,
                )
            )
            self._stdin.flush()
        except OSError:
            pass  # the host already died; wait_ready reports how

    @property
    def pid(self) -> int:
        return self._tree.pid

    @property
    def name(self) -> str:
        return f"ps-{self.pid}"

    def age(self, now: float) -> float:
        return now - self.started_at

    def stderr_tail(self) -> str:
        with self._stderr_lock:
            text = decode_stderr(bytes(self._stderr_tail), self._stderr_codec).strip()
        return " ".join(text.split())

    def wait_ready(self, timeout: float) -> Ready:
        """Block until the host says it is ready; raises HostStartupFailed otherwise.

        `timeout` bounds loading RemoteExchange.ps1, then again Connect-ExchangeServer; the
        wait for the connect mutex in between has its own bound (`connect_lock_seconds`).
        """
        step = "loading RemoteExchange.ps1 or waiting for the connect mutex"
        wait = timeout + self.connect_lock_seconds
        while True:
            try:
                message = self._inbox.get(timeout=wait)
            except queue.Empty:
                self.kill("startup_timeout")
                raise HostStartupFailed(
                    f"the PowerShell host (pid {self.pid}) was not ready within {wait:g} s "
                    f"({step}; local.startup_timeout_seconds)"
                ) from None
            if not isinstance(message, Connecting):
                break
            step, wait = "Connect-ExchangeServer may be hanging", timeout
        if isinstance(message, Ready):
            self.ready = message
            return message
        if isinstance(message, StartupFailure):
            # host.ps1 sends its startup error, then Exit-Host: Stop-Transcript, then exit.
            # Killed at once, the transcript of `probe --transcript` lost its end, and on
            # Windows possibly its last records (PowerShell writes a transcript from a
            # background thread; Stop-Transcript waits for it).
            self._let_exit("startup_failed")
            raise HostStartupFailed(describe(message, self.remote_exchange_path), kind=message.kind)
        self.kill("startup_failed")
        if isinstance(message, _End):
            raise HostStartupFailed(self._ended_text("during startup", message))
        raise HostStartupFailed(
            f"the PowerShell host (pid {self.pid}) sent {type(message).__name__} before ready"
        )

    def call(
        self, cmdlet: str, parameters: Mapping[str, str], timeout: float
    ) -> Result | ErrorRecord:
        """Run one allow-listed cmdlet; the host is killed on timeout, crash or protocol error."""
        self._in_command = True
        try:
            return self._call(cmdlet, parameters, timeout)
        finally:
            self._in_command = False

    def _call(
        self, cmdlet: str, parameters: Mapping[str, str], timeout: float
    ) -> Result | ErrorRecord:
        self._next_id += 1
        request = Request(id=self._next_id, cmdlet=cmdlet, parameters=parameters)
        line = encode_request(request)
        try:
            self._stdin.write(line)
            self._stdin.flush()
        except OSError:
            self.kill("crashed")
            raise HostCrashed(self._ended_text(f"before {cmdlet}", _End("stdin closed"))) from None
        try:
            message = self._inbox.get(timeout=timeout)
        except queue.Empty:
            self.kill("timeout")
            raise HostTimeout(
                f"{cmdlet} did not finish within {timeout:g} s "
                f"(exchange.command_timeout_seconds); the PowerShell host (pid {self.pid}) and "
                "its children were killed and a replacement is starting; the outcome is unknown"
            ) from None
        if isinstance(message, Result | ErrorRecord) and message.id == request.id:
            return message
        if isinstance(message, Refused):
            raise HostRefused(f"the PowerShell host refused {cmdlet}: {message.detail}")
        self.kill("crashed" if isinstance(message, _End) else "protocol_error")
        if isinstance(message, _End):
            raise HostCrashed(self._ended_text(f"during {cmdlet}", message))
        raise HostCrashed(
            f"the PowerShell host (pid {self.pid}) answered {cmdlet} with an unexpected "
            f"{type(message).__name__}; it was killed and a replacement is starting"
        )

    def kill(self, reason: str = "killed") -> None:
        """Kill the process tree now. Safe to call from any thread, more than once."""
        with self._kill_lock:
            if self.end_reason is None:
                self.end_reason = reason
            self._tree.kill()

    def _let_exit(self, reason: str, grace: float = GRACE_SECONDS) -> None:
        """The host said it is ending: wait (at most `grace`) for it to exit by itself, then
        kill what is left of its tree. `reason` is its end reason, whoever notices the exit."""
        with self._kill_lock:
            if self.end_reason is None:
                self.end_reason = reason
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._tree.process.wait(timeout=grace)
        self.kill(reason)

    def close(self, grace: float = GRACE_SECONDS) -> None:
        """Close stdin (the host releases its session and exits); kill it after `grace`."""
        with contextlib.suppress(OSError):
            self._stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._tree.process.wait(timeout=grace)
        self.kill()

    def _ended_text(self, when: str, end: _End) -> str:
        # The host is dead (killed and reaped): its last stderr words (a stack overflow, say)
        # may still be in the pipe; let the drain thread reach end-of-file, briefly.
        self._stderr_reader.join(timeout=1.0)
        code = self._tree.process.poll()
        status = end.reason if code is None else f"{end.reason}, exit code {code}"
        stderr = self.stderr_tail()
        said = f"; stderr: {stderr[-500:]}" if stderr else ""
        return (
            f"the PowerShell host (pid {self.pid}) failed {when} ({status}){said}; the outcome "
            "is unknown and a replacement is starting"
        )

    def _read(self, stdout: IO[bytes]) -> None:
        reason = "exited"
        try:
            for line in read_lines(stdout, self.nonce):
                message = parse_line(line, self.nonce)
                if message is not None:
                    self._inbox.put(message)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        except (OSError, ValueError):
            pass
        if reason == "exited":
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._tree.process.wait(timeout=1.0)  # for the exit code in messages
        with self._kill_lock:
            if self.end_reason is None:  # nobody killed it: it ended on its own
                if reason != "exited":
                    self.end_reason = "protocol_error"
                else:
                    self.end_reason = "crashed" if self._in_command else "exited"
        self.ended = True
        self._inbox.put(_End(reason))
        if self._on_end is not None:
            self._on_end(self)

    def _drain(self, stderr: IO[bytes]) -> None:
        try:
            while chunk := stderr.read1(4096):  # type: ignore[attr-defined]
                with self._stderr_lock:
                    self._stderr_tail += chunk
                    del self._stderr_tail[:-_STDERR_TAIL_BYTES]
        except (OSError, ValueError):
            pass

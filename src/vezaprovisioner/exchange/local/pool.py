"""Host processes and the warm, self-healing pool that hands them out one command at a time.

`Host` is one running host.ps1: it starts the process (see `process_tree`), sends the hello,
reads framed messages on a thread, and runs one request at a time under a deadline.

`HostPool` keeps `pool_size` hosts warm. Each slot has a thread that starts a host, waits until it
is ready (bounded by the startup timeout), offers it, and replaces it when it is retired: after a
command timeout (the process tree is killed first), a crash or protocol error, a broken Exchange
session, when it dies while idle, or when it reaches `max_commands` or `max_age_seconds`
(recycled: stdin is closed so the host can release its Exchange session, then it is killed after
a grace period). A slot whose starts keep failing waits with exponential backoff and is reported
broken, with the last startup error, until a start succeeds. Requests wait for a free host in a
bounded FIFO queue for at most `queue_wait_seconds`; beyond that, or when every slot is broken, they
get BackendUnavailable.
With `pool_size = 0` every command starts and stops its own host (the slow baseline).

The pool reports what happens to an optional `PoolEvents` hook (the service passes
`metrics.BackendEvents`, which fits it structurally): hosts started, recycled and killed (with
the reason), the number of hosts in each state and the number of waiting requests whenever
they change.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Literal, Protocol

from ..errors import BackendUnavailable
from .process_tree import ProcessTree
from .protocol import (
    ErrorRecord,
    Message,
    ProtocolError,
    Ready,
    Refused,
    Request,
    Result,
    StartupFailure,
    encode_hello,
    encode_request,
    new_nonce,
    parse_line,
    read_lines,
)

log = logging.getLogger(__name__)

#: How long a recycled or shut-down host may take to release its session before it is killed.
GRACE_SECONDS = 5.0
_STDERR_TAIL_BYTES = 2048


class PoolEvents(Protocol):
    """What the pool reports as hosts come and go; `metrics.BackendEvents` satisfies it.

    `host` names a host as ``ps-<pid>``. Killed reasons: startup_timeout, startup_failed,
    timeout, crashed, protocol_error, session_lost, exited (died while idle). Recycled reasons:
    max_commands, max_age. States in `hosts`: idle, busy, starting, broken.
    """

    def host_started(self, host: str, **fields: object) -> None: ...

    def host_recycled(self, host: str, reason: str, **fields: object) -> None: ...

    def host_killed(self, host: str, reason: str, **fields: object) -> None: ...

    def hosts(self, by_state: Mapping[str, int]) -> None: ...

    def queue_depth(self, waiting: int) -> None: ...


class _NoEvents:
    """The hook when nobody listens (tests of the pool alone, the probe)."""

    def host_started(self, host: str, **fields: object) -> None:
        pass

    def host_recycled(self, host: str, reason: str, **fields: object) -> None:
        pass

    def host_killed(self, host: str, reason: str, **fields: object) -> None:
        pass

    def hosts(self, by_state: Mapping[str, int]) -> None:
        pass

    def queue_depth(self, waiting: int) -> None:
        pass


class HostError(Exception):
    """A host could not do what was asked; `message` says what happened, for the admin."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HostStartupFailed(HostError):
    """The host never became ready (bad path, no connection, missing role, timeout, exit)."""


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


def describe_startup_failure(failure: StartupFailure, remote_exchange_path: str) -> str:
    """The admin's sentence for a startup error the host reported."""
    if failure.kind == "remote_exchange_path":
        return (
            f"RemoteExchange.ps1 was not found ({failure.detail}); set "
            f"exchange.remote_exchange_path (now {remote_exchange_path!r}) to the file in "
            "Exchange's bin folder, usually C:\\Program Files\\Microsoft\\Exchange Server\\V15"
            "\\bin\\RemoteExchange.ps1"
        )
    if failure.kind == "connect":
        said = failure.detail.strip() or "no error text"
        return (
            f"Connect-ExchangeServer -auto could not connect to Exchange ({said}); check that "
            "the service account can open the Exchange Management Shell on this server "
            "(RemotePowerShellEnabled, the PowerShell virtual directory in IIS, Kerberos)"
        )
    return (
        f"the account {failure.detail} connected to Exchange, but Enable-Mailbox is not "
        "available to it: it lacks the Mail Recipients management role. Add it to the "
        "Recipient Management role group (or a role group with Mail Recipients)"
    )


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
        monotonic: Callable[[], float] = time.monotonic,
        on_end: Callable[[Host], None] | None = None,
    ) -> None:
        self.remote_exchange_path = remote_exchange_path
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
            self._stdin.write(encode_hello(self.nonce, remote_exchange_path))
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
            text = bytes(self._stderr_tail).decode("utf-8", "replace").strip()
        return " ".join(text.split())

    def wait_ready(self, timeout: float) -> Ready:
        """Block until the host says it is ready; raises HostStartupFailed otherwise."""
        try:
            message = self._inbox.get(timeout=timeout)
        except queue.Empty:
            self.kill("startup_timeout")
            raise HostStartupFailed(
                f"the PowerShell host (pid {self.pid}) was not ready within {timeout:g} s "
                "(local.startup_timeout_seconds); Connect-ExchangeServer may be hanging"
            ) from None
        if isinstance(message, Ready):
            self.ready = message
            return message
        self.kill("startup_failed")
        if isinstance(message, StartupFailure):
            raise HostStartupFailed(describe_startup_failure(message, self.remote_exchange_path))
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


@dataclass(frozen=True)
class PoolLimits:
    """The pool's sizes and deadlines (the `[local]` settings plus the command timeout)."""

    pool_size: int = 2
    queue_size: int = 32
    queue_wait_seconds: float = 30.0
    startup_timeout_seconds: float = 180.0
    command_timeout_seconds: float = 120.0
    max_commands: int = 1000
    max_age_seconds: float = 3600.0
    restart_backoff_seconds: float = 1.0
    restart_backoff_max_seconds: float = 60.0


@dataclass(frozen=True)
class PoolStatus:
    """What readiness reports."""

    size: int
    warm: int
    busy: int
    waiting: int
    starting: int
    broken: int
    starts: int
    failed_starts: int
    last_startup_error: str | None

    def describe(self) -> str:
        if self.size == 0:
            text = f"pool_size 0: a new PowerShell host per command ({self.starts} started)"
        else:
            text = (
                f"{self.warm}/{self.size} PowerShell hosts warm ({self.busy} busy, "
                f"{self.waiting} requests waiting), {self.starting} starting, {self.broken} broken"
            )
        if self.last_startup_error:
            text += f"; last startup error: {self.last_startup_error}"
        return text


_SlotState = Literal["starting", "warm", "broken", "stopped"]


class _Waiter:
    """A request waiting for a host; the pool hands it one (or an error) through the event."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.host: Host | None = None
        self.error: BackendUnavailable | None = None


class _Slot:
    def __init__(self, index: int) -> None:
        self.index = index
        self.state: _SlotState = "starting"
        self.host: Host | None = None
        self.failures = 0
        self.next_start = 0.0
        self.retire = threading.Event()
        self.graceful = False
        self.reason = ""


class HostPool:
    """`pool_size` warm hosts, one command each at a time, replaced whenever they misbehave."""

    def __init__(
        self,
        argv: Sequence[str],
        remote_exchange_path: str,
        limits: PoolLimits,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        events: PoolEvents | None = None,
    ) -> None:
        self._argv = tuple(argv)
        self._remote_exchange_path = remote_exchange_path
        self.limits = limits
        self._monotonic = monotonic  # host ages only; every wait uses real time
        self._cond = threading.Condition(threading.RLock())
        self._idle: deque[Host] = deque()
        self._live: set[Host] = set()
        self._slots = [_Slot(i) for i in range(limits.pool_size)]
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._waiters: deque[_Waiter] = deque()
        self._starts = 0
        self._failed_starts = 0
        self._last_error: str | None = None
        self._fresh = threading.BoundedSemaphore(max(1, limits.queue_size))
        self._fresh_waiting = 0
        self._events: PoolEvents = events or _NoEvents()
        self._reported: tuple[dict[str, int], int] | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Begin warming every slot in the background."""
        for slot in self._slots:
            thread = threading.Thread(
                target=self._slot_loop, args=(slot,), name=f"host-slot-{slot.index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def close(self) -> None:
        """Stop every host (stdin closed, then killed after the grace period). Idempotent."""
        with self._cond:
            if self._closed.is_set():
                return
            self._closed.set()
            hosts = list(self._live)
            self._idle.clear()
            self._fail_waiters_locked(BackendUnavailable("the service is shutting down"))
            for slot in self._slots:
                slot.retire.set()
            self._changed_locked()
        # A ready host gets the grace period to release its Exchange session; one still
        # connecting has nothing to release and is killed at once.
        closers = [
            threading.Thread(target=host.close if host.ready else host.kill, daemon=True)
            for host in hosts
        ]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join()
        for thread in self._threads:
            thread.join(timeout=GRACE_SECONDS)
        with self._cond:
            leftovers = list(self._live)
        for host in leftovers:
            host.kill()

    def status(self) -> PoolStatus:
        with self._cond:
            warm = [s for s in self._slots if s.state == "warm"]
            return PoolStatus(
                size=len(self._slots),
                warm=len(warm),
                busy=sum(1 for s in warm if s.host is not None and s.host not in self._idle),
                waiting=len(self._waiters),
                starting=sum(1 for s in self._slots if s.state == "starting"),
                broken=sum(1 for s in self._slots if s.state == "broken"),
                starts=self._starts,
                failed_starts=self._failed_starts,
                last_startup_error=self._last_error,
            )

    def wait_for(self, condition: Callable[[PoolStatus], bool], timeout: float) -> PoolStatus:
        """Block until `condition(status())` holds or `timeout` passes; returns the last status.

        For callers that want a warm pool before going on (the benchmark, tests, a CLI probe).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                status = self.status()
                remaining = deadline - time.monotonic()
                if condition(status) or remaining <= 0:
                    return status
                self._cond.wait(remaining)

    def _changed_locked(self) -> None:
        """The pool's state changed: wake `wait_for` and report new counts to the events hook."""
        self._cond.notify_all()
        if self._slots:
            hosts = [s.host for s in self._slots if s.state == "warm" and s.host is not None]
            idle = sum(1 for host in hosts if host in self._idle)
            by_state = {
                "idle": idle,
                "busy": len(hosts) - idle,
                "starting": sum(1 for s in self._slots if s.state == "starting"),
                "broken": sum(1 for s in self._slots if s.state == "broken"),
            }
        else:
            ready = sum(1 for host in self._live if host.ready is not None)
            by_state = {"idle": 0, "busy": ready, "starting": len(self._live) - ready, "broken": 0}
        waiting = len(self._waiters) + self._fresh_waiting
        previous = self._reported
        self._reported = (by_state, waiting)
        if previous is None or previous[0] != by_state:
            self._events.hosts(by_state)
        if previous is None or previous[1] != waiting:
            self._events.queue_depth(waiting)

    # ---- running commands -------------------------------------------------------------------

    def run(self, cmdlet: str, parameters: Mapping[str, str]) -> Result | ErrorRecord:
        """Run one cmdlet on a free host. Raises BackendUnavailable or a HostError."""
        if not self._slots:
            return self._run_fresh(cmdlet, parameters)
        host = self._checkout()
        try:
            result = host.call(cmdlet, parameters, self.limits.command_timeout_seconds)
        except HostRefused as exc:
            log.error("%s", exc.message)
            self._checkin(host)
            raise
        except HostError as exc:
            log.warning("%s", exc.message)
            self._retire(host, graceful=False, reason="crashed")
            raise
        except BaseException:
            self._retire(host, graceful=False, reason="killed")
            host.kill()
            raise
        if isinstance(result, ErrorRecord) and session_failed(result):
            log.warning(
                "PowerShell host pid %d lost its Exchange session (%s); replacing it",
                host.pid,
                result.message,
            )
            self._retire(host, graceful=False, reason="session_lost")
        else:
            self._checkin(host)
        return result

    def _run_fresh(self, cmdlet: str, parameters: Mapping[str, str]) -> Result | ErrorRecord:
        with self._cond:
            self._fresh_waiting += 1
            self._changed_locked()
        try:
            acquired = self._fresh.acquire(timeout=self.limits.queue_wait_seconds)
        finally:
            with self._cond:
                self._fresh_waiting -= 1
                self._changed_locked()
        if not acquired:
            raise BackendUnavailable(
                f"{self.limits.queue_size} PowerShell hosts are already starting or running "
                "(local.queue_size)",
                retry_after_seconds=5,
            )
        try:
            if self._closed.is_set():
                raise BackendUnavailable("the service is shutting down")
            host = self._start_host()
            if host is None:
                raise BackendUnavailable(
                    f"no PowerShell host could start: {self._last_error}", retry_after_seconds=5
                )
            try:
                return host.call(cmdlet, parameters, self.limits.command_timeout_seconds)
            except HostError as exc:
                log.warning("%s", exc.message)
                if host.end_reason is not None:  # refused: the host is fine and just closes
                    self._events.host_killed(host.name, host.end_reason, pid=host.pid)
                raise
            finally:
                with self._cond:
                    self._live.discard(host)
                    self._changed_locked()
                threading.Thread(target=host.close, daemon=True).start()
        finally:
            self._fresh.release()

    def _checkout(self) -> Host:
        """A free host: at once if one is idle, else in arrival order (FIFO) from the queue."""
        with self._cond:
            if self._closed.is_set():
                raise BackendUnavailable("the service is shutting down")
            while self._idle:
                host = self._idle.popleft()
                if self._expired(host):
                    self._retire_locked(host, graceful=True, reason="max_age")
                    continue
                self._changed_locked()  # the status changed (one more busy host)
                return host
            if all(slot.state == "broken" for slot in self._slots):
                raise self._all_broken_locked()
            if len(self._waiters) >= self.limits.queue_size:
                raise BackendUnavailable(
                    f"all {len(self._slots)} PowerShell hosts are busy and "
                    f"{len(self._waiters)} requests are already waiting (local.queue_size)",
                    retry_after_seconds=max(1, math.ceil(self.limits.queue_wait_seconds / 4)),
                )
            waiter = _Waiter()
            self._waiters.append(waiter)
            self._changed_locked()  # the status changed (one more waiting)
        waiter.event.wait(self.limits.queue_wait_seconds)
        with self._cond:
            if waiter.host is not None:
                return waiter.host
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self._changed_locked()
            if waiter.error is not None:
                raise waiter.error
            raise BackendUnavailable(
                f"no PowerShell host became free within "
                f"{self.limits.queue_wait_seconds:g} s (local.queue_wait_seconds)",
                retry_after_seconds=5,
            )

    def _offer_locked(self, host: Host) -> None:
        """Hand a free host to the longest-waiting request, or make it idle."""
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.host = host
            waiter.event.set()
        else:
            self._idle.append(host)
        self._changed_locked()

    def _fail_waiters_locked(self, error: BackendUnavailable) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = error
            waiter.event.set()

    def _all_broken_locked(self) -> BackendUnavailable:
        wait = min(slot.next_start for slot in self._slots) - time.monotonic()
        return BackendUnavailable(
            f"no PowerShell host is running: {self._last_error}",
            retry_after_seconds=max(1, math.ceil(wait)),
        )

    def _checkin(self, host: Host) -> None:
        with self._cond:
            host.commands += 1
            if host.ended or self._closed.is_set():
                return
            if host.commands >= self.limits.max_commands or self._expired(host):
                log.info(
                    "recycling PowerShell host pid %d after %d commands (age %.0f s)",
                    host.pid,
                    host.commands,
                    host.age(self._monotonic()),
                )
                expired = host.commands < self.limits.max_commands
                self._retire_locked(
                    host, graceful=True, reason="max_age" if expired else "max_commands"
                )
                return
            self._offer_locked(host)

    def _expired(self, host: Host) -> bool:
        return host.age(self._monotonic()) >= self.limits.max_age_seconds

    def _retire(self, host: Host, *, graceful: bool, reason: str) -> None:
        with self._cond:
            self._retire_locked(host, graceful=graceful, reason=reason)

    def _retire_locked(self, host: Host, *, graceful: bool, reason: str) -> None:
        """Have the host's slot replace it; `reason` is reported unless the host knows better."""
        if host in self._idle:
            self._idle.remove(host)
        for slot in self._slots:
            if slot.host is host:
                slot.graceful = graceful
                slot.reason = reason
                slot.retire.set()

    def _host_ended(self, host: Host) -> None:
        """Reader thread: the host exited or broke the protocol (busy or idle)."""
        self._retire(host, graceful=False, reason=host.end_reason or "exited")

    # ---- slots ------------------------------------------------------------------------------

    def _start_host(self) -> Host | None:
        """Start one host and wait until ready; None (and the error recorded) on failure."""
        with self._cond:
            if self._closed.is_set():
                return None
            self._starts += 1
        host: Host | None = None
        started = time.monotonic()
        try:
            host = Host(
                self._argv,
                self._remote_exchange_path,
                monotonic=self._monotonic,
                on_end=self._host_ended,
            )
            with self._cond:
                self._live.add(host)
                self._changed_locked()
            if self._closed.is_set():
                host.kill()
                raise HostStartupFailed("the service is shutting down")
            ready = host.wait_ready(self.limits.startup_timeout_seconds)
            log.info(
                "PowerShell host pid %d connected to %s as %s in %.1f s",
                host.pid,
                ready.server,
                ready.user,
                time.monotonic() - started,
            )
            self._events.host_started(
                host.name,
                pid=host.pid,
                server=ready.server,
                user=ready.user,
                seconds=round(time.monotonic() - started, 3),
            )
            with self._cond:
                self._changed_locked()
            return host
        except HostStartupFailed as exc:
            with self._cond:
                if host is not None:
                    self._live.discard(host)
                    self._changed_locked()
                if self._closed.is_set():
                    return None
                log.warning("PowerShell host did not start: %s", exc.message)
                self._failed_starts += 1
                self._last_error = exc.message
            if host is not None:
                self._events.host_killed(
                    host.name, host.end_reason or "startup_failed", pid=host.pid, error=exc.message
                )
            return None

    def _slot_loop(self, slot: _Slot) -> None:
        while not self._closed.is_set():
            delay = backoff_delay(
                slot.failures,
                self.limits.restart_backoff_seconds,
                self.limits.restart_backoff_max_seconds,
            )
            if delay and self._closed.wait(delay):
                return
            with self._cond:
                slot.state = "starting"
                self._changed_locked()
            host = self._start_host()
            with self._cond:
                if host is None:
                    slot.failures += 1
                    slot.state = "broken"
                    slot.next_start = time.monotonic() + backoff_delay(
                        slot.failures,
                        self.limits.restart_backoff_seconds,
                        self.limits.restart_backoff_max_seconds,
                    )
                    if all(other.state == "broken" for other in self._slots):
                        self._fail_waiters_locked(self._all_broken_locked())
                    self._changed_locked()
                    continue
                if self._closed.is_set():
                    self._live.discard(host)
                    host.kill()
                    return
                slot.failures = 0
                slot.state = "warm"
                slot.host = host
                slot.retire.clear()
                self._offer_locked(host)
            if host.ended:
                self._retire(host, graceful=False, reason=host.end_reason or "exited")
            slot.retire.wait()
            with self._cond:
                slot.host = None
                slot.state = "stopped" if self._closed.is_set() else "starting"
                if host in self._idle:
                    self._idle.remove(host)
                self._live.discard(host)
                closed = self._closed.is_set()
                graceful = slot.graceful and not closed
                reason = slot.reason
                slot.graceful = False
                self._changed_locked()
            if closed:
                # Like close() does for every host: the grace period to remove its Exchange
                # session, then a kill. Done here too, because this thread must outlive its host:
                # on Linux the host gets SIGKILL when the thread that started it ends.
                host.close()
                return
            if graceful:
                self._events.host_recycled(host.name, reason, pid=host.pid, commands=host.commands)
                threading.Thread(target=host.close, daemon=True).start()
            else:
                host.kill(reason)
                self._events.host_killed(host.name, host.end_reason or reason, pid=host.pid)

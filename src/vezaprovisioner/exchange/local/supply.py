"""What both ways of getting a PowerShell host share: limits, status, events, starting one host.

`HostSupply` is the base of `warm_pool.HostPool` (pool_size hosts kept warm) and
`per_command.HostPerCommand` (pool_size 0: a host per command). It owns the hosts that are
alive, starts one host and waits until it is ready (bounded by the startup timeout), counts
starts and failed starts, keeps the last startup error for readiness, and reports to an optional
`PoolEvents` hook (the service passes `metrics.BackendEvents`, which fits it structurally): hosts
started, recycled and killed (with the reason), the number of hosts in each state and the number
of waiting requests whenever they change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .host import Host, HostStartupFailed
from .protocol import ErrorRecord, Result

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class PoolLimits:
    """The pool's sizes and deadlines (the `[local]` settings plus the command timeout)."""

    pool_size: int = 2
    queue_size: int = 32
    queue_wait_seconds: float = 30.0
    startup_timeout_seconds: float = 180.0
    connect_lock_wait_seconds: float = 600.0
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
    #: The startup error kind host.ps1 reported last (see `startup`); None if none was.
    last_startup_kind: str | None = None

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


@dataclass(frozen=True)
class HostOptions:
    """How every host is started besides its command line: `transcript` (the probe's, never
    the service's) and the codec of its standard error (None: `protocol.stderr_encoding()`)."""

    transcript: str | None = None
    stderr_codec: str | None = None


class HostSupply:
    """Hands out PowerShell hosts for commands; the subclasses decide how hosts are kept."""

    def __init__(
        self,
        argv: Sequence[str],
        remote_exchange_path: str,
        limits: PoolLimits,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        events: PoolEvents | None = None,
        options: HostOptions | None = None,
    ) -> None:
        self._argv = tuple(argv)
        self._options = options or HostOptions()
        self._remote_exchange_path = remote_exchange_path
        self.limits = limits
        self._monotonic = monotonic  # host ages only; every wait uses real time
        self._cond = threading.Condition(threading.RLock())
        self._live: set[Host] = set()
        self._closed = threading.Event()
        self._starts = 0
        self._failed_starts = 0
        self._last_error: str | None = None
        self._last_kind: str | None = None
        self._events: PoolEvents = events or _NoEvents()
        self._reported: tuple[dict[str, int], int] | None = None

    # ---- what each way of keeping hosts says --------------------------------------------------

    def start(self) -> None:
        """Begin whatever background work keeps hosts ready (none by default)."""

    def run(self, cmdlet: str, parameters: Mapping[str, str]) -> Result | ErrorRecord:
        """Run one cmdlet on a host. Raises BackendUnavailable or a HostError."""
        raise NotImplementedError

    def status(self) -> PoolStatus:
        raise NotImplementedError

    def _counts_locked(self) -> tuple[dict[str, int], int]:
        """Hosts by state (idle, busy, starting, broken) and the number of waiting requests."""
        raise NotImplementedError

    def _closing_locked(self) -> None:
        """close() has begun: let go of waiting requests and idle hosts."""

    def _join_threads(self) -> None:
        """close(): wait (bounded) for the background threads."""

    def _host_ended(self, host: Host) -> None:
        """Reader thread: the host exited or broke the protocol (busy or idle)."""

    # ---- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every host (stdin closed, then killed after the grace period). Idempotent."""
        with self._cond:
            if self._closed.is_set():
                return
            self._closed.set()
            hosts = list(self._live)
            self._closing_locked()
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
        self._join_threads()
        with self._cond:
            leftovers = list(self._live)
        for host in leftovers:
            host.kill()

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
        """The state changed: wake `wait_for` and report new counts to the events hook."""
        self._cond.notify_all()
        by_state, waiting = self._counts_locked()
        previous = self._reported
        self._reported = (by_state, waiting)
        if previous is None or previous[0] != by_state:
            self._events.hosts(by_state)
        if previous is None or previous[1] != waiting:
            self._events.queue_depth(waiting)

    # ---- starting one host --------------------------------------------------------------------

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
                connect_lock_seconds=self.limits.connect_lock_wait_seconds,
                monotonic=self._monotonic,
                on_end=self._host_ended,
                transcript=self._options.transcript,
                stderr_codec=self._options.stderr_codec,
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
                self._last_kind = exc.kind
            if host is not None:
                self._events.host_killed(
                    host.name, host.end_reason or "startup_failed", pid=host.pid, error=exc.message
                )
            return None

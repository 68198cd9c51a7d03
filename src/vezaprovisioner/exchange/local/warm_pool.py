"""The warm pool: `pool_size` PowerShell hosts kept ready, one command each at a time.

Each slot has a thread that starts a host, waits until it is ready (bounded by the startup
timeout), offers it, and replaces it when it is retired: after a command timeout (the process
tree is killed first), a crash or protocol error, a broken Exchange session, when it dies while
idle, or when it reaches `max_commands` or `max_age_seconds` (recycled: stdin is closed so the
host can release its Exchange session, then it is killed after a grace period). A slot whose
starts keep failing waits with exponential backoff and is reported broken, with the last startup
error, until a start succeeds. Requests wait for a free host in a bounded FIFO queue for at most
`queue_wait_seconds`; beyond that, or when every slot is broken, they get BackendUnavailable.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from ..errors import BackendUnavailable
from .host import GRACE_SECONDS, Host, HostError, HostRefused, session_failed
from .protocol import ErrorRecord, Result
from .supply import HostOptions, HostSupply, PoolEvents, PoolLimits, PoolStatus

log = logging.getLogger(__name__)


def backoff_delay(failures: int, first: float, cap: float) -> float:
    """Seconds to wait before the next start after `failures` failed starts in a row."""
    if failures <= 0:
        return 0.0
    return float(min(cap, first * 2 ** min(failures - 1, 30)))


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


class HostPool(HostSupply):
    """`pool_size` warm hosts, one command each at a time, replaced whenever they misbehave."""

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
        if limits.pool_size < 1:
            raise ValueError("a HostPool needs pool_size >= 1; use HostPerCommand for 0")
        super().__init__(
            argv, remote_exchange_path, limits, monotonic=monotonic, events=events, options=options
        )
        self._idle: deque[Host] = deque()
        self._slots = [_Slot(i) for i in range(limits.pool_size)]
        self._threads: list[threading.Thread] = []
        self._waiters: deque[_Waiter] = deque()

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Begin warming every slot in the background."""
        for slot in self._slots:
            thread = threading.Thread(
                target=self._slot_loop, args=(slot,), name=f"host-slot-{slot.index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _closing_locked(self) -> None:
        self._idle.clear()
        self._fail_waiters_locked(BackendUnavailable("the service is shutting down"))
        for slot in self._slots:
            slot.retire.set()

    def _join_threads(self) -> None:
        for thread in self._threads:
            thread.join(timeout=GRACE_SECONDS)

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
                last_startup_kind=self._last_kind,
            )

    def _counts_locked(self) -> tuple[dict[str, int], int]:
        hosts = [s.host for s in self._slots if s.state == "warm" and s.host is not None]
        idle = sum(1 for host in hosts if host in self._idle)
        by_state = {
            "idle": idle,
            "busy": len(hosts) - idle,
            "starting": sum(1 for s in self._slots if s.state == "starting"),
            "broken": sum(1 for s in self._slots if s.state == "broken"),
        }
        return by_state, len(self._waiters)

    # ---- running commands -------------------------------------------------------------------

    def run(self, cmdlet: str, parameters: Mapping[str, str]) -> Result | ErrorRecord:
        """Run one cmdlet on a free host. Raises BackendUnavailable or a HostError."""
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

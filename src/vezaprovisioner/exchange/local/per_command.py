"""pool_size 0: every command starts its own PowerShell host and stops it afterwards.

The slow baseline (each command pays the Exchange connect) and the mode for servers that must
not keep sessions open. At most `queue_size` hosts start or run at once; a command that finds no
place within `queue_wait_seconds` gets BackendUnavailable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from ..errors import BackendUnavailable
from .host import HostError
from .protocol import ErrorRecord, Result
from .supply import HostOptions, HostSupply, PoolEvents, PoolLimits, PoolStatus

log = logging.getLogger(__name__)


class HostPerCommand(HostSupply):
    """A fresh host for each command (pool_size 0), at most `queue_size` at a time."""

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
        super().__init__(
            argv, remote_exchange_path, limits, monotonic=monotonic, events=events, options=options
        )
        self._places = threading.BoundedSemaphore(max(1, limits.queue_size))
        self._waiting = 0

    def status(self) -> PoolStatus:
        with self._cond:
            return PoolStatus(
                size=0,
                warm=0,
                busy=0,
                waiting=0,
                starting=0,
                broken=0,
                starts=self._starts,
                failed_starts=self._failed_starts,
                last_startup_error=self._last_error,
                last_startup_kind=self._last_kind,
            )

    def _counts_locked(self) -> tuple[dict[str, int], int]:
        ready = sum(1 for host in self._live if host.ready is not None)
        by_state = {"idle": 0, "busy": ready, "starting": len(self._live) - ready, "broken": 0}
        return by_state, self._waiting

    def run(self, cmdlet: str, parameters: Mapping[str, str]) -> Result | ErrorRecord:
        """Start a host, run one cmdlet on it, close it. Raises BackendUnavailable or HostError."""
        with self._cond:
            self._waiting += 1
            self._changed_locked()
        try:
            acquired = self._places.acquire(timeout=self.limits.queue_wait_seconds)
        finally:
            with self._cond:
                self._waiting -= 1
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
            self._places.release()

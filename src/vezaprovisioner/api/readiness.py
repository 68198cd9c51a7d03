"""Readiness: the checks behind `/health/ready`, `/health/ready/details` and `/status`, and how
often they really run.

The checks cost something real: the backend's probe (the pool's state for the local backend; a
`Get-User -ResultSize 1` over one of `remote.pool_size` sessions for the remote one) and a write
transaction on the journal (an fsync with `synchronous = "full"`). `/health/ready` needs no
credentials, so without a bound anyone who can reach it turns a flood of GETs into Exchange calls
and fsyncs, and holds the remote sessions that CREATE_EMAIL needs. So, in each process:

* **one run at a time**: a caller who arrives while the checks run waits for that run's result
  (on the event loop, holding no thread) instead of starting another;
* the public `/health/ready` answers from the last run if it finished less than
  `readiness_cache_seconds` ago; the authenticated `/health/ready/details` and `/status` want a
  run that finishes after they arrive (the one in flight, or a new one);
* a backend probe still running from an earlier run (a hung backend outlived
  `readiness_timeout_seconds`) is not started again: the check says how long it has been running.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from starlette.concurrency import run_in_threadpool

from .. import logs
from ..clock import Clock
from ..journal.store import JournalUnavailable
from ..services import Services
from .models import ReadinessCheck

Checks = dict[str, ReadinessCheck]

# Backend probes run here, so a hung backend cannot tie up the request threads.
_probe_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="readiness-probe")


class Readiness:
    """Runs `run` (the checks) at most once at a time, and keeps the last result for reuse."""

    def __init__(self, run: Callable[[], Checks], clock: Clock) -> None:
        self._run = run
        self._clock = clock
        self._last: tuple[float, Checks] | None = None  # (when it finished, the checks)
        self._running: asyncio.Task[Checks] | None = None

    async def checks(self, max_age: float = 0.0) -> Checks:
        """The last run's checks if it finished less than `max_age` seconds ago; otherwise those
        of the run in flight, or of a new one."""
        last = self._last
        if last is not None and self._clock.monotonic() - last[0] < max_age:
            return last[1]
        loop = asyncio.get_running_loop()
        running = self._running
        # A run belongs to the event loop that started it (a test client may use one per request).
        if running is None or running.get_loop() is not loop:
            running = self._running = loop.create_task(self._run_once())
        # Shielded: a caller who hangs up does not cancel the run the others wait for.
        return await asyncio.shield(running)

    async def _run_once(self) -> Checks:
        try:
            checks = await run_in_threadpool(self._run)
            self._last = (self._clock.monotonic(), checks)
            return checks
        finally:
            if self._running is asyncio.current_task():
                self._running = None


class ReadinessChecks:
    """The checks themselves, for one process's services: configuration, backend, journal, logs."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._lock = threading.Lock()
        self._probe: tuple[float, Future[str]] | None = None  # (when it started, the probe)

    def __call__(self) -> Checks:
        settings = self._services.settings
        source = str(settings.source) if settings.source else "built in code"
        return {
            "configuration": ReadinessCheck(ok=True, detail=f"valid ({source})"),
            "backend": self._backend(),
            "journal": self._journal(),
            "logs": _logs_written(),
        }

    def _backend(self) -> ReadinessCheck:
        services = self._services
        timeout = services.settings.readiness_timeout_seconds
        clock = services.clock
        with self._lock:
            if self._probe is not None and not self._probe[1].done():
                running_for = clock.monotonic() - self._probe[0]
                return ReadinessCheck(
                    ok=False,
                    detail=f"{services.settings.backend} backend has not answered the previous "
                    f"probe, sent {running_for:.0f} s ago; no new probe is sent until it does",
                )
            started = clock.monotonic()
            future = _probe_executor.submit(services.exchange.probe)
            self._probe = (started, future)
        try:
            return ReadinessCheck(ok=True, detail=future.result(timeout=timeout))
        except FutureTimeout:
            return ReadinessCheck(
                ok=False,
                detail=f"{services.settings.backend} backend did not answer within {timeout:g} s",
            )
        except Exception as exc:  # any failure means "not ready"; the detail says which
            return ReadinessCheck(ok=False, detail=f"{type(exc).__name__}: {exc}")

    def _journal(self) -> ReadinessCheck:
        try:
            return ReadinessCheck(ok=True, detail=self._services.journal.check_writable())
        except JournalUnavailable as exc:
            return ReadinessCheck(ok=False, detail=str(exc))


def _logs_written() -> ReadinessCheck:
    """Not ready when the configured log file could not be opened (lines go to stderr)."""
    found = logs.status()
    return ReadinessCheck(ok=found.ok, detail=found.detail)


def readiness_for(services: Services) -> Readiness:
    """The one `Readiness` of an app built from these services."""
    return Readiness(ReadinessChecks(services), services.clock)

"""A clock whose sleep advances time instantly: retry windows and latency cost no real time."""

from __future__ import annotations

import threading


class FakeClock:
    """Implements vezaprovisioner.clock.Clock; records every sleep."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self._now += seconds

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

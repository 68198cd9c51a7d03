"""The budget for password checks that may fail: token buckets per client and for all clients.

A Basic-mode password check costs tens of milliseconds of scrypt, which is the point of scrypt
and also what a flood of wrong passwords would turn against the service. So every check that
needs scrypt first spends a token from its client's bucket and from the bucket all clients
share; a check that succeeds gives both tokens back, so only failures use the budget up. With no
token left the request is refused (429 with Retry-After) before any scrypt work.

Each bucket holds a minute's worth of tokens and refills evenly over the minute. A client's
bucket is forgotten once a success fills it again (it would behave like a new one), and at most
`max_clients` buckets are kept: a flood from many addresses evicts the least recently seen, and
the shared bucket still bounds the total.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .clock import Clock

_SECONDS_PER_MINUTE = 60.0


@dataclass
class TokenBucket:
    """`capacity` tokens, refilled at `rate` tokens per second."""

    capacity: float
    rate: float
    tokens: float
    updated: float

    @classmethod
    def per_minute(cls, per_minute: int, now: float) -> TokenBucket:
        return cls(float(per_minute), per_minute / _SECONDS_PER_MINUTE, float(per_minute), now)

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.updated = now

    def seconds_until_one(self) -> float:
        """After `refill`: 0 when a token is there, else how long until one is."""
        return max(0.0, (1.0 - self.tokens) / self.rate)

    @property
    def full(self) -> bool:
        return self.tokens >= self.capacity


class FailedLoginBudget:
    """Per-client and global token buckets for password checks; thread-safe."""

    def __init__(
        self,
        per_client_per_minute: int,
        total_per_minute: int,
        clock: Clock,
        max_clients: int = 10_000,
    ) -> None:
        self._per_client = per_client_per_minute
        self._clock = clock
        self._max_clients = max_clients
        self._total = TokenBucket.per_minute(total_per_minute, clock.monotonic())
        self._clients: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def spend(self, client: str | None) -> int | None:
        """Takes one token from `client`'s bucket and the shared one: None when both had one,
        else the whole seconds to wait (for Retry-After) and nothing is taken."""
        now = self._clock.monotonic()
        key = client or ""
        with self._lock:
            bucket = self._bucket(key, now)
            self._total.refill(now)
            wait = max(bucket.seconds_until_one(), self._total.seconds_until_one())
            if wait > 0:
                return max(1, math.ceil(wait))
            bucket.tokens -= 1
            self._total.tokens -= 1
            return None

    def refund(self, client: str | None) -> None:
        """Gives back what `spend` took, for a check that succeeded."""
        now = self._clock.monotonic()
        key = client or ""
        with self._lock:
            bucket = self._bucket(key, now)
            bucket.tokens = min(bucket.capacity, bucket.tokens + 1)
            self._total.refill(now)
            self._total.tokens = min(self._total.capacity, self._total.tokens + 1)
            if bucket.full:
                del self._clients[key]

    @property
    def tracked_clients(self) -> int:
        with self._lock:
            return len(self._clients)

    def _bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._clients.get(key)
        if bucket is not None:
            bucket.refill(now)
            self._clients.move_to_end(key)
            return bucket
        while len(self._clients) >= self._max_clients:
            self._clients.popitem(last=False)  # the least recently seen client
        bucket = TokenBucket.per_minute(self._per_client, now)
        self._clients[key] = bucket
        return bucket

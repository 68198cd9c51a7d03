"""Where the blocking provisioning flow runs: a thread pool sized from the backend's capacity.

The API's routes are `async`; the flow (journal writes, Exchange calls) blocks, so it runs here,
not on the event loop and not in AnyIO's shared default pool of 40 threads. The pool has as many
threads as the backend can run commands at once, plus the requests its own queue may hold, plus
a little head-room: so requests reach the backend's queue, whose limits answer 503 with
Retry-After, at any concurrency. A request that finds every thread busy is refused at once with
the same 503 rather than waiting in an unbounded queue.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

from .exchange.errors import BackendUnavailable
from .exchange.port import Capacity

_T = TypeVar("_T")

#: Threads beyond the backend's capacity and queue: flows between Exchange calls (journal,
#: reading the user again) so the backend's own queue limit is what refuses first.
HEAD_ROOM: Final = 4
RETRY_AFTER_SECONDS: Final = 5


class FlowThreads:
    """Runs blocking calls for async routes, at most `size` at once; more are refused (503)."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self.size = capacity.running + capacity.waiting + HEAD_ROOM
        self._pool = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="flow")
        self._lock = threading.Lock()
        self._busy = 0

    @property
    def busy(self) -> int:
        with self._lock:
            return self._busy

    async def run(self, call: Callable[[], _T]) -> _T:
        """`call()` on a pool thread; BackendUnavailable at once when all threads are busy."""
        with self._lock:
            if self._busy >= self.size:
                raise BackendUnavailable(
                    f"{self.size} requests are already being provisioned by this process "
                    f"(the backend runs {self.capacity.running} commands at once and queues "
                    f"{self.capacity.waiting}); retry later",
                    retry_after_seconds=RETRY_AFTER_SECONDS,
                )
            self._busy += 1
        try:
            # With the caller's context variables (the request id logs carry), as AnyIO does.
            future = self._pool.submit(contextvars.copy_context().run, call)
        except BaseException:
            self._free()
            raise
        # The thread's slot frees when the call ends, even if the client went away meanwhile.
        future.add_done_callback(lambda _: self._free())
        return await asyncio.wrap_future(future)

    def _free(self) -> None:
        with self._lock:
            self._busy -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

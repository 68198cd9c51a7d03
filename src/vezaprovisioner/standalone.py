"""The standalone server (`vezaprovisioner serve`): uvicorn with the limits IIS gives IIS mode.

Under IIS, http.sys drops slow and idle connections (its connectionTimeout, headerWaitTimeout
and minBytesPerSecond). uvicorn on its own waits forever for a request's headers: a client
that sends one byte every few seconds keeps its connection, and a few thousand such clients
use up the server. So `serve` runs uvicorn's own h11 protocol with a guard around it:

- **header timeout** (`server.header_timeout_seconds`): a request's headers must be complete
  this long after its first byte (or after the connection opened); else the connection closes.
- **body timeout** (`server.body_timeout_seconds`): once the headers are in, the whole body
  must arrive within this long; else the connection closes and the app sees a disconnect.
- **connections per client address** (`server.max_connections_per_client`): more are closed
  as soon as they open, so one address cannot hold every slot.
- **connections in total** (`server.max_connections`): uvicorn's `limit_concurrency`; beyond
  it, uvicorn answers 503.
- **keep-alive** (`server.keep_alive_seconds`): uvicorn's `timeout_keep_alive`, how long an
  idle connection waits for its next request.

A response's head and body leave in one send (`CoalescingTransport`), not two.

Neither timeout runs while the app works on a request (an Exchange command may take minutes):
only while the server waits for the client.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from typing import Any, ClassVar, cast

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ServerSettings

log = logging.getLogger(__name__)

#: The most a request line plus headers may take (h11's own default, stated here on purpose).
MAX_HEADER_BYTES = 16 * 1024


class CoalescingTransport:
    """A connection's transport whose writes of one event-loop step go out in one call.

    uvicorn's h11 protocol writes a response's head and its body apart; on a connection with
    nothing buffered each write is a send() of its own, so every response cost two system calls
    and two TCP segments for the client to read. Here writes are collected and handed to the
    real transport once, at the end of the loop step that made them (head and body of a response
    are written in the same step), or as soon as the response is complete (`send_now`, from the
    protocol), so the client is not kept waiting while the app logs the request. Everything else
    is the real transport's.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.send_now)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def send_now(self) -> None:
        """Hands what is pending to the real transport (at the end of the loop step, or at once
        when a response is complete)."""
        self._scheduled = False
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def close(self) -> None:
        self.send_now()  # what was written goes out before the close
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body deadlines and a per-address connection cap.

    Use `guarded_protocol(limits)`, which binds the limits and a fresh per-address count.
    """

    limits: ClassVar[ServerSettings]
    open_by_address: ClassVar[Counter[str]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None  # "headers", "body" or None
        self._address: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing = CoalescingTransport(transport, self.loop)
        super().connection_made(cast(asyncio.Transport, coalescing))
        self._address = self.client[0] if self.client else ""
        self.open_by_address[self._address] += 1
        if self.open_by_address[self._address] > self.limits.max_connections_per_client:
            log.debug("connection from %s closed: over max_connections_per_client", self._address)
            transport.abort()
            return
        self._wait_for("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._wait_for(None)
        if self._address is not None:
            self.open_by_address[self._address] -= 1
            if self.open_by_address[self._address] <= 0:
                del self.open_by_address[self._address]
            self._address = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_client()

    def on_response_complete(self) -> None:
        # The whole response is written: send it now, before the app's middleware unwinds
        # (access log, metrics) and before a pipelined next request is read.
        cast(CoalescingTransport, self.transport).send_now()
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:
            self._wait_for(None)  # idle until the next request: uvicorn's keep-alive applies
        else:
            self._follow_client()

    def _follow_client(self) -> None:
        """Arms the deadline for what the server now waits for from the client."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._waiting_for != "headers":
                self._wait_for("headers")  # from this request's first byte, never reset
        elif state is h11.SEND_BODY:
            if self._waiting_for != "body":
                self._wait_for("body")
        else:
            self._wait_for(None)

    def _wait_for(self, what: str | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._waiting_for = what
        if what is None or self.transport.is_closing():
            return
        seconds = (
            self.limits.header_timeout_seconds
            if what == "headers"
            else self.limits.body_timeout_seconds
        )
        self._deadline = self.loop.call_later(seconds, self._too_slow, what)

    def _too_slow(self, what: str) -> None:
        self._deadline = None
        if self._waiting_for != what or self.transport.is_closing():
            return
        log.debug("connection from %s closed: the request's %s came too slowly", self.client, what)
        self.transport.close()


def guarded_protocol(limits: ServerSettings) -> type[GuardedH11Protocol]:
    """The protocol class for one server, with its limits and its own per-address count."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"limits": limits, "open_by_address": Counter()},
    )


def _limits_for_uvicorn(limits: ServerSettings) -> dict[str, Any]:
    return {
        "http": guarded_protocol(limits),
        "timeout_keep_alive": limits.keep_alive_seconds,
        "limit_concurrency": limits.max_connections,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    }


def uvicorn_config(
    app: ASGIApp, limits: ServerSettings, host: str, port: int, log_level: str
) -> uvicorn.Config:
    """uvicorn's configuration with every limit of `[server]` applied (what `serve` runs)."""
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, **_limits_for_uvicorn(limits)
    )


def serve(
    app: ASGIApp,
    limits: ServerSettings,
    host: str,
    port: int,
    log_level: str,
    sock: socket.socket | None = None,
) -> None:
    """Runs the server until it is stopped (Ctrl+C, SIGTERM); exits 3 if it cannot start.

    With `sock` (bound and listening already: `cli serve` binds before the app starts, so a
    taken port is reported before any backend starts) it serves on that socket."""
    if sock is None:
        uvicorn.run(app, host=host, port=port, log_level=log_level, **_limits_for_uvicorn(limits))
        return
    config = uvicorn.Config(app, log_level=log_level, **_limits_for_uvicorn(limits))
    uvicorn.Server(config).run(sockets=[sock])

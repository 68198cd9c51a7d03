"""`vezaprovisioner serve` drops slow clients and keeps answering: a real uvicorn on 127.0.0.1.

Slow clients connect from 127.0.0.2 (Linux routes all of 127.0.0.0/8 to the loopback), the
well-behaved one from 127.0.0.1, so the per-address cap can tell them apart. What is asserted
is behaviour: the server closes the slow connections, and /health answers. The waits below are
upper bounds for a failure, never the thing measured.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from tests.conftest import AUTH
from tests.fakes.clock import FakeClock
from vezaprovisioner.api.app import create_app
from vezaprovisioner.config import Settings
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange
from vezaprovisioner.standalone import CoalescingTransport, uvicorn_config

SLOW_CLIENT = "127.0.0.2"
#: How long a test waits for the server to close a connection before it calls that a failure.
FAILURE_BOUND_SECONDS = 20.0


@contextmanager
def running(app: Any, settings: Settings) -> Iterator[str]:
    """A uvicorn server on a free port with `settings.server`'s limits; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, settings.server, "0.0.0.0", port, "warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    started = threading.Event()
    for _ in range(200):  # wait until it listens (a failure bound, not a measurement)
        if server.started:
            started.set()
            break
        started.wait(0.05)
    assert started.is_set(), "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=FAILURE_BOUND_SECONDS)


def slow_connection(base: str, first_bytes: bytes) -> socket.socket:
    """A connection from SLOW_CLIENT that sent `first_bytes` and then nothing."""
    port = int(base.rsplit(":", 1)[1])
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=FAILURE_BOUND_SECONDS, source_address=(SLOW_CLIENT, 0)
    )
    if first_bytes:
        sock.sendall(first_bytes)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed the connection; False if it is still open after the bound."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.fixture
def serve(
    make_settings: Callable[..., Settings], exchange: SimulatedExchange, clock: FakeClock
) -> Iterator[Callable[..., str]]:
    with ExitStack() as stack:

        def start(**server: Any) -> str:
            settings = make_settings(server=server)
            app = create_app(settings, exchange=exchange, clock=clock)
            return stack.enter_context(running(app, settings))

        yield start


def test_one_address_cannot_hold_every_connection(serve: Callable[..., str]) -> None:
    base = serve(header_timeout_seconds=300, max_connections=8, max_connections_per_client=3)
    held = [slow_connection(base, b"GET /VezaProvisioner/health HTTP/1.1\r\nHo") for _ in range(3)]
    refused = [slow_connection(base, b"") for _ in range(6)]
    try:
        assert all(closed_by_server(sock) for sock in refused)
        response = httpx.get(f"{base}/VezaProvisioner/health", timeout=FAILURE_BOUND_SECONDS)
        assert response.status_code == 200  # answered while the slow three still hold theirs
        for sock in held:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):  # still open: nothing to read, no EOF
                sock.recv(1)
    finally:
        for sock in held + refused:
            sock.close()


def test_slow_headers_are_dropped_and_the_server_answers_again(serve: Callable[..., str]) -> None:
    """Slow clients fill every slot (uvicorn answers 503), then the header timeout frees them."""
    base = serve(header_timeout_seconds=1, max_connections=4, max_connections_per_client=100)
    slow = [slow_connection(base, b"GET /VezaProvisioner/health HTTP/1.1\r\nHo") for _ in range(2)]
    silent = [slow_connection(base, b"") for _ in range(2)]  # never send a byte
    try:
        assert all(closed_by_server(sock) for sock in slow + silent)
        response = httpx.get(f"{base}/VezaProvisioner/health", timeout=FAILURE_BOUND_SECONDS)
        assert response.status_code == 200
    finally:
        for sock in slow + silent:
            sock.close()


def test_a_slow_body_is_dropped(serve: Callable[..., str]) -> None:
    base = serve(body_timeout_seconds=1)
    sock = slow_connection(
        base,
        b"POST /VezaProvisioner/api/v1/emails HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: {AUTH['Authorization']}\r\n".encode()
        + b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"identity"',
    )
    try:
        assert closed_by_server(sock)
    finally:
        sock.close()


def test_a_request_that_takes_longer_than_the_timeouts_is_answered(
    make_settings: Callable[..., Settings],
) -> None:
    """The deadlines cover waiting for the client only, never the app's own work."""
    settings = make_settings(
        simulated={"latency_ms": 700},  # the real clock: each cmdlet takes 0.7 s
        server={"header_timeout_seconds": 0.3, "body_timeout_seconds": 0.3},
    )
    app = create_app(settings)
    with running(app, settings) as base:
        response = httpx.post(
            f"{base}/VezaProvisioner/api/v1/emails",
            json={"identity": "CONTOSO\\plain"},
            headers=AUTH,
            timeout=FAILURE_BOUND_SECONDS,
        )
    assert response.status_code == 201


class RecordingTransport:
    """Stands in for asyncio's socket transport: records each write call."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


def test_a_responses_head_and_body_leave_in_one_write() -> None:
    """uvicorn writes the head and the body apart, in one loop step: one send for both."""

    async def respond() -> tuple[list[bytes], list[bytes]]:
        real = RecordingTransport()
        transport = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"{}")
        transport.write(b"")  # h11's EndOfMessage for a sized body
        within_the_step = list(real.writes)
        assert transport.get_write_buffer_size() == 45
        await asyncio.sleep(0)  # the end of the loop step
        return within_the_step, real.writes

    within_the_step, after = asyncio.run(respond())
    assert within_the_step == []
    assert after == [b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}"]


def test_closing_sends_what_was_written_first() -> None:
    async def close_at_once() -> RecordingTransport:
        real = RecordingTransport()
        transport = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"last words")
        transport.close()
        await asyncio.sleep(0)
        return real

    real = asyncio.run(close_at_once())
    assert real.writes == [b"last words"]
    assert real.closed


def test_a_complete_response_is_sent_before_the_app_finishes(make_settings: Any) -> None:
    """The response leaves as soon as its last byte is written, not when the app (its access
    log, metrics) returns: here the app blocks the event loop after sending until the client
    has read the response, which it could not if the send waited for the end of the loop step."""
    client_has_it = threading.Event()
    seen_by_client_while_app_ran: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-length", b"4")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"done"})
        # Blocks the loop on purpose, until the client has the response (or the bound).
        seen_by_client_while_app_ran.append(client_has_it.wait(FAILURE_BOUND_SECONDS))

    with running(app, make_settings()) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=FAILURE_BOUND_SECONDS) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            received = b""
            while not received.endswith(b"done"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
            client_has_it.set()
    assert received.startswith(b"HTTP/1.1 200 ")
    assert received.endswith(b"done")
    assert seen_by_client_while_app_ran == [True]

"""Prints /health latency idle and under a flood of wrong Basic passwords.

Starts `vezaprovisioner serve` (basic mode, logging to a file) on 127.0.0.1, measures p50/p99 of
`GET /health` on one keep-alive connection, then again for as long as a separate process runs 16
clients that send `POST /api/v1/emails` with wrong passwords (a new guess each time) as fast as
the server answers. Each flood client uses its own loopback address (127.0.0.11 ... 127.0.0.26),
so both the per-client and the global failed-login budget come into play. Bounded: the flood
stops after --seconds or --max-flood requests, whichever comes first; all traffic stays on
127.0.0.0/8.

    .venv/bin/python bench/auth_flood.py [--health 300] [--seconds 30] [--no-budget]

--no-budget raises both budgets to their maximum, so every wrong password costs a scrypt check
(still off the event loop): the cost the budget saves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx

from vezaprovisioner.auth import hash_password

PASSWORD = "bench-password"  # noqa: S105 - a throwaway account of the bench
FLOOD_CLIENTS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_latencies(
    base: str, count: int, until: Callable[[], bool] = lambda: True
) -> list[float]:
    """`count` sequential requests, or more until `until()` says stop."""
    latencies: list[float] = []
    with httpx.Client(timeout=30) as client:
        client.get(f"{base}/health")  # connect outside the measurement
        while len(latencies) < count or not until():
            started = time.perf_counter()
            response = client.get(f"{base}/health")
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    return latencies


def summary(latencies: list[float]) -> tuple[float, float]:
    quantiles = statistics.quantiles(latencies, n=100)
    return quantiles[49] * 1000, quantiles[98] * 1000


async def flood(base: str, seconds: float, max_requests: int) -> dict[str, int]:
    """16 clients from 16 loopback addresses; returns the count of each status."""
    statuses: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    budget = max_requests

    async def one_client(index: int) -> None:
        nonlocal budget
        transport = httpx.AsyncHTTPTransport(local_address=f"127.0.0.{11 + index}")
        async with httpx.AsyncClient(transport=transport, timeout=60) as client:
            guess = 0
            while time.monotonic() < deadline and budget > 0:
                budget -= 1
                guess += 1  # a new password each time: repeats would share one check
                response = await client.post(
                    f"{base}/api/v1/emails",
                    json={"identity": "x"},
                    auth=("bench", f"guess-{index}-{guess}"),
                )
                statuses[str(response.status_code)] += 1

    await asyncio.gather(*(one_client(i) for i in range(FLOOD_CLIENTS)))
    return dict(statuses)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--health", type=int, default=300, help="/health requests per phase")
    parser.add_argument("--seconds", type=float, default=30.0, help="longest flood")
    parser.add_argument("--max-flood", type=int, default=200_000, help="most flood requests")
    parser.add_argument("--no-budget", action="store_true")
    parser.add_argument("--flood-only", metavar="BASE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_only:  # the flood's own process, so it shares no GIL with the measurement
        print(json.dumps(asyncio.run(flood(args.flood_only, args.seconds, args.max_flood))))
        return
    budget = (
        "failed_logins_per_client_per_minute = 10000\nfailed_logins_per_minute = 100000\n"
        if args.no_budget
        else ""
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "bench.toml").write_text(
            f'[simulated]\ndirectory = "{Path("examples/directory.json").resolve()}"\n'
            '[logging]\nfile = "service.log"\n'
            f'[auth]\nmode = "basic"\n{budget}'
            f'[auth.users]\nbench = "{hash_password(PASSWORD)}"\n'
        )
        port = free_port()
        server = subprocess.Popen(  # noqa: S603 - our own console script, fixed arguments
            [
                str(Path(sys.executable).with_name("vezaprovisioner")),
                "serve",
                "--config",
                str(folder / "bench.toml"),
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
        )
        base = f"http://127.0.0.1:{port}/VezaProvisioner"
        try:
            for _ in range(100):
                try:
                    if httpx.get(f"{base}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            health_latencies(base, 50)  # warm-up
            idle_p50, idle_p99 = summary(health_latencies(base, args.health))
            flooder = subprocess.Popen(  # noqa: S603 - this script, fixed arguments
                [
                    sys.executable,
                    __file__,
                    "--flood-only",
                    base,
                    "--seconds",
                    str(args.seconds),
                    "--max-flood",
                    str(args.max_flood),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(1.0)  # let the flood reach full speed before measuring
            flood_latencies = health_latencies(
                base, args.health, lambda: flooder.poll() is not None
            )
            flood_p50, flood_p99 = summary(flood_latencies)
            out, _ = flooder.communicate(timeout=args.seconds + 120)
            statuses = json.loads(out)
        finally:
            server.terminate()
            server.wait(timeout=10)
    total = sum(statuses.values())
    print(f"budget: {'off (every wrong password runs scrypt)' if args.no_budget else 'default'}")
    print(f"{'phase':>6} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'idle':>6} {idle_p50:>8.1f} {idle_p99:>8.1f}")
    print(f"{'flood':>6} {flood_p50:>8.1f} {flood_p99:>8.1f}  ({len(flood_latencies)} requests)")
    print(f"p50 under flood / idle: {flood_p50 / idle_p50:.2f}x")
    print(f"flood: {total} requests in <= {args.seconds:g} s, by status {statuses}")


if __name__ == "__main__":
    main()

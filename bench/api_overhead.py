"""Prints what the service itself adds to a CREATE_EMAIL: HTTP, auth, validation, flow.

Starts `vezaprovisioner serve` on 127.0.0.1 with the simulated Exchange at zero latency, sends
requests over real HTTP at concurrency 1 and 8, and prints throughput and p50/p99 latency. New
users are created by a copy of the test directory with N plain users, so every request is a real
"created" path (Get-User, Get-User, Enable-Mailbox) with everything a production request
does: the journal (synchronous=full), the audit line, the JSON log line (to a file) and metrics.

    .venv/bin/python bench/api_overhead.py [--requests 400]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from bench_directory import plain_users

from vezaprovisioner.auth import hash_password

PASSWORD = "bench-password"  # noqa: S105 - a throwaway account of the bench


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(requests: int, concurrency: int, base: str, offset: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    with httpx.Client(auth=("bench", PASSWORD), timeout=30) as client:

        def one(i: int) -> None:
            started = time.perf_counter()
            response = client.post(f"{base}/api/v1/emails", json={"identity": f"bench{offset + i}"})
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 201, response.text

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
        return time.perf_counter() - started, latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "dir.json").write_text(json.dumps(plain_users(3 * args.requests)))
        (folder / "bench.toml").write_text(
            '[simulated]\ndirectory = "dir.json"\n[logging]\nfile = "service.log"\n'
            '[auth]\nmode = "basic"\n'
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
            run(10, 1, base, 2 * args.requests + 10)  # warm-up, incl. the one scrypt check
            print(f"{'concurrency':>11} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
            for offset, concurrency in enumerate((1, 8)):
                elapsed, latencies = run(args.requests, concurrency, base, offset * args.requests)
                quantiles = statistics.quantiles(latencies, n=100)
                print(
                    f"{concurrency:>11} {args.requests:>8} {args.requests / elapsed:>8.0f} "
                    f"{quantiles[49] * 1000:>8.1f} {quantiles[98] * 1000:>8.1f}"
                )
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()

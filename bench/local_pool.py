"""Benchmark: CREATE_EMAIL through HTTP over the local backend, warm pool versus a host per command.

Starts `vezaprovisioner serve` (uvicorn, 127.0.0.1) with `backend = "local"` over the fake
PowerShell (tests/fakes/powershell.py) set to a 5 s connect and a 150 ms cmdlet, then sends
CREATE_EMAIL requests for distinct new users at a fixed concurrency and prints a table:
throughput, p50/p99 latency, cmdlet calls per request (counted from the fake's log), and pool
efficiency = measured cmdlet throughput / (pool_size / cmdlet time).

    .venv/bin/python bench/local_pool.py                  # the README's table (about 25 minutes)
    .venv/bin/python bench/local_pool.py --requests 40 --baseline-requests 8   # a quick look
    .venv/bin/python bench/local_pool.py --cases 16:16 --requests 320  # pool 16, 16 callers

Before the clock starts, each of the `concurrency` clients makes one CREATE_EMAIL for a user of
its own, not counted: its connection, the verified-password cache and the server's first
CREATE_EMAIL are what a running service already has, and the pool is what is measured.

Each CREATE_EMAIL of a new user makes two cmdlet calls (Get-User, Enable-Mailbox; a second
Get-User by GUID only when another request may have enabled the user meanwhile), so with
pool_size 0 every request starts two hosts and pays the connect time twice (over 10 s a
request): the 200-request baseline is most of the run's time. `--baseline-requests` runs fewer
for a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_directory import plain_users

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fakes" / "powershell.py"
USER, PASSWORD = "bench", "bench-password"


@dataclass(frozen=True)
class Row:
    pool_size: int
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    calls_per_request: float
    failures: int

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def efficiency(self, cmdlet_seconds: float) -> float | None:
        if not self.pool_size:
            return None
        return self.throughput * self.calls_per_request / (self.pool_size / cmdlet_seconds)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_case(
    work: Path,
    *,
    pool_size: int,
    concurrency: int,
    requests: int,
    connect_seconds: float,
    cmdlet_ms: int,
) -> Row:
    from vezaprovisioner.auth import hash_password

    case = work / f"pool{pool_size}-c{concurrency}"
    case.mkdir()
    (case / "RemoteExchange.ps1").write_text("# stand-in\n")
    # bench0 … bench{requests-1} are measured; the next `concurrency` users warm the clients.
    (case / "directory.json").write_text(json.dumps(plain_users(requests + concurrency)))
    config = case / "config.toml"
    config.write_text(
        "backend = 'local'\n"
        "[exchange]\n"
        f"powershell_path = '{FAKE}'\n"
        f"remote_exchange_path = '{case / 'RemoteExchange.ps1'}'\n"
        "[local]\n"
        f"pool_size = {pool_size}\n"
        "queue_size = 64\n"
        "queue_wait_seconds = 120\n"
        "[auth]\nmode = 'basic'\nrequire_https = false\n"
        f"[auth.users]\n{USER} = '{hash_password(PASSWORD)}'\n"
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "VZP_FAKE_DIRECTORY": str(case / "directory.json"),
        "VZP_FAKE_STATE": str(case / "forest.sqlite3"),
        "VZP_FAKE_LOG": str(case / "fake-log.jsonl"),
        "VZP_FAKE_CONNECT_SECONDS": str(connect_seconds),
        "VZP_FAKE_LATENCY_MS": str(cmdlet_ms),
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}/VezaProvisioner"
    server = subprocess.Popen(  # noqa: S603 - this interpreter, constant arguments
        [
            sys.executable,
            "-m",
            "vezaprovisioner",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(base, pool_size=pool_size, timeout=connect_seconds * pool_size + 60)
        latencies: list[float] = []
        failures = 0
        lock = threading.Lock()
        clients = [httpx.Client(auth=(USER, PASSWORD), timeout=300) for _ in range(concurrency)]
        opened = list(clients)
        local = threading.local()

        def warm(index: int) -> None:
            response = clients[index].post(
                f"{base}/api/v1/emails", json={"identity": f"bench{requests + index}"}
            )
            if response.status_code != 201:
                raise SystemExit(f"warming a client failed: {response.status_code} {response.text}")

        def one(index: int) -> None:
            nonlocal failures
            client = getattr(local, "client", None)
            if client is None:
                with lock:
                    client = local.client = clients.pop()
            started = time.perf_counter()
            response = client.post(f"{base}/api/v1/emails", json={"identity": f"bench{index}"})
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                if response.status_code != 201:
                    failures += 1

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(warm, range(concurrency)))
        warm_calls = count_calls(case)  # every warming request has been answered
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, range(requests)))
        seconds = time.perf_counter() - started
        for client in opened:
            client.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    ordered = sorted(latencies)
    return Row(
        pool_size=pool_size,
        concurrency=concurrency,
        requests=requests,
        seconds=seconds,
        p50_ms=statistics.median(ordered) * 1000,
        p99_ms=ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000,
        calls_per_request=(count_calls(case) - warm_calls) / requests,
        failures=failures,
    )


def count_calls(case: Path) -> int:
    """Cmdlet calls the fake PowerShell hosts have logged so far."""
    log_lines = (case / "fake-log.jsonl").read_text().splitlines()
    return sum(1 for line in log_lines if '"event": "call"' in line)


def wait_ready(base: str, *, pool_size: int, timeout: float) -> None:
    """Poll readiness until the pool is fully warm (or, without a pool, the server answers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # The public /health/ready carries no detail; the pool's warmth is in the details.
            response = httpx.get(f"{base}/health/ready/details", auth=(USER, PASSWORD), timeout=5)
            detail = response.json()["checks"]["backend"]["detail"]
            # Hosts waiting for the connect mutex are not "starting": count the warm ones.
            warm = f"{pool_size}/{pool_size} PowerShell hosts warm"
            if not pool_size or (response.status_code == 200 and detail.startswith(warm)):
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server at {base} did not become ready within {timeout:g} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--baseline-requests", type=int, default=200)
    parser.add_argument("--connect-seconds", type=float, default=5.0)
    parser.add_argument("--cmdlet-ms", type=int, default=150)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument(
        "--cases",
        nargs="*",
        metavar="POOL:CONCURRENCY",
        help="run only these cases (default: pool_size 0 and --pool-size, each at 4 and 8)",
    )
    args = parser.parse_args()
    cmdlet_seconds = args.cmdlet_ms / 1000
    if args.cases:
        cases = [tuple(int(n) for n in case.split(":", 1)) for case in args.cases]
    else:
        cases = [(p, c) for p in (0, args.pool_size) for c in (4, 8)]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="vzp-bench-") as tmp:
        for pool_size, concurrency in cases:
            count = args.requests if pool_size else args.baseline_requests
            row = run_case(
                Path(tmp),
                pool_size=pool_size,
                concurrency=concurrency,
                requests=count,
                connect_seconds=args.connect_seconds,
                cmdlet_ms=args.cmdlet_ms,
            )
            rows.append(row)
            print(f"done: pool_size {pool_size}, concurrency {concurrency}", file=sys.stderr)
    print(
        f"connect {args.connect_seconds:g} s, cmdlet {args.cmdlet_ms} ms; "
        f"efficiency = cmdlet calls/s / (pool_size / {cmdlet_seconds:g} s)\n"
    )
    print(
        "| pool_size | concurrency | requests | failed | req/s | p50 ms | p99 ms "
        "| cmdlets/request | pool efficiency |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        efficiency = row.efficiency(cmdlet_seconds)
        print(
            f"| {row.pool_size} | {row.concurrency} | {row.requests} | {row.failures} "
            f"| {row.throughput:.2f} | {row.p50_ms:.0f} | {row.p99_ms:.0f} "
            f"| {row.calls_per_request:.2f} "
            f"| {'n/a' if efficiency is None else f'{efficiency:.2f}'} |"
        )


if __name__ == "__main__":
    main()

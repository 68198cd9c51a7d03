"""Prints what the service itself adds to a CREATE_EMAIL, against a bare endpoint in the same run.

Starts three servers on 127.0.0.1, one process each:

* the product, `vezaprovisioner serve`, with the simulated Exchange at zero latency and
  everything a production request does: basic authentication, the journal (on the same disk,
  `synchronous = "full"` as shipped), the audit line, the JSON log line (to a file), metrics;
* the same with `journal.synchronous = "normal"`;
* the baseline: a bare FastAPI `def` endpoint that parses the same body with the same pydantic
  model and answers 201 (bench/bare_endpoint.py).

Every product request creates a new mailbox (Get-User, Enable-Mailbox). For each
concurrency (1, 8, 32) the three servers are measured in turn, `--repeats` times interleaved; the
median run is printed with its ratio to the baseline, and the server's CPU time per request (from
/proc, Linux) of that run. Bounded: `--requests` per run, 127.0.0.1 only.

The client shares the machine's two cores with the server. The default client (httpx, one thread
per connection) costs more CPU per request than the bare endpoint does, which flattens the
ratios; `--client wrk` drives the same requests from wrk (C, one thread; Debian package `wrk`)
for `--seconds` per run, so each server gets the CPU it can use and the ratio is close to the
ratio of the servers' own costs.

    .venv/bin/python bench/api_overhead.py [--requests 300] [--repeats 3]
    .venv/bin/python bench/api_overhead.py --client wrk [--seconds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_directory import plain_users

from vezaprovisioner.auth import hash_password

PASSWORD = "bench-password"  # noqa: S105 - a throwaway account of the bench
HERE = Path(__file__).resolve().parent
CONCURRENCIES = (1, 8, 32)
#: With `--client wrk`, users per product server per second of runs: above any rate seen here.
WRK_USERS_PER_SECOND = 2_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    rate: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float


class Server:
    def __init__(self, name: str, argv: list[str], auth: tuple[str, str] | None) -> None:
        self.name = name
        self.port = free_port()
        self.auth = auth
        self.next_user = 0
        self.process = subprocess.Popen(  # noqa: S603 - our interpreter, fixed arguments
            [*argv, "--port", str(self.port)], stdout=subprocess.DEVNULL
        )
        self.base = f"http://127.0.0.1:{self.port}/VezaProvisioner"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.post(f"{self.base}/api/v1/emails", json={}, timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)  # start-up poll interval
        self.run(10, 1)  # warm-up, incl. the one scrypt check of the caller

    def run(self, requests: int, concurrency: int) -> Run:
        first, self.next_user = self.next_user, self.next_user + requests
        latencies: list[float] = []
        with httpx.Client(auth=self.auth, timeout=30) as client:

            def one(i: int) -> None:
                started = time.perf_counter()
                response = client.post(
                    f"{self.base}/api/v1/emails", json={"identity": f"bench{first + i}"}
                )
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 201, response.text

            cpu_before = cpu_seconds(self.process.pid)
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(one, range(requests)))
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(self.process.pid) - cpu_before
        quantiles = statistics.quantiles(latencies, n=100)
        return Run(
            requests / elapsed, quantiles[49] * 1000, quantiles[98] * 1000, cpu / requests * 1000
        )

    def run_wrk(self, wrk: str, seconds: int, concurrency: int) -> Run:
        """`concurrency` connections from one wrk thread for `seconds`, each request a new user."""
        env = {**os.environ, "FIRST": str(self.next_user)}
        if self.auth:
            env["AUTH"] = base64.b64encode(":".join(self.auth).encode()).decode()
        script = HERE / "wrk_create_email.lua"
        url = f"{self.base}/api/v1/emails"
        run, requests = wrk_run(wrk, self.process.pid, url, seconds, concurrency, script, env)
        # Skip those still in flight when wrk stopped (sent, so their users are taken).
        self.next_user += requests + concurrency + 10
        return run

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def wrk_run(
    wrk: str,
    pid: int,
    url: str,
    seconds: int,
    concurrency: int,
    script: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[Run, int]:
    """One run of wrk (one thread, `concurrency` connections) against `url`, with the CPU time
    the server process `pid` spent meanwhile: the run, and how many requests wrk counted."""
    argv = [wrk, "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    cpu_before = cpu_seconds(pid)
    output = subprocess.run(  # noqa: S603 - wrk, fixed arguments
        [*argv, url], env=env, capture_output=True, text=True, check=True
    ).stdout
    cpu = cpu_seconds(pid) - cpu_before
    requests = int(_wrk_field(output, r"(\d+) requests in"))
    assert "Non-2xx or 3xx responses" not in output, output
    assert "Socket errors" not in output, output
    run = Run(
        float(_wrk_field(output, r"Requests/sec:\s+([\d.]+)")),
        _milliseconds(_wrk_field(output, r"(?m)^\s+50%\s+(\S+)$")),
        _milliseconds(_wrk_field(output, r"(?m)^\s+99%\s+(\S+)$")),
        cpu / requests * 1000,
    )
    return run, requests


def _wrk_field(output: str, pattern: str) -> str:
    found = re.search(pattern, output)
    assert found, output
    return found[1]


def _milliseconds(duration: str) -> float:
    """wrk's "812.00us", "3.04ms" or "1.20s" in milliseconds."""
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if duration.endswith(unit):
            return float(duration[: -len(unit)]) * factor
    raise ValueError(duration)


def product(
    folder: Path, synchronous: str, users: int, *, top: str = "", name: str | None = None
) -> Server:
    """`vezaprovisioner serve` as the benches run it; `top`: more top-level TOML lines."""
    folder.mkdir()
    (folder / "dir.json").write_text(json.dumps(plain_users(users)))
    (folder / "bench.toml").write_text(
        f'{top}[simulated]\ndirectory = "dir.json"\n[logging]\nfile = "service.log"\n'
        f'[journal]\nsynchronous = "{synchronous}"\n'
        '[auth]\nmode = "basic"\n'
        f'[auth.users]\nbench = "{hash_password(PASSWORD)}"\n'
        # All clients share 127.0.0.1: at c=32 the default per-address cap (32) would close a
        # connection opened while the previous run's are still being torn down.
        "[server]\nmax_connections_per_client = 256\n"
    )
    console = str(Path(sys.executable).with_name("vezaprovisioner"))
    argv = [console, "serve", "--config", str(folder / "bench.toml"), "--log-level", "warning"]
    return Server(name or f"product ({synchronous})", argv, ("bench", PASSWORD))


def bare() -> Server:
    argv = [sys.executable, "-m", "uvicorn", "bare_endpoint:app", "--app-dir", str(HERE)]
    return Server("bare endpoint", [*argv, "--log-level", "warning"], None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client", choices=("httpx", "wrk"), default="httpx")
    parser.add_argument("--seconds", type=int, default=3, help="per run, with --client wrk")
    args = parser.parse_args()
    wrk = shutil.which("wrk") if args.client == "wrk" else None
    if args.client == "wrk" and wrk is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    runs = args.repeats * len(CONCURRENCIES)
    users = (WRK_USERS_PER_SECOND * args.seconds if wrk else args.requests) * runs + 20
    with tempfile.TemporaryDirectory() as tmp:
        servers = [
            product(Path(tmp) / "full", "full", users),
            product(Path(tmp) / "normal", "normal", users),
            bare(),
        ]
        try:
            results: dict[tuple[str, int], list[Run]] = {}
            for concurrency in CONCURRENCIES:
                for _ in range(args.repeats):
                    for server in servers:  # interleaved: each sees the same background
                        if wrk:
                            run = server.run_wrk(wrk, args.seconds, concurrency)
                        else:
                            run = server.run(args.requests, concurrency)
                        results.setdefault((server.name, concurrency), []).append(run)
        finally:
            for server in servers:
                server.stop()

    def median(name: str, concurrency: int) -> Run:
        runs = sorted(results[(name, concurrency)], key=lambda r: r.rate)
        return runs[len(runs) // 2]

    per_run = f"{args.seconds} s per run from wrk" if wrk else f"{args.requests} requests per run"
    print(
        f"{per_run}, median of {args.repeats} interleaved runs; "
        "simulated Exchange at 0 ms; HTTP on 127.0.0.1; "
        f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} at the end"
    )
    print()
    print("| c | server | req/s | ratio to bare | p50 ms | p99 ms | server CPU ms/request |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for concurrency in CONCURRENCIES:
        baseline = median("bare endpoint", concurrency)
        for server in servers:
            run = median(server.name, concurrency)
            ratio = run.rate / baseline.rate
            print(
                f"| {concurrency} | {server.name} | {run.rate:.0f} | {ratio:.2f} "
                f"| {run.p50_ms:.1f} | {run.p99_ms:.1f} | {run.cpu_ms:.2f} |"
            )


if __name__ == "__main__":
    main()

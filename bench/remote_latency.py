"""CREATE_EMAIL latency through the remote backend, against the fake /PowerShell endpoint.

Runs the real flow as the service builds it (`build_services`: journal, per-user claims, audit
trail, metrics) over `RemoteExchange` -> pypsrp -> WS-Man over TLS on loopback -> the fake
endpoint (psrpcore, in a process of its own so it does not share the client's GIL), where every
cmdlet takes `--delay-ms` (150 ms by default, a plausible Exchange cmdlet time). Each iteration
enables a fresh user, so every request runs Get-User and Enable-Mailbox (no second Get-User: no
other request enabled the user meanwhile). The overhead is the end-to-end time minus the cmdlet
time (cmdlets run x delay): what the warm pool, PSRP (de)serialization, WS-Man, HTTP and TLS
add. It also prints the WS-Man requests per cmdlet and the
CPU each process spent per cmdlet (the client: the flow, `RemoteExchange`, pypsrp, requests, TLS;
the endpoint: psrpcore, its HTTP server, TLS), and the load average before and after, since on a
shared machine other work's CPU shows up as overhead.

Then the same flow in parallel: for each `--pool-sizes` value P, P callers at once on a backend
with `remote.pool_size = P` (`--parallel-requests` each), printing throughput against the ideal
P / (cmdlets per request x delay) requests per second and p50/p99. Bounded: about 2 x 40
requests of 300 ms.

    .venv/bin/python bench/remote_latency.py [--iterations 100] [--delay-ms 150]
        [--pool-sizes 2 4] [--parallel-requests 40]

Numbers are for this machine and loopback; a real network adds its round trips (three HTTP
requests per cmdlet: Command, Receive, Signal terminate).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import ssl
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import trustme

# The fake endpoint lives in the test tree; run from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_directory import plain_users
from tests.fakes.clock import FakeClock
from tests.fakes.psrp_server import FakeExchangeEndpoint

from vezaprovisioner.clock import SystemClock
from vezaprovisioner.config import Settings
from vezaprovisioner.exchange.remote import RemoteCredentials, RemoteExchange
from vezaprovisioner.exchange.simulated.directory import parse_directory
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange
from vezaprovisioner.provisioning import CreateEmail
from vezaprovisioner.services import Services, build_services

USER, PASSWORD = "svc-bench@contoso.com", "bench-password"


@dataclass(frozen=True)
class EndpointStats:
    """What the endpoint process counted so far."""

    commands: int
    actions: dict[str, int]
    cpu_seconds: float


class EndpointProcess:
    """The fake endpoint in a child process (forked), answering "how many cmdlets so far"."""

    def __init__(self, users: int, tls: ssl.SSLContext, delay_seconds: float) -> None:
        self.delay_seconds = delay_seconds
        context = multiprocessing.get_context("fork")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, users, tls, delay_seconds), daemon=True
        )

    def __enter__(self) -> EndpointProcess:
        self._process.start()
        self.port = int(self._conn.recv())
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.send("stop")
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()

    def commands(self) -> int:
        self._conn.send("count")
        return int(self._conn.recv())

    def stats(self) -> EndpointStats:
        self._conn.send("stats")
        commands, actions, cpu_seconds = self._conn.recv()
        return EndpointStats(commands, actions, cpu_seconds)


def _serve(conn: Connection, users: int, tls: ssl.SSLContext, delay_seconds: float) -> None:
    simulated = SimulatedExchange(parse_directory(plain_users(users)), clock=FakeClock())
    with FakeExchangeEndpoint(simulated, username=USER, password=PASSWORD, tls=tls) as endpoint:
        endpoint.delay_seconds = delay_seconds
        conn.send(endpoint.port)
        while (question := conn.recv()) != "stop":
            if question == "count":
                conn.send(len(endpoint.commands))
            else:
                conn.send((len(endpoint.commands), dict(endpoint.actions), time.process_time()))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--delay-ms", type=float, default=150.0)
    parser.add_argument("--pool-sizes", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--parallel-requests", type=int, default=40, help="per caller")
    args = parser.parse_args()
    parallel_users = sum(p * args.parallel_requests + p for p in args.pool_sizes)

    load_before = os.getloadavg()
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(tls)
    users = args.iterations + 1 + parallel_users
    with (
        tempfile.TemporaryDirectory() as scratch,
        EndpointProcess(users, tls, args.delay_ms / 1000) as endpoint,
    ):
        bundle = Path(scratch) / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        settings = Settings.model_validate(
            {
                "backend": "remote",
                "not_found_retry_seconds": 0,
                "remote": {
                    "server": "localhost",
                    "port": endpoint.port,
                    "ssl": True,
                    "auth": "basic",
                    "ca_bundle": str(bundle),
                },
            }
        )
        remote = RemoteExchange(
            settings.remote.model_copy(update={"pool_size": 1}),
            settings.exchange,
            RemoteCredentials(USER, PASSWORD),
            clock=SystemClock(),
        )
        services = service_of(settings, remote, Path(scratch) / "sequential")
        provisioner = services.provisioner

        started = time.perf_counter()
        provisioner.create_email(CreateEmail("CONTOSO\\bench0"))  # opens the pool: the cold call
        cold = time.perf_counter() - started

        totals: list[float] = []
        overheads: list[float] = []
        stats_before = endpoint.stats()
        client_cpu = time.process_time()
        for n in range(1, args.iterations + 1):
            before = endpoint.commands()
            started = time.perf_counter()
            result = provisioner.create_email(CreateEmail(f"CONTOSO\\bench{n}"))
            elapsed = time.perf_counter() - started
            assert result.status == "created", result
            cmdlets = endpoint.commands() - before
            totals.append(elapsed)
            overheads.append(elapsed - cmdlets * endpoint.delay_seconds)
        client_cpu = time.process_time() - client_cpu
        stats_after = endpoint.stats()
        services.close()

        first_user = args.iterations + 1
        parallel_rows = []
        for pool_size in args.pool_sizes:
            parallel_rows.append(
                run_parallel(
                    settings,
                    endpoint,
                    pool_size,
                    first_user,
                    args.parallel_requests,
                    Path(scratch) / f"pool-{pool_size}",
                )
            )
            first_user += pool_size * args.parallel_requests + pool_size

    load_after = os.getloadavg()
    cmdlets_per_request = cmdlets
    per_cmdlet = [o / cmdlets_per_request for o in overheads]
    sequential_cmdlets = stats_after.commands - stats_before.commands
    requests_per_cmdlet = {
        action: (count - stats_before.actions.get(action, 0)) / sequential_cmdlets
        for action, count in sorted(stats_after.actions.items())
        if count > stats_before.actions.get(action, 0)
    }
    print(
        f"CREATE_EMAIL through the remote backend (fake endpoint, TLS on loopback), "
        f"cmdlet delay {args.delay_ms:g} ms, {args.iterations} requests, "
        f"{cmdlets_per_request} cmdlets each, one warm pool (opened {remote.pools_opened}x)"
    )
    print()
    print("| measure | p50 | p99 | mean |")
    print("|---|---|---|---|")
    for label, values in (
        ("end to end", totals),
        ("overhead over cmdlet time", overheads),
        ("overhead per cmdlet", per_cmdlet),
    ):
        print(
            f"| {label} | {percentile(values, 0.5) * 1000:.1f} ms "
            f"| {percentile(values, 0.99) * 1000:.1f} ms "
            f"| {statistics.fmean(values) * 1000:.1f} ms |"
        )
    print()
    print(
        "WS-Man requests per cmdlet: "
        + ", ".join(f"{action} {count:.2f}" for action, count in requests_per_cmdlet.items())
    )
    print(
        f"CPU per cmdlet: client process {client_cpu / sequential_cmdlets * 1000:.1f} ms, "
        f"endpoint process "
        f"{(stats_after.cpu_seconds - stats_before.cpu_seconds) / sequential_cmdlets * 1000:.1f} ms"
    )
    print(f"cold first request (opens the pool): {cold * 1000:.1f} ms")
    if parallel_rows:
        print_parallel(parallel_rows, args.parallel_requests, cmdlets_per_request, args.delay_ms)
    print()
    print(
        "load average (1/5/15 min) before: "
        + " ".join(f"{x:.2f}" for x in load_before)
        + ", after: "
        + " ".join(f"{x:.2f}" for x in load_after)
    )


def print_parallel(
    parallel_rows: list[tuple[int, float, float, float, float]],
    parallel_requests: int,
    cmdlets_per_request: int,
    delay_ms: float,
) -> None:
    print()
    print(
        f"In parallel: concurrency = remote.pool_size, {parallel_requests} requests per "
        f"caller, pools warmed first; ideal = pool_size / ({cmdlets_per_request} x "
        f"{delay_ms:g} ms)"
    )
    print()
    print("| pool_size = concurrency | req/s | ideal | of ideal | p50 | p99 | p99/p50 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for pool_size, rate, ideal, p50, p99 in parallel_rows:
        print(
            f"| {pool_size} | {rate:.2f} | {ideal:.2f} | {rate / ideal:.2f} "
            f"| {p50 * 1000:.0f} ms | {p99 * 1000:.0f} ms | {p99 / p50:.2f} |"
        )


def service_of(settings: Settings, remote: RemoteExchange, data_dir: Path) -> Services:
    """The service's objects over `remote`, with the journal and audit trail in `data_dir`."""
    return build_services(settings.model_copy(update={"data_dir": data_dir}), exchange=remote)


def run_parallel(
    settings: Settings,
    endpoint: EndpointProcess,
    pool_size: int,
    first_user: int,
    per_caller: int,
    data_dir: Path,
) -> tuple[int, float, float, float, float]:
    """`pool_size` callers at once on a backend with that many sessions."""
    remote = RemoteExchange(
        settings.remote.model_copy(update={"pool_size": pool_size}),
        settings.exchange,
        RemoteCredentials(USER, PASSWORD),
        clock=SystemClock(),
    )
    services = service_of(settings, remote, data_dir)
    provisioner = services.provisioner

    def one(n: int) -> float:
        started = time.perf_counter()
        result = provisioner.create_email(CreateEmail(f"CONTOSO\\bench{n}"))
        assert result.status == "created", result
        return time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=pool_size) as callers:
        # Warm every session first (opening one is not what this measures).
        list(callers.map(one, range(first_user, first_user + pool_size)))
        first_user += pool_size
        before = endpoint.commands()
        started = time.perf_counter()
        latencies = list(callers.map(one, range(first_user, first_user + pool_size * per_caller)))
        elapsed = time.perf_counter() - started
    cmdlets = (endpoint.commands() - before) / len(latencies)
    services.close()
    ideal = pool_size / (cmdlets * endpoint.delay_seconds)
    return (
        pool_size,
        len(latencies) / elapsed,
        ideal,
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
    )


if __name__ == "__main__":
    main()

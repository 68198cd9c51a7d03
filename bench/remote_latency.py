"""CREATE_EMAIL latency through the remote backend, against the fake /PowerShell endpoint.

Runs the real flow (`Provisioner`) over `RemoteExchange` -> pypsrp -> WS-Man over TLS on loopback
-> the fake endpoint (psrpcore), where every cmdlet takes `--delay-ms` (150 ms by default, a
plausible Exchange cmdlet time). Each iteration enables a fresh user, so every request runs
Get-User, Get-User (by GUID, under the per-user claim) and Enable-Mailbox. The overhead is the
end-to-end time minus the cmdlet time (cmdlets run x delay): what the warm pool, the is_alive
check, PSRP (de)serialization, WS-Man and TLS add.

    .venv/bin/python bench/remote_latency.py [--iterations 100] [--delay-ms 150]

Numbers are for this machine and loopback; a real network adds its round trips (about five
HTTP requests per cmdlet: is_alive, Command, Receive x2, Signal).
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import sys
import tempfile
import time
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
from vezaprovisioner.provisioning import CreateEmail, Provisioner

USER, PASSWORD = "svc-bench@contoso.com", "bench-password"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--delay-ms", type=float, default=150.0)
    args = parser.parse_args()

    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(tls)
    simulated = SimulatedExchange(
        parse_directory(plain_users(args.iterations + 1)), clock=FakeClock()
    )
    with (
        tempfile.TemporaryDirectory() as scratch,
        FakeExchangeEndpoint(simulated, username=USER, password=PASSWORD, tls=tls) as endpoint,
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
            settings.remote,
            settings.exchange,
            RemoteCredentials(USER, PASSWORD),
            clock=SystemClock(),
        )
        provisioner = Provisioner(settings, remote, SystemClock())
        endpoint.delay_seconds = args.delay_ms / 1000

        started = time.perf_counter()
        provisioner.create_email(CreateEmail("CONTOSO\\bench0"))  # opens the pool: the cold call
        cold = time.perf_counter() - started

        totals: list[float] = []
        overheads: list[float] = []
        for n in range(1, args.iterations + 1):
            before = len(endpoint.commands)
            started = time.perf_counter()
            result = provisioner.create_email(CreateEmail(f"CONTOSO\\bench{n}"))
            elapsed = time.perf_counter() - started
            assert result.status == "created", result
            cmdlets = len(endpoint.commands) - before
            totals.append(elapsed)
            overheads.append(elapsed - cmdlets * endpoint.delay_seconds)
        remote.close()

    cmdlets_per_request = cmdlets
    per_cmdlet = [o / cmdlets_per_request for o in overheads]
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
    print(f"cold first request (opens the pool): {cold * 1000:.1f} ms")


if __name__ == "__main__":
    main()

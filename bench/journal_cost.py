"""What the journal costs per CREATE_EMAIL: the same flow with and without it, in one run.

    .venv/bin/python bench/journal_cost.py [--requests 400] [--latency-ms 0]
    .venv/bin/python bench/journal_cost.py --cpu [--requests 2000] [--repeats 3]

Each variant provisions `--requests` distinct users (so every request takes the full path:
received; claim + running + enable_sent; Enable-Mailbox; created + release) against a simulated
Exchange whose cmdlets take `--latency-ms`, at concurrency 1 and 16 (threads, as the API's
thread pool runs them). "without" is the flow with the in-process claim only; "with" adds the
SQLite journal and its cross-process claim, with synchronous=full (the default) and normal.
Prints per-request wall time (total time / requests) and latency percentiles; the journal's
cost is the difference. Numbers depend on the disk: run it on the Exchange server's data_dir.

`--cpu` measures what the wall time hides on a busy machine: the process's CPU time per request
and its voluntary context switches per request (summed over /proc/self/task/*/status, so Linux
only), at 1 and 8 threads, for "without", "with/full" and "services" — the flow exactly as the
server builds it (`build_services`: journal with synchronous=full, audit trail, metrics, timed
Exchange). Cells run interleaved `--repeats` times; medians are printed with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_directory import plain_users

from vezaprovisioner.clock import SystemClock
from vezaprovisioner.config import JournalSettings, Settings
from vezaprovisioner.exchange.simulated.directory import parse_directory
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange
from vezaprovisioner.journal.claims import InProcessClaims, JournalClaims
from vezaprovisioner.journal.records import Journal, RequestContext
from vezaprovisioner.provisioning import CreateEmail, Provisioner
from vezaprovisioner.services import build_services


def build(
    variant: str, users: int, latency_ms: int, data_dir: Path, *, open_journal: bool = False
) -> tuple[Provisioner, Callable[[], None]]:
    """The flow for `variant` ("without" or "with/<synchronous>") and what closes it; with
    `open_journal`, the journal file is created now rather than by the first request."""
    clock = SystemClock()
    exchange = SimulatedExchange(
        parse_directory(plain_users(users)), clock=clock, latency_ms=latency_ms
    )
    settings = Settings.model_validate({"data_dir": str(data_dir), "not_found_retry_seconds": 0})
    if variant == "without":
        return Provisioner(settings, exchange, clock), lambda: None
    if variant == "services":  # as the server builds it: journal (full), audit, metrics
        directory = data_dir / "directory.json"
        directory.write_text(json.dumps(plain_users(users)))
        settings = Settings.model_validate(
            {
                "data_dir": str(data_dir),
                "not_found_retry_seconds": 0,
                "simulated": {"directory": str(directory), "latency_ms": latency_ms},
            }
        )
        services = build_services(settings)
        if open_journal:
            services.journal.check_writable()
        return services.provisioner, services.journal.close
    journal_settings = JournalSettings(synchronous=variant.removeprefix("with/"))  # type: ignore[arg-type]
    journal = Journal(data_dir, journal_settings)
    claims = JournalClaims(journal, journal_settings, clock, InProcessClaims())
    if open_journal:
        journal.check_writable()
    return Provisioner(settings, exchange, clock, claims=claims, journal=journal), journal.close


def timed_create(provisioner: Provisioner, i: int) -> float:
    """CREATE_EMAIL for the directory's new user `bench{i}`; its wall time in seconds."""
    started = time.perf_counter()
    context = RequestContext(f"bench-{i}", "bench", "none", "127.0.0.1")
    result = provisioner.create_email(CreateEmail(identity=f"CONTOSO\\bench{i}"), context)
    assert result.status == "created"
    return time.perf_counter() - started


def run(variant: str, requests: int, concurrency: int, latency_ms: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="journal-bench-") as folder:
        provisioner, close = build(variant, requests, latency_ms, Path(folder))
        latencies: list[float] = []

        def one(i: int) -> None:
            latencies.append(timed_create(provisioner, i))

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, range(requests)))
        elapsed = time.perf_counter() - started
        close()
    latencies.sort()
    return {
        "per_request_ms": elapsed / requests * 1000,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


def voluntary_switches() -> int:
    """Voluntary context switches of every live thread of this process so far."""
    total = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
    return total


def cpu_run(variant: str, requests: int, threads: int, latency_ms: int) -> tuple[float, float]:
    """(CPU ms per request, voluntary context switches per request) of `requests` CREATE_EMAIL
    at `threads`, after a warm-up; the pool's threads are counted while they still live."""
    warm = 50
    with tempfile.TemporaryDirectory(prefix="journal-cpu-") as folder:
        provisioner, close = build(variant, warm + requests, latency_ms, Path(folder))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda i: timed_create(provisioner, i), range(warm)))
            cpu, switches = time.process_time(), voluntary_switches()
            list(pool.map(lambda i: timed_create(provisioner, i), range(warm, warm + requests)))
            cpu, switches = time.process_time() - cpu, voluntary_switches() - switches
        close()
    return cpu / requests * 1000, switches / requests


def cpu_main(args: argparse.Namespace) -> None:
    variants = ("without", "with/full", "services")
    cells = [(threads, variant) for threads in (1, 8) for variant in variants]
    results: dict[tuple[int, str], list[tuple[float, float]]] = {cell: [] for cell in cells}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for threads, variant in cells:
            results[threads, variant].append(
                cpu_run(variant, args.requests, threads, args.latency_ms)
            )
        loads.append(os.getloadavg()[0])
    print(
        f"{args.requests} CREATE_EMAIL per cell, simulated cmdlet latency {args.latency_ms} ms, "
        f"median of {args.repeats} interleaved runs, load average (1 min) "
        f"{min(loads):.2f}-{max(loads):.2f}"
    )
    print("| threads | flow | CPU ms/request | voluntary context switches/request |")
    print("|---:|---|---:|---:|")
    for threads, variant in cells:
        runs = results[threads, variant]
        cpu = statistics.median(r[0] for r in runs)
        switches = statistics.median(r[1] for r in runs)
        print(f"| {threads} | {variant} | {cpu:.3f} | {switches:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=None, help="400 (--cpu: 2000)")
    parser.add_argument("--latency-ms", type=int, default=0, help="simulated cmdlet latency")
    parser.add_argument("--cpu", action="store_true", help="CPU and context switches per request")
    parser.add_argument("--repeats", type=int, default=3, help="--cpu: interleaved runs per cell")
    args = parser.parse_args()
    if args.cpu:
        args.requests = args.requests or 2000
        cpu_main(args)
        return
    args.requests = args.requests or 400
    variants = ("without", "with/full", "with/normal")
    print(f"{args.requests} CREATE_EMAIL per cell, simulated cmdlet latency {args.latency_ms} ms")
    print("| concurrency | journal | wall ms/request | p50 ms | p99 ms | journal cost ms/request |")
    print("|---:|---|---:|---:|---:|---:|")
    for concurrency in (1, 16):
        baseline = 0.0
        for variant in variants:
            numbers = run(variant, args.requests, concurrency, args.latency_ms)
            if variant == "without":
                baseline = numbers["per_request_ms"]
            cost = numbers["per_request_ms"] - baseline
            print(
                f"| {concurrency} | {variant} | {numbers['per_request_ms']:.2f} "
                f"| {numbers['p50_ms']:.2f} | {numbers['p99_ms']:.2f} "
                f"| {'—' if variant == 'without' else f'{cost:+.2f}'} |"
            )


if __name__ == "__main__":
    main()

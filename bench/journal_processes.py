"""Two worker processes sharing one journal against two with a journal each (as IIS runs them).

Each process runs the real flow (`Provisioner` with the SQLite journal and its cross-process
claim) over its own simulated Exchange with `--latency-ms` cmdlets, `--requests` distinct new
users at `--concurrency` threads. The two processes provision different users (the first
bench0, bench1, …, the second the next `--requests`), as two IIS workers serving different
onboarding requests do. Both start together (forked, released by a barrier); the result is the
total throughput of the pair and each request's latency. "shared" points both at one data_dir,
"separate" gives each its own; the ratio shared/separate is what sharing the file costs. Runs
alternate `--repeats` times; medians are printed, with the ratio of each shared run to the
separate run just before it and the load average (runs of one invocation spread by about ±0.1
even on a quiet machine: read the median). Bounded; no network.

Until 2026-11-29 both processes provisioned the same users in the same order: with one shared
journal nearly every request met the other process's claim and Enable-* for its user, waited
for the claim and read the user again (1,197 Get-User for 600 requests in one process). That
measured two processes racing for the same 600 users, not what sharing the file costs.

    .venv/bin/python bench/journal_processes.py [--requests 600] [--concurrency 8]
        [--latency-ms 5] [--synchronous full] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.synchronize import Barrier
from pathlib import Path

from journal_cost import build, timed_create


def worker(
    data_dir: str,
    first_user: int,
    args: argparse.Namespace,
    start: Barrier,
    results: multiprocessing.Queue[tuple[float, float, list[float]]],
) -> None:
    provisioner, close = build(
        f"with/{args.synchronous}",
        first_user + args.requests,
        args.latency_ms,
        Path(data_dir),
        open_journal=True,  # the file exists before the clock starts
    )
    latencies: list[float] = []

    def one(i: int) -> None:
        latencies.append(timed_create(provisioner, i))

    start.wait(60)
    began = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, range(first_user, first_user + args.requests)))
    ended = time.perf_counter()
    close()
    results.put((began, ended, latencies))


def pair(shared: bool, args: argparse.Namespace) -> tuple[float, float, float]:
    """(requests/s of both, p50 ms, p99 ms)."""
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="journal-procs-") as folder:
        dirs = [folder] * 2 if shared else [f"{folder}/a", f"{folder}/b"]
        start = context.Barrier(2)
        results: multiprocessing.Queue[tuple[float, float, list[float]]] = context.Queue()
        processes = [
            context.Process(target=worker, args=(d, n * args.requests, args, start, results))
            for n, d in enumerate(dirs)
        ]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=600) for _ in processes]
        for process in processes:
            process.join(60)
    began = min(o[0] for o in outcomes)
    ended = max(o[1] for o in outcomes)
    latencies = sorted(x for o in outcomes for x in o[2])
    quantiles = statistics.quantiles(latencies, n=100)
    return len(latencies) / (ended - began), quantiles[49] * 1000, quantiles[98] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="per process")
    parser.add_argument("--concurrency", type=int, default=8, help="threads per process")
    parser.add_argument("--latency-ms", type=int, default=5)
    parser.add_argument("--synchronous", choices=("full", "normal"), default="full")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float, float]]] = {"separate": [], "shared": []}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name in ("separate", "shared"):
            runs[name].append(pair(name == "shared", args))
        loads.append(os.getloadavg()[0])
    print(
        f"2 processes x {args.requests} CREATE_EMAIL at {args.concurrency} threads each, "
        f"cmdlets {args.latency_ms} ms, synchronous={args.synchronous}, "
        f"median of {args.repeats} alternating runs, load average (1 min) "
        f"{min(loads):.2f}-{max(loads):.2f}"
    )
    print()
    print("| journal | req/s (both) | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    medians = {}
    for name, results in runs.items():
        rate, p50, p99 = sorted(results)[len(results) // 2]
        medians[name] = rate
        print(f"| {name} | {rate:.0f} | {p50:.1f} | {p99:.1f} |")
    print()
    pairs = [s[0] / p[0] for s, p in zip(runs["shared"], runs["separate"], strict=True)]
    print(f"shared / separate = {medians['shared'] / medians['separate']:.2f}")
    print(f"per run: {' '.join(f'{r:.2f}' for r in pairs)}")


if __name__ == "__main__":
    main()

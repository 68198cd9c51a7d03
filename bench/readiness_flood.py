"""Prints what a flood of anonymous GET /health/ready costs the service.

`/health/ready` needs no credentials, and each run of its checks costs a backend probe and a
journal write transaction (an fsync with `synchronous = "full"`). The service runs the checks
once at a time and lets the public endpoint reuse a run up to `readiness_cache_seconds` old
(api/readiness.py). This starts `vezaprovisioner serve` on 127.0.0.1 (simulated Exchange at 0 ms,
100 users, the journal on the same disk with `synchronous = "full"`, a log file) once per value
of `readiness_cache_seconds` asked for, floods `/health/ready` from wrk (Debian package `wrk`)
with `--concurrency` connections for `--seconds`, interleaved `--repeats` times, and prints each
run: requests/s, p50, p99 and the server's CPU time per call (from /proc, Linux). Bounded:
127.0.0.1 only, `--seconds` per run.

    .venv/bin/python bench/readiness_flood.py [--cache 2,0] [--seconds 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from api_overhead import Server, product, wrk_run

READY = "/health/ready"


def server(folder: Path, cache: str) -> Server:
    # "shipped" writes no key: the default, and a checkout from before the key existed runs too.
    key = "" if cache == "shipped" else f"readiness_cache_seconds = {cache}\n"
    name = "as shipped (2 s)" if cache == "shipped" else f"readiness_cache_seconds = {cache}"
    return product(folder, "full", 100, top=key, name=name)


def flood(wrk: str, target: Server, seconds: int, concurrency: int) -> str:
    url = target.base + READY
    run, _ = wrk_run(wrk, target.process.pid, url, seconds, concurrency)
    return (
        f"| {target.name} | {run.rate:.0f} | {run.p50_ms:.1f} | {run.p99_ms:.1f} "
        f"| {run.cpu_ms:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="shipped,0", help="values of readiness_cache_seconds")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        targets = [server(Path(tmp) / str(i), c) for i, c in enumerate(args.cache.split(","))]
        try:
            for _ in range(args.repeats):
                for target in targets:  # interleaved: each sees the same background
                    rows.append(flood(wrk, target, args.seconds, args.concurrency))
        finally:
            for target in targets:
                target.stop()
    print(
        f"GET /health/ready without credentials from wrk, {args.concurrency} connections, "
        f"{args.seconds} s per run; simulated Exchange, journal synchronous = full; load average "
        f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} at the end"
    )
    print()
    print("| server | calls/s | p50 ms | p99 ms | server CPU ms/call |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Benchmark: CREATE_EMAIL under IIS's process model, through the real wfastcgi 3.0.0.

Starts N FastCGI processes as IIS does with maxInstances = N (tests/harness/: the unmodified
wfastcgi.py, only ctypes.windll stubbed), each reading the shipped web.config and serving the
service with `backend = "local"` over the fake PowerShell (tests/fakes/powershell.py) with
IIS's default of one warm host per process and a 150 ms cmdlet. Each process is warmed through
/warmup (Application Initialization's page), then N client threads play IIS's dispatch: a
request goes to an idle process, one request per process at a time. It prints throughput,
p50/p99 latency, cmdlet calls per request (from the fake's log) and the efficiency against the
ceiling N / (cmdlet calls per request x cmdlet time).

    .venv/bin/python bench/iis_wfastcgi.py                       # the README's figures
    .venv/bin/python bench/iis_wfastcgi.py --processes 2 --requests 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the harness lives in tests/

from bench_directory import plain_users
from tests.harness.iis import BASE, IisSite, WfastcgiProcess, get, post

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fakes" / "powershell.py"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(processes: int, requests: int, cmdlet_ms: int, connect_seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="vzp-bench-iis-") as tmp:
        work = Path(tmp)
        (work / "RemoteExchange.ps1").write_text("# stand-in\n")
        (work / "directory.json").write_text(json.dumps(plain_users(requests)))
        config = work / "vezaprovisioner.toml"
        config.write_text(
            "backend = 'local'\n"
            f"data_dir = '{work / 'data'}'\n"
            "[exchange]\n"
            f"powershell_path = '{FAKE}'\n"
            f"remote_exchange_path = '{work / 'RemoteExchange.ps1'}'\n"
            "[auth]\nmode = 'iis'\n",
            encoding="utf-8",
        )
        site = IisSite.create(work / "app", config)
        env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "TMPDIR": str(work),
            "VZP_FAKE_DIRECTORY": str(work / "directory.json"),
            "VZP_FAKE_STATE": str(work / "forest.json"),
            "VZP_FAKE_LOG": str(work / "fake-log.jsonl"),
            "VZP_FAKE_CONNECT_SECONDS": str(connect_seconds),
            "VZP_FAKE_LATENCY_MS": str(cmdlet_ms),
        }
        fastcgi: list[WfastcgiProcess] = [site.start(env) for _ in range(processes)]
        try:
            for process in fastcgi:  # Application Initialization warms the first; IIS's
                # dispatch would warm the others on their first request: warm them all here.
                warm = process.request(get(f"{BASE}/warmup", user=None, https=False))
                assert warm.status == 204, warm.body
            cpu_before = sum(cpu_seconds(p.pid) for p in fastcgi)
            latencies: list[float] = []
            failures = 0
            lock = threading.Lock()
            next_index = iter(range(requests))

            def serve(process: WfastcgiProcess) -> None:
                nonlocal failures
                while True:
                    with lock:
                        index = next(next_index, None)
                    if index is None:
                        return
                    started = time.perf_counter()
                    reply = process.request(
                        post(f"{BASE}/api/v1/emails", {"identity": f"bench{index}"})
                    )
                    elapsed = time.perf_counter() - started
                    with lock:
                        latencies.append(elapsed)
                        failures += reply.status != 201

            threads = [threading.Thread(target=serve, args=(p,)) for p in fastcgi]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - started
            cpu = sum(cpu_seconds(p.pid) for p in fastcgi) - cpu_before
        finally:
            for process in fastcgi:
                process.close_pipe()
            for process in fastcgi:
                process.wait(60)
        log = (work / "fake-log.jsonl").read_text(encoding="utf-8").splitlines()
        calls = sum(1 for line in log if '"event": "call"' in line)
        starts = sum(1 for line in log if '"event": "start"' in line)
    ordered = sorted(latencies)
    per_request = calls / requests
    throughput = requests / seconds
    ceiling = processes / (per_request * cmdlet_ms / 1000)
    return {
        "processes": processes,
        "requests": requests,
        "failures": failures,
        "hosts_started": starts,
        "seconds": seconds,
        "throughput": throughput,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000,
        "calls_per_request": per_request,
        "ceiling": ceiling,
        "efficiency": throughput / ceiling,
        "cpu_ms_per_request": cpu / requests * 1000,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4, help="FastCGI maxInstances")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--cmdlet-ms", type=int, default=150)
    parser.add_argument("--connect-seconds", type=float, default=1.0)
    args = parser.parse_args()
    row = run(args.processes, args.requests, args.cmdlet_ms, args.connect_seconds)
    print(
        "| processes (maxInstances) | pool_size | requests | failed | hosts started | req/s "
        "| p50 ms | p99 ms | cmdlets/request | ceiling req/s | efficiency | CPU ms/request |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {row['processes']:.0f} | 1 | {row['requests']:.0f} | {row['failures']:.0f} "
        f"| {row['hosts_started']:.0f} | {row['throughput']:.2f} | {row['p50_ms']:.0f} "
        f"| {row['p99_ms']:.0f} | {row['calls_per_request']:.2f} | {row['ceiling']:.2f} "
        f"| {row['efficiency']:.2f} | {row['cpu_ms_per_request']:.0f} |"
    )
    print(f"load average (1 min) at the end: {row['load']:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()

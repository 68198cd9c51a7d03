"""How long importing the service takes in a fresh interpreter (what IIS pays per worker start).

Each measurement is a new Python process that times `import <module>` (wall time with
perf_counter, and the process's CPU time, which other load on the machine disturbs less) and
reports whether pypsrp (the remote backend's client) was loaded. The modules: the app factory
(`vezaprovisioner.api.app`) and the IIS entry point wfastcgi loads
(`vezaprovisioner.iis_entry`). Runs are interleaved; the median and the fastest are printed.

    .venv/bin/python bench/import_time.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

#: The app factory, the IIS entry point, and what backend = "remote" adds (loaded only then).
MODULES = (
    "vezaprovisioner.api.app",
    "vezaprovisioner.iis_entry",
    "vezaprovisioner.exchange.remote",
)
_CHILD = """
import json, sys, time
started, cpu = time.perf_counter(), time.process_time()
__import__(sys.argv[1])
elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
print(json.dumps({"seconds": elapsed, "cpu": cpu, "pypsrp": "pypsrp" in sys.modules}))
"""


def measure(module: str) -> tuple[float, float, bool]:
    out = subprocess.run(  # noqa: S603 - this interpreter, constant arguments
        [sys.executable, "-c", _CHILD, module],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    result = json.loads(out)
    return float(result["seconds"]), float(result["cpu"]), bool(result["pypsrp"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {module: [] for module in MODULES}
    cpu: dict[str, list[float]] = {module: [] for module in MODULES}
    loaded: dict[str, bool] = {}
    for _ in range(args.runs):
        for module in MODULES:
            seconds, cpu_seconds, pypsrp = measure(module)
            times[module].append(seconds)
            cpu[module].append(cpu_seconds)
            loaded[module] = pypsrp
    print(f"import time in a fresh interpreter, {args.runs} interleaved runs each")
    print()
    print("| module | wall median | wall fastest | CPU median | pypsrp loaded |")
    print("|---|---:|---:|---:|---|")
    for module in MODULES:
        print(
            f"| `{module}` | {statistics.median(times[module]) * 1000:.0f} ms "
            f"| {min(times[module]) * 1000:.0f} ms "
            f"| {statistics.median(cpu[module]) * 1000:.0f} ms "
            f"| {'yes' if loaded[module] else 'no'} |"
        )


if __name__ == "__main__":
    main()

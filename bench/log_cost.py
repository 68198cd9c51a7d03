"""What a log line and an audit line cost the thread that serves the request, in one run.

    .venv/bin/python bench/log_cost.py [--records 20000] [--threads 8]

"before" rebuilds the setup the service had until 2026-11-29 (a RotatingFileHandler with the
JSON formatter on the logging thread: formatted twice, two stat calls per record for rollover,
written under the handler's lock); "after" is logs.configure_logging (a QueueHandler: the
writer thread formats once and writes). Each variant logs `--records` access-log-shaped records
from `--threads` threads into a file in a temporary folder and prints the time the logging
threads spent per record (median and p99 of per-call time, and wall time / records), then the
time until everything is on disk. The audit rows time `AuditTrail.write`, which waits until its
line is written and flushed (before: a RotatingFileHandler write on the calling thread).
Numbers depend on the disk: run it on the Exchange server's data_dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vezaprovisioner import logs
from vezaprovisioner.audit import AuditEvent, AuditTrail
from vezaprovisioner.config import AuditSettings, Settings

FIELDS = {
    "event.action": "request",
    "http.request.id": "6a1f0d1e-8d1c-4bd5-a0f5-0c1b2e3d4f5a",
    "user.name": "veza-svc",
    "http.request.method": "POST",
    "http.route": "/VezaProvisioner/api/v1/emails",
    "url.path": "/VezaProvisioner/api/v1/emails",
    "http.response.status_code": 201,
    "event.duration": 4_200_000,
    "client.address": "10.0.0.5",
}


class OldJsonFormatter(logging.Formatter):
    """The formatter logs.py had before (datetime + json.dumps, on the logging thread)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        return json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":"))


def timed(call: Callable[[int], None], records: int, threads: int) -> tuple[list[float], float]:
    per_call: list[float] = []
    lock = threading.Lock()

    def work(start: int) -> None:
        mine = []
        for number in range(start, records, threads):
            began = time.perf_counter()
            call(number)
            mine.append(time.perf_counter() - began)
        with lock:
            per_call.extend(mine)

    began = time.perf_counter()
    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return per_call, time.perf_counter() - began


def report(name: str, per_call: list[float], wall: float, done: float, records: int) -> None:
    ordered = sorted(per_call)
    p50 = statistics.median(ordered) * 1e6
    p99 = ordered[int(len(ordered) * 0.99)] * 1e6
    print(
        f"{name:<14} per call p50 {p50:7.1f} µs  p99 {p99:8.1f} µs  "
        f"wall/record {wall / records * 1e6:7.1f} µs  all on disk after {done:6.3f} s"
    )


def log_lines(folder: Path, variant: str, records: int, threads: int) -> None:
    logger = logging.getLogger(f"vezaprovisioner.bench.{variant}")
    logger.propagate = variant == "after"
    if variant == "before":
        handler = logging.handlers.RotatingFileHandler(
            folder / "before.log", maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8"
        )
        handler.setFormatter(OldJsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logs.configure_logging(
            Settings.model_validate({"data_dir": str(folder), "logging": {"file": "after.log"}})
        )

    def one(number: int) -> None:
        logger.info("request finished", extra={"fields": FIELDS})

    began = time.perf_counter()
    per_call, wall = timed(one, records, threads)
    if variant == "before":
        handler.flush()
        handler.close()
    else:
        logs.flush(60)
    report(f"log {variant}", per_call, wall, time.perf_counter() - began, records)


def audit_lines(folder: Path, variant: str, records: int, threads: int) -> None:
    event = AuditEvent(
        "request_finished", "r-1", "veza-svc", "basic", "10.0.0.5", "CREATE_EMAIL",
        "CONTOSO\\jdoe", "john.doe", "created", duration_ms=4,
    )  # fmt: skip
    if variant == "before":
        handler = logging.handlers.RotatingFileHandler(
            folder / "audit-before.jsonl", maxBytes=10 * 1024 * 1024, backupCount=10
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.Logger("bench-audit")
        logger.addHandler(handler)

        def one(number: int) -> None:
            line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
            line.update({k: v for k, v in vars(event).items() if v is not None})
            logger.info(json.dumps(line, ensure_ascii=False, separators=(",", ":")))

    else:
        trail = AuditTrail(folder, AuditSettings())

        def one(number: int) -> None:
            trail.write(event)

    began = time.perf_counter()
    per_call, wall = timed(one, records, threads)
    if variant == "before":
        handler.close()
    else:
        trail.close()
    report(f"audit {variant}", per_call, wall, time.perf_counter() - began, records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for variant in ("before", "after"):
            log_lines(Path(folder), variant, args.records, args.threads)
        for variant in ("before", "after"):
            audit_lines(Path(folder), variant, args.records // 4, args.threads)
        logs.shutdown()


if __name__ == "__main__":
    main()

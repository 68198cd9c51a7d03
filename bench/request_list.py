"""What the request list and the status page cost on a large journal.

    .venv/bin/python bench/request_list.py [--records 100000] [--repeat 20]

Fills a fresh journal (in a temporary folder) with `--records` finished records spread over the
retention period (1 in 10 failed, codes mixed), then times: the first page of
GET /api/v1/requests (50 records), a page deep in the journal (by cursor), a filter on state and
code, a filter on identity, the 24-hour counts, and the whole /status page rendered through the
app. Prints the median and the worst of `--repeat` runs, in milliseconds.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from vezaprovisioner.api.app import create_app
from vezaprovisioner.auth import hash_password
from vezaprovisioner.config import Settings

CODES = ("IDENTITY_NOT_FOUND", "AMBIGUOUS_IDENTITY", "EXCHANGE_TIMEOUT", "WRONG_RECIPIENT_TYPE")


def fill(client: TestClient, records: int) -> None:
    journal = client.app.state.services.journal  # type: ignore[attr-defined]
    now = journal.now()
    step = 400 * 86_400 / records
    rows = []
    for n in range(records):
        failed = n % 10 == 0
        received = now - (records - n) * step
        rows.append(
            (
                f"bench-{n}",
                "CREATE_EMAIL",
                f"CONTOSO\\user{n % 5000}",
                "veza-svc",
                "basic",
                "failed" if failed else "created",
                received,
                received,
                received + 0.2,
                200,
                CODES[n % len(CODES)] if failed else None,
                "what happened; what to do" if failed else None,
            )
        )
    with journal.transaction("bench fill") as db:
        db.executemany(
            "INSERT INTO requests (request_id, action, identity, caller, caller_method, state,"
            " received_at, updated_at, finished_at, duration_ms, code, detail, recovered,"
            " owner_host, owner_pid, owner_token)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 'bench', 0, 'bench')",
            rows,
        )


def timed(label: str, repeat: int, call: Callable[[], object]) -> None:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    print(f"{label:<40} median {statistics.median(times):8.2f} ms   worst {max(times):8.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        password = "bench-password"  # noqa: S105 - a throwaway local user
        settings = Settings.model_validate(
            {
                "backend": "simulated",
                "data_dir": folder,
                "simulated": {"directory": str(Path("examples/directory.json").resolve())},
                "auth": {"mode": "basic", "users": {"bench": hash_password(password)}},
                "logging": {"file": str(Path(folder) / "service.log")},
            }
        )
        token = base64.b64encode(f"bench:{password}".encode()).decode()
        headers = {"Authorization": f"Basic {token}"}
        with TestClient(create_app(settings), headers=headers) as client:
            fill(client, args.records)
            base = "/VezaProvisioner/api/v1/requests"
            deep = client.get(base, params={"limit": 500}).json()["next_cursor"]
            for _ in range(20):  # 10,000 records down
                deep = client.get(base, params={"limit": 500, "cursor": deep}).json()["next_cursor"]
            print(f"journal of {args.records} records, {args.repeat} runs each")
            timed("list: first page (50)", args.repeat, lambda: client.get(base))
            timed(
                "list: page 10,000 records down",
                args.repeat,
                lambda: client.get(base, params={"cursor": deep}),
            )
            timed(
                "list: state=failed&code=EXCHANGE_TIMEOUT",
                args.repeat,
                lambda: client.get(base, params={"state": "failed", "code": "EXCHANGE_TIMEOUT"}),
            )
            timed(
                "list: identity=CONTOSO\\user42",
                args.repeat,
                lambda: client.get(base, params={"identity": "CONTOSO\\user42"}),
            )
            timed(
                "/status (whole page)", args.repeat, lambda: client.get("/VezaProvisioner/status")
            )


if __name__ == "__main__":
    main()

"""What the app costs per CREATE_EMAIL without HTTP: instructions (callgrind) and CPU time.

    .venv/bin/python bench/app_cost.py [--requests 250]          # instructions, needs valgrind
    .venv/bin/python bench/app_cost.py --cpu [--requests 2000]   # CPU time, one run each

Drives the ASGI app in process (no socket, no uvicorn, no h11), one request at a time, with a
request shaped as the platform sends it (Basic auth, JSON body, a new user each time) against
the simulated Exchange at 0 ms, the journal on disk (`synchronous = "normal"`, so fsyncs do not
count) and the log file, exactly as `create_app` builds it. Three variants:

* `product`: everything a CREATE_EMAIL does;
* `app layer`: the same app with the flow replaced by a canned result (middleware, FastAPI,
  authentication, logs, metrics, the response; no journal, no Exchange, no thread hop);
* `bare`: bench/bare_endpoint.py, the baseline of bench/api_overhead.py.

Instructions are counted by valgrind's callgrind, which counts what the CPU executes, not time:
the same figure whatever else the machine is doing (it does not count the kernel's work or what
contention costs, which is what `--cpu` and bench/api_overhead.py show). Each variant runs twice
under callgrind, with `--requests` and with 50 requests, and the difference divided by the
difference in requests is printed, so start-up (imports, the directory, the first scrypt check)
cancels out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = ("product", "app layer", "bare")
FEW = 50


def build(variant: str, folder: Path, users: int) -> Any:
    """The ASGI app of `variant`, its data in `folder`."""
    if variant == "bare":
        from bare_endpoint import app

        return app
    from bench_directory import plain_users

    from vezaprovisioner.api.app import create_app
    from vezaprovisioner.auth import hash_password
    from vezaprovisioner.config import Settings
    from vezaprovisioner.provisioning import MailboxResult

    (folder / "dir.json").write_text(json.dumps(plain_users(users)))
    settings = Settings.model_validate(
        {
            "backend": "simulated",
            "data_dir": str(folder),
            "simulated": {"directory": str(folder / "dir.json")},
            "journal": {"synchronous": "normal"},
            "logging": {"file": "service.log"},
            "auth": {"mode": "basic", "users": {"bench": hash_password("bench-password")}},
        }
    )
    app = create_app(settings)
    if variant == "app layer":
        canned = MailboxResult(
            status="created",
            identity="bench",
            guid="00000000-0000-0000-0000-000000000001",
            distinguished_name="CN=bench,DC=contoso,DC=com",
            alias="bench",
            primary_smtp_address="bench@contoso.com",
            recipient_type_details="UserMailbox",
            database="DB01",
        )
        services = app.state.services
        services.provisioner.create_email = lambda command, context: canned

        async def inline(call: Any) -> Any:
            return call()

        services.flows.run = inline
    return app


async def one(app: Any, user: int) -> None:
    body = json.dumps({"identity": f"bench{user}"}).encode()
    path = "/VezaProvisioner/api/v1/emails"
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"authorization", b"Basic " + base64.b64encode(b"bench:bench-password")),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect while the request runs
        raise AssertionError("unreachable")

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    assert statuses == [201], statuses


def run_child(variant: str, requests: int) -> None:
    """Warms up, then serves `requests` CREATE_EMAILs; prints CPU ms per request."""
    with tempfile.TemporaryDirectory() as tmp:
        app = build(variant, Path(tmp), requests + 20)

        async def serve() -> float:
            for user in range(requests, requests + 10):
                await one(app, user)
            started = time.process_time()
            for user in range(requests):
                await one(app, user)
            return time.process_time() - started

        cpu = asyncio.run(serve())
        if hasattr(app.state, "services"):
            app.state.services.close()
    print(json.dumps({"cpu_ms": cpu * 1000 / requests}))


def instructions(valgrind: str, variant: str, requests: int) -> int:
    """Instructions executed by a child serving `requests`, counted by callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        result = subprocess.run(  # noqa: S603 - valgrind and our interpreter, fixed arguments
            [
                valgrind,
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--child",
                variant,
                "--requests",
                str(requests),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:  # say why: under valgrind a child runs some 50 times slower
            sys.exit(f"the {variant!r} child failed under callgrind:\n{result.stderr[-4000:]}")
        collected = re.search(r"Collected : (\d+)", result.stderr)
        assert collected, result.stderr[-2000:]
        return int(collected[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=250)
    parser.add_argument("--cpu", action="store_true", help="CPU time instead of instructions")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.requests)
        return
    if args.cpu:
        print("| variant | CPU ms per CREATE_EMAIL (in process, no HTTP) |")
        print("|---|---:|")
        for variant in VARIANTS:
            child = subprocess.run(  # noqa: S603 - our interpreter, fixed arguments
                [sys.executable, __file__, "--child", variant, "--requests", str(args.requests)],
                capture_output=True,
                text=True,
                check=True,
            )
            print(f"| {variant} | {json.loads(child.stdout.splitlines()[-1])['cpu_ms']:.2f} |")
        return
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind); or use --cpu")
    print(
        f"instructions per CREATE_EMAIL in process (callgrind, {args.requests} - {FEW} requests; "
        f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}, which does not matter)"
    )
    print()
    print("| variant | instructions per request | of bare |")
    print("|---|---:|---:|")
    counts = {}
    for variant in VARIANTS:
        many = instructions(valgrind, variant, args.requests)
        few = instructions(valgrind, variant, FEW)
        counts[variant] = (many - few) / (args.requests - FEW)
    for variant in VARIANTS:
        ratio = counts[variant] / counts["bare"]
        print(f"| {variant} | {counts[variant] / 1e6:.2f} M | {ratio:.1f} x |")


if __name__ == "__main__":
    main()

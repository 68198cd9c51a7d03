"""A real server process for end-to-end tests: the service's own app factory under uvicorn,
over the `SharedSimulatedExchange`, so several processes act on one simulated Exchange.

    python -m tests.fakes.server --config FILE --state-dir DIR [--land after_delay|before_reply]
        [--enable-slots N]

It binds 127.0.0.1 on a free port and prints `port <n>` on stdout before serving. The slow
Enable-* delay is the configuration's `simulated.enable_latency_ms`.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import uvicorn

from tests.fakes.shared_exchange import SharedSimulatedExchange
from vezaprovisioner.api.app import create_app
from vezaprovisioner.config import load_settings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--land", choices=("after_delay", "before_reply"), default="after_delay")
    parser.add_argument("--enable-slots", type=int, default=None)
    args = parser.parse_args()
    settings = load_settings(args.config)
    exchange = SharedSimulatedExchange(
        settings.simulated.directory,
        args.state_dir,
        enable_delay_seconds=settings.simulated.enable_latency_ms / 1000,
        land=args.land,
        enable_slots=args.enable_slots,
    )
    app = create_app(settings, exchange=exchange)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(f"port {sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

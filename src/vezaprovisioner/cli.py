"""The `vezaprovisioner` command.

Subcommands: serve, check, create-email, journal, probe, hash-password, doctor.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import platform
import re
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path, PureWindowsPath

from . import __version__
from .api.models import RequestRecordResponse
from .auth import hash_password
from .clock import SystemClock
from .config import ConfigError, Settings, load_settings
from .exchange.backends import open_exchange
from .exchange.errors import ExchangeError
from .exchange.local.backend import LocalExchange
from .failures import Failure
from .journal.records import STATES, Journal, RequestContext
from .journal.store import JournalUnavailable
from .provisioning import CreateEmail
from .services import build_services
from .validation import InvalidValue, validate_alias, validate_identity

# Exit codes of `create-email`, so scripts can branch without parsing text.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
#: `serve` cannot listen on --host/--port (in use, not permitted): checked before the app starts.
EXIT_CANNOT_BIND = 4


def _settings(args: argparse.Namespace) -> Settings:
    path: Path | None = args.config
    return load_settings(path)


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening (OSError when the address cannot be used)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on accepted sockets whose
    # proto says TCP, and without it uvicorn's h11 protocol (headers and body written apart)
    # waits for the client's delayed ACK, about 40 ms a response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _serve(args: argparse.Namespace) -> int:
    from .api.app import create_app
    from .standalone import serve

    settings = _settings(args)
    try:  # before the app (and a backend's PowerShell hosts) start
        sock = listening_socket(args.host, args.port)
    except OSError as exc:
        print(
            f"cannot bind {args.host}:{args.port}: {exc.strerror or exc}. Another program "
            "(another demo?) may be using the port: stop it or pass --port with a free port.",
            file=sys.stderr,
        )
        return EXIT_CANNOT_BIND
    port = sock.getsockname()[1]
    app = create_app(settings)
    print(
        f"VezaProvisioner {__version__}: {settings.backend} backend, "
        f"http://{args.host}:{port}{settings.base_path}",
        file=sys.stderr,
    )
    serve(app, settings.server, host=args.host, port=port, log_level=args.log_level, sock=sock)
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    """Validates without starting a process or opening an Exchange session (unlike services:
    backend = "local" would start PowerShell hosts); `doctor` and `probe` make the live checks."""
    settings = _settings(args)
    if settings.backend in ("simulated", "remote"):
        # Built without side effects: simulated loads its directory file; remote checks its
        # credentials in the environment and connects only on the first command.
        open_exchange(settings, SystemClock()).close()
    journal = Journal(settings.data_dir, settings.journal)
    try:
        status = journal.check_writable()
    except JournalUnavailable as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        journal.close()
    print(json.dumps(settings.masked(), indent=2))
    for warning in path_warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"configuration OK ({settings.source}); journal {status}", file=sys.stderr)
    return EXIT_OK


def path_warnings(settings: Settings, *, on_windows: bool = os.name == "nt") -> list[str]:
    """The configured files this machine lacks; off Windows, Windows paths cannot be checked."""
    paths = {
        "exchange.powershell_path": settings.exchange.powershell_path,
        "exchange.remote_exchange_path": settings.exchange.remote_exchange_path,
    }
    if settings.remote.ca_bundle is not None:
        paths["remote.ca_bundle"] = str(settings.remote.ca_bundle)
    warnings = []
    unchecked = []
    for key, value in paths.items():
        windows_only = PureWindowsPath(value).drive != ""
        if windows_only and not on_windows:
            unchecked.append(key)
        elif not Path(value).is_file():
            warnings.append(f"{key} {value!r} does not exist on this machine")
    if unchecked:
        warnings.append(
            f"this machine is not Windows ({platform.system() or sys.platform}), so "
            f"{' and '.join(unchecked)} cannot be checked here; run `vezaprovisioner check` "
            "on the Exchange server"
        )
    return warnings


def _report_problem(exc: Failure) -> int:
    """Prints the problem's code, detail and what Exchange said, as the API would; exit 1."""
    report: dict[str, object] = {"code": exc.code, "detail": exc.detail}
    if isinstance(exc, ExchangeError) and exc.from_exchange:
        report["exchange"] = {
            "reason": exc.reason,
            "error_id": exc.error_id,
            "message": exc.message,
        }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return EXIT_FAILED


def _create_email(args: argparse.Namespace) -> int:
    try:
        identity = validate_identity(args.identity)
        alias = validate_alias(args.alias) if args.alias else None
    except InvalidValue as exc:
        print(f"invalid input: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    services = build_services(_settings(args))
    try:
        result = services.provisioner.create_email(
            CreateEmail(identity=identity, alias=alias), _cli_context()
        )
    except Failure as exc:
        return _report_problem(exc)
    finally:
        services.close()
    print(json.dumps(asdict(result), indent=2, ensure_ascii=False))
    return EXIT_OK


def _cli_context() -> RequestContext:
    """The journal's "who": the account that ran the command on this machine."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "(unknown local user)"
    return RequestContext(
        request_id=str(uuid.uuid4()), caller=user, caller_method="cli", client_address="local"
    )


_SINCE = re.compile(r"^(\d+)([smhdw])$")
_SINCE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_since(text: str) -> float:
    """`30m`, `12h`, `1d`, `2w` as seconds (for `journal --since`)."""
    match = _SINCE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: use a number and s, m, h, d or w, like 1d")
    return int(match.group(1)) * _SINCE_SECONDS[match.group(2)]


def _journal(args: argparse.Namespace) -> int:
    settings = _settings(args)
    journal = Journal(settings.data_dir, settings.journal)
    if not journal.path.exists():
        print(f"no journal yet at {journal.path}", file=sys.stderr)
        return EXIT_OK
    try:
        records = journal.records(
            since=time.time() - args.since if args.since is not None else None,
            identity=args.identity,
            state=args.state,
            limit=args.limit,
        )
    except JournalUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILED
    finally:
        journal.close()
    shown = [RequestRecordResponse.build(r).model_dump(mode="json") for r in records]
    if args.json:
        print(json.dumps(shown, indent=2, ensure_ascii=False))
        return EXIT_OK
    columns = ("received_at", "request_id", "state", "code", "caller", "identity", "duration_ms")
    print("\t".join(columns))
    for row in shown:
        print("\t".join("" if row[c] is None else str(row[c]) for c in columns))
    print(f"{len(shown)} record(s) in {journal.path}", file=sys.stderr)
    return EXIT_OK


def _probe(args: argparse.Namespace) -> int:
    """Start the backend, wait until it is ready or has failed, report; optionally Get-User.

    With --transcript (local backend only) one host starts, and host.ps1 records what
    RemoteExchange.ps1 and Connect-ExchangeServer printed into that file (Start-Transcript).
    """
    try:
        identity = validate_identity(args.identity) if args.identity else None
    except InvalidValue as exc:
        print(f"invalid input: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    settings = _settings(args)
    transcript = str(args.transcript.resolve()) if args.transcript else None
    if transcript is not None and settings.backend != "local":
        print(
            f"--transcript: only the local backend starts PowerShell (backend is "
            f"{settings.backend!r})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    exchange = open_exchange(settings, SystemClock(), transcript=transcript)
    try:
        if isinstance(exchange, LocalExchange):
            exchange.wait_started(settings.local.longest_start_seconds)
        report: dict[str, object] = {"backend": settings.backend, "probe": exchange.probe()}
        if transcript is not None:
            report["transcript"] = transcript
        if identity is not None:
            report["get_user"] = asdict(exchange.get_user(identity))
    except Failure as exc:
        if transcript is not None:
            print(f"transcript: {transcript}", file=sys.stderr)
        return _report_problem(exc)
    finally:
        exchange.close()
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return EXIT_OK


def _hash_password(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat: ") != password:
            print("the passwords differ", file=sys.stderr)
            return EXIT_USAGE
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("the password must not be empty", file=sys.stderr)
        return EXIT_USAGE
    print(hash_password(password))
    return EXIT_OK


def _iis_settings(args: argparse.Namespace) -> int:
    """The FastCGI timeouts IIS needs for this configuration, as JSON (install.ps1 reads it)."""
    from .iis_settings import IisSettingsError, fastcgi_timeouts

    try:
        timeouts = fastcgi_timeouts(_settings(args))
    except IisSettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(timeouts.as_data()))
    return EXIT_OK


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import Doctor, format_report, report_data

    checks = Doctor(config=args.config, identity=args.identity, site=args.site).run()
    if args.json:
        print(json.dumps(report_data(checks), indent=2, ensure_ascii=False))
    else:
        print(format_report(checks))
    return EXIT_FAILED if any(check.status == "fail" for check in checks) else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vezaprovisioner", description="Gives existing AD users an Exchange mailbox."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            help="TOML configuration file (default: $VEZAPROVISIONER_CONFIG)",
        )
        return p

    serve = with_config(commands.add_parser("serve", help="run the HTTP service (uvicorn)"))
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(run=_serve)

    check = with_config(commands.add_parser("check", help="validate and print the configuration"))
    check.set_defaults(run=_check)

    create = with_config(
        commands.add_parser("create-email", help="run CREATE_EMAIL directly, without HTTP")
    )
    create.add_argument("--identity", required=True, help="the user's AD identity")
    create.add_argument("--alias", default=None, help="the Exchange alias (optional)")
    create.set_defaults(run=_create_email)

    listing = with_config(
        commands.add_parser("journal", help="list journal records (newest first)")
    )
    listing.add_argument("--since", type=parse_since, default=None, help="e.g. 30m, 12h, 1d, 2w")
    listing.add_argument("--identity", default=None, help="requested identity or user GUID")
    listing.add_argument("--state", choices=STATES, default=None)
    listing.add_argument("--limit", type=int, default=1000)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=_journal)
    probe = with_config(
        commands.add_parser(
            "probe",
            help="start the backend, report whether it is ready; --identity also runs Get-User",
        )
    )
    probe.add_argument("--identity", default=None, help="an AD identity to read (read-only)")
    probe.add_argument(
        "--transcript",
        type=Path,
        default=None,
        help="local backend: start one host and write what RemoteExchange.ps1 and "
        "Connect-ExchangeServer printed to this file (Start-Transcript)",
    )
    probe.set_defaults(run=_probe)

    hashing = commands.add_parser(
        "hash-password", help="print a hash for [auth.users] (reads stdin when piped)"
    )
    hashing.set_defaults(run=_hash_password)

    iis = with_config(
        commands.add_parser(
            "iis-settings",
            help="print, as JSON, the FastCGI timeouts IIS needs for this configuration",
        )
    )
    iis.set_defaults(run=_iis_settings)

    doctor = with_config(
        commands.add_parser("doctor", help="check this server's installation; exit 1 on failure")
    )
    doctor.add_argument(
        "--identity", default=None, help="a test user for a read-only Get-User (recommended)"
    )
    doctor.add_argument(
        "--site", default="Default Web Site", help="the IIS site holding the application"
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(run=_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return code


if __name__ == "__main__":
    sys.exit(main())

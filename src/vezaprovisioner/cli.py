"""The `vezaprovisioner` command: serve, check, create-email, hash-password."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .api.problems import problem_for
from .auth import hash_password
from .config import ConfigError, Settings, load_settings
from .exchange.errors import ExchangeError
from .exchange.local.backend import LocalExchange
from .provisioning import CreateEmail, ProvisioningError
from .services import build_services
from .validation import InvalidValue, validate_alias, validate_identity

# Exit codes of `create-email`, so scripts can branch without parsing text.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3


def _settings(args: argparse.Namespace) -> Settings:
    path: Path | None = args.config
    return load_settings(path)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app

    settings = _settings(args)
    app = create_app(settings)
    print(
        f"VezaProvisioner {__version__}: {settings.backend} backend, "
        f"http://{args.host}:{args.port}{settings.base_path}",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    services = build_services(settings)  # also loads the directory / starts nothing else
    services.close()
    print(json.dumps(settings.masked(), indent=2))
    print(f"configuration OK ({settings.source})", file=sys.stderr)
    return EXIT_OK


def _create_email(args: argparse.Namespace) -> int:
    try:
        identity = validate_identity(args.identity)
        alias = validate_alias(args.alias) if args.alias else None
    except InvalidValue as exc:
        print(f"invalid input: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    services = build_services(_settings(args))
    try:
        result = services.provisioner.create_email(CreateEmail(identity=identity, alias=alias))
    except (ExchangeError, ProvisioningError) as exc:
        problem = problem_for(exc)
        report: dict[str, object] = {"code": problem.kind.code, "detail": problem.detail}
        if problem.exchange:
            report["exchange"] = problem.exchange
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return EXIT_FAILED
    finally:
        services.close()
    print(json.dumps(asdict(result), indent=2, ensure_ascii=False))
    return EXIT_OK


def _probe(args: argparse.Namespace) -> int:
    """Start the backend, wait until it is ready or has failed, report; optionally Get-User."""
    try:
        identity = validate_identity(args.identity) if args.identity else None
    except InvalidValue as exc:
        print(f"invalid input: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    settings = _settings(args)
    services = build_services(settings)
    try:
        exchange = services.exchange
        if isinstance(exchange, LocalExchange):
            exchange.pool.wait_for(
                lambda s: s.size == 0 or s.warm > 0 or s.failed_starts > 0,
                timeout=settings.local.startup_timeout_seconds + 5,
            )
        report: dict[str, object] = {"backend": settings.backend, "probe": exchange.probe()}
        if identity is not None:
            report["get_user"] = asdict(exchange.get_user(identity))
    except ExchangeError as exc:
        problem = problem_for(exc)
        failure: dict[str, object] = {"code": problem.kind.code, "detail": problem.detail}
        if problem.exchange:
            failure["exchange"] = problem.exchange
        print(json.dumps(failure, indent=2, ensure_ascii=False))
        return EXIT_FAILED
    finally:
        services.close()
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

    probe = with_config(
        commands.add_parser(
            "probe",
            help="start the backend, report whether it is ready; --identity also runs Get-User",
        )
    )
    probe.add_argument("--identity", default=None, help="an AD identity to read (read-only)")
    probe.set_defaults(run=_probe)

    hashing = commands.add_parser(
        "hash-password", help="print a hash for [auth.users] (reads stdin when piped)"
    )
    hashing.set_defaults(run=_hash_password)
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

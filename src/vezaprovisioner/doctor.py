"""`vezaprovisioner doctor`: the self-test an admin runs on the server after installing.

Each check reports pass, fail (with the fix) or skip. Exchange is reached through the same port
the service uses (`open_exchange`, then `probe()` and a read-only `get_user()`), so the checks
cover whichever backend the configuration names. Windows-only facts come through two seams: a
file-existence function and an `IisConfigReader` (appcmd), present only on Windows.
"""

from __future__ import annotations

import getpass
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from .clock import Clock, SystemClock
from .config import ConfigError, Settings, load_settings
from .exchange.backends import open_exchange
from .exchange.errors import (
    BackendUnavailable,
    ExchangeError,
    ExchangeTimeout,
    IdentityNotFound,
    PermissionDenied,
)
from .exchange.local.backend import LocalExchange
from .exchange.local.startup import TRANSCRIPT_HINT, fix_for
from .exchange.port import ExchangePort
from .iis_settings import (
    WARMUP_PAGE,
    AppcmdReader,
    IisConfigReader,
    IisReadError,
    IisSettingsError,
    fastcgi_timeouts,
    read_auth_settings,
    read_fastcgi_application,
    read_warmup_settings,
)
from .validation import InvalidValue, validate_identity

Status = Literal["pass", "fail", "skip"]
WARMUP = "iis warm-up"
MIN_PYTHON = (3, 10)


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str
    fix: str = ""


def _pass(name: str, detail: str) -> Check:
    return Check(name, "pass", detail)


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "fail", detail, fix)


def _skip(name: str, detail: str) -> Check:
    return Check(name, "skip", detail)


def _default_iis_reader() -> IisConfigReader | None:
    return AppcmdReader() if sys.platform == "win32" else None


@dataclass
class Doctor:
    """Runs the checks in order; later checks are skipped when what they need has failed."""

    config: Path | None
    identity: str | None = None
    site: str = "Default Web Site"
    environ: Mapping[str, str] | None = None
    clock: Clock = field(default_factory=SystemClock)
    is_file: Callable[[str], bool] = os.path.isfile
    iis: IisConfigReader | None = field(default_factory=_default_iis_reader)
    #: The python.exe IIS's FastCGI application must run: this venv's (install.ps1 registers it).
    python_exe: str = sys.executable

    def run(self) -> list[Check]:
        return list(self._checks())

    def _checks(self) -> Iterator[Check]:
        yield self._python()
        settings: Settings | None = None
        try:
            settings = load_settings(self.config, self.environ)
        except ConfigError as exc:
            yield _fail(
                "configuration",
                str(exc),
                "Correct the file (README: Configuration reference); "
                "`vezaprovisioner check --config FILE` lists every problem.",
            )
        if settings is None:
            for name in (
                "exchange paths",
                "exchange",
                "get-user",
                "data folder",
                "iis",
                WARMUP,
                "iis fastcgi",
            ):
                yield _skip(name, "needs a valid configuration")
            return
        yield _pass(
            "configuration",
            f"valid: {settings.source} ({settings.backend} backend, auth mode "
            f"{settings.auth.mode}, base path {settings.base_path})",
        )
        yield self._paths(settings)
        port: ExchangePort | None = None
        try:
            port, check = self._connect(settings)
            yield check
            yield self._get_user(settings, port)
        finally:
            if port is not None:
                port.close()
        yield self._data_dir(settings)
        yield self._iis(settings)
        yield self._warmup(settings)
        yield self._fastcgi(settings)

    def _python(self) -> Check:
        version = ".".join(str(part) for part in sys.version_info[:3])
        bits = 64 if sys.maxsize > 2**32 else 32
        detail = f"Python {version} ({bits}-bit) at {sys.executable}"
        if sys.version_info[:2] < MIN_PYTHON:
            return _fail("python", detail, "Install 64-bit Python 3.10 to 3.13 and reinstall.")
        return _pass("python", detail)

    def _paths(self, settings: Settings) -> Check:
        name = "exchange paths"
        if settings.backend != "local":
            return _skip(name, f"the {settings.backend} backend does not start PowerShell")
        wanted = {
            "exchange.powershell_path": settings.exchange.powershell_path,
            "exchange.remote_exchange_path": settings.exchange.remote_exchange_path,
        }
        missing = [f"{key} = {path}" for key, path in wanted.items() if not self.is_file(path)]
        if missing:
            return _fail(
                name,
                "not found: " + "; ".join(missing),
                "Use the two paths in the Target of the Exchange Management Shell shortcut "
                "(install.ps1 discovers them from $env:ExchangeInstallPath).",
            )
        return _pass(name, "; ".join(wanted.values()))

    def _connect(self, settings: Settings) -> tuple[ExchangePort | None, Check]:
        name = "exchange"
        try:
            port = open_exchange(settings, self.clock)
        except ConfigError as exc:
            return None, _fail(name, f"the backend could not be opened: {exc}", _CONFIG_FIX)
        try:
            if isinstance(port, LocalExchange):  # its hosts connect in the background
                port.wait_started(settings.local.longest_start_seconds)
            described = port.probe()
        except ExchangeError as exc:
            fix = _exchange_fix(exc)
            if isinstance(port, LocalExchange):
                fix = _local_startup_fix(port, fix)
            return port, _fail(name, f"the probe failed: {exc.message}", fix)
        return port, _pass(name, described)

    def _get_user(self, settings: Settings, port: ExchangePort | None) -> Check:
        name = "get-user"
        if self.identity is None:
            return _skip(name, "pass --identity <a test user> to run a read-only Get-User")
        if port is None:
            return _skip(name, "needs a working Exchange connection")
        try:
            identity = validate_identity(self.identity)
        except InvalidValue as exc:
            return _fail(name, f"'{self.identity}': {exc.message}", "Pass a valid AD identity.")
        try:
            user = port.get_user(identity, settings.exchange.domain_controller or None)
        except ExchangeError as exc:
            return _fail(name, f"Get-User '{identity}': {exc.message}", _exchange_fix(exc))
        return _pass(
            name,
            f"Get-User '{identity}': {user.distinguished_name} ({user.recipient_type_details})",
        )

    def _data_dir(self, settings: Settings) -> Check:
        name = "data folder"
        folder = settings.data_dir
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".doctor-", delete=True) as probe:
                probe.write(b"ok")
                probe.flush()
        except OSError as exc:
            return _fail(
                name,
                f"{folder} is not writable by {getpass.getuser()}: {exc.strerror or exc}",
                f"Give the application pool's account Modify rights on {folder} "
                "(install.ps1 sets this ACL), or change data_dir.",
            )
        return _pass(name, f"{folder} is writable by {getpass.getuser()}")

    def _iis(self, settings: Settings) -> Check:
        name = "iis"
        location = f"{self.site}{settings.base_path}"
        if self.iis is None:
            return _skip(name, "not running on Windows: IIS settings are not read back here")
        try:
            found = read_auth_settings(self.iis, location)
        except IisReadError as exc:
            return _fail(
                name,
                str(exc),
                f"Run doctor elevated on the IIS server; check that the application "
                f"{location!r} exists (--site names another site).",
            )
        problems = found.problems()
        if problems:
            return _fail(
                name,
                f"{location}: " + "; ".join(problems),
                "Re-run deploy/iis/install.ps1, or in IIS Manager set the application's "
                "Authentication to Anonymous Disabled and Basic Enabled, and SSL Settings to "
                "Require SSL.",
            )
        return _pass(name, f"{location}: Anonymous off, Basic on, SSL required")

    def _warmup(self, settings: Settings) -> Check:
        """IIS Application Initialization: the pool warms the service before the first caller."""
        location = f"{self.site}{settings.base_path}"
        if self.iis is None:
            return _skip(WARMUP, "not running on Windows: IIS settings are not read back here")
        try:
            found = read_warmup_settings(self.iis, self.site, settings.base_path)
        except IisReadError as exc:
            return _fail(WARMUP, str(exc), "Run doctor elevated on the IIS server.")
        problems = found.problems()
        if problems:
            return _fail(
                WARMUP,
                f"{location}: " + "; ".join(problems),
                "Run: Install-WindowsFeature Web-AppInit, then re-run deploy/iis/install.ps1 "
                "(it sets startMode AlwaysRunning, preloadEnabled and the warm-up page). Without "
                "it the first request after every recycle waits for the Exchange connect.",
            )
        return _pass(
            WARMUP,
            f"{location}: pool {found.pool} AlwaysRunning, preloaded, warm-up page "
            f"{WARMUP_PAGE} anonymous over HTTP",
        )

    def _fastcgi(self, settings: Settings) -> Check:
        """IIS's FastCGI timeouts are at least what the configuration's worst case needs."""
        name = "iis fastcgi"
        try:
            wanted = fastcgi_timeouts(settings)
        except IisSettingsError as exc:
            return _fail(name, str(exc), "Lower the timeouts in the configuration.")
        if self.iis is None:
            return _skip(
                name,
                "not running on Windows: IIS settings are not read back here (needed: "
                f"requestTimeout and activityTimeout {wanted.request_timeout} s)",
            )
        location = f"{self.site}{settings.base_path}"
        try:
            found = read_fastcgi_application(self.iis, location, self.python_exe)
        except IisReadError as exc:
            return _fail(
                name,
                str(exc),
                "Re-run deploy/iis/install.ps1 (it registers the venv's python.exe with "
                "wfastcgi.py as a FastCGI application).",
            )
        problems = wanted.problems(found)
        if problems:
            return _fail(
                name,
                "; ".join(problems) + f" (a request may take {wanted.worst_case_seconds:g} s)",
                "Re-run deploy/iis/install.ps1 after changing timeouts in the configuration (it "
                "sets them from `vezaprovisioner iis-settings`), or set them in IIS Manager "
                "(FastCGI Settings).",
            )
        return _pass(
            name,
            f"requestTimeout {found['requestTimeout']} s, activityTimeout "
            f"{found['activityTimeout']} s, idleTimeout {found['idleTimeout']} s (a request may "
            f"take {wanted.worst_case_seconds:g} s)",
        )


_CONFIG_FIX = "Correct the configuration; `vezaprovisioner check --config FILE` shows it."


def _exchange_fix(exc: ExchangeError) -> str:
    """What to do, by failure: the service's own advice plus what the server admin checks."""
    if isinstance(exc, IdentityNotFound):
        return (
            "Pass the identity of a user that exists (for example a test user's UPN) and that "
            "the service account can read."
        )
    advice = exc.detail
    if isinstance(exc, PermissionDenied):
        return (
            f"{advice} Assign the service account the Mail Recipients role (for example through "
            "the Recipient Management role group)."
        )
    if isinstance(exc, BackendUnavailable | ExchangeTimeout):
        return (
            f"{advice} Check that PowerShell starts as the service account, that "
            "RemoteExchange.ps1 connects (RemotePowerShellEnabled must be true for the account), "
            "and exchange.command_timeout_seconds."
        )
    return advice


def _local_startup_fix(port: LocalExchange, otherwise: str) -> str:
    """For a host that could not start: the fix for its startup error kind, and the transcript."""
    status = port.pool.status()
    if status.last_startup_error is None:
        return otherwise
    first = fix_for(status.last_startup_kind) if status.last_startup_kind else otherwise
    return f"{first} {TRANSCRIPT_HINT}"


def format_report(checks: list[Check]) -> str:
    """Human-readable: one line per check, the fix indented under each failure."""
    lines = []
    width = max(len(check.name) for check in checks)
    for check in checks:
        lines.append(f"{check.status.upper():4}  {check.name:<{width}}  {check.detail}")
        if check.fix:
            lines.append(f"{'':4}  {'':<{width}}  fix: {check.fix}")
    failed = sum(check.status == "fail" for check in checks)
    lines.append("all checks passed" if not failed else f"{failed} check(s) failed")
    return "\n".join(lines)


def report_data(checks: list[Check]) -> dict[str, object]:
    """The same as JSON-ready data."""
    return {
        "ok": not any(check.status == "fail" for check in checks),
        "checks": [asdict(check) for check in checks],
    }

"""What IIS is configured to do for the application, read back through appcmd's XML output.

`vezaprovisioner doctor` uses it to confirm Anonymous off, Basic on and Require SSL, and that the
FastCGI timeouts fit the configuration's worst case (`fastcgi_timeouts`, which install.ps1 also
reads through `vezaprovisioner iis-settings`). Running
appcmd is the only Windows-only step (`AppcmdReader`, verified by reading only); parsing its
`/xml` output is plain Python and tested here with appcmd-shaped documents.
"""

from __future__ import annotations

import math
import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .config import Settings

ANONYMOUS = "system.webServer/security/authentication/anonymousAuthentication"
BASIC = "system.webServer/security/authentication/basicAuthentication"
ACCESS = "system.webServer/security/access"
SECTIONS = (ANONYMOUS, BASIC, ACCESS)
GLOBAL_MODULES = "system.webServer/globalModules"
SITES = "system.applicationHost/sites"
APP_POOLS = "system.applicationHost/applicationPools"
APP_INIT = "system.webServer/applicationInitialization"
#: The module the IIS feature "Application Initialization" (Web-AppInit) registers (warmup.dll).
APP_INIT_MODULE = "ApplicationInitializationModule"
#: The page IIS Application Initialization requests, below the application (web.config).
WARMUP_PAGE = "/warmup"


class IisReadError(Exception):
    """IIS's configuration could not be read (no IIS, no such application, not elevated)."""


class IisConfigReader(Protocol):
    """The seam: one configuration section at one location, as `appcmd list config /xml`."""

    def read(self, location: str, section: str) -> bytes: ...


class AppcmdReader:
    """Runs %windir%\\system32\\inetsrv\\appcmd.exe with an argument list (no shell)."""

    def __init__(self, appcmd: Path | None = None, timeout_seconds: float = 30.0) -> None:
        windir = os.environ.get("WINDIR", r"C:\Windows")
        self.appcmd = appcmd or Path(windir) / "system32" / "inetsrv" / "appcmd.exe"
        self.timeout_seconds = timeout_seconds

    def read(self, location: str, section: str) -> bytes:
        # /config:* lists every attribute, defaults included, so nothing has to be assumed.
        arguments = [str(self.appcmd), "list", "config", location, f"-section:{section}"]
        try:
            done = subprocess.run(  # noqa: S603 - fixed executable, argument list, no shell
                [*arguments, "/config:*", "/xml"],
                capture_output=True,
                timeout=self.timeout_seconds,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise IisReadError(f"could not run {self.appcmd}: {exc}") from exc
        if done.returncode != 0:
            said = (done.stdout or done.stderr).decode("utf-8", "replace").strip()
            raise IisReadError(f"appcmd could not read {section} at {location!r}: {said}")
        return done.stdout


@dataclass(frozen=True)
class IisAuthSettings:
    """The effective authentication and SSL settings of one IIS location."""

    anonymous_enabled: bool
    basic_enabled: bool
    ssl_flags: frozenset[str]

    @property
    def ssl_required(self) -> bool:
        return "Ssl" in self.ssl_flags

    def problems(self) -> list[str]:
        """What differs from Anonymous off, Basic on, Require SSL; empty when all is right."""
        found = []
        if self.anonymous_enabled:
            found.append("Anonymous authentication is enabled")
        if not self.basic_enabled:
            found.append("Basic authentication is disabled")
        if not self.ssl_required:
            flags = ",".join(sorted(self.ssl_flags)) or "None"
            found.append(f"Require SSL is off (sslFlags={flags})")
        return found


def section_element(document: bytes, section: str) -> ET.Element:
    """The section's element in appcmd's `/xml` output (children included)."""
    try:
        root = ET.fromstring(document)  # noqa: S314 - output of the local appcmd.exe
    except ET.ParseError as exc:
        raise IisReadError(f"appcmd's output for {section} is not XML: {exc}") from exc
    for config in root.iter("CONFIG"):
        if config.attrib.get("CONFIG.SECTION", "").lower() == section.lower():
            element = config.find(section.replace("/", "-"))
            if element is None and len(config):
                element = config[0]
            if element is not None:
                return element
            return ET.Element(section.replace("/", "-"))
    raise IisReadError(f"appcmd's output has no {section} section")


def section_attributes(document: bytes, section: str) -> dict[str, str]:
    """The attributes of `section` in appcmd's `/xml` output.

    appcmd answers `<appcmd><CONFIG CONFIG.SECTION="system.webServer/security/access" path=...>
    <system.webServer-security-access sslFlags="Ssl" /></CONFIG></appcmd>`: the section element
    is named after the section with '/' turned into '-'.
    """
    return dict(section_element(document, section).attrib)


def _flag(value: str | None, default: bool) -> bool:
    return default if value is None else value.strip().lower() == "true"


def read_auth_settings(reader: IisConfigReader, location: str) -> IisAuthSettings:
    """Anonymous, Basic and SSL settings of `location` (e.g. "Default Web Site/VezaProvisioner").

    A missing attribute counts as the unsafe value, so a doubtful read never passes.
    """
    anonymous = section_attributes(reader.read(location, ANONYMOUS), ANONYMOUS)
    basic = section_attributes(reader.read(location, BASIC), BASIC)
    access = section_attributes(reader.read(location, ACCESS), ACCESS)
    flags = frozenset(
        flag.strip() for flag in access.get("sslFlags", "None").split(",") if flag.strip()
    )
    return IisAuthSettings(
        anonymous_enabled=_flag(anonymous.get("enabled"), default=True),
        basic_enabled=_flag(basic.get("enabled"), default=False),
        ssl_flags=flags - {"None"},
    )


@dataclass(frozen=True)
class IisWarmupSettings:
    """What IIS Application Initialization needs to warm the service before the first caller."""

    module_installed: bool
    pool: str | None
    start_mode: str | None
    preload_enabled: bool
    initialization_pages: tuple[str, ...]
    page_anonymous: bool
    page_ssl_flags: frozenset[str]

    def problems(self) -> list[str]:
        found = []
        if not self.module_installed:
            found.append(
                "the IIS feature Application Initialization (Web-AppInit) is not installed "
                f"(no {APP_INIT_MODULE})"
            )
        if self.start_mode != "AlwaysRunning":
            found.append(
                f"application pool {self.pool!r} has startMode "
                f"{self.start_mode or 'OnDemand'}, not AlwaysRunning"
            )
        if not self.preload_enabled:
            found.append("the application's preloadEnabled is false")
        if WARMUP_PAGE not in self.initialization_pages:
            found.append(f"applicationInitialization has no initializationPage {WARMUP_PAGE}")
        if not self.page_anonymous:
            found.append(
                f"{WARMUP_PAGE} does not allow Anonymous authentication "
                "(the warm-up request has no credentials)"
            )
        if "Ssl" in self.page_ssl_flags:
            found.append(f"{WARMUP_PAGE} requires SSL (the warm-up request is plain HTTP)")
        return found


def read_warmup_settings(reader: IisConfigReader, site: str, app_path: str) -> IisWarmupSettings:
    """Application Initialization's settings for the application `app_path` of `site`.

    appcmd answers the server-level sections (globalModules, sites, applicationPools) at any
    location, so everything is read at the application's own location; the warm-up page's
    authentication at the page's location. A missing value counts as the unset one.
    """
    location = f"{site}{app_path}"
    modules = section_element(reader.read(location, GLOBAL_MODULES), GLOBAL_MODULES)
    installed = any(
        add.attrib.get("name", "").lower() == APP_INIT_MODULE.lower() for add in modules.iter("add")
    )
    pool: str | None = None
    preload = False
    sites = section_element(reader.read(location, SITES), SITES)
    for found_site in sites.iter("site"):
        if found_site.attrib.get("name", "").lower() != site.lower():
            continue
        for application in found_site.iter("application"):
            if application.attrib.get("path", "").lower() == app_path.lower():
                pool = application.attrib.get("applicationPool")
                preload = _flag(application.attrib.get("preloadEnabled"), default=False)
    start_mode: str | None = None
    pools = section_element(reader.read(location, APP_POOLS), APP_POOLS)
    for add in pools.iter("add"):
        if pool is not None and add.attrib.get("name", "").lower() == pool.lower():
            start_mode = add.attrib.get("startMode")
    init = section_element(reader.read(location, APP_INIT), APP_INIT)
    pages = tuple(add.attrib.get("initializationPage", "") for add in init.iter("add"))
    page = f"{location}{WARMUP_PAGE}"
    anonymous = section_attributes(reader.read(page, ANONYMOUS), ANONYMOUS)
    access = section_attributes(reader.read(page, ACCESS), ACCESS)
    flags = frozenset(
        flag.strip() for flag in access.get("sslFlags", "Ssl").split(",") if flag.strip()
    )
    return IisWarmupSettings(
        module_installed=installed,
        pool=pool,
        start_mode=start_mode,
        preload_enabled=preload,
        initialization_pages=pages,
        page_anonymous=_flag(anonymous.get("enabled"), default=False),
        page_ssl_flags=flags - {"None"},
    )


# --- FastCGI timeouts that fit the app ----------------------------------------------------------

FASTCGI = "system.webServer/fastCgi"
#: IIS's accepted ranges for <fastCgi><application> (learn.microsoft.com, "FastCGI Application
#: <application>"): activityTimeout 10-3600, requestTimeout and idleTimeout 10-604800.
ACTIVITY_TIMEOUT_MAX = 3600
REQUEST_TIMEOUT_MAX = 604_800
IDLE_TIMEOUT_MAX = 604_800
#: Added to the worst case: a quarter of it, plus this many seconds (journal commits, a2wsgi,
#: IIS's own scheduling), rounded up to ten seconds.
MARGIN_SECONDS = 30


def worst_case_seconds(settings: Settings) -> float:
    """The longest a CREATE_EMAIL can take before the service answers on its own.

    Three cmdlets (Get-User, Get-User again past the claim when another request may have
    enabled the user meanwhile, Enable-*), each bounded by `exchange.command_timeout_seconds`;
    with the local backend each may first wait for a free PowerShell host
    (`local.queue_wait_seconds`) and, with no warm pool (`pool_size = 0`), for a new host to
    start (`LocalSettings.longest_start_seconds`). Then the not-found wait,
    the wait for another request's claim on the same user, and up to three journal commits
    waiting for another process's write lock (`journal.busy_timeout_ms`).
    """
    per_cmdlet = settings.exchange.command_timeout_seconds
    if settings.backend == "local":
        per_cmdlet += settings.local.queue_wait_seconds
        if settings.local.pool_size == 0:
            per_cmdlet += settings.local.longest_start_seconds
    return (
        3 * per_cmdlet
        + settings.not_found_retry_seconds
        + settings.journal.claim_wait_seconds
        + 3 * settings.journal.busy_timeout_ms / 1000
    )


@dataclass(frozen=True)
class FastCgiTimeouts:
    """What IIS's FastCGI application must allow so that it never kills a request the app is
    still working on, and keeps the warm PowerShell pool between Veza's calls."""

    worst_case_seconds: float
    request_timeout: int
    activity_timeout: int
    idle_timeout: int = IDLE_TIMEOUT_MAX

    def as_data(self) -> dict[str, float | int]:
        """What `vezaprovisioner iis-settings` prints (install.ps1 reads it)."""
        return {
            "worstCaseSeconds": self.worst_case_seconds,
            "requestTimeout": self.request_timeout,
            "activityTimeout": self.activity_timeout,
            "idleTimeout": self.idle_timeout,
        }

    def problems(self, found: Mapping[str, str]) -> list[str]:
        """What in IIS's <application> attributes is shorter than needed; empty when all fit."""
        wanted = {
            "requestTimeout": self.request_timeout,
            "activityTimeout": self.activity_timeout,
            "idleTimeout": self.idle_timeout,
        }
        problems = []
        for name, minimum in wanted.items():
            value = found.get(name)
            try:
                seconds = int(value) if value is not None else None
            except ValueError:
                seconds = None
            if seconds is None:
                problems.append(f"{name} is not set (needs at least {minimum})")
            elif seconds < minimum:
                problems.append(f"{name} is {seconds}, needs at least {minimum}")
        return problems


def fastcgi_timeouts(settings: Settings) -> FastCgiTimeouts:
    """The FastCGI timeouts for `settings`; IisSettingsError when IIS cannot allow them."""
    worst = worst_case_seconds(settings)
    needed = int(math.ceil((worst * 1.25 + MARGIN_SECONDS) / 10) * 10)
    if needed > ACTIVITY_TIMEOUT_MAX:
        raise IisSettingsError(
            f"a request may take {worst:g} s (3 x (exchange.command_timeout_seconds + "
            "local.queue_wait_seconds, + a host start when local.pool_size = 0) + "
            "not_found_retry_seconds + journal.claim_wait_seconds + 3 x "
            f"journal.busy_timeout_ms), so IIS's FastCGI activityTimeout would need {needed} s, "
            f"more than its maximum of {ACTIVITY_TIMEOUT_MAX} s; lower "
            "exchange.command_timeout_seconds or the waits"
        )
    return FastCgiTimeouts(worst, request_timeout=needed, activity_timeout=needed)


class IisSettingsError(Exception):
    """The configuration asks for more than IIS can be set to."""


def read_fastcgi_application(
    reader: IisConfigReader, location: str, python_exe: str
) -> dict[str, str]:
    """The attributes of the <fastCgi><application> whose fullPath is `python_exe` (the venv's
    python.exe, as install.ps1 registers it); IisReadError when there is none."""
    document = reader.read(location, FASTCGI)
    try:
        root = ET.fromstring(document)  # noqa: S314 - output of the local appcmd.exe
    except ET.ParseError as exc:
        raise IisReadError(f"appcmd's output for {FASTCGI} is not XML: {exc}") from exc
    registered = []
    for application in root.iter("application"):
        full_path = application.attrib.get("fullPath", "")
        registered.append(full_path)
        if full_path.lower() == python_exe.lower():
            return dict(application.attrib)
    listed = ", ".join(registered) or "none"
    raise IisReadError(f"no FastCGI application runs {python_exe} (registered: {listed})")

"""What IIS is configured to do for the application, read back through appcmd's XML output.

`vezaprovisioner doctor` uses it to confirm Anonymous off, Basic on and Require SSL. Running
appcmd is the only Windows-only step (`AppcmdReader`, verified by reading only); parsing its
`/xml` output is plain Python and tested here with appcmd-shaped documents.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
    try:
        root = ET.fromstring(document)  # noqa: S314 - output of the local appcmd.exe
    except ET.ParseError as exc:
        raise IisReadError(f"appcmd's output for {section} is not XML: {exc}") from exc
    for config in root.iter("CONFIG"):
        if config.attrib.get("CONFIG.SECTION", "").lower() == section.lower():
            element = config.find(section.replace("/", "-"))
            if element is None and len(config):
                element = config[0]
            return dict(element.attrib) if element is not None else {}
    raise IisReadError(f"appcmd's output has no {section} section")


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

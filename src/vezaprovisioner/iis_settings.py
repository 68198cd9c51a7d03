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

"""A stand-in for appcmd.exe's `list config /xml` answers (the doctor's IIS seam).

Models, as read in Microsoft's IIS documentation (learn.microsoft.com: "Getting Started with
AppCmd.exe"; the configuration reference pages of each section, e.g. "FastCGI Application
<application>"): one `<CONFIG CONFIG.SECTION=... path=...>` element per section, holding an
element named after the section with '/' turned into '-', whose attributes are the section's
attributes (all of them with /config:*); a collection's entries (fastCgi's <application>) as child
elements shaped like applicationHost.config's; an unknown location is an appcmd error.
Not modelled: appcmd's exact error texts beyond the one used, locked sections, and other
sections. The collection shape was read, never seen on a server.
"""

from __future__ import annotations

from vezaprovisioner.iis_settings import ACCESS, ANONYMOUS, BASIC, FASTCGI, IisReadError

LOCATION = "Default Web Site/VezaProvisioner"
VENV_PYTHON = "C:\\VezaProvisioner\\venv\\Scripts\\python.exe"
WFASTCGI = "C:\\VezaProvisioner\\venv\\Lib\\site-packages\\wfastcgi.py"


def appcmd_xml(section: str, **attributes: str) -> bytes:
    """What `appcmd list config LOCATION -section:SECTION /config:* /xml` prints."""
    element = section.replace("/", "-")
    attrs = " ".join(f'{name}="{value}"' for name, value in attributes.items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\r\n<appcmd>\r\n'
        f'    <CONFIG CONFIG.SECTION="{section}" path="MACHINE/WEBROOT/APPHOST/{LOCATION}" '
        'overrideMode="Inherit" locked="false">\r\n'
        f"        <{element} {attrs} />\r\n"
        "    </CONFIG>\r\n</appcmd>\r\n"
    ).encode()


def fastcgi_xml(*applications: dict[str, str]) -> bytes:
    """`appcmd list config LOCATION -section:system.webServer/fastCgi /config:* /xml`."""
    entries = "".join(
        "            <application "
        + " ".join(f'{name}="{value}"' for name, value in attributes.items())
        + " />\r\n"
        for attributes in applications
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\r\n<appcmd>\r\n'
        f'    <CONFIG CONFIG.SECTION="{FASTCGI}" path="MACHINE/WEBROOT/APPHOST" '
        'overrideMode="Inherit" locked="false">\r\n'
        "        <system.webServer-fastCgi>\r\n"
        f"{entries}"
        "        </system.webServer-fastCgi>\r\n    </CONFIG>\r\n</appcmd>\r\n"
    ).encode()


def fastcgi_application(**overrides: str) -> dict[str, str]:
    """The application install.ps1 registers, with IIS's other attributes at their defaults."""
    attributes = {
        "fullPath": VENV_PYTHON,
        "arguments": WFASTCGI,
        "maxInstances": "4",
        "idleTimeout": "604800",
        "activityTimeout": "840",
        "requestTimeout": "840",
        "instanceMaxRequests": "10000",
        "protocol": "NamedPipe",
        "queueLength": "1000",
        "flushNamedPipe": "false",
        "rapidFailsPerMinute": "10",
        "signalBeforeTerminateSeconds": "30",
        "stderrMode": "ReturnGeneric500",
    }
    return {**attributes, **overrides}


def secure_sections() -> dict[str, bytes]:
    return {
        ANONYMOUS: appcmd_xml(
            ANONYMOUS, enabled="false", userName="IUSR", password="", logonMethod="ClearText"
        ),
        BASIC: appcmd_xml(
            BASIC, enabled="true", realm="", defaultLogonDomain="CONTOSO", logonMethod="ClearText"
        ),
        ACCESS: appcmd_xml(ACCESS, sslFlags="Ssl"),
        FASTCGI: fastcgi_xml(
            fastcgi_application(fullPath="C:\\Program Files\\PHP\\php-cgi.exe", arguments=""),
            fastcgi_application(),
        ),
    }


class FakeAppcmd:
    """Answers like appcmd for one application; any other location is an appcmd error."""

    def __init__(self, sections: dict[str, bytes], location: str = LOCATION) -> None:
        self.sections = sections
        self.location = location
        self.reads: list[tuple[str, str]] = []

    def read(self, location: str, section: str) -> bytes:
        self.reads.append((location, section))
        if location != self.location:
            raise IisReadError(
                f"appcmd could not read {section} at {location!r}: ERROR ( message:Cannot find "
                "requested collection element. )"
            )
        return self.sections[section]

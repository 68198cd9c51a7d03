"""A stand-in for appcmd.exe's `list config /xml` answers (the doctor's IIS seam).

Modelled: one `<CONFIG CONFIG.SECTION=... path=...>` per section, holding the section element
named after the section with '/' turned into '-', its attributes and child elements (collections
as `<add .../>`, sites as `<site><application .../></site>`). Read from appcmd's documented
`/xml` output and IIS's configuration reference; the nested form of the server-level sections
(sites, applicationPools, globalModules) was not observed on a server.
The FastCGI section (`system.webServer/fastCgi`) holds one `<application>` per registered
process pool with its attributes (fullPath, arguments, the timeouts; learn.microsoft.com,
"FastCGI Application <application>"), in the same nested form, equally not observed on a server.
"""

from __future__ import annotations

from vezaprovisioner.iis_settings import (
    ACCESS,
    ANONYMOUS,
    APP_INIT,
    APP_INIT_MODULE,
    APP_POOLS,
    BASIC,
    FASTCGI,
    GLOBAL_MODULES,
    SITES,
    WARMUP_PAGE,
    IisReadError,
)

LOCATION = "Default Web Site/VezaProvisioner"
PAGE = f"{LOCATION}{WARMUP_PAGE}"
POOL = "VezaProvisionerPool"
VENV_PYTHON = "C:\\VezaProvisioner\\venv\\Scripts\\python.exe"
WFASTCGI = "C:\\VezaProvisioner\\venv\\Lib\\site-packages\\wfastcgi.py"


def appcmd_xml(section: str, inner: str = "", **attributes: str) -> bytes:
    """What `appcmd list config LOCATION -section:SECTION /config:* /xml` prints."""
    element = section.replace("/", "-")
    attrs = " ".join(f'{name}="{value}"' for name, value in attributes.items())
    body = f"<{element} {attrs}>{inner}</{element}>" if inner else f"<{element} {attrs} />"
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\r\n<appcmd>\r\n'
        f'    <CONFIG CONFIG.SECTION="{section}" path="MACHINE/WEBROOT/APPHOST/{LOCATION}" '
        'overrideMode="Inherit" locked="false">\r\n'
        f"        {body}\r\n"
        "    </CONFIG>\r\n</appcmd>\r\n"
    ).encode()


def fastcgi_xml(*applications: dict[str, str]) -> bytes:
    """`appcmd list config LOCATION -section:system.webServer/fastCgi /config:* /xml`."""
    entries = "".join(
        "<application " + " ".join(f'{k}="{v}"' for k, v in attributes.items()) + " />"
        for attributes in applications
    )
    return appcmd_xml(FASTCGI, entries)


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


def warmup_sections(
    *,
    module: bool = True,
    start_mode: str = "AlwaysRunning",
    preload: str = "true",
    page: str = WARMUP_PAGE,
) -> dict[str, bytes]:
    """The server-level and application sections Application Initialization needs, as set."""
    modules = '<add name="StaticFileModule" image="%windir%\\System32\\inetsrv\\static.dll" />'
    if module:
        modules += (
            f'<add name="{APP_INIT_MODULE}" image="%windir%\\System32\\inetsrv\\warmup.dll" />'
        )
    sites = (
        '<site name="Default Web Site" id="1">'
        '<application path="/" applicationPool="DefaultAppPool" />'
        '<application path="/owa" applicationPool="MSExchangeOWAAppPool" />'
        f'<application path="/VezaProvisioner" applicationPool="{POOL}" '
        f'preloadEnabled="{preload}" />'
        "</site>"
    )
    pools = (
        '<add name="DefaultAppPool" startMode="OnDemand" />'
        f'<add name="{POOL}" managedRuntimeVersion="" startMode="{start_mode}" />'
    )
    return {
        GLOBAL_MODULES: appcmd_xml(GLOBAL_MODULES, modules),
        SITES: appcmd_xml(SITES, sites),
        APP_POOLS: appcmd_xml(APP_POOLS, pools),
        APP_INIT: appcmd_xml(
            APP_INIT, f'<add initializationPage="{page}" />', doAppInitAfterRestart="true"
        ),
    }


def warmup_page_sections(*, anonymous: str = "true", ssl_flags: str = "None") -> dict[str, bytes]:
    """The warm-up page's own location: anonymous, plain HTTP allowed."""
    return {
        ANONYMOUS: appcmd_xml(ANONYMOUS, enabled=anonymous, userName="IUSR"),
        ACCESS: appcmd_xml(ACCESS, sslFlags=ssl_flags),
    }


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
        **warmup_sections(),
    }


class FakeAppcmd:
    """Answers like appcmd for one application; any other location is an appcmd error."""

    def __init__(
        self,
        sections: dict[str, bytes],
        location: str = LOCATION,
        page: dict[str, bytes] | None = None,
    ) -> None:
        self.sections = sections
        self.location = location
        self.page = warmup_page_sections() if page is None else page
        self.reads: list[tuple[str, str]] = []

    def read(self, location: str, section: str) -> bytes:
        self.reads.append((location, section))
        if location == f"{self.location}{WARMUP_PAGE}" and section in self.page:
            return self.page[section]
        if location != self.location:
            raise IisReadError(
                f"appcmd could not read {section} at {location!r}: ERROR ( message:Cannot find "
                "requested collection element. )"
            )
        return self.sections[section]

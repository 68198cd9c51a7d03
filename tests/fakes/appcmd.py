"""A stand-in for appcmd.exe's `list config /xml` answers (the doctor's IIS seam)."""

from __future__ import annotations

from vezaprovisioner.iis_settings import ACCESS, ANONYMOUS, BASIC, IisReadError

LOCATION = "Default Web Site/VezaProvisioner"


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


def secure_sections() -> dict[str, bytes]:
    return {
        ANONYMOUS: appcmd_xml(
            ANONYMOUS, enabled="false", userName="IUSR", password="", logonMethod="ClearText"
        ),
        BASIC: appcmd_xml(
            BASIC, enabled="true", realm="", defaultLogonDomain="CONTOSO", logonMethod="ClearText"
        ),
        ACCESS: appcmd_xml(ACCESS, sslFlags="Ssl"),
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

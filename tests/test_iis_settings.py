"""IIS's authentication and SSL settings, parsed from appcmd's real `/xml` output shape."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fakes.appcmd import LOCATION, FakeAppcmd, appcmd_xml, secure_sections
from vezaprovisioner.iis_settings import (
    ACCESS,
    ANONYMOUS,
    BASIC,
    AppcmdReader,
    IisReadError,
    read_auth_settings,
    section_attributes,
)


def test_the_secure_settings_pass() -> None:
    settings = read_auth_settings(FakeAppcmd(secure_sections()), LOCATION)
    assert not settings.anonymous_enabled
    assert settings.basic_enabled
    assert settings.ssl_required
    assert settings.problems() == []


def test_each_insecure_setting_is_named() -> None:
    sections = {
        ANONYMOUS: appcmd_xml(ANONYMOUS, enabled="true", userName="IUSR"),
        BASIC: appcmd_xml(BASIC, enabled="false"),
        ACCESS: appcmd_xml(ACCESS, sslFlags="None"),
    }
    problems = read_auth_settings(FakeAppcmd(sections), LOCATION).problems()
    assert problems == [
        "Anonymous authentication is enabled",
        "Basic authentication is disabled",
        "Require SSL is off (sslFlags=None)",
    ]


@pytest.mark.parametrize(
    ("flags", "required"),
    [
        ("Ssl", True),
        ("Ssl,Ssl128", True),
        ("Ssl, SslNegotiateCert", True),
        ("SslNegotiateCert", False),
    ],
)
def test_ssl_flags(flags: str, required: bool) -> None:
    sections = {**secure_sections(), ACCESS: appcmd_xml(ACCESS, sslFlags=flags)}
    assert read_auth_settings(FakeAppcmd(sections), LOCATION).ssl_required is required


def test_missing_attributes_count_as_unsafe() -> None:
    sections = {section: appcmd_xml(section) for section in (ANONYMOUS, BASIC, ACCESS)}
    assert len(read_auth_settings(FakeAppcmd(sections), LOCATION).problems()) == 3


def test_unreadable_output_is_an_error() -> None:
    with pytest.raises(IisReadError, match="not XML"):
        section_attributes(b"ERROR ( message:Unknown config section. )", BASIC)
    with pytest.raises(IisReadError, match=r"no system\.webServer/security/access"):
        section_attributes(appcmd_xml(BASIC, enabled="true"), ACCESS)


@pytest.fixture
def fake_appcmd_exe(tmp_path: Path) -> Path:
    """An executable standing in for appcmd.exe: records its argv, prints like appcmd."""
    script = tmp_path / "appcmd.exe"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "open(sys.argv[0] + '.args', 'a').write(json.dumps(args) + '\\n')\n"
        f"if args[2] != {LOCATION!r}:\n"
        "    print('ERROR ( message:Cannot find requested collection element. )')\n"
        "    sys.exit(1)\n"
        "section = args[3].split(':', 1)[1]\n"
        "element = section.replace('/', '-')\n"
        'print(\'<?xml version="1.0" encoding="UTF-8"?>\')\n'
        'print(f\'<appcmd><CONFIG CONFIG.SECTION="{section}"><{element} enabled="true" \'\n'
        "      f'sslFlags=\"Ssl\" /></CONFIG></appcmd>')\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    return script


def test_appcmd_reader_passes_an_argument_list(fake_appcmd_exe: Path) -> None:
    reader = AppcmdReader(fake_appcmd_exe)
    attributes = section_attributes(reader.read(LOCATION, BASIC), BASIC)
    assert attributes["enabled"] == "true"
    recorded = fake_appcmd_exe.with_name("appcmd.exe.args").read_text().splitlines()
    assert recorded == [
        f'["list", "config", "{LOCATION}", "-section:{BASIC}", "/config:*", "/xml"]'
    ]
    with pytest.raises(IisReadError, match="Cannot find requested collection element"):
        reader.read("Default Web Site/Other", BASIC)
    with pytest.raises(IisReadError, match="could not run"):
        AppcmdReader(fake_appcmd_exe.with_name("missing.exe")).read(LOCATION, BASIC)


_FLAG_NAMES = ["Ssl", "Ssl128", "SslNegotiateCert", "SslRequireCert", "SslMapCert", "None"]


@given(
    flags=st.lists(st.sampled_from(_FLAG_NAMES), unique=True, max_size=5),
    separator=st.sampled_from([",", ", ", " ,", " , "]),
)
def test_ssl_required_exactly_when_the_ssl_flag_is_set(flags: list[str], separator: str) -> None:
    sections = {**secure_sections(), ACCESS: appcmd_xml(ACCESS, sslFlags=separator.join(flags))}
    settings = read_auth_settings(FakeAppcmd(sections), LOCATION)
    assert settings.ssl_required is ("Ssl" in flags)
    assert "None" not in settings.ssl_flags

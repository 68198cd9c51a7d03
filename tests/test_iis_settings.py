"""IIS's authentication and SSL settings, parsed from appcmd's real `/xml` output shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fakes.appcmd import LOCATION, FakeAppcmd, appcmd_xml, secure_sections
from vezaprovisioner.config import Settings
from vezaprovisioner.iis_settings import (
    ACCESS,
    ANONYMOUS,
    BASIC,
    AppcmdReader,
    IisReadError,
    IisSettingsError,
    fastcgi_timeouts,
    read_auth_settings,
    section_attributes,
    worst_case_seconds,
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


# --- FastCGI timeouts from the configuration's worst case ---------------------------------------


def test_the_timeouts_cover_the_worst_case_with_margin() -> None:
    """Defaults: 3 x (120 s cmdlet + 30 s wait for a free host) + 30 s not-found wait + 150 s
    claim wait + 3 x 5 s journal lock waits = 645 s; with a quarter and 30 s on top, rounded up
    to ten: 840 s. The old 300 s was less than half of it."""
    settings = Settings(backend="local")
    assert worst_case_seconds(settings) == 645
    timeouts = fastcgi_timeouts(settings)
    assert (timeouts.request_timeout, timeouts.activity_timeout) == (840, 840)
    assert timeouts.idle_timeout == 604_800  # IIS's maximum: keep the warm pool
    simulated = Settings(backend="simulated")  # no host queue
    assert worst_case_seconds(simulated) == 555


def test_a_host_per_command_adds_each_hosts_start() -> None:
    """pool_size = 0 starts a host for every cmdlet: each may take longest_start_seconds
    (2 x startup_timeout + connect_lock_wait + 5 = 965 s by default), which IIS cannot allow;
    shorter startup limits fit."""
    per_command = Settings.model_validate({"backend": "local", "local": {"pool_size": 0}})
    assert worst_case_seconds(per_command) == 3 * (120 + 30 + 965) + 30 + 150 + 15
    with pytest.raises(IisSettingsError, match=r"local\.pool_size = 0"):
        fastcgi_timeouts(per_command)
    shorter = Settings.model_validate(
        {
            "backend": "local",
            "local": {
                "pool_size": 0,
                "startup_timeout_seconds": 60,
                "connect_lock_wait_seconds": 60,
            },
        }
    )
    assert fastcgi_timeouts(shorter).request_timeout == 1530


@given(
    command=st.floats(min_value=1, max_value=3600),
    retry=st.floats(min_value=0, max_value=600),
    claim=st.floats(min_value=0, max_value=3600),
)
def test_the_timeouts_always_exceed_the_worst_case_or_are_refused(
    command: float, retry: float, claim: float
) -> None:
    settings = Settings.model_validate(
        {
            "backend": "local",
            "not_found_retry_seconds": retry,
            "exchange": {"command_timeout_seconds": command},
            "journal": {"claim_wait_seconds": claim, "stale_claim_seconds": 86_400},
        }
    )
    worst = worst_case_seconds(settings)
    if worst * 1.25 + 30 > 3600:
        with pytest.raises(IisSettingsError, match="activityTimeout"):
            fastcgi_timeouts(settings)
        return
    timeouts = fastcgi_timeouts(settings)
    assert timeouts.request_timeout >= worst * 1.25 + 30
    assert timeouts.activity_timeout <= 3600  # IIS refuses more


def test_the_cli_prints_them_for_install_ps1(tmp_path: Path) -> None:
    config = tmp_path / "vezaprovisioner.toml"
    config.write_text('backend = "local"\n[exchange]\ncommand_timeout_seconds = 60\n')
    done = subprocess.run(
        [sys.executable, "-m", "vezaprovisioner", "iis-settings", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # 3 x (60 + 30) + 30 + 150 + 15 = 465 s → 465 x 1.25 + 30 = 611.25 → 620 s.
    assert json.loads(done.stdout) == {
        "worstCaseSeconds": 465.0,
        "requestTimeout": 620,
        "activityTimeout": 620,
        "idleTimeout": 604800,
    }
    config.write_text(
        'backend = "local"\n[exchange]\ncommand_timeout_seconds = 1200\n'
        "[journal]\nstale_claim_seconds = 86400\n"
    )
    refused = subprocess.run(
        [sys.executable, "-m", "vezaprovisioner", "iis-settings", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1
    assert "activityTimeout would need" in refused.stderr

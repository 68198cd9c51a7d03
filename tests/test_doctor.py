"""`vezaprovisioner doctor` over the generic Exchange port (the simulated backend and its faults),
the data folder, and IIS's settings read back through the appcmd seam."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_DIRECTORY
from tests.fakes.appcmd import (
    VENV_PYTHON,
    FakeAppcmd,
    appcmd_xml,
    fastcgi_application,
    fastcgi_xml,
    secure_sections,
    warmup_page_sections,
    warmup_sections,
)
from tests.fakes.clock import FakeClock
from vezaprovisioner.doctor import Check, Doctor, format_report, report_data
from vezaprovisioner.exchange.backends import open_exchange
from vezaprovisioner.iis_settings import (
    ACCESS,
    ANONYMOUS,
    APP_INIT,
    APP_POOLS,
    BASIC,
    FASTCGI,
    GLOBAL_MODULES,
    SITES,
)

EXECUTABLE = Path(sys.executable).with_name("vezaprovisioner")


def write_config(
    tmp_path: Path, backend: str = "simulated", latency_ms: int = 0, data_dir: Path | None = None
) -> Path:
    config = tmp_path / "vezaprovisioner.toml"
    lines = [
        f'backend = "{backend}"',
        f"data_dir = {json.dumps(str(data_dir or tmp_path / 'data'))}",
        "[simulated]",
        f"directory = {json.dumps(str(TEST_DIRECTORY))}",
        f"latency_ms = {latency_ms}",
        "[exchange]",
        "command_timeout_seconds = 5",
        "[auth]",
        'mode = "iis"',
    ]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def doctor(config: Path | None, **kwargs: Any) -> dict[str, Check]:
    kwargs.setdefault("clock", FakeClock())
    kwargs.setdefault("iis", None)
    kwargs.setdefault("python_exe", VENV_PYTHON)
    checks = Doctor(config=config, environ={}, **kwargs).run()
    assert [c.name for c in checks] == [
        "python",
        "configuration",
        "exchange paths",
        "exchange",
        "get-user",
        "data folder",
        "iis",
        "iis warm-up",
        "iis fastcgi",
    ]
    for check in checks:
        assert bool(check.fix) == (check.status == "fail"), check  # every failure says what to do
    return {check.name: check for check in checks}


def statuses(checks: dict[str, Check]) -> dict[str, str]:
    return {name: check.status for name, check in checks.items()}


def test_a_healthy_installation_passes(tmp_path: Path) -> None:
    iis = FakeAppcmd(secure_sections())
    checks = doctor(write_config(tmp_path), identity="plain@contoso.com", iis=iis)
    assert statuses(checks) == {
        "python": "pass",
        "configuration": "pass",
        "exchange paths": "skip",  # the simulated backend starts no PowerShell
        "exchange": "pass",
        "get-user": "pass",
        "data folder": "pass",
        "iis": "pass",
        "iis warm-up": "pass",
        "iis fastcgi": "pass",
    }
    assert "CN=Pat Plain" in checks["get-user"].detail
    assert "simulated Exchange" in checks["exchange"].detail
    assert (tmp_path / "data").is_dir()  # created when missing
    assert list((tmp_path / "data").iterdir()) == []  # and nothing left behind
    app = "Default Web Site/VezaProvisioner"
    assert iis.reads == [
        *((app, section) for section in (ANONYMOUS, BASIC, ACCESS)),
        *((app, section) for section in (GLOBAL_MODULES, SITES, APP_POOLS, APP_INIT)),
        *((f"{app}/warmup", section) for section in (ANONYMOUS, ACCESS)),
        *((app, FASTCGI),),
    ]


def test_only_read_only_cmdlets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def recording_open(settings: Any, clock: Any) -> Any:
        port = open_exchange(settings, clock)
        seen.append(port)
        return port

    monkeypatch.setattr("vezaprovisioner.doctor.open_exchange", recording_open)
    doctor(write_config(tmp_path), identity="plain")
    (port,) = seen
    assert [cmdlet for cmdlet, _ in port.calls] == ["Get-ExchangeServer", "Get-User"]


def test_without_identity_get_user_is_skipped_and_nothing_fails(tmp_path: Path) -> None:
    checks = doctor(write_config(tmp_path))
    assert checks["get-user"].status == "skip"
    assert "--identity" in checks["get-user"].detail
    assert report_data(list(checks.values()))["ok"] is True


def test_a_broken_configuration_fails_and_skips_the_rest(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text('backend = "simulated"\nunknown_key = 1\n', encoding="utf-8")
    checks = doctor(config, identity="plain")
    assert checks["configuration"].status == "fail"
    assert "unknown_key" in checks["configuration"].detail
    skipped = ("exchange", "get-user", "data folder", "iis", "iis fastcgi")
    assert {checks[n].status for n in skipped} == {"skip"}
    missing = doctor(None)  # no --config and no VEZAPROVISIONER_CONFIG
    assert "VEZAPROVISIONER_CONFIG" in missing["configuration"].detail


def test_a_backend_that_cannot_open_fails_with_the_reason(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    text = config.read_text().replace(json.dumps(str(TEST_DIRECTORY)), '"missing.json"')
    config.write_text(text)
    checks = doctor(config, identity="plain")
    assert checks["exchange"].status == "fail"
    assert "simulated.directory" in checks["exchange"].detail
    assert checks["get-user"].status == "skip"


def test_an_exchange_that_does_not_answer_in_time(tmp_path: Path) -> None:
    clock = FakeClock()
    config = write_config(tmp_path, latency_ms=6000)  # over the 5 s command timeout
    checks = doctor(config, identity="plain", clock=clock)
    assert checks["exchange"].status == "fail"
    assert "did not finish within the command timeout" in checks["exchange"].detail
    assert "RemotePowerShellEnabled" in checks["exchange"].fix
    assert checks["get-user"].status == "fail"
    assert clock.sleeps == [5.0, 5.0]  # bounded by the command timeout, on the fake clock


@pytest.mark.parametrize(
    ("identity", "said", "fix"),
    [
        ("nobody@contoso.com", "couldn't be found", "a user that exists"),
        ("Alex Smith", "matches multiple entries", "send a unique form"),
        ("newhire", "couldn't be found", "a user that exists"),  # not replicated yet
        ("bad*identity", "wildcard", "valid AD identity"),
    ],
)
def test_get_user_failures_say_what_to_do(
    tmp_path: Path, identity: str, said: str, fix: str
) -> None:
    checks = doctor(write_config(tmp_path), identity=identity)
    assert checks["exchange"].status == "pass"
    assert checks["get-user"].status == "fail"
    assert said in checks["get-user"].detail
    assert fix in checks["get-user"].fix


def test_local_backend_paths_must_exist(tmp_path: Path) -> None:
    config = write_config(tmp_path, backend="local")
    existing = {r"C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe"}
    checks = doctor(config, is_file=existing.__contains__)
    assert checks["exchange paths"].status == "fail"
    assert "exchange.remote_exchange_path" in checks["exchange paths"].detail
    assert "exchange.powershell_path" not in checks["exchange paths"].detail
    existing.add(r"C:\Program Files\Microsoft\Exchange Server\V15\bin\RemoteExchange.ps1")
    assert doctor(config, is_file=existing.__contains__)["exchange paths"].status == "pass"


def test_an_unwritable_data_folder_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the data folder should be")
    checks = doctor(write_config(tmp_path, data_dir=blocker / "data"))
    assert checks["data folder"].status == "fail"
    assert "Modify rights" in checks["data folder"].fix


def test_iis_settings_that_are_wrong_or_unreadable_fail(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    insecure = FakeAppcmd(
        {
            **secure_sections(),
            ANONYMOUS: appcmd_xml(ANONYMOUS, enabled="true"),
            BASIC: appcmd_xml(BASIC, enabled="true"),
            ACCESS: appcmd_xml(ACCESS, sslFlags="None"),
            FASTCGI: secure_sections()[FASTCGI],
        }
    )
    checks = doctor(config, iis=insecure)
    assert checks["iis"].status == "fail"
    assert "Anonymous authentication is enabled" in checks["iis"].detail
    assert "Require SSL is off" in checks["iis"].detail
    elsewhere = doctor(config, iis=FakeAppcmd(secure_sections()), site="Exchange Back End")
    assert elsewhere["iis"].status == "fail"
    assert "Cannot find requested collection element" in elsewhere["iis"].detail
    assert doctor(config)["iis"].status == "skip"  # no reader: not on Windows


def test_fastcgi_timeouts_shorter_than_the_worst_case_fail(tmp_path: Path) -> None:
    """The config (command_timeout_seconds = 5, simulated) needs 3 x 5 + 30 + 150 + 15 = 210 s,
    with margin 300 s; IIS's own defaults (90 s, 70 s, 300 s idle) fail."""
    config = write_config(tmp_path)
    sections = secure_sections()
    sections[FASTCGI] = fastcgi_xml(
        fastcgi_application(requestTimeout="90", activityTimeout="70", idleTimeout="300")
    )
    checks = doctor(config, iis=FakeAppcmd(sections))
    assert checks["iis fastcgi"].status == "fail"
    assert "requestTimeout is 90, needs at least 300" in checks["iis fastcgi"].detail
    assert "activityTimeout is 70, needs at least 300" in checks["iis fastcgi"].detail
    assert "idleTimeout is 300, needs at least 604800" in checks["iis fastcgi"].detail
    assert "iis-settings" in checks["iis fastcgi"].fix
    sections[FASTCGI] = fastcgi_xml(fastcgi_application(requestTimeout="300"))
    assert doctor(config, iis=FakeAppcmd(sections))["iis fastcgi"].status == "pass"


def test_a_fastcgi_application_for_another_python_fails(tmp_path: Path) -> None:
    checks = doctor(
        write_config(tmp_path),
        iis=FakeAppcmd(secure_sections()),
        python_exe="D:\\Other\\venv\\Scripts\\python.exe",
    )
    assert checks["iis fastcgi"].status == "fail"
    assert "no FastCGI application runs D:\\Other" in checks["iis fastcgi"].detail
    assert VENV_PYTHON in checks["iis fastcgi"].detail  # what is registered instead
    skipped = doctor(write_config(tmp_path))["iis fastcgi"]
    assert skipped.status == "skip"
    assert "300 s" in skipped.detail


@pytest.mark.parametrize(
    ("sections", "page", "problem"),
    [
        (warmup_sections(module=False), {}, "Web-AppInit"),
        (warmup_sections(start_mode="OnDemand"), {}, "not AlwaysRunning"),
        (warmup_sections(preload="false"), {}, "preloadEnabled is false"),
        (warmup_sections(page="/"), {}, "no initializationPage /warmup"),
        ({}, {"anonymous": "false"}, "does not allow Anonymous"),
        ({}, {"ssl_flags": "Ssl"}, "requires SSL"),
    ],
)
def test_application_initialization_settings_are_checked(
    tmp_path: Path, sections: dict[str, bytes], page: dict[str, str], problem: str
) -> None:
    iis = FakeAppcmd({**secure_sections(), **sections}, page=warmup_page_sections(**page))
    checks = doctor(write_config(tmp_path), iis=iis)
    assert checks["iis"].status == "pass"
    assert checks["iis warm-up"].status == "fail"
    assert problem in checks["iis warm-up"].detail
    assert "Web-AppInit" in checks["iis warm-up"].fix


def test_report_formats() -> None:
    checks = [
        Check("python", "pass", "Python 3.12.1"),
        Check("get-user", "fail", "Get-User 'x': not found", "Pass an identity that exists."),
    ]
    text = format_report(checks)
    assert "PASS  python" in text
    assert "FAIL  get-user" in text
    assert "fix: Pass an identity that exists." in text
    assert text.endswith("1 check(s) failed")


def test_the_cli_exits_non_zero_on_any_failure(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(EXECUTABLE), "doctor", "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ok = run("--identity", "plain@contoso.com", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] is True
    assert {c["name"]: c["status"] for c in report["checks"]}["get-user"] == "pass"
    failed = run("--identity", "nobody@contoso.com")
    assert failed.returncode == 1
    assert "FAIL  get-user" in failed.stdout
    assert "fix:" in failed.stdout

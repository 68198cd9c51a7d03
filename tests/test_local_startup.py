"""The admin's text for each startup error kind: what happened, every record, and the fix."""

from __future__ import annotations

import pytest

from vezaprovisioner.exchange.local.protocol import (
    STARTUP_ERROR_KINDS,
    StartupFailure,
    StartupRecord,
)
from vezaprovisioner.exchange.local.startup import (
    FIXES,
    TRANSCRIPT_HINT,
    describe,
    fix_for,
    format_records,
)

PATH = "C:\\Program Files\\Microsoft\\Exchange Server\\V15\\bin\\RemoteExchange.ps1"


def test_every_kind_has_its_own_fix() -> None:
    assert set(FIXES) == set(STARTUP_ERROR_KINDS)
    assert len(set(FIXES.values())) == len(FIXES)
    assert fix_for(None) == TRANSCRIPT_HINT
    assert fix_for("something new") == TRANSCRIPT_HINT


@pytest.mark.parametrize("kind", sorted(STARTUP_ERROR_KINDS))
def test_the_sentence_names_the_kind_and_ends_with_its_fix(kind: str) -> None:
    text = describe(StartupFailure(kind, "detail"), PATH)
    assert text.startswith(f"{kind}: ")
    assert text.endswith(f"Fix: {FIXES[kind]}")


def test_a_connect_failure_shows_every_record_with_its_id_and_server() -> None:
    records = (
        StartupRecord(
            "Connecting to EX01 failed: 500", "WinRMHttpError,PSSessionOpenFailed", "EX01"
        ),
        StartupRecord("Access is denied.", "AccessDenied,PSSessionOpenFailed", "EX02"),
        StartupRecord("PowerShell is in NonInteractive mode.", "", ""),
    )
    text = describe(StartupFailure("connect", "no session", records=records), PATH)
    assert "3 error records" in text
    assert (
        "[1] Connecting to EX01 failed: 500 (WinRMHttpError,PSSessionOpenFailed; server EX01)"
        in text
    )
    assert "[2] Access is denied. (AccessDenied,PSSessionOpenFailed; server EX02)" in text
    assert "[3] PowerShell is in NonInteractive mode." in text
    assert "RemotePowerShellEnabled" in text


def test_records_are_bounded() -> None:
    many = tuple(StartupRecord("x" * 1000, "id", "") for _ in range(25))
    text = format_records(many)
    assert "[10] " in text
    assert "[11] " not in text
    assert "[…] 15 more" in text
    assert len(text) < 10 * 320 + 100


def test_module_import_names_the_cache_folder() -> None:
    failure = StartupFailure(
        "module_import",
        "no cmdlets",
        server="EX01.contoso.com",
        path="C:\\Users\\svc\\AppData\\Roaming\\Microsoft\\Exchange\\RemotePowerShell\\EX01.contoso.com",
    )
    text = describe(failure, PATH)
    assert "session to EX01.contoso.com but imported no Exchange cmdlet" in text
    assert "module cache C:\\Users\\svc\\AppData\\Roaming\\Microsoft\\Exchange" in text
    assert "-ClearCache" in text
    assert "Mail Recipients" not in text  # not an RBAC problem
    without_path = describe(StartupFailure("module_import", "x", server="EX01"), PATH)
    assert "%APPDATA%\\Microsoft\\Exchange\\RemotePowerShell\\EX01" in without_path


def test_rbac_names_the_account_and_the_missing_cmdlets() -> None:
    failure = StartupFailure(
        "rbac", "x", server="EX01", user="CONTOSO\\svc", missing=("Enable-Mailbox",)
    )
    text = describe(failure, PATH)
    assert (
        "the account CONTOSO\\svc connected to Exchange (EX01), but cannot run Enable-Mailbox"
        in text
    )
    assert "lacks the Mail Recipients management role" in text

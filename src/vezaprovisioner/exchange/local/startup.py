"""What each startup error of host.ps1 means, and what the admin does about it.

host.ps1 starts in steps (transcript, RemoteExchange.ps1 dot-sourced, the connect mutex,
Connect-ExchangeServer, the session and its cmdlets checked); each step that fails reports its
own `kind` (see `protocol.STARTUP_ERROR_KINDS`). `describe` turns one into the sentence that
readiness, `probe` and `doctor` show; `fix_for` is the fix alone, for the doctor's fix line.
Pure text: nothing here starts a process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from .protocol import StartupFailure, StartupRecord

#: How the admin sees what the host's Exchange steps printed (the service silences them).
TRANSCRIPT_HINT: Final = (
    "To see what RemoteExchange.ps1 and Connect-ExchangeServer printed, run as the service "
    "account: vezaprovisioner probe --config <file> --transcript C:\\VezaProvisioner\\data"
    "\\connect-transcript.txt"
)

_CACHE: Final = "%APPDATA%\\Microsoft\\Exchange\\RemotePowerShell\\<server>"
_MAX_RECORDS_SHOWN: Final = 10
_MAX_MESSAGE: Final = 300

#: The fix for each kind, in the admin's terms.
FIXES: Final[Mapping[str, str]] = {
    "transcript": (
        "Pass --transcript a file in a folder the account can write (the probe's transcript "
        "only; the service never writes one)."
    ),
    "remote_exchange_path": (
        "Set exchange.remote_exchange_path to the file in Exchange's bin folder, usually "
        "C:\\Program Files\\Microsoft\\Exchange Server\\V15\\bin\\RemoteExchange.ps1 "
        "($env:ExchangeInstallPath\\bin\\RemoteExchange.ps1)."
    ),
    "dot_source": (
        "Point exchange.remote_exchange_path at Exchange's own RemoteExchange.ps1, with "
        "ConnectFunctions.ps1 and CommonConnectFunctions.ps1 beside it, and check that the "
        "account may read them and load Exchange's assemblies from the bin folder."
    ),
    "connect_lock": (
        "Hosts of one account connect one at a time. Raise local.connect_lock_wait_seconds or "
        "lower local.pool_size (the last of N starting hosts waits for N - 1 connects); if a "
        "powershell.exe of the account hangs in Connect-ExchangeServer, end it."
    ),
    "connect": (
        "Check that the service account can open the Exchange Management Shell on this server: "
        "RemotePowerShellEnabled is true for it (Get-User <account> | Format-List "
        "RemotePowerShellEnabled), the w3svc service runs, the PowerShell virtual directory "
        "answers (http://<server>/PowerShell), and Kerberos works for the account."
    ),
    "module_import": (
        "The account's cached Exchange module did not import (hosts rebuilding it at once, or a "
        f"damaged cache). Delete the folder {_CACHE} of the service account (it is rebuilt on "
        "the next connect), or run Connect-ExchangeServer -auto -ClearCache once as that "
        "account; if APPDATA is empty, set loadUserProfile = true on the application pool."
    ),
    "rbac": (
        "Give the account the Mail Recipients management role: add it to the Recipient "
        "Management role group (or a role group with Mail Recipients), then recycle the "
        "application pool."
    ),
}


def fix_for(kind: str | None) -> str:
    """The fix for a kind (the transcript hint for an unknown or missing kind)."""
    return FIXES.get(kind or "", TRANSCRIPT_HINT)


def format_records(records: tuple[StartupRecord, ...]) -> str:
    """Every record as ``[n] message (error id; server)``, bounded in count and length."""
    shown = []
    for number, record in enumerate(records[:_MAX_RECORDS_SHOWN], 1):
        message = " ".join(record.message.split())
        if len(message) > _MAX_MESSAGE:
            message = message[: _MAX_MESSAGE - 1] + "…"
        where = "; ".join(
            part
            for part in (record.error_id, f"server {record.target}" if record.target else "")
            if part
        )
        shown.append(f"[{number}] {message}" + (f" ({where})" if where else ""))
    if len(records) > _MAX_RECORDS_SHOWN:
        shown.append(f"[…] {len(records) - _MAX_RECORDS_SHOWN} more")
    return " ".join(shown)


def _what(failure: StartupFailure, remote_exchange_path: str) -> str:
    kind = failure.kind
    records = format_records(failure.records)
    if kind == "transcript":
        return f"Start-Transcript could not write {failure.path or 'the file'}: {failure.detail}"
    if kind == "remote_exchange_path":
        return (
            f"RemoteExchange.ps1 was not found ({failure.detail}); exchange.remote_exchange_path "
            f"is {remote_exchange_path!r}"
        )
    if kind == "dot_source":
        return (
            f"dot-sourcing {failure.path or remote_exchange_path} did not define "
            f"Connect-ExchangeServer; error records: {records or 'none'}"
        )
    if kind == "connect_lock":
        return f"the connect mutex was not free in time: {failure.detail}"
    if kind == "connect":
        return (
            f"Connect-ExchangeServer -auto could not connect to Exchange: no session opened, "
            f"{len(failure.records)} error records: {records or failure.detail}"
        )
    if kind == "module_import":
        cache = failure.path or _CACHE.replace("<server>", failure.server or "<server>")
        return (
            f"Connect-ExchangeServer opened a session to {failure.server or 'Exchange'} but "
            f"imported no Exchange cmdlet: the module import failed (module cache {cache})"
            + (f"; error records: {records}" if records else "")
        )
    missing = ", ".join(failure.missing) or "Enable-Mailbox"
    return (
        f"the account {failure.user or failure.detail} connected to Exchange"
        f"{f' ({failure.server})' if failure.server else ''}, but cannot run {missing}: it "
        "lacks the Mail Recipients management role"
    )


def describe(failure: StartupFailure, remote_exchange_path: str) -> str:
    """The admin's sentence: ``<kind>: what happened. Fix: what to do.``"""
    return f"{failure.kind}: {_what(failure, remote_exchange_path)}. Fix: {fix_for(failure.kind)}"

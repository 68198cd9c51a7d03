#!/usr/bin/env python3
r"""A fake `powershell.exe` that speaks host.ps1's protocol, backed by the simulated Exchange.

The local backend's tests configure this file as `exchange.powershell_path`. It plays Windows
PowerShell running the shipped host.ps1, including how Exchange's own connect scripts behave,
and it is strict where the real host would be:

* it refuses to run unless its arguments are exactly the host switches and `-File` names the
  shipped host.ps1 with unchanged content (compared by SHA-256);
* the hello and every request must be ASCII JSON lines (PowerShell 5.1 would garble anything
  else) without ``\/`` (ConvertFrom-Json 5.1 would turn it into a date);
* only the allow-listed cmdlets and parameters are run; anything else is refused.

Real behaviours modelled, and where each was read (Microsoft-signed V15 copies of the Exchange
Management Shell scripts in public repositories, found by their lines in the public code index;
read there, none of their code is copied here):

* RemoteExchange.ps1 (script body, `WidenWindow`, `get-exbanner`, `get-tip`): it resizes the
  console, prints a banner and a tip, reads `HKLM:\SOFTWARE\Microsoft\ExchangeServer\v15\Setup`
  for `$global:exbin`, loads Exchange assemblies from there, then dot-sources
  CommonConnectFunctions.ps1 and ConnectFunctions.ps1, which define Connect-ExchangeServer.
  Fault `dot_source`: the Setup key is missing (a copied script, not an Exchange server), so the
  assembly load fails and ConnectFunctions.ps1 is not found: Connect-ExchangeServer never exists.
* ConnectFunctions.ps1 (`Connect-ExchangeServer`, `_AutoDiscoverAndConnect`,
  `_ConnectToAnyServer`, `_NewExchangeRunspace`): with -auto it tries the local server, then the
  site's other servers; every failed New-PSSession leaves a PSSessionOpenFailed error record
  (non-terminating: the loop goes on); when all fail it calls Read-Host, which under
  -NonInteractive fails with "PowerShell is in NonInteractive mode...", and then opens a session
  to the empty answer, which fails once more. Fault `connect`: those records, in that order.
  An access denied (error code 5) or logon failure (1326) ends the attempts at once, before
  Read-Host (`_NewExchangeRunspace`'s `break connectScope`). Fault `connect_denied`: one record.
* CommonConnectFunctions.ps1 (`ImportPSSession`, `ExportPSSessionAndImportModule`,
  `CreateRegistryEntryAndImportModule`, `ClearRegistryEntryAndModule`): the proxy module is
  exported to and imported from `%APPDATA%\Microsoft\Exchange\RemotePowerShell\<server>`; a
  failure there is caught and only warned about, and the fallback Import-PSSession runs only
  when Get-Module returns nothing, so the host ends with a session and no Exchange cmdlet.
  Fault `module_import`: that outcome, with the caught export error left in $Error.
* Exchange RBAC (Mail Recipients role, research notes section 6): an account without it has
  Get-User but no Enable-Mailbox. Fault `rbac`.
* powershell.exe writes redirected standard error in the console's OEM code page
  (research notes 7.2): fault `exit` writes its text in VZP_FAKE_STDERR_ENCODING.
* Start-Transcript (Microsoft's Start-Transcript documentation): with a `transcript` in the
  hello the fake writes a transcript file: a header block, what the Exchange steps printed
  (banner, tip, VERBOSE lines, error records) and an end block, like host.ps1's Show-Captured.
* PowerShell's transcription (PowerShell/PowerShell,
  src/System.Management.Automation/engine/hostifaces/MshHostUserInterface.cs: FlushPendingOutput,
  TranscriptionOption.FlushContentToDisk and Dispose; the decompiled 5.1 engine reads the same):
  lines wait in memory and a background task writes them; Stop-Transcript waits up to 1 s for
  it. So the file is complete only once Stop-Transcript has run, and a host killed before that
  leaves a transcript without its last lines and its end. With VZP_FAKE_STOP_TRANSCRIPT_SECONDS
  the fake holds the lines until Stop-Transcript and takes that long; without it every line is
  written at once.

What host.ps1 does and the fake does the same way: the connect mutex (a flock on VZP_FAKE_MUTEX
stands for `Global\VezaProvisioner-Connect-<SID>`; enter and leave times are logged), the
`connecting` message once it is held, the startup error kinds and their fields, the framing.

Known real behaviours NOT modelled: strict mode and every other PowerShell language rule
(tests/test_local_host_script.py checks host.ps1 statically for those); the minutes each
unreachable server takes in `-auto` (3-minute open timeout) and `MsExchEmsTimeout`; the 72-hour
module cache expiry and the HKCU hash; the race itself (the fake takes the mutex as host.ps1
does, so it never sees two imports at once); `w3svc` being stopped; the exact error texts
quoted here (only their shapes were read; the FullyQualifiedErrorIds of Read-Host,
Export-PSSession and the WinRM failures come from field reports, not a source); Windows
mutex semantics (abandoned mutexes, the Global namespace's access rules); the exact
Start-Transcript header fields.

Cmdlets run against `SimulatedExchange`; its classified errors are turned back into the raw
record (message, CategoryInfo.Reason, FullyQualifiedErrorId, exception type) host.ps1 sends.
Its own framing and JSON are written here independently of `protocol.py`, on purpose.

Environment (set by the test; user data never travels on the command line):

    VZP_FAKE_DIRECTORY        the simulated directory (JSON file), required
    VZP_FAKE_STATE            a SQLite file logging the changes to the forest every fake host
                              shares (shared_exchange.SharedForest); without it each host has
                              its own
    VZP_FAKE_LOG              JSON lines: {"event": "start", "argv", "pid"} per process,
                              {"event": "hello", "keys", "transcript"} per hello,
                              {"event": "lock_wait"} when a host starts waiting for the mutex,
                              {"event": "connect_lock", "enter", "leave"} (monotonic ns) per
                              connect, {"event": "call", "cmdlet", "parameters", "pid"} per
                              request, {"event": "grandchild", "pid"} when a hang starts a child,
                              {"event": "session_removed", "pid"} on stdin end-of-file
    VZP_FAKE_MUTEX            the file standing for the account's connect mutex (default: one
                              per user in the temporary folder, like the machine-wide mutex)
    VZP_FAKE_CONNECT_SECONDS  how long Connect-ExchangeServer takes (held under the mutex)
    VZP_FAKE_STOP_TRANSCRIPT_SECONDS  how long Stop-Transcript takes to write the lines it
                              still holds (all of them, when set) and the end block; default 0
    VZP_FAKE_LATENCY_MS       how long every cmdlet takes in all, default 0
    VZP_FAKE_STDERR_ENCODING  the code page of standard error, default utf-8 (cp850 on a
                              German or French Windows)
    VZP_FAKE_FAULT            startup faults: never_ready (Connect-ExchangeServer hangs, holding
                              the mutex), dot_source, connect, connect_denied, module_import,
                              rbac, exit;
                              command faults: crash, hang, noise, partial, huge, non_utf8,
                              session_broken (the remote session died: a transport error)
    VZP_FAKE_FAULT_IDENTITY   command faults fire only when -Identity equals this
    VZP_FAKE_FAULT_CMDLET     command faults fire only for this cmdlet
    VZP_FAKE_FAULT_STARTS     startup faults fire only for the first N starts (needs the state)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

import vezaprovisioner.exchange.local as local_package
from vezaprovisioner.exchange.errors import BackendUnavailable, ExchangeError, ExchangeTimeout
from vezaprovisioner.exchange.port import DirectoryUser, EnableMailbox, EnableRemoteMailbox
from vezaprovisioner.exchange.port import Recipient as PortRecipient
from vezaprovisioner.exchange.simulated.directory import parse_directory
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange

if TYPE_CHECKING:
    from tests.fakes.shared_exchange import SharedForest

SHIPPED_HOST = Path(local_package.__file__).with_name("host.ps1")
SWITCHES = ["-NoLogo", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-File"]
ALLOWED = {
    "Get-User": {"Identity", "DomainController"},
    "Get-Recipient": {"Identity", "DomainController"},
    "Enable-Mailbox": {
        "Identity",
        "Alias",
        "Database",
        "AddressBookPolicy",
        "RetentionPolicy",
        "DomainController",
    },
    "Enable-RemoteMailbox": {"Identity", "Alias", "RemoteRoutingAddress", "DomainController"},
}
STARTUP_FAULTS = {
    "never_ready",
    "dot_source",
    "connect",
    "connect_denied",
    "module_import",
    "rbac",
    "exit",
}
HELLO = ("nonce", "remote_exchange_path", "connect_lock_ms")
SERVER = "EX01.contoso.com"
ACCOUNT = "CONTOSO\\svc-veza"
BANNER = [
    b"         Welcome to the Exchange Management Shell!",
    b"Full list of cmdlets: Get-Command",
    b"Tip of the day #12: Want to see the mailboxes in a database? Get-Mailbox -Database",
]
CONNECTED = [
    b"VERBOSE: Connecting to EX01.contoso.com.",
    b"VERBOSE: Connected to EX01.contoso.com.",
]
SETUP_KEY = "HKLM:\\SOFTWARE\\Microsoft\\ExchangeServer\\v15\\Setup"
# RemoteExchange.ps1 on a machine without Exchange's Setup key ($global:exbin becomes "bin\").
DOT_SOURCE_RECORDS = [
    {
        "message": f"Cannot find path '{SETUP_KEY}' because it does not exist.",
        "error_id": "PathNotFound,Microsoft.PowerShell.Commands.GetItemPropertyCommand",
        "target": SETUP_KEY,
    },
    {
        "message": 'Exception calling "LoadFrom" with "1" argument(s): "Could not load file or '
        "assembly 'file:///C:\\Windows\\system32\\bin\\Microsoft.Exchange.Data.dll' or one of "
        'its dependencies. The system cannot find the file specified."',
        "error_id": "FileNotFoundException",
        "target": "",
    },
    {
        "message": "The term 'bin\\CommonConnectFunctions.ps1' is not recognized as the name of a "
        "cmdlet, function, script file, or operable program.",
        "error_id": "CommandNotFoundException",
        "target": "bin\\CommonConnectFunctions.ps1",
    },
    {
        "message": "The term 'bin\\ConnectFunctions.ps1' is not recognized as the name of a "
        "cmdlet, function, script file, or operable program.",
        "error_id": "CommandNotFoundException",
        "target": "bin\\ConnectFunctions.ps1",
    },
]
# Connect-ExchangeServer -auto when no server accepts: one record per server tried, then
# Read-Host under -NonInteractive, then the session to the empty answer.
CONNECT_RECORDS = [
    {
        "message": "Connecting to remote server EX01.contoso.com failed with the following error "
        "message : The WinRM client received an HTTP server error status (500), but the remote "
        "service did not include any other information about the cause of the failure. For "
        "more information, see the about_Remote_Troubleshooting Help topic.",
        "error_id": "WinRMHttpError,PSSessionOpenFailed",
        "target": "EX01.contoso.com",
    },
    {
        "message": "Connecting to remote server EX02.contoso.com failed with the following error "
        "message : WinRM cannot complete the operation. Verify that the specified computer name "
        "is valid, that the computer is accessible over the network, and that a firewall "
        "exception for the WinRM service is enabled and allows access from this computer. For "
        "more information, see the about_Remote_Troubleshooting Help topic.",
        "error_id": "-2144108250,PSSessionOpenFailed",
        "target": "EX02.contoso.com",
    },
    {
        "message": "PowerShell is in NonInteractive mode. Read and Prompt functionality is not "
        "available.",
        "error_id": "System.Management.Automation.PSInvalidOperationException,"
        "Microsoft.PowerShell.Commands.ReadHostCommand",
        "target": "",
    },
    {
        "message": "Cannot bind parameter 'ConnectionUri'. Cannot convert value "
        '"http:///powershell?serializationLevel=Full;clientApplication=ManagementShell" to '
        'type "System.Uri". Error: "Invalid URI: The hostname could not be parsed."',
        "error_id": "CannotConvertArgumentNoMessage,"
        "Microsoft.PowerShell.Commands.NewPSSessionCommand",
        "target": "",
    },
]
# _NewExchangeRunspace stops trying at access denied (error code 5) or logon failure (1326):
# one record, and no Read-Host.
DENIED_RECORDS = [
    {
        "message": "Connecting to remote server EX01.contoso.com failed with the following error "
        "message : Access is denied. For more information, see the "
        "about_Remote_Troubleshooting Help topic.",
        "error_id": "AccessDenied,PSSessionOpenFailed",
        "target": "EX01.contoso.com",
    },
]
CACHE = (
    "C:\\Users\\svc-veza\\AppData\\Roaming\\Microsoft\\Exchange\\RemotePowerShell\\EX01.contoso.com"
)
# ExportPSSessionAndImportModule's failure, caught by ImportPSSession (still in $Error).
IMPORT_RECORDS = [
    {
        "message": f"The process cannot access the file '{CACHE}\\EX01.contoso.com.psm1' "
        "because it is being used by another process.",
        "error_id": "System.IO.IOException,Microsoft.PowerShell.Commands.ExportPSSessionCommand",
        "target": "",
    },
]
DENIED_TEXT = (
    "RemoteExchange.ps1 : Die Datei kann nicht geladen werden. Der Zugriff wurde verweigert "
    "(Überprüfen Sie die Berechtigungen für das Konto; Größe 0 Bytes)."
)
PROPERTIES = [
    "Guid",
    "DistinguishedName",
    "SamAccountName",
    "UserPrincipalName",
    "Name",
    "DisplayName",
    "RecipientTypeDetails",
    "Alias",
    "PrimarySmtpAddress",
    "Database",
]

stdout = sys.stdout.buffer


def refuse(reason: str) -> NoReturn:
    sys.stderr.write(f"fake powershell: {reason}\n")
    sys.stderr.flush()
    sys.exit(64)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def shared_forest(
    path: Path,
    build: Callable[[], SimulatedExchange],
    call: Callable[[SimulatedExchange, str, dict[str, str]], dict[str, str | None]],
) -> SharedForest[dict[str, str | None]]:
    """The forest every host shares (a SQLite change log: tests/fakes/shared_exchange.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: find tests/
    from tests.fakes.shared_exchange import SharedForest

    return SharedForest(path, build, call)


def log(record: dict[str, Any]) -> None:
    target = os.environ.get("VZP_FAKE_LOG")
    if not target:
        return
    with locked(Path(target)), open(target, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({**record, "pid": os.getpid()}) + "\n")


def write_line(data: bytes) -> None:
    stdout.write(data + b"\n")
    stdout.flush()


def read_ascii_json_line() -> Any:
    raw = sys.stdin.buffer.readline()
    if not raw:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        refuse("stdin carried non-ASCII bytes; PowerShell 5.1 would garble them")
    if re.search(r"(?<!\\)(?:\\\\)*\\/", text):
        refuse("stdin carried '\\/', which ConvertFrom-Json in 5.1 reads as a date")
    return json.loads(text)


class Host:
    def __init__(self, nonce: str) -> None:
        self.prefix = f"@@VZP {nonce} ".encode("ascii")
        self.fault = os.environ.get("VZP_FAKE_FAULT", "")
        self.fault_identity = os.environ.get("VZP_FAKE_FAULT_IDENTITY")
        self.fault_cmdlet = os.environ.get("VZP_FAKE_FAULT_CMDLET")
        self.latency = int(os.environ.get("VZP_FAKE_LATENCY_MS", "0")) / 1000
        self.directory = Path(os.environ["VZP_FAKE_DIRECTORY"])
        state = os.environ.get("VZP_FAKE_STATE")
        self.state = Path(state) if state else None
        self.private: SimulatedExchange | None = None
        self.shared: SharedForest[dict[str, str | None]] | None = None
        self.stderr_encoding = os.environ.get("VZP_FAKE_STDERR_ENCODING") or "utf-8"
        self.transcript: IO[str] | None = None
        stop = os.environ.get("VZP_FAKE_STOP_TRANSCRIPT_SECONDS")
        #: How long Stop-Transcript takes; None: every transcript line is written at once.
        self.stop_transcript_seconds = float(stop) if stop else None
        #: Lines PowerShell's background writer has not written yet.
        self.pending: list[str] = []

    def frame(self, message: dict[str, Any]) -> bytes:
        return self.prefix + json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode()

    def send(self, message: dict[str, Any]) -> None:
        write_line(self.frame(message))

    # ---- startup ------------------------------------------------------------------------------

    def startup_fault(self) -> str | None:
        if self.fault not in STARTUP_FAULTS:
            return None
        limit = os.environ.get("VZP_FAKE_FAULT_STARTS")
        if limit is None or self.state is None:
            return self.fault
        counter = Path(f"{self.state}.starts")
        with locked(counter):
            count = int(counter.read_text()) if counter.exists() else 0
            counter.write_text(str(count + 1))
        return self.fault if count < int(limit) else None

    def start(self, hello: dict[str, str]) -> None:
        """host.ps1's startup steps, in its order, with Exchange's behaviour at each."""
        transcript = hello.get("transcript")
        if transcript is not None:
            self.start_transcript(transcript)
        remote_exchange_path = hello["remote_exchange_path"]
        if not os.path.isfile(remote_exchange_path):
            self.startup_error(
                3,
                "remote_exchange_path",
                f"no file at {remote_exchange_path}",
                path=remote_exchange_path,
            )
        fault = self.startup_fault()
        # Step 1: the dot-source. host.ps1 captures what it prints; the fake also writes it to
        # stdout, so every start exercises the service's skipping of stray lines.
        self.show(BANNER, echo=True)
        if fault == "exit":
            sys.stderr.buffer.write((DENIED_TEXT + "\n").encode(self.stderr_encoding))
            sys.stderr.flush()
            self.end(1)
        if fault == "dot_source":
            self.show_records(DOT_SOURCE_RECORDS)
            self.startup_error(
                8,
                "dot_source",
                "Connect-ExchangeServer does not exist after dot-sourcing "
                f"{remote_exchange_path}: {DOT_SOURCE_RECORDS[-1]['message']}",
                path=remote_exchange_path,
                records=DOT_SOURCE_RECORDS,
            )
        # Step 2: Connect-ExchangeServer, holding the account's connect mutex.
        lock = self.enter_connect_lock(int(hello["connect_lock_ms"]) / 1000)
        if lock is None:
            self.startup_error(
                6,
                "connect_lock",
                "another host of this account held Global\\VezaProvisioner-Connect for "
                f"{hello['connect_lock_ms']} ms",
            )
        entered = time.monotonic_ns()
        self.send({"type": "connecting"})
        if fault == "never_ready":
            while True:  # a hung Connect-ExchangeServer keeps the mutex until it is killed
                time.sleep(3600)
        time.sleep(float(os.environ.get("VZP_FAKE_CONNECT_SECONDS", "0")))
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        log({"event": "connect_lock", "enter": entered, "leave": time.monotonic_ns()})
        # Step 3: the effect: a session, and the cmdlets.
        if fault in ("connect", "connect_denied"):
            records = CONNECT_RECORDS if fault == "connect" else DENIED_RECORDS
            self.show_records(records)
            self.startup_error(
                4,
                "connect",
                f"no Exchange session opened ({len(records)} error records); the last: "
                f"{records[-1]['message']}",
                records=records,
            )
        self.show(CONNECTED)
        if fault == "module_import":
            self.show_records(IMPORT_RECORDS)
            self.startup_error(
                9,
                "module_import",
                f"a session to {SERVER} is open but no Exchange cmdlet was imported",
                server=SERVER,
                user=ACCOUNT,
                path=CACHE,
                records=IMPORT_RECORDS,
            )
        if fault == "rbac":
            self.startup_error(
                5,
                "rbac",
                f"{ACCOUNT} cannot run Enable-Mailbox",
                server=SERVER,
                user=ACCOUNT,
                missing=["Enable-Mailbox"],
            )
        self.send({"type": "ready", "server": SERVER, "user": ACCOUNT})

    def startup_error(self, code: int, kind: str, detail: str, **fields: object) -> NoReturn:
        self.send({"type": "startup_error", "kind": kind, "detail": detail, **fields})
        self.end(code)

    def enter_connect_lock(self, timeout: float) -> IO[str] | None:
        """The mutex: a flock, waited for at most `timeout` (released by the kernel on death)."""
        default = Path(tempfile.gettempdir()) / f"vzp-fake-connect-{os.getuid()}.mutex"
        handle = open(os.environ.get("VZP_FAKE_MUTEX") or default, "a")  # noqa: SIM115
        log({"event": "lock_wait"})
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.close()
                    return None
                time.sleep(0.01)  # WaitOne's wait, emulated; not test synchronisation

    # ---- the transcript (Start-Transcript) ----------------------------------------------------

    def start_transcript(self, path: str) -> None:
        try:
            self.transcript = open(path, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            self.startup_error(7, "transcript", str(exc.strerror or exc), path=path)
        stamp = time.strftime("%Y%m%d%H%M%S")
        self.transcript.write(
            "**********************\n"
            "Windows PowerShell transcript start\n"
            f"Start time: {stamp}\n"
            f"Username: {ACCOUNT}\n"
            f"RunAs User: {ACCOUNT}\n"
            f"Machine: {SERVER.split('.')[0]} (Microsoft Windows NT 10.0.17763.0)\n"
            f"Host Application: powershell.exe {' '.join(SWITCHES)} host.ps1\n"
            f"Process ID: {os.getpid()}\n"
            "PSVersion: 5.1.17763.1\n"
            "**********************\n"
            f"Transcript started, output file is {path}\n"
        )
        self.transcript.flush()

    def show(self, lines: list[bytes], *, echo: bool = False) -> None:
        """What an Exchange step printed: into the transcript (and on stdout when `echo`)."""
        for line in lines:
            if echo or self.transcript is not None:
                write_line(line)
            if self.transcript is None:
                continue
            if self.stop_transcript_seconds is not None:
                self.pending.append(line.decode("ascii"))
            else:
                self.transcript.write(line.decode("ascii") + "\n")
                self.transcript.flush()

    def show_records(self, records: list[dict[str, str]]) -> None:
        self.show(
            [
                f"{r['message']}\n    + FullyQualifiedErrorId : {r['error_id']}".encode()
                for r in records
            ]
        )

    def end(self, code: int) -> NoReturn:
        """Exit-Host: stop the transcript, then exit."""
        if self.transcript is not None:
            # Stop-Transcript: wait for the background writer, then the end block.
            time.sleep(self.stop_transcript_seconds or 0)
            self.transcript.writelines(f"{line}\n" for line in self.pending)
            self.transcript.write(
                "**********************\n"
                "Windows PowerShell transcript end\n"
                f"End time: {time.strftime('%Y%m%d%H%M%S')}\n"
                "**********************\n"
            )
            self.transcript.close()
        sys.stdout.flush()
        sys.exit(code)

    # ---- commands -----------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            request = read_ascii_json_line()
            if request is None:
                # stdin closed: the service is gone or recycles us. host.ps1 now removes its
                # Exchange session (Get-PSSession | Remove-PSSession) before it exits.
                log({"event": "session_removed"})
                self.end(0)
            self.handle(request)

    def handle(self, request: Any) -> None:
        received = time.monotonic()
        request_id = request.get("id") if isinstance(request, dict) else None
        cmdlet = request.get("cmdlet") if isinstance(request, dict) else None
        parameters = request.get("parameters") if isinstance(request, dict) else None
        if not isinstance(request_id, int) or not isinstance(parameters, dict):
            self.send({"type": "refused", "id": None, "detail": "bad request"})
            return
        if cmdlet not in ALLOWED:
            self.send({"type": "refused", "id": request_id, "detail": f"{cmdlet} is not allowed"})
            return
        extra = set(parameters) - ALLOWED[cmdlet]
        if extra or not all(isinstance(v, str) for v in parameters.values()):
            self.send({"type": "refused", "id": request_id, "detail": f"bad parameters {extra}"})
            return
        log({"event": "call", "cmdlet": cmdlet, "parameters": parameters})
        fault = ""
        if (
            self.fault not in STARTUP_FAULTS
            and self.fault_identity in (None, parameters.get("Identity"))
            and self.fault_cmdlet in (None, cmdlet)
        ):
            fault = self.fault
        message = self.execute(request_id, cmdlet, parameters)
        # A cmdlet takes VZP_FAKE_LATENCY_MS in all, the fake's own work included.
        time.sleep(max(0.0, self.latency - (time.monotonic() - received)))
        self.reply(message, fault)

    def execute(self, request_id: int, cmdlet: str, parameters: dict[str, str]) -> dict[str, Any]:
        try:
            objects = [self.run_cmdlet(cmdlet, parameters)]
        except ExchangeTimeout:
            # What a stuck Exchange looks like from the host: no answer at all.
            while True:
                time.sleep(3600)
        except BackendUnavailable as exc:
            return {"type": "error", "id": request_id, "message": exc.message}
        except ExchangeError as exc:
            return {
                "type": "error",
                "id": request_id,
                "message": exc.message,
                "reason": exc.reason or "",
                "error_id": exc.error_id or "",
                "exception_type": exc.exception_type or "",
            }
        return {"type": "result", "id": request_id, "objects": objects}

    def run_cmdlet(self, cmdlet: str, p: dict[str, str]) -> dict[str, str | None]:
        if self.state is None:
            if self.private is None:
                self.private = self.exchange(self.directory)
            return self.call(self.private, cmdlet, p)
        if self.shared is None:
            directory = self.directory
            self.shared = shared_forest(self.state, lambda: self.exchange(directory), self.call)
        return self.shared.run(cmdlet, p, changes=cmdlet.startswith("Enable-"))

    @staticmethod
    def exchange(path: Path) -> SimulatedExchange:
        directory = parse_directory(json.loads(path.read_text(encoding="utf-8")))
        return SimulatedExchange(directory, clock=_NoWait(), server=SERVER.split(".")[0])

    @staticmethod
    def call(exchange: SimulatedExchange, cmdlet: str, p: dict[str, str]) -> dict[str, str | None]:
        dc = p.get("DomainController")
        if cmdlet == "Get-User":
            return flatten_user(exchange.get_user(p.get("Identity", ""), dc))
        if cmdlet == "Get-Recipient":
            return flatten_recipient(exchange.get_recipient(p.get("Identity", ""), dc))
        if cmdlet == "Enable-Mailbox":
            return flatten_recipient(
                exchange.enable_mailbox(
                    EnableMailbox(
                        identity=p.get("Identity", ""),
                        alias=p.get("Alias"),
                        database=p.get("Database"),
                        address_book_policy=p.get("AddressBookPolicy"),
                        retention_policy=p.get("RetentionPolicy"),
                        domain_controller=dc,
                    )
                )
            )
        return flatten_recipient(
            exchange.enable_remote_mailbox(
                EnableRemoteMailbox(
                    identity=p.get("Identity", ""),
                    alias=p.get("Alias"),
                    remote_routing_address=p.get("RemoteRoutingAddress"),
                    domain_controller=dc,
                )
            )
        )

    def reply(self, message: dict[str, Any], fault: str) -> None:
        line = self.frame(message)
        if fault == "crash":
            stdout.write(line[: len(line) // 2])
            stdout.flush()
            sys.stderr.write("Process is terminated due to StackOverflowException.\n")
            sys.stderr.flush()
            os._exit(255)
        if fault == "hang":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
            log({"event": "grandchild", "child": child.pid})
            while True:
                time.sleep(3600)
        if fault == "noise":
            write_line(
                b"WARNING: The command completed successfully but no settings were modified."
            )
            write_line(b"@@VZP " + b"0" * 32 + b' {"type":"result","id":1,"objects":[]}')
            write_line(b"x" * (2 * 1024 * 1024))
            write_line(b"")
        if fault == "non_utf8":
            write_line(b"\xff\xfe Willkommen in der Exchange-Verwaltungsshell \x84\x94\x81")
        if fault == "session_broken":
            line = self.frame(
                {
                    "type": "error",
                    "id": message["id"],
                    "message": "Starting a command on the remote server failed with the "
                    "following error message : The I/O operation has been aborted because of "
                    "either a thread exit or an application request. For more information, see "
                    "the about_Remote_Troubleshooting Help topic.",
                    "reason": "PSRemotingTransportException",
                    "error_id": "JobFailure",
                    "exception_type": "System.Management.Automation.Remoting."
                    "PSRemotingTransportException",
                }
            )
        if fault == "huge":
            message = {**message, "objects": [{"Name": "x" * (2 * 1024 * 1024)}]}
            line = self.frame(message)
        if fault == "partial":
            for start in range(0, len(line), max(1, len(line) // 3)):
                stdout.write(line[start : start + max(1, len(line) // 3)])
                stdout.flush()
                time.sleep(0.02)
            write_line(b"")
            return
        write_line(line)


class _NoWait:
    """The simulator's clock: the fake applies latency itself, outside the shared lock."""

    def __init__(self) -> None:
        self._created = False

    def monotonic(self) -> float:
        # Creation time 0, every later reading far beyond it: replication lag is not modelled.
        if not self._created:
            self._created = True
            return 0.0
        return 1e9

    def sleep(self, seconds: float) -> None:
        return None


def flatten_user(user: DirectoryUser) -> dict[str, str | None]:
    values = {
        "Guid": user.guid,
        "DistinguishedName": user.distinguished_name,
        "SamAccountName": user.sam_account_name,
        "UserPrincipalName": user.user_principal_name,
        "Name": user.name,
        "DisplayName": user.display_name,
        "RecipientTypeDetails": user.recipient_type_details,
    }
    return {name: values.get(name) for name in PROPERTIES}


def flatten_recipient(recipient: PortRecipient) -> dict[str, str | None]:
    values = {
        "Guid": recipient.guid,
        "DistinguishedName": recipient.distinguished_name,
        "RecipientTypeDetails": recipient.recipient_type_details,
        "Alias": recipient.alias,
        "PrimarySmtpAddress": recipient.primary_smtp_address,
        "Database": recipient.database,
    }
    return {name: values.get(name) for name in PROPERTIES}


def main() -> None:
    args = sys.argv[1:]
    log({"event": "start", "argv": sys.argv})
    if len(args) != len(SWITCHES) + 1 or args[:-1] != SWITCHES:
        refuse(f"expected {' '.join(SWITCHES)} <host.ps1>, got {args!r}")
    script = Path(args[-1])
    if script.name != "host.ps1" or not script.is_file():
        refuse(f"-File must name the shipped host.ps1, not {script}")
    if (
        hashlib.sha256(script.read_bytes()).digest()
        != hashlib.sha256(SHIPPED_HOST.read_bytes()).digest()
    ):
        refuse(f"{script} differs from the shipped host.ps1")
    hello = read_ascii_json_line()
    if (
        not isinstance(hello, dict)
        or not set(HELLO) <= set(hello) <= {*HELLO, "transcript"}
        or not all(isinstance(value, str) for value in hello.values())
        or not hello["connect_lock_ms"].isdigit()
    ):
        refuse(f"the first stdin line must be the hello, got {hello!r}")
    log({"event": "hello", "keys": sorted(hello), "transcript": "transcript" in hello})
    host = Host(hello["nonce"])
    host.start(hello)
    host.serve()


if __name__ == "__main__":
    main()

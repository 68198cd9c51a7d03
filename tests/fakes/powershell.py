#!/usr/bin/env python3
"""A fake `powershell.exe` that speaks host.ps1's protocol, backed by the simulated Exchange.

The local backend's tests configure this file as `exchange.powershell_path`. It behaves like
Windows PowerShell running the shipped host.ps1 after Connect-ExchangeServer, including the
banner text that leaks onto stdout, and it is strict where the real host would be:

* it refuses to run unless its arguments are exactly the host switches and `-File` names the
  shipped host.ps1 with unchanged content (compared by SHA-256);
* the hello and every request must be ASCII JSON lines (PowerShell 5.1 would garble anything
  else) without ``\\/`` (ConvertFrom-Json 5.1 would turn it into a date);
* only the allow-listed cmdlets and parameters are run; anything else is refused.

Cmdlets run against `SimulatedExchange`; its classified errors are turned back into the raw
record (message, CategoryInfo.Reason, FullyQualifiedErrorId, exception type) host.ps1 sends.
Its own framing and JSON are written here independently of `protocol.py`, on purpose.

Environment (set by the test; user data never travels on the command line):

    VZP_FAKE_DIRECTORY        the simulated directory (JSON file), required
    VZP_FAKE_STATE            a file holding the forest every fake host shares (created from
                              the directory, locked with flock); without it each host has its own
    VZP_FAKE_LOG              JSON lines: {"event": "start", "argv", "pid"} per process,
                              {"event": "call", "cmdlet", "parameters", "pid"} per request,
                              {"event": "grandchild", "pid"} when a hang starts a child,
                              {"event": "session_removed", "pid"} on stdin end-of-file
    VZP_FAKE_CONNECT_SECONDS  how long connecting takes (slow start), default 0
    VZP_FAKE_LATENCY_MS       how long every cmdlet takes in all, default 0
    VZP_FAKE_FAULT            startup faults: never_ready, connect, rbac, exit;
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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import vezaprovisioner.exchange.local as local_package
from vezaprovisioner.exchange.errors import BackendUnavailable, ExchangeError, ExchangeTimeout
from vezaprovisioner.exchange.port import DirectoryUser, EnableMailbox, EnableRemoteMailbox
from vezaprovisioner.exchange.port import Recipient as PortRecipient
from vezaprovisioner.exchange.simulated.directory import parse_directory
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange

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
STARTUP_FAULTS = {"never_ready", "connect", "rbac", "exit"}
SERVER = "EX01.contoso.com"
ACCOUNT = "CONTOSO\\svc-veza"
BANNER = [
    b"         Welcome to the Exchange Management Shell!",
    b"Full list of cmdlets: Get-Command",
    b"VERBOSE: Connecting to EX01.contoso.com.",
    b"VERBOSE: Connected to EX01.contoso.com.",
    b"Tip of the day #12: Want to see the mailboxes in a database? Get-Mailbox -Database",
]
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

    def start(self, remote_exchange_path: str) -> None:
        for line in BANNER:
            write_line(line)
        if not os.path.isfile(remote_exchange_path):
            self.send(
                {
                    "type": "startup_error",
                    "kind": "remote_exchange_path",
                    "detail": f"no file at {remote_exchange_path}",
                }
            )
            sys.exit(3)
        fault = self.startup_fault()
        if fault == "never_ready":
            while True:
                time.sleep(3600)
        if fault == "connect":
            self.send(
                {
                    "type": "startup_error",
                    "kind": "connect",
                    "detail": "Connecting to remote server EX01.contoso.com failed with the "
                    "following error message : Access is denied. For more information, see "
                    "the about_Remote_Troubleshooting Help topic.",
                }
            )
            sys.exit(4)
        if fault == "rbac":
            self.send({"type": "startup_error", "kind": "rbac", "detail": ACCOUNT})
            sys.exit(5)
        if fault == "exit":
            sys.stderr.write("RemoteExchange.ps1 : File cannot be loaded. Access denied.\n")
            sys.stderr.flush()
            sys.exit(1)
        time.sleep(float(os.environ.get("VZP_FAKE_CONNECT_SECONDS", "0")))
        self.send({"type": "ready", "server": SERVER, "user": ACCOUNT})

    # ---- commands -----------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            request = read_ascii_json_line()
            if request is None:
                # stdin closed: the service is gone or recycles us. host.ps1 now removes its
                # Exchange session (Get-PSSession | Remove-PSSession) before it exits.
                log({"event": "session_removed"})
                return
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
        with locked(self.state):
            if not self.state.exists():
                self.state.write_text(self.directory.read_text(encoding="utf-8"), "utf-8")
            exchange = self.exchange(self.state)
            result = self.call(exchange, cmdlet, p)
            if cmdlet.startswith("Enable-"):
                self.state.write_text(json.dumps(exchange.snapshot()), encoding="utf-8")
            return result

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
    if not isinstance(hello, dict) or set(hello) != {"nonce", "remote_exchange_path"}:
        refuse(f"the first stdin line must be the hello, got {hello!r}")
    host = Host(str(hello["nonce"]))
    host.start(str(hello["remote_exchange_path"]))
    host.serve()


if __name__ == "__main__":
    main()

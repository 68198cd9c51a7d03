"""A fake Exchange remote PowerShell endpoint: WS-Man over HTTP(S) on loopback, PSRP by psrpcore.

The real pypsrp client talks to it exactly as it talks to ``http(s)://<fqdn>/PowerShell`` on an
Exchange server: WS-Man Create/Command/Send/Receive/Signal/Delete/Get SOAP envelopes carry PSRP
fragments, which psrpcore's server-side `ServerRunspacePool` and `ServerPipeline` decode and
answer. Cmdlets run against a `SimulatedExchange`, so results and error records carry Exchange's
real texts, CategoryInfo.Reason, FullyQualifiedErrorId and exception type.

Like Exchange's ``Microsoft.Exchange`` endpoint it
* serves only that configuration (another resource URI is "not found in the WS-Management
  catalog");
* runs in NoLanguage mode: a script is refused with PowerShell's own ParseException, and only the
  cmdlets the service may run exist (anything else is CommandNotFoundException);
* writes "not found" errors of Get-* as non-terminating errors and Enable-* failures as
  terminating ones, so clients must read both the error stream and the pipeline state.

Authentication is Basic, accepted over TLS only (like WinRM with AllowUnencrypted=false).

The wire exchange per cmdlet is the real one, three HTTP requests with pypsrp: Command (carrying
the CreatePipeline message), one Receive that waits until the cmdlet has output or ended, and the
Signal `terminate` with which the client closes the command. As PowerShell's server does, the
pipeline's Running state is not sent to the client: `ServerPowerShellDriver.
HandlePowerShellInvocationStateChanged` sends only Completed, Failed and Stopped (read in
PowerShell/PowerShell src/System.Management.Automation/engine/remoting/server/
ServerPowerShellDriver.cs, and the same switch in a decompiled Windows PowerShell copy of that
class); psrpcore's `ServerPipeline.start()` would send it and cost every cmdlet a second Receive.

Timing: with `delay_seconds`, a cmdlet ends that long after its Command request arrived. This
endpoint's own decoding of the pipeline (psrpcore in Python, 2-4 ms per Command on these
machines; Exchange's .NET does it in a fraction of that) falls inside the cmdlet's time instead of
being added to it, so `bench/remote_latency.py` measures the client, not this fake's Python.
Encoding the output after the cmdlet (about 1.5 ms) and the HTTP and TLS work of every request
still add to what the client waits for.

Not modelled: whether WinRM answers a waiting Receive with a cmdlet's output before its final
state is queued (here both go in one Receive; if Exchange split them, a cmdlet would cost one more
Receive); Kerberos/Negotiate and WS-Man message encryption; Exchange's full objects (a real
Get-User or Enable-Mailbox result carries far more properties than the few sent here, so the
client's deserialization costs more against Exchange); Exchange's per-user throttling
(PowerShellMaxConcurrency and friends); session loading time (seconds on Exchange); the
two-minute idle drop by itself (tests call `drop_idle_pools()`).

Fault modes for the tests: `delay_seconds` (every cmdlet ends that long after its Command
arrived), `hold_commands()` (cmdlets wait until released or stopped; `wait_for_commands(n)` waits
until n arrived, `wait_for_waiting_receive()` until a Receive waits for a pipeline's data),
`drop_idle_pools()` (the server forgets every shell,
as Exchange does with idle sessions) and `drop_connection_on(action)` (the next such request is
answered by closing the socket).

Every command received is recorded in `commands` with its parameters exactly as deserialized.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import socket
import ssl
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final

import psrpcore
from psrpcore.types import (
    ErrorCategory,
    ErrorCategoryInfo,
    ErrorRecord,
    NETException,
    PSInvocationState,
    PSNoteProperty,
    PSObject,
    PSRPMessageType,
)

from vezaprovisioner.exchange.errors import ExchangeError
from vezaprovisioner.exchange.port import (
    DirectoryUser,
    EnableMailbox,
    EnableRemoteMailbox,
    Recipient,
)
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange

NS: Final = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "wsa": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "wsman": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "wst": "http://schemas.xmlsoap.org/ws/2004/09/transfer",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
    "f": "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault",
    "pwsh": "http://schemas.microsoft.com/powershell",
    "xml": "http://www.w3.org/XML/1998/namespace",
}
for _prefix, _uri in NS.items():
    if _prefix != "xml":
        ET.register_namespace(_prefix, _uri)

EXCHANGE_RESOURCE_URI: Final = "http://schemas.microsoft.com/powershell/Microsoft.Exchange"
SHELL_RESOURCE_URI: Final = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
_ACTION_BASE: Final = {
    "Create": "http://schemas.xmlsoap.org/ws/2004/09/transfer/",
    "Delete": "http://schemas.xmlsoap.org/ws/2004/09/transfer/",
    "Get": "http://schemas.xmlsoap.org/ws/2004/09/transfer/",
}
_SHELL_ACTION_BASE: Final = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/"
_FAULT_ACTION: Final = "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault"
# MS-PSRP spells the stop signal "crtl_c"; pypsrp sends "ctrl_c" (accepted by Windows too).
_SIGNALS_CTRL_C: Final = frozenset({"powershell/signal/crtl_c", "powershell/signal/ctrl_c"})
_SIGNAL_TERMINATE: Final = (
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/terminate"
)
_COMMAND_DONE: Final = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done"

# WS-Man fault codes Windows returns (winerror.h), which pypsrp inspects.
FAULT_OPERATION_TIMEOUT: Final = 0x80338029
FAULT_SHELL_NOT_FOUND: Final = 0x8033805B
FAULT_RESOURCE_NOT_FOUND: Final = 0x80338000

#: The cmdlets that exist in the fake runspace: the service's allow-list.
CMDLETS: Final = frozenset({"Get-User", "Get-Recipient", "Enable-Mailbox", "Enable-RemoteMailbox"})
_MAX_WAIT_SECONDS: Final = 30.0
# IIS's 404 page is HTML, not well-formed XML (an unclosed <meta>): clients see no WSManFault.
_IIS_404: Final = (
    b'<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" '
    b'"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">\r\n<html><head>'
    b'<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">'
    b"<title>404 - File or directory not found.</title></head><body>"
    b"<h2>404 - File or directory not found.</h2></body></html>"
)
# Characters XML 1.0 cannot carry; PowerShell's serializer writes them as _xHHHH_.
_XML_INVALID: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_NO_LANGUAGE_MESSAGE: Final = (
    "The syntax is not supported by this runspace. This can occur if the runspace is in "
    "no-language mode."
)


@dataclass(frozen=True)
class ReceivedCommand:
    """One command as the endpoint received it: the name and the deserialized parameters."""

    name: str
    parameters: dict[str, Any]
    is_script: bool


@dataclass
class _Pipeline:
    server: psrpcore.ServerPipeline
    #: When its Command request arrived (`time.monotonic()`): the cmdlet's time counts from here.
    arrived: float
    stopped: threading.Event = field(default_factory=threading.Event)
    done: bool = False


@dataclass
class _Shell:
    shell_id: str
    pool: psrpcore.ServerRunspacePool
    #: Notified when data for this shell is queued or the shell goes (the endpoint's lock).
    ready: threading.Condition
    pipelines: dict[uuid.UUID, _Pipeline] = field(default_factory=dict)
    # Outgoing PSRP data per target (None = the pool itself), drained by Receive.
    outgoing: dict[uuid.UUID | None, bytearray] = field(
        default_factory=lambda: defaultdict(bytearray)
    )


class _Fault(Exception):
    def __init__(self, code: int, message: str, subcode: str = "w:InternalError") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.subcode = subcode


class FakeExchangeEndpoint:
    """The fake ``/PowerShell`` endpoint. Use as a context manager; it binds 127.0.0.1."""

    def __init__(
        self,
        exchange: SimulatedExchange,
        *,
        username: str,
        password: str,
        tls: ssl.SSLContext | None = None,
        path: str = "/PowerShell",
        machine: str = "EXSIM01.contoso.com",
    ) -> None:
        self.exchange = exchange
        self.username = username
        self.password = password
        self.path = path
        self.machine = machine
        self.tls = tls
        #: Every cmdlet the endpoint was asked to run, in order.
        self.commands: list[ReceivedCommand] = []
        #: Every WS-Man signal code received, in order.
        self.signals: list[str] = []
        #: How many runspace pools (WS-Man shells) were created.
        self.shells_created = 0
        #: How many requests of each WS-Man action arrived (Get is pypsrp's is_alive()).
        self.actions: Counter[str] = Counter()
        #: Seconds every cmdlet takes (the stop signal cuts it short).
        self.delay_seconds = 0.0
        #: How many Receive requests are waiting for a pipeline's data right now.
        self.receives_waiting = 0
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._shells: dict[str, _Shell] = {}
        self._gate: threading.Event | None = None
        self._drop: dict[str, int] = defaultdict(int)
        self._connections: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def __enter__(self) -> FakeExchangeEndpoint:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving and close every connection (the server going away). Idempotent."""
        self.release_commands()
        self._server.shutdown()
        self._server.server_close()
        with self._cond:
            connections = list(self._connections)
        for conn in connections:
            _close_quietly(conn)
        self._thread.join(timeout=10)

    # ---- fault modes -----------------------------------------------------------------------

    def hold_commands(self) -> None:
        """From now on cmdlets wait until `release_commands()` or a stop signal."""
        with self._cond:
            self._gate = threading.Event()

    def release_commands(self) -> None:
        with self._cond:
            if self._gate is not None:
                self._gate.set()
                self._gate = None
            self._cond.notify_all()

    def wait_for_commands(self, count: int, timeout: float = 10.0) -> bool:
        """Block until `count` cmdlets have arrived (True), or the timeout passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.commands) >= count, timeout)

    def wait_for_waiting_receive(self, timeout: float = 10.0) -> bool:
        """Block until a Receive request waits for data (True), or the timeout passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.receives_waiting > 0, timeout)

    def drop_idle_pools(self) -> None:
        """Forget every shell, as Exchange does with sessions idle for about two minutes."""
        with self._cond:
            for shell in self._shells.values():
                for pipeline in shell.pipelines.values():
                    pipeline.stopped.set()
                shell.ready.notify_all()
            self._shells.clear()
            self._cond.notify_all()

    def drop_connection_on(self, action: str, count: int = 1) -> None:
        """Answer the next `count` requests of this WS-Man action by closing the connection."""
        with self._cond:
            self._drop[action] += count

    @property
    def open_shells(self) -> int:
        with self._cond:
            return len(self._shells)

    # ---- WS-Man ----------------------------------------------------------------------------

    def handle(self, body: bytes, *, arrived: float | None = None) -> tuple[int, bytes] | None:
        """One SOAP request -> (HTTP status, SOAP response), or None to drop the connection.

        `arrived` is when the request arrived (`time.monotonic()`, default now): a Command's cmdlet
        time counts from it.
        """
        arrived = time.monotonic() if arrived is None else arrived
        request = ET.fromstring(body)
        header = _find(request, "s:Header")
        action_uri = _text(header, "wsa:Action")
        action = action_uri.rsplit("/", 1)[-1]
        message_id = _text(header, "wsa:MessageID")
        with self._cond:
            self.actions[action] += 1
            if self._drop[action] > 0:
                self._drop[action] -= 1
                return None
        try:
            handler = getattr(self, f"_{action.lower()}", None)
            if handler is None:
                raise _Fault(0x80338000, f"The WS-Management action {action_uri} is not supported.")
            if action == "Command":
                response_action, response_body = self._command(
                    header, _find(request, "s:Body"), arrived
                )
            else:
                response_action, response_body = handler(header, _find(request, "s:Body"))
        except _Fault as fault:
            return 500, self._fault_envelope(message_id, fault)
        return 200, _envelope(response_action, message_id, response_body)

    def _create(self, header: ET.Element, body: ET.Element) -> tuple[str, ET.Element]:
        resource_uri = _text(header, "wsman:ResourceURI")
        if resource_uri != EXCHANGE_RESOURCE_URI:
            raise _Fault(
                FAULT_RESOURCE_NOT_FOUND,
                "The WS-Management service cannot process the request. The resource URI "
                f"({resource_uri}) was not found in the WS-Management catalog. The catalog "
                "contains the metadata that describes resources, or logical endpoints.",
                "w:DestinationUnreachable",
            )
        shell_el = _find(body, "rsp:Shell")
        shell_id = shell_el.attrib.get("ShellId") or str(uuid.uuid4()).upper()
        creation = _text(shell_el, "pwsh:creationXml")
        shell = _Shell(shell_id, psrpcore.ServerRunspacePool(), threading.Condition(self._lock))
        with self._cond:
            self._shells[shell_id] = shell
            self.shells_created += 1
            self._feed(shell, _b64(creation))
        created = ET.Element(_q("wst:ResourceCreated"))
        ET.SubElement(created, _q("wsa:Address")).text = f"{self.scheme}://localhost{self.path}"
        ref = ET.SubElement(created, _q("wsa:ReferenceParameters"))
        ET.SubElement(ref, _q("wsman:ResourceURI")).text = resource_uri
        selectors = ET.SubElement(ref, _q("wsman:SelectorSet"))
        ET.SubElement(selectors, _q("wsman:Selector"), Name="ShellId").text = shell_id
        info = ET.Element(_q("rsp:Shell"))
        for name, value in (
            ("ShellId", shell_id),
            ("ResourceUri", resource_uri),
            ("Owner", self.username),
            ("ClientIP", "127.0.0.1"),
            ("IdleTimeOut", "PT7200.000S"),
            ("InputStreams", "stdin pr"),
            ("OutputStreams", "stdout"),
            ("ShellRunTime", "P0DT0H0M0S"),
            ("ShellInactivity", "P0DT0H0M0S"),
        ):
            ET.SubElement(info, _q(f"rsp:{name}")).text = value
        return "CreateResponse", _bodies(created, info)

    def _get(self, header: ET.Element, body: ET.Element) -> tuple[str, ET.Element]:
        with self._cond:
            shell = self._shell(header)
            info = ET.Element(_q("rsp:Shell"))
            ET.SubElement(info, _q("rsp:ShellId")).text = shell.shell_id
            ET.SubElement(info, _q("rsp:State")).text = "Connected"
        return "GetResponse", _bodies(info)

    def _delete(self, header: ET.Element, body: ET.Element) -> tuple[str, ET.Element]:
        with self._cond:
            shell = self._shell(header)
            for pipeline in shell.pipelines.values():
                pipeline.stopped.set()
            del self._shells[shell.shell_id]
            shell.ready.notify_all()
            self._cond.notify_all()
        return "DeleteResponse", _bodies()

    def _command(
        self, header: ET.Element, body: ET.Element, arrived: float
    ) -> tuple[str, ET.Element]:
        line = _find(body, "rsp:CommandLine")
        command_id = line.attrib.get("CommandId") or str(uuid.uuid4()).upper()
        first_fragment = _b64(_text(line, "rsp:Arguments"))
        with self._cond:
            shell = self._shell(header)
            pipeline_id = uuid.UUID(command_id)
            pipeline = _Pipeline(psrpcore.ServerPipeline(shell.pool, pipeline_id), arrived)
            shell.pipelines[pipeline_id] = pipeline
            self._feed(shell, first_fragment, pipeline_id)
        response = ET.Element(_q("rsp:CommandResponse"))
        ET.SubElement(response, _q("rsp:CommandId")).text = command_id
        return "CommandResponse", _bodies(response)

    def _send(self, header: ET.Element, body: ET.Element) -> tuple[str, ET.Element]:
        stream = _find(body, "rsp:Send/rsp:Stream")
        command_id = stream.attrib.get("CommandId")
        with self._cond:
            shell = self._shell(header)
            self._feed(
                shell, _b64(stream.text or ""), uuid.UUID(command_id) if command_id else None
            )
        return "SendResponse", _bodies(ET.Element(_q("rsp:SendResponse")))

    def _signal(self, header: ET.Element, body: ET.Element) -> tuple[str, ET.Element]:
        signal = _find(body, "rsp:Signal")
        code = _text(signal, "rsp:Code")
        pipeline_id = uuid.UUID(signal.attrib["CommandId"])
        with self._cond:
            self.signals.append(code)
            shell = self._shell(header)
            pipeline = shell.pipelines.get(pipeline_id)
            if pipeline is not None:
                if code in _SIGNALS_CTRL_C:
                    pipeline.stopped.set()
                    if pipeline.server.state == PSInvocationState.Running:
                        pipeline.server.stop()
                        pipeline.done = True
                        self._drain(shell)
                elif code.casefold() == _SIGNAL_TERMINATE and pipeline.done:
                    pipeline.server.close()
                    del shell.pipelines[pipeline_id]
                    shell.outgoing.pop(pipeline_id, None)
            self._cond.notify_all()
        return "SignalResponse", _bodies(ET.Element(_q("rsp:SignalResponse")))

    def _receive(self, header: ET.Element, body: ET.Element) -> tuple[str, ET.Element]:
        desired = _find(body, "rsp:Receive/rsp:DesiredStream")
        command_id = desired.attrib.get("CommandId")
        target = uuid.UUID(command_id) if command_id else None
        wait = min(_operation_timeout(header), _MAX_WAIT_SECONDS)
        with self._cond:
            shell = self._shell(header)
            self.receives_waiting += 1
            self._cond.notify_all()
            try:
                # Woken only by this shell's data: other sessions' Receives sleep on.
                ready = shell.ready.wait_for(
                    lambda: shell.shell_id not in self._shells or bool(shell.outgoing[target]), wait
                )
            finally:
                self.receives_waiting -= 1
            if not ready:
                raise _Fault(
                    FAULT_OPERATION_TIMEOUT,
                    "The WS-Management service cannot complete the operation within the time "
                    "specified in OperationTimeout.",
                    "w:TimedOut",
                )
            shell = self._shell(header)
            data = bytes(shell.outgoing.pop(target))
            pipeline = shell.pipelines.get(target) if target else None
            finished = pipeline is not None and pipeline.done and not shell.outgoing.get(target)
        response = ET.Element(_q("rsp:ReceiveResponse"))
        stream = ET.SubElement(response, _q("rsp:Stream"), Name="stdout")
        if command_id:
            stream.attrib["CommandId"] = command_id
        stream.text = base64.b64encode(data).decode()
        if finished and command_id:
            state = ET.SubElement(response, _q("rsp:CommandState"), CommandId=command_id)
            state.attrib["State"] = _COMMAND_DONE
        return "ReceiveResponse", _bodies(response)

    # ---- PSRP ------------------------------------------------------------------------------

    def _shell(self, header: ET.Element) -> _Shell:
        selector = header.find("wsman:SelectorSet/wsman:Selector[@Name='ShellId']", NS)
        shell_id = selector.text if selector is not None and selector.text else ""
        shell = self._shells.get(shell_id)
        if shell is None:
            raise _Fault(
                FAULT_SHELL_NOT_FOUND,
                f"The request for the Windows Remote Shell with ShellId {shell_id} failed because "
                "the shell was not found on the server. Possible causes are: the specified ShellId "
                "is incorrect or the shell no longer exists on the server. Provide the correct "
                "ShellId or create a new shell and try again.",
                "w:InvalidSelectors",
            )
        return shell

    def _feed(self, shell: _Shell, data: bytes, pipeline_id: uuid.UUID | None = None) -> None:
        """Give PSRP fragments to the pool and act on every complete message (lock held)."""
        stream = psrpcore.StreamType.default
        shell.pool.receive_data(psrpcore.PSRPPayload(data, stream, pipeline_id))
        while (event := shell.pool.next_event()) is not None:
            if isinstance(event, psrpcore.CreatePipelineEvent) and event.pipeline_id is not None:
                pipeline = shell.pipelines[event.pipeline_id]
                threading.Thread(
                    target=self._run, args=(shell, pipeline), daemon=True, name="fake-cmdlet"
                ).start()
        self._drain(shell)

    def _drain(self, shell: _Shell) -> None:
        """Move everything the pool wants to send into the per-target queues (lock held)."""
        while (payload := shell.pool.data_to_send()) is not None:
            shell.outgoing[payload.pipeline_id] += payload.data
        shell.ready.notify_all()

    def _run(self, shell: _Shell, pipeline: _Pipeline) -> None:
        """Execute one pipeline: like Exchange's endpoint, cmdlets only, never script text."""
        server = pipeline.server
        metadata = server.metadata
        with self._cond:
            # Running, told to nobody: PowerShell's server reports only terminal pipeline states
            # (Completed, Failed, Stopped) to the client, so a client's first Receive waits for
            # the cmdlet's output or end (psrpcore's start() would send a Running state message
            # and cost the client one more Receive per cmdlet than Exchange does).
            server._change_state(PSInvocationState.Running, emit=False)
            gate = self._gate
        commands = list(getattr(metadata, "commands", []))
        for command in commands:
            parameters = {str(name): value for name, value in command.parameters}
            with self._cond:
                self.commands.append(
                    ReceivedCommand(str(command.command_text), parameters, bool(command.is_script))
                )
                self._cond.notify_all()
        if gate is not None:
            with self._cond:
                self._cond.wait_for(
                    lambda: gate.is_set() or pipeline.stopped.is_set(), _MAX_WAIT_SECONDS
                )
        if self.delay_seconds:
            # The cmdlet's time counts from its Command's arrival (or its release), so this
            # endpoint's own decoding of the pipeline in Python (psrpcore: 2-4 ms here, which
            # Exchange's .NET does in far less) falls inside it instead of adding to it.
            started = pipeline.arrived if gate is None else time.monotonic()
            pipeline.stopped.wait(max(0.0, started + self.delay_seconds - time.monotonic()))
        if pipeline.stopped.is_set():
            return
        outputs: list[PSObject] = []
        error: tuple[ErrorRecord, bool] | None = None
        if len(commands) != 1 or commands[0].is_script:
            error = (_no_language_error(), True)
        else:
            command = commands[0]
            name = str(command.command_text)
            parameters = {str(n): v for n, v in command.parameters}
            try:
                outputs = self._execute(name, parameters)
            except _CommandNotFound:
                error = (_command_not_found(name), True)
            except ExchangeError as exc:
                # Get-* report "not found" as non-terminating errors; Enable-* fail terminally.
                error = (_error_record(exc, name), name.startswith("Enable-"))
        with self._cond:
            if pipeline.stopped.is_set() or server.state != PSInvocationState.Running:
                return
            for output in outputs:
                server.write_output(output)
            if error is not None and error[1]:
                # psrpcore has no public "fail" for a server pipeline; Failed carries the record.
                server._change_state(PSInvocationState.Failed, error[0])
            else:
                if error is not None:
                    # What write_error() sends, with the record's ToString made XML-safe.
                    server.prepare_message(error[0], message_type=PSRPMessageType.ErrorRecord)
                server.complete()
            pipeline.done = True
            self._drain(shell)

    def _execute(self, name: str, parameters: dict[str, Any]) -> list[PSObject]:
        if name not in CMDLETS:
            raise _CommandNotFound(name)
        sim = self.exchange

        def text(key: str) -> str | None:
            value = parameters.get(key)
            return None if value is None else str(value)

        identity = text("Identity") or ""
        dc = text("DomainController")
        if name == "Get-User" and "Identity" not in parameters:
            # Get-User -ResultSize N: the first N users (the readiness probe).
            limit = int(parameters.get("ResultSize") or 1000)
            guids = [user.guid for user in sim.directory.users[:limit]]
            return [_user_object(sim.get_user(guid, dc)) for guid in guids]
        if name == "Get-User":
            return [_user_object(sim.get_user(identity, dc))]
        if name == "Get-Recipient":
            return [_recipient_object(sim.get_recipient(identity, dc), "ReducedRecipient")]
        if name == "Enable-Mailbox":
            request = EnableMailbox(
                identity=identity,
                alias=text("Alias"),
                database=text("Database"),
                address_book_policy=text("AddressBookPolicy"),
                retention_policy=text("RetentionPolicy"),
                domain_controller=dc,
            )
            return [_recipient_object(sim.enable_mailbox(request), "Mailbox")]
        remote = EnableRemoteMailbox(
            identity=identity,
            alias=text("Alias"),
            remote_routing_address=text("RemoteRoutingAddress"),
            domain_controller=dc,
        )
        return [_recipient_object(sim.enable_remote_mailbox(remote), "RemoteMailbox")]

    # ---- HTTP glue -------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def authorized(self, header: str | None) -> bool:
        """Basic credentials, accepted over TLS only (AllowUnencrypted=false)."""
        if self.tls is None or not header or not header.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(header[6:], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, password = decoded.partition(":")
        return user == self.username and password == self.password

    def track(self, connection: socket.socket, alive: bool) -> None:
        with self._cond:
            if alive:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def _fault_envelope(self, relates_to: str, fault: _Fault) -> bytes:
        fault_el = ET.Element(_q("s:Fault"))
        code = ET.SubElement(fault_el, _q("s:Code"))
        ET.SubElement(code, _q("s:Value")).text = "s:Receiver"
        sub = ET.SubElement(code, _q("s:Subcode"))
        ET.SubElement(sub, _q("s:Value")).text = fault.subcode
        reason = ET.SubElement(fault_el, _q("s:Reason"))
        ET.SubElement(reason, _q("s:Text"), {_q("xml:lang"): "en-US"}).text = fault.message
        detail = ET.SubElement(fault_el, _q("s:Detail"))
        wsman_fault = ET.SubElement(
            detail, _q("f:WSManFault"), Code=str(fault.code), Machine=self.machine
        )
        ET.SubElement(wsman_fault, _q("f:Message")).text = fault.message
        return _envelope(_FAULT_ACTION, relates_to, _bodies(fault_el), absolute=True)


class _CommandNotFound(Exception):
    pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        endpoint: FakeExchangeEndpoint,
    ) -> None:
        self.endpoint = endpoint
        super().__init__(address, handler)
        if endpoint.tls is not None:
            self.socket = endpoint.tls.wrap_socket(self.socket, server_side=True)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, as IIS serves /PowerShell (pypsrp's is_alive relies on it)."""

    protocol_version = "HTTP/1.1"
    # One write per response: headers and body written apart stall on Nagle + delayed ACK.
    wbufsize = 1 << 16
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.endpoint.track(self.connection, True)

    def finish(self) -> None:
        self.server.endpoint.track(self.connection, False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pytest shows failures, not access logs."""

    def do_POST(self) -> None:
        arrived = time.monotonic()  # the request line and headers are in
        endpoint = self.server.endpoint
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path.rstrip("/").casefold() != endpoint.path.casefold():
            self._reply(404, _IIS_404, {"Content-Type": "text/html"})
            return
        if not endpoint.authorized(self.headers.get("Authorization")):
            self._reply(401, b"", {"WWW-Authenticate": 'Basic realm="WSMAN"'})
            return
        result = endpoint.handle(body, arrived=arrived)
        if result is None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        status, payload = result
        self._reply(status, payload, {"Content-Type": "application/soap+xml;charset=UTF-8"})

    def _reply(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


# ---- helpers -------------------------------------------------------------------------------


def _q(name: str) -> str:
    prefix, local = name.split(":")
    return f"{{{NS[prefix]}}}{local}"


def _find(element: ET.Element, path: str) -> ET.Element:
    found = element.find(path, NS)
    if found is None:
        raise _Fault(0x80338043, f"The WS-Management service cannot find {path} in the request.")
    return found


def _text(element: ET.Element, path: str) -> str:
    return _find(element, path).text or ""


def _b64(text: str) -> bytes:
    return base64.b64decode(text.encode())


def _operation_timeout(header: ET.Element) -> float:
    value = header.findtext("wsman:OperationTimeout", "PT20S", NS)
    match = re.fullmatch(r"PT(\d+(?:\.\d+)?)S", value.strip())
    return float(match.group(1)) if match else 20.0


def _bodies(*children: ET.Element) -> ET.Element:
    body = ET.Element(_q("s:Body"))
    body.extend(children)
    return body


def _envelope(action: str, relates_to: str, body: ET.Element, *, absolute: bool = False) -> bytes:
    if not absolute:
        base = _ACTION_BASE.get(action.removesuffix("Response"), _SHELL_ACTION_BASE)
        action = base + action
    envelope = ET.Element(_q("s:Envelope"))
    header = ET.SubElement(envelope, _q("s:Header"))
    ET.SubElement(header, _q("wsa:Action")).text = action
    ET.SubElement(header, _q("wsa:MessageID")).text = f"uuid:{str(uuid.uuid4()).upper()}"
    ET.SubElement(header, _q("wsa:RelatesTo")).text = relates_to
    ET.SubElement(
        header, _q("wsa:To")
    ).text = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous"
    envelope.append(body)
    data: bytes = ET.tostring(envelope, encoding="utf-8")
    return data


def _close_quietly(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def _exchange_object(type_name: str, properties: dict[str, Any], to_string: str) -> PSObject:
    """A deserialized Exchange object: its properties are adapted (.NET) properties."""
    obj = PSObject()
    obj.PSObject.type_names = [
        f"Microsoft.Exchange.Data.Directory.Management.{type_name}",
        "Microsoft.Exchange.Data.Directory.ADObject",
        "System.Object",
    ]
    for name, value in properties.items():
        obj.PSObject.adapted_properties.append(PSNoteProperty(name, value))
    obj.PSObject.to_string = _xml_safe(to_string)
    return obj


def _user_object(user: DirectoryUser) -> PSObject:
    return _exchange_object(
        "User",
        {
            "Guid": uuid.UUID(user.guid),
            "DistinguishedName": user.distinguished_name,
            "SamAccountName": user.sam_account_name,
            "UserPrincipalName": user.user_principal_name,
            "Name": user.name,
            "DisplayName": user.display_name,
            "RecipientTypeDetails": user.recipient_type_details,
        },
        user.name,
    )


def _recipient_object(recipient: Recipient, type_name: str) -> PSObject:
    return _exchange_object(
        type_name,
        {
            "Guid": uuid.UUID(recipient.guid),
            "DistinguishedName": recipient.distinguished_name,
            "Alias": recipient.alias,
            "PrimarySmtpAddress": recipient.primary_smtp_address,
            "RecipientTypeDetails": recipient.recipient_type_details,
            "Database": recipient.database,
        },
        recipient.distinguished_name,
    )


def _xml_safe(text: str) -> str:
    """ToString text as PowerShell serializes it (psrpcore leaves ToString unescaped)."""
    return _XML_INVALID.sub(lambda match: f"_x{ord(match.group()):04X}_", text)


def _exception(message: str, type_name: str, hresult: int = -2146233087) -> NETException:
    exception = NETException(Message=message, HResult=hresult)
    exception.PSObject.type_names = [type_name, "System.Exception", "System.Object"]
    return exception


def _error_record(exc: ExchangeError, cmdlet: str) -> ErrorRecord:
    """The ErrorRecord Exchange writes for `exc` (built from its classified fields)."""
    record = ErrorRecord(
        Exception=_exception(exc.message, exc.exception_type or "System.Exception"),
        CategoryInfo=ErrorCategoryInfo(
            Category=ErrorCategory.NotSpecified,
            Activity=cmdlet,
            Reason=exc.reason or "",
            TargetName="",
            TargetType="",
        ),
        FullyQualifiedErrorId=exc.error_id or "",
    )
    record.PSObject.to_string = _xml_safe(exc.message)
    return record


def _no_language_error() -> ErrorRecord:
    return ErrorRecord(
        Exception=_exception(
            _NO_LANGUAGE_MESSAGE, "System.Management.Automation.ParseException", -2146233087
        ),
        CategoryInfo=ErrorCategoryInfo(Category=ErrorCategory.ParserError, Reason="ParseException"),
        FullyQualifiedErrorId="ScriptsNotAllowed",
    )


def _command_not_found(name: str) -> ErrorRecord:
    return ErrorRecord(
        Exception=_exception(
            f"The term '{name}' is not recognized as the name of a cmdlet, function, script "
            "file, or operable program. Check the spelling of the name, or if a path was "
            "included, verify that the path is correct and try again.",
            "System.Management.Automation.CommandNotFoundException",
        ),
        CategoryInfo=ErrorCategoryInfo(
            Category=ErrorCategory.ObjectNotFound,
            Activity=name,
            Reason="CommandNotFoundException",
            TargetName=name,
            TargetType="String",
        ),
        FullyQualifiedErrorId="CommandNotFoundException",
    )


__all__ = [
    "CMDLETS",
    "EXCHANGE_RESOURCE_URI",
    "FakeExchangeEndpoint",
    "ReceivedCommand",
]

"""The wire protocol between the service and `host.ps1`: framing, encoding and messages.

Pure functions over bytes; nothing here starts a process or waits.

Wire format
-----------
Both directions carry one JSON object per line, **ASCII only**: every character outside
U+0020-U+007E travels as a ``\\uXXXX`` escape (UTF-16 code units, so U+1F600 is a surrogate pair).
The console encodings of Windows PowerShell 5.1 (an OEM code page when redirected) therefore never
matter, and José, Łukasz and 山田 arrive unchanged. Python never writes ``\\/`` (which
ConvertFrom-Json in 5.1 would turn into a date), and the service sends only strings as values.

Service → host (stdin, unframed: nobody else writes to the host's stdin):

* first line, the hello: ``{"nonce": "<32 hex>", "remote_exchange_path": "C:\\\\...ps1",
  "connect_lock_ms": "180000"}``, plus ``"transcript": "C:\\\\...txt"`` only when
  `vezaprovisioner probe --transcript` asks for one (the service never does);
* then one request per line: ``{"id": 7, "cmdlet": "Get-User",
  "parameters": {"Identity": "...", "DomainController": "..."}}``. The host checks the cmdlet and
  every parameter name against its allow-list and splats the values; they never become script.

Host → service (stdout): every protocol line is ``@@VZP <nonce> <json>``. The nonce is random per
process and is sent on stdin only (never on the command line), so banner, verbose or warning text
that RemoteExchange.ps1 or Connect-ExchangeServer manage to print can never be taken for a message;
such lines are skipped. Messages (``type``):

* ``connecting`` ``{}`` — RemoteExchange.ps1 is loaded and the host holds its account's connect
  mutex; Connect-ExchangeServer starts now;
* ``ready`` ``{server, user}`` — connected, and the cmdlets CREATE_EMAIL needs are available;
* ``startup_error`` ``{kind, detail}`` plus, by kind, ``server``, ``user``, ``path``,
  ``missing`` (cmdlet names) and ``records`` (``[{message, error_id, target}]``, every error
  record the failed step left, oldest first); the kinds are in `STARTUP_ERROR_KINDS`;
* ``result`` ``{id, objects: [{Property: "text" | null}]}`` — the cmdlet's output, flattened;
* ``error`` ``{id, message, reason, error_id, exception_type}`` — the cmdlet's error record;
* ``refused`` ``{id, detail}`` — the request named a cmdlet or parameter outside the allow-list,
  or was not valid JSON.

Standard error is not framed: it carries what powershell.exe itself prints (a crash, an error
outside any step), in the console's OEM code page on Windows; `stderr_encoding` names the codec.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Final

#: Marks a protocol line; followed by a space, the session nonce, a space and the JSON.
FRAME_MARK: Final = b"@@VZP"
#: A protocol line longer than this is a protocol error; a longer stray line is skipped.
MAX_LINE_BYTES: Final = 1024 * 1024

#: The cmdlets the host will run, and the parameters each may receive. host.ps1 holds the same
#: table (a test keeps the two equal); this copy lets the service refuse early.
ALLOWED_CMDLETS: Final[Mapping[str, frozenset[str]]] = {
    "Get-User": frozenset({"Identity", "DomainController"}),
    "Get-Recipient": frozenset({"Identity", "DomainController"}),
    "Enable-Mailbox": frozenset(
        {
            "Identity",
            "Alias",
            "Database",
            "AddressBookPolicy",
            "RetentionPolicy",
            "DomainController",
        }
    ),
    "Enable-RemoteMailbox": frozenset(
        {"Identity", "Alias", "RemoteRoutingAddress", "DomainController"}
    ),
}

#: The properties the host flattens from every output object (absent ones arrive as null).
FLATTENED_PROPERTIES: Final = (
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
)

#: Why a host could not get ready, one kind per step of host.ps1's startup.
STARTUP_ERROR_KINDS: Final = frozenset(
    {
        "transcript",  # Start-Transcript failed (probe --transcript only)
        "remote_exchange_path",  # no file at exchange.remote_exchange_path
        "dot_source",  # dot-sourcing it did not define Connect-ExchangeServer
        "connect_lock",  # another host of the account held the connect mutex too long
        "connect",  # Connect-ExchangeServer opened no Microsoft.Exchange session
        "module_import",  # a session, but not one Exchange cmdlet was imported
        "rbac",  # cmdlets imported, but not Enable-Mailbox (or Get-User, Get-Recipient)
    }
)
_NONCE: Final = re.compile(r"[0-9a-f]{32}")


class ProtocolError(Exception):
    """The host wrote something that breaks the protocol; the host can no longer be trusted."""


@dataclass(frozen=True)
class Request:
    """One cmdlet call: an allow-listed cmdlet and string parameters (bound by splatting)."""

    id: int
    cmdlet: str
    parameters: Mapping[str, str]


@dataclass(frozen=True)
class Ready:
    """The host connected to Exchange and found Enable-Mailbox."""

    server: str
    user: str


@dataclass(frozen=True)
class Connecting:
    """The host holds its account's connect mutex and is running Connect-ExchangeServer."""


@dataclass(frozen=True)
class StartupRecord:
    """One error record a failed startup step left: its text, error id and target server."""

    message: str
    error_id: str
    target: str


@dataclass(frozen=True)
class StartupFailure:
    """The host could not get ready; `kind` says which step failed, `detail` what it saw."""

    kind: str
    detail: str
    server: str | None = None
    user: str | None = None
    path: str | None = None
    missing: tuple[str, ...] = ()
    records: tuple[StartupRecord, ...] = ()


@dataclass(frozen=True)
class Result:
    """A cmdlet's output: one flattened property map per output object."""

    id: int
    objects: tuple[Mapping[str, str | None], ...]


@dataclass(frozen=True)
class ErrorRecord:
    """A cmdlet's error record, as `exchange.errors.classify` takes it."""

    id: int
    message: str
    reason: str | None
    error_id: str | None
    exception_type: str | None


@dataclass(frozen=True)
class Refused:
    """The host refused a request (cmdlet or parameter not allowed, or bad JSON)."""

    id: int | None
    detail: str


Message = Connecting | Ready | StartupFailure | Result | ErrorRecord | Refused


def new_nonce() -> str:
    """A fresh per-process nonce (128 random bits, hex)."""
    return secrets.token_hex(16)


def _ascii_json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def encode_hello(
    nonce: str,
    remote_exchange_path: str,
    *,
    connect_lock_seconds: float,
    transcript: str | None = None,
) -> bytes:
    """The first line on the host's stdin. `transcript` only from the probe, never the service."""
    if not _NONCE.fullmatch(nonce):
        raise ValueError("the nonce must be 32 lower-case hex digits")
    if not 0 < connect_lock_seconds <= 86_400:
        raise ValueError("connect_lock_seconds must be positive and at most a day")
    hello = {
        "nonce": nonce,
        "remote_exchange_path": remote_exchange_path,
        "connect_lock_ms": str(round(connect_lock_seconds * 1000)),
    }
    if transcript is not None:
        hello["transcript"] = transcript
    return _ascii_json(hello)


def stderr_encoding(platform: str = sys.platform) -> str:
    """The codec of the host's standard error: the console's OEM code page on Windows
    (powershell.exe writes redirected text in it; Python's "oem" codec is CP_OEMCP), else UTF-8."""
    return "oem" if platform == "win32" else "utf-8"


def decode_stderr(data: bytes, encoding: str) -> str:
    """Standard-error bytes as text; undecodable bytes become U+FFFD, never an exception."""
    return data.decode(encoding, "replace")


def encode_request(request: Request) -> bytes:
    """One request line. Refuses (ValueError) what the host would refuse anyway."""
    allowed = ALLOWED_CMDLETS.get(request.cmdlet)
    if allowed is None:
        raise ValueError(f"{request.cmdlet!r} is not an allow-listed cmdlet")
    unknown = set(request.parameters) - allowed
    if unknown:
        raise ValueError(f"{request.cmdlet} does not take {', '.join(sorted(unknown))}")
    if not all(isinstance(value, str) for value in request.parameters.values()):
        raise ValueError("parameter values must be strings")
    return _ascii_json(
        {"id": request.id, "cmdlet": request.cmdlet, "parameters": dict(request.parameters)}
    )


def frame_prefix(nonce: str) -> bytes:
    """What every protocol line of this session starts with."""
    return FRAME_MARK + b" " + nonce.encode("ascii") + b" "


def _text(data: Mapping[str, object], key: str, *, optional: bool = False) -> str | None:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _required(data: Mapping[str, object], key: str) -> str:
    value = _text(data, key)
    assert value is not None
    return value


def _id(data: Mapping[str, object], *, optional: bool = False) -> int | None:
    value = data.get("id")
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"'id' must be an integer, got {value!r}")
    return value


def _objects(value: object) -> tuple[Mapping[str, str | None], ...]:
    if not isinstance(value, list):
        raise ProtocolError("'objects' must be a list")
    objects: list[Mapping[str, str | None]] = []
    for item in value:
        if not isinstance(item, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in item.items()
        ):
            raise ProtocolError("each object must map property names to text or null")
        objects.append(item)
    return tuple(objects)


def _names(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ProtocolError("'missing' must be a list of cmdlet names")
    return tuple(value)


def _records(value: object) -> tuple[StartupRecord, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ProtocolError("'records' must be a list")
    records = []
    for item in value:
        if not isinstance(item, dict):
            raise ProtocolError("each record must be an object")
        records.append(
            StartupRecord(
                message=_text(item, "message", optional=True) or "",
                error_id=_text(item, "error_id", optional=True) or "",
                target=_text(item, "target", optional=True) or "",
            )
        )
    return tuple(records)


def decode_message(payload: str) -> Message:
    """One message from the JSON text after the frame prefix."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"a framed line is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ProtocolError("a framed line is not a JSON object")
    kind = data.get("type")
    if kind == "ready":
        return Ready(server=_required(data, "server"), user=_required(data, "user"))
    if kind == "connecting":
        return Connecting()
    if kind == "startup_error":
        failure = StartupFailure(
            kind=_required(data, "kind"),
            detail=_required(data, "detail"),
            server=_text(data, "server", optional=True) or None,
            user=_text(data, "user", optional=True) or None,
            path=_text(data, "path", optional=True) or None,
            missing=_names(data.get("missing")),
            records=_records(data.get("records")),
        )
        if failure.kind not in STARTUP_ERROR_KINDS:
            raise ProtocolError(f"unknown startup error kind {failure.kind!r}")
        return failure
    if kind == "result":
        request_id = _id(data)
        assert request_id is not None
        return Result(id=request_id, objects=_objects(data.get("objects")))
    if kind == "error":
        request_id = _id(data)
        assert request_id is not None
        return ErrorRecord(
            id=request_id,
            message=_required(data, "message"),
            reason=_text(data, "reason", optional=True) or None,
            error_id=_text(data, "error_id", optional=True) or None,
            exception_type=_text(data, "exception_type", optional=True) or None,
        )
    if kind == "refused":
        return Refused(id=_id(data, optional=True), detail=_required(data, "detail"))
    raise ProtocolError(f"unknown message type {kind!r}")


def parse_line(line: bytes, nonce: str) -> Message | None:
    """The message on one stdout line (without its newline), or None for a stray line.

    A line is ours only if it starts with this session's prefix; then it must be ASCII JSON.
    """
    prefix = frame_prefix(nonce)
    line = line.rstrip(b"\r\n")
    if not line.startswith(prefix):
        return None
    try:
        payload = line[len(prefix) :].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("a framed line contains bytes that are not ASCII") from None
    return decode_message(payload)


def read_lines(stream: IO[bytes], nonce: str, max_line: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The stream's protocol lines, stray lines skipped; ends at EOF.

    Memory stays bounded: a stray line longer than `max_line` is skipped in pieces; a protocol
    line longer than that raises ProtocolError. A partial line at EOF is dropped (the host died
    while writing it).
    """
    prefix = frame_prefix(nonce)
    while True:
        chunk = stream.readline(max_line + 1)
        if not chunk:
            return
        if chunk.endswith(b"\n"):
            if chunk.startswith(prefix):
                yield chunk
            continue
        if len(chunk) <= max_line:
            return  # EOF in the middle of a line
        if chunk.startswith(prefix):
            raise ProtocolError(f"a protocol line is longer than {max_line} bytes")
        while chunk and not chunk.endswith(b"\n"):  # skip the rest of a long stray line
            chunk = stream.readline(max_line + 1)

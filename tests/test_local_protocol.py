"""The host protocol as pure functions over bytes: framing, ASCII encoding, message shapes."""

from __future__ import annotations

import io
import json
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from vezaprovisioner.exchange.local.protocol import (
    Connecting,
    ErrorRecord,
    ProtocolError,
    Ready,
    Refused,
    Request,
    Result,
    StartupFailure,
    StartupRecord,
    decode_stderr,
    encode_hello,
    encode_request,
    frame_prefix,
    new_nonce,
    parse_line,
    read_lines,
    stderr_encoding,
)

NONCE = "0123456789abcdef0123456789abcdef"
_SLASH_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\/")


def framed(payload: object, nonce: str = NONCE) -> bytes:
    text = json.dumps(payload, ensure_ascii=True)
    return frame_prefix(nonce) + text.encode("ascii") + b"\n"


def test_requests_are_one_ascii_line_with_escapes() -> None:
    line = encode_request(
        Request(id=3, cmdlet="Get-User", parameters={"Identity": "José Łukasz 山田 😀"})
    )
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert line.isascii()
    for escape in (b"\\u00e9", b"\\u5c71", b"\\ud83d\\ude00"):
        assert escape in line
    assert json.loads(line)["parameters"]["Identity"] == "José Łukasz 山田 😀"


@given(st.text())
@example("\\/Date(0)\\/")
def test_any_text_survives_the_request_encoding(value: str) -> None:
    line = encode_request(Request(id=1, cmdlet="Get-User", parameters={"Identity": value}))
    assert line.isascii()
    assert line.count(b"\n") == 1
    # No "\/" escape (an odd run of backslashes before "/"): ConvertFrom-Json in 5.1 reads
    # "\/Date(...)\/" as a date.
    assert _SLASH_ESCAPE.search(line) is None
    assert json.loads(line)["parameters"]["Identity"] == value


@given(st.text())
def test_any_text_survives_the_answer_decoding(value: str) -> None:
    line = framed({"type": "result", "id": 1, "objects": [{"Name": value, "Alias": None}]})
    assert parse_line(line, NONCE) == Result(id=1, objects=({"Name": value, "Alias": None},))


def test_requests_outside_the_allow_list_are_never_encoded() -> None:
    with pytest.raises(ValueError, match="not an allow-listed cmdlet"):
        encode_request(Request(id=1, cmdlet="Remove-Mailbox", parameters={"Identity": "x"}))
    with pytest.raises(ValueError, match="does not take ScriptBlock"):
        encode_request(Request(id=1, cmdlet="Get-User", parameters={"ScriptBlock": "x"}))


def test_hello_carries_the_nonce_path_and_lock_wait() -> None:
    hello = encode_hello(
        NONCE, "C:\\Program Files\\Exchange\\RemoteExchange.ps1", connect_lock_seconds=180
    )
    # Values are strings only: ConvertFrom-Json in 5.1 is given nothing else to interpret.
    assert json.loads(hello) == {
        "nonce": NONCE,
        "remote_exchange_path": "C:\\Program Files\\Exchange\\RemoteExchange.ps1",
        "connect_lock_ms": "180000",
    }
    with pytest.raises(ValueError, match="nonce"):
        encode_hello("not hex", "C:\\x.ps1", connect_lock_seconds=1)
    with pytest.raises(ValueError, match="connect_lock_seconds"):
        encode_hello(NONCE, "C:\\x.ps1", connect_lock_seconds=0)


def test_only_an_asked_for_transcript_travels_in_the_hello() -> None:
    plain = json.loads(encode_hello(NONCE, "C:\\x.ps1", connect_lock_seconds=1))
    assert "transcript" not in plain
    asked = encode_hello(
        NONCE, "C:\\x.ps1", connect_lock_seconds=1, transcript="C:\\Temp\\Über.txt"
    )
    assert asked.isascii()
    assert json.loads(asked)["transcript"] == "C:\\Temp\\Über.txt"


def test_host_stderr_is_read_in_the_oem_code_page_on_windows() -> None:
    assert stderr_encoding("win32") == "oem"
    assert stderr_encoding("linux") == "utf-8"
    german = "Der Zugriff wurde verweigert. Überprüfen Sie die Größe."
    for code_page in ("cp850", "cp437"):
        data = german.encode(code_page)
        assert decode_stderr(data, code_page) == german
        assert decode_stderr(data, "utf-8") != german  # read as UTF-8 it arrives garbled
    assert decode_stderr(b"\xff\xfe ok", "utf-8") == "\ufffd\ufffd ok"


def test_nonces_are_fresh() -> None:
    assert len({new_nonce() for _ in range(100)}) == 100


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            {"type": "ready", "server": "EX01", "user": "CONTOSO\\svc"},
            Ready("EX01", "CONTOSO\\svc"),
        ),
        (
            {"type": "startup_error", "kind": "rbac", "detail": "CONTOSO\\svc"},
            StartupFailure("rbac", "CONTOSO\\svc"),
        ),
        ({"type": "connecting"}, Connecting()),
        (
            {
                "type": "startup_error",
                "kind": "connect",
                "detail": "no session",
                "records": [
                    {
                        "message": "Access is denied.",
                        "error_id": "AccessDenied,PSSessionOpenFailed",
                        "target": "EX02.contoso.com",
                    },
                    {"message": "NonInteractive mode.", "error_id": "", "target": ""},
                ],
            },
            StartupFailure(
                "connect",
                "no session",
                records=(
                    StartupRecord(
                        "Access is denied.", "AccessDenied,PSSessionOpenFailed", "EX02.contoso.com"
                    ),
                    StartupRecord("NonInteractive mode.", "", ""),
                ),
            ),
        ),
        (
            {
                "type": "startup_error",
                "kind": "module_import",
                "detail": "no cmdlets",
                "server": "EX01",
                "user": "CONTOSO\\svc",
                "path": "C:\\Users\\svc\\AppData\\Roaming\\Microsoft\\Exchange",
                "missing": ["Get-User"],
            },
            StartupFailure(
                "module_import",
                "no cmdlets",
                server="EX01",
                user="CONTOSO\\svc",
                path="C:\\Users\\svc\\AppData\\Roaming\\Microsoft\\Exchange",
                missing=("Get-User",),
            ),
        ),
        (
            {
                "type": "error",
                "id": 4,
                "message": "not found",
                "reason": "ManagementObjectNotFoundException",
                "error_id": "x,GetUser",
                "exception_type": "",
            },
            ErrorRecord(4, "not found", "ManagementObjectNotFoundException", "x,GetUser", None),
        ),
        ({"type": "refused", "id": None, "detail": "bad"}, Refused(None, "bad")),
    ],
)
def test_messages_decode(payload: object, message: object) -> None:
    assert parse_line(framed(payload), NONCE) == message


@pytest.mark.parametrize(
    "line",
    [
        b"Welcome to the Exchange Management Shell!\n",
        b"VERBOSE: Connecting to EX01.contoso.com.\n",
        b"\xff\xfe Willkommen \x84\x94\n",
        b'@@VZP {"type":"result","id":1,"objects":[]}\n',
        framed({"type": "result", "id": 1, "objects": []}, nonce="f" * 32),
        b" " + framed({"type": "result", "id": 1, "objects": []}),
    ],
)
def test_stray_lines_are_not_messages(line: bytes) -> None:
    assert parse_line(line, NONCE) is None


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (frame_prefix(NONCE) + b'{"type":"ready","server":"\xc3\xa9","user":"x"}\n', "not ASCII"),
        (frame_prefix(NONCE) + b"{not json\n", "not valid JSON"),
        (frame_prefix(NONCE) + b"[1]\n", "not a JSON object"),
        (framed({"type": "gossip"}), "unknown message type"),
        (framed({"type": "result", "id": "1", "objects": []}), "'id' must be an integer"),
        (framed({"type": "result", "id": 1, "objects": [{"Name": 5}]}), "text or null"),
        (framed({"type": "startup_error", "kind": "boom", "detail": ""}), "unknown startup"),
        (
            framed({"type": "startup_error", "kind": "connect", "detail": "", "records": {}}),
            "'records' must be a list",
        ),
        (
            framed({"type": "startup_error", "kind": "rbac", "detail": "", "missing": [1]}),
            "'missing' must be a list",
        ),
    ],
)
def test_broken_frames_are_protocol_errors(line: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        parse_line(line, NONCE)


def test_reader_skips_noise_and_keeps_frames() -> None:
    first = framed({"type": "ready", "server": "EX01", "user": "u"})
    second = framed({"type": "result", "id": 1, "objects": []})
    stream = io.BytesIO(b"banner\n" + b"x" * 5000 + b"\n" + first + b"\xff\n" + second)
    assert list(read_lines(stream, NONCE, max_line=1000)) == [first, second]


def test_reader_refuses_an_oversized_frame() -> None:
    stream = io.BytesIO(framed({"type": "ready", "server": "x" * 5000, "user": "u"}))
    with pytest.raises(ProtocolError, match="longer than 1000 bytes"):
        list(read_lines(stream, NONCE, max_line=1000))


def test_reader_drops_a_partial_line_at_eof() -> None:
    whole = framed({"type": "result", "id": 1, "objects": []})
    stream = io.BytesIO(whole + whole[:20])
    assert list(read_lines(stream, NONCE)) == [whole]


_RECORD = st.fixed_dictionaries(
    {"message": st.text(), "error_id": st.text(max_size=80), "target": st.text(max_size=80)}
)


@given(records=st.lists(_RECORD, max_size=25), missing=st.lists(st.text(max_size=30)))
def test_any_startup_records_survive_the_decoding(
    records: list[dict[str, str]], missing: list[str]
) -> None:
    line = framed(
        {
            "type": "startup_error",
            "kind": "connect",
            "detail": "d",
            "records": records,
            "missing": missing,
        }
    )
    failure = parse_line(line, NONCE)
    assert isinstance(failure, StartupFailure)
    assert failure.records == tuple(
        StartupRecord(r["message"], r["error_id"], r["target"]) for r in records
    )
    assert failure.missing == tuple(missing)

"""The audit trail, and the rule that no password or Authorization value lands anywhere on disk."""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import PASSWORD, USER, basic
from vezaprovisioner import logs
from vezaprovisioner.audit import AuditEvent, AuditTrail
from vezaprovisioner.config import AuditSettings
from vezaprovisioner.logs import dated_files

EMAILS = "/VezaProvisioner/api/v1/emails"


def audit_lines(data_dir: Path) -> list[dict[str, Any]]:
    """Every line of the trail (its dated files, oldest first). No flush: `write` returns only
    once its line is in the file."""
    return [
        json.loads(line)
        for path in dated_files(data_dir / "audit.jsonl")
        for line in path.open(encoding="utf-8")
    ]


def test_one_line_per_finished_request_with_who_what_outcome(
    client: TestClient, tmp_path: Path
) -> None:
    client.post(
        EMAILS, json={"identity": "CONTOSO\\plain", "alias": "pat"}, headers={"X-Request-ID": "a-1"}
    )
    client.post(EMAILS, json={"identity": "Alex Smith"}, headers={"X-Request-ID": "a-2"})
    client.get("/VezaProvisioner/health")  # not a provisioning request: not audited
    created, ambiguous = audit_lines(tmp_path / "data")
    assert created["event.action"] == "request_finished"
    assert created["http.request.id"] == "a-1"
    assert created["user.name"] == USER
    assert created["vezaprovisioner.auth_method"] == "basic"
    assert created["client.address"] == "testclient"
    assert created["vezaprovisioner.action"] == "CREATE_EMAIL"
    assert created["vezaprovisioner.identity"] == "CONTOSO\\plain"
    assert created["vezaprovisioner.outcome"] == "created"
    assert created["vezaprovisioner.primary_smtp_address"] == "pat@contoso.com"
    assert created["event.duration"] >= 0
    assert created["@timestamp"].endswith("Z")
    assert ambiguous["vezaprovisioner.outcome"] == "failed"
    assert ambiguous["vezaprovisioner.code"] == "AMBIGUOUS_IDENTITY"
    assert (
        "FailureCategory=Cmdlet-ManagementObjectAmbiguousException"
        in (ambiguous["vezaprovisioner.exchange.error_id"])
    )


def _event(identity: str = "x" * 500, **fields: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "event": "request_finished",
        "request_id": "r",
        "caller": "c",
        "caller_method": "basic",
        "client_address": None,
        "action": "CREATE_EMAIL",
        "identity": identity,
        "alias": None,
        "outcome": "created",
    }
    return AuditEvent(**{**values, **fields})


def test_files_are_named_by_day_and_never_renamed(tmp_path: Path) -> None:
    """Several IIS processes append to the same file, so no file is ever renamed: past
    max_bytes the trail continues in the next numbered file, and the first file keeps its
    first line."""
    trail = AuditTrail(tmp_path, AuditSettings(max_bytes=4096, backup_count=20))
    for number in range(40):
        trail.write(_event(request_id=f"r-{number}"))
    first = trail.files()[0]
    first_line = first.open(encoding="utf-8").readline()
    trail.write(_event(request_id="last"))
    trail.close()
    files = trail.files()
    assert files[0] == first
    assert json.loads(first.open(encoding="utf-8").readline()) == json.loads(first_line)
    assert re.fullmatch(r"audit-\d{4}-\d{2}-\d{2}\.jsonl", files[0].name)
    assert [re.sub(r"\d{4}-\d{2}-\d{2}", "DAY", p.name) for p in files[1:3]] == [
        "audit-DAY.1.jsonl",
        "audit-DAY.2.jsonl",
    ]
    assert all(p.stat().st_size <= 4096 for p in files)
    ids = [line["http.request.id"] for line in audit_lines(tmp_path)]
    assert ids == [f"r-{n}" for n in range(40)] + ["last"]


def test_a_second_process_appends_to_the_same_file(tmp_path: Path) -> None:
    settings = AuditSettings()
    first = AuditTrail(tmp_path, settings)
    second = AuditTrail(tmp_path, settings)
    for number in range(10):
        (first if number % 2 else second).write(_event("u", request_id=f"r-{number}"))
    first.close()
    second.close()
    assert len(first.files()) == 1
    assert sorted(line["http.request.id"] for line in audit_lines(tmp_path)) == sorted(
        f"r-{n}" for n in range(10)
    )


@pytest.mark.parametrize(
    "hostile", ["jd\u202eeod", "a\u200bb", "x\x1b[31m", "\u2066y\u2069", "nul\x00", "z\x85"]
)
def test_non_printable_characters_from_any_field_are_escaped(tmp_path: Path, hostile: str) -> None:
    trail = AuditTrail(tmp_path, AuditSettings())
    trail.write(_event(caller=hostile, request_id=hostile, identity=hostile, detail=hostile))
    trail.close()
    raw = trail.files()[0].read_text(encoding="utf-8")
    assert raw.rstrip("\n").isprintable()
    (line,) = audit_lines(tmp_path)
    assert line["user.name"] == line["http.request.id"] == line["vezaprovisioner.detail"] == hostile


def test_the_line_is_written_on_the_requests_thread_not_behind_the_log_writer(
    tmp_path: Path,
) -> None:
    """The audit line is in the file when `write` returns even while the logging writer
    thread is stuck (a log destination that blocks): no hand-off to that thread and back."""
    stuck, entered = threading.Event(), threading.Event()

    class Blocking(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            entered.set()
            stuck.wait(30)

    old = logs.WRITER.use_sink(Blocking())
    try:
        logging.getLogger("vezaprovisioner.test").warning("the writer thread takes this one")
        assert entered.wait(10)
        trail = AuditTrail(tmp_path, AuditSettings())
        trail.write(_event("while-stuck", request_id="r-stuck"))
        assert [line["http.request.id"] for line in audit_lines(tmp_path)] == ["r-stuck"]
        trail.close()
    finally:
        stuck.set()
        logs.WRITER.use_sink(old)


def test_an_unwritable_trail_is_logged_not_raised(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder", encoding="utf-8")
    trail = AuditTrail(blocked, AuditSettings())
    trail.write(_event())  # no exception: the request still gets its answer
    assert trail.files() == []


def test_no_secret_anywhere_in_journal_audit_or_logs(
    make_client: Callable[..., TestClient], tmp_path: Path, password_hash: str
) -> None:
    wrong_password = "Wr0ng-but-secret-passw0rd"
    client = make_client(logging={"file": "service.log", "level": "DEBUG"})
    client.post(EMAILS, json={"identity": "CONTOSO\\plain"})
    client.post(EMAILS, json={"identity": "Alex Smith"})
    client.post(EMAILS, json={"identity": "mailbox"}, headers=basic(USER, wrong_password))
    client.get("/VezaProvisioner/api/v1/requests/none")
    client.get("/VezaProvisioner/metrics")
    data_dir = tmp_path / "data"
    written = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())
    assert b"service.log" not in written  # sanity: we read contents, not names
    assert b"request finished" in written  # the log file is among them
    assert b"request_finished" in written  # so is the audit trail
    assert b"CONTOSO\\\\plain" in written or b"CONTOSO\\plain" in written  # and the journal
    for secret in (PASSWORD, wrong_password, password_hash.split("$")[-1]):
        assert secret.encode() not in written
        for user in (USER,):
            token = base64.b64encode(f"{user}:{secret}".encode())
            assert token not in written
    assert b"Authorization" not in written
    assert b"authorization" not in written

"""Structured logs: one JSON line per request, and backend lifecycle events."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import USER
from vezaprovisioner.metrics import Metrics


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_one_line_per_request(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client(logging={"file": "logs/service.log"})
    client.post(
        "/VezaProvisioner/api/v1/emails",
        json={"identity": "Alex Smith"},
        headers={"X-Request-ID": "log-1"},
    )
    client.get("/VezaProvisioner/health", headers={"X-Request-ID": "log-2"})
    client.get("/VezaProvisioner/nowhere/42", headers={"X-Request-ID": "log-3"})
    requests = [
        line
        for line in log_lines(tmp_path / "data" / "logs" / "service.log")
        if line.get("event") == "request"
    ]
    by_id = {line["request_id"]: line for line in requests}
    assert set(by_id) == {"log-1", "log-2", "log-3"}
    post = by_id["log-1"]
    assert post["caller"] == USER
    assert post["route"] == "/VezaProvisioner/api/v1/emails"
    assert post["method"] == "POST"
    assert post["status"] == 409
    assert post["code"] == "AMBIGUOUS_IDENTITY"
    assert post["duration_ms"] >= 0
    assert post["level"] == "INFO"
    assert by_id["log-2"]["status"] == 200
    assert "caller" not in by_id["log-2"]  # public route: nobody authenticated
    assert by_id["log-3"]["route"] == "unmatched"  # raw paths never become labels
    assert by_id["log-3"]["code"] == "NOT_FOUND"


def test_level_filters(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client(logging={"file": "quiet.log", "level": "WARNING"})
    client.get("/VezaProvisioner/health")
    assert (tmp_path / "data" / "quiet.log").read_text() == ""


def test_backend_lifecycle_events_are_logged_and_counted(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    make_client(logging={"file": "backend.log"})  # configures the JSON log file
    metrics = Metrics()
    events = metrics.backend_events("local")
    events.host_started("ps-1", pid=4242)
    events.host_recycled("ps-1", "served 500 commands")
    events.host_killed("ps-2", "command timeout")
    lines = log_lines(tmp_path / "data" / "backend.log")
    assert [(line["event"], line["host"]) for line in lines] == [
        ("host_started", "ps-1"),
        ("host_recycled", "ps-1"),
        ("host_killed", "ps-2"),
    ]
    assert lines[0]["pid"] == 4242
    assert lines[2]["level"] == "WARNING"
    assert lines[2]["reason"] == "command timeout"

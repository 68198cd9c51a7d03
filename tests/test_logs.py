"""Structured logs: one logging setup, one JSON line per request, host events, daily files that
are never renamed, the writer thread, escaping, and the fail-soft start."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import REPO_ROOT, TEST_DIRECTORY, USER
from vezaprovisioner import logs
from vezaprovisioner.config import Settings
from vezaprovisioner.logs import DatedFileHandler, dated_files, dated_name, printable
from vezaprovisioner.metrics import Metrics

DAY = 86_400.0
#: 2026-11-29T12:00:00Z
NOON = 1_795_953_600.0


def log_lines(path: Path, logger: str = "") -> list[dict[str, Any]]:
    """Every line written for the configured file `path` (all its dated files), oldest first;
    with `logger`, only that logger's (other threads of the test process may log too)."""
    assert logs.flush()
    lines = [
        json.loads(line)
        for file in dated_files(path)
        for line in file.read_text(encoding="utf-8").splitlines()
    ]
    return [line for line in lines if line["log.logger"].startswith(logger)]


TEST_LOGGER = "vezaprovisioner.test"


@pytest.fixture(autouse=True)
def _back_to_stderr(make_settings: Callable[..., Settings]) -> Iterator[None]:
    yield
    logs.configure_logging(make_settings())


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
        if line.get("event.action") == "request"
    ]
    by_id = {line["http.request.id"]: line for line in requests}
    assert set(by_id) == {"log-1", "log-2", "log-3"}
    post = by_id["log-1"]
    assert post["user.name"] == USER
    assert post["http.route"] == "/VezaProvisioner/api/v1/emails"
    assert post["http.request.method"] == "POST"
    assert post["url.path"] == "/VezaProvisioner/api/v1/emails"
    assert post["http.response.status_code"] == 409
    assert post["vezaprovisioner.code"] == "AMBIGUOUS_IDENTITY"
    assert post["event.duration"] > 0
    assert post["client.address"] == "testclient"
    assert post["log.level"] == "INFO"
    assert post["log.logger"] == "vezaprovisioner.access"
    assert by_id["log-2"]["http.response.status_code"] == 200
    assert "user.name" not in by_id["log-2"]  # public route: nobody authenticated
    assert by_id["log-3"]["http.route"] == "unmatched"  # raw paths never become labels
    assert by_id["log-3"]["vezaprovisioner.code"] == "NOT_FOUND"


def test_every_line_logged_while_serving_a_request_carries_its_id(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """Lines the flow logs (here a journal error, in the worker thread Starlette runs the flow
    in) carry the request id without being handed it."""
    client = make_client(logging={"file": "service.log"})
    services = client.app.state.services  # type: ignore[attr-defined]

    def failing(*_: object, **__: object) -> None:
        logging.getLogger("vezaprovisioner.provisioning").warning("inside the flow")

    services.provisioner._audited = failing
    client.post(
        "/VezaProvisioner/api/v1/emails",
        json={"identity": "CONTOSO\\plain"},
        headers={"X-Request-ID": "ctx-1"},
    )
    logging.getLogger("vezaprovisioner.elsewhere").warning("outside any request")
    lines = log_lines(tmp_path / "data" / "service.log")
    inside = next(line for line in lines if line["message"] == "inside the flow")
    assert inside["http.request.id"] == "ctx-1"
    outside = next(line for line in lines if line["message"] == "outside any request")
    assert "http.request.id" not in outside


def test_level_filters(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client(logging={"file": "quiet.log", "level": "WARNING"})
    client.get("/VezaProvisioner/health")
    assert log_lines(tmp_path / "data" / "quiet.log", "vezaprovisioner.access") == []


def test_backend_lifecycle_events_are_logged_and_counted(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    make_client(logging={"file": "backend.log"})  # configures the JSON log file
    metrics = Metrics()
    events = metrics.backend_events("local")
    events.host_started("ps-1", pid=4242)
    events.host_recycled("ps-1", "served 500 commands")
    events.host_killed("ps-2", "command timeout")
    lines = log_lines(tmp_path / "data" / "backend.log", "vezaprovisioner.backend")
    assert [(line["event.action"], line["vezaprovisioner.host.name"]) for line in lines] == [
        ("host_started", "ps-1"),
        ("host_recycled", "ps-1"),
        ("host_killed", "ps-2"),
    ]
    assert lines[0]["vezaprovisioner.host.pid"] == 4242
    assert lines[0]["vezaprovisioner.backend"] == "local"
    assert lines[2]["log.level"] == "WARNING"
    assert lines[2]["event.reason"] == "command timeout"


# --- under wfastcgi: a fresh sys.stderr for every request ------------------------------------


def _iis_environ(request_id: str) -> dict[str, Any]:
    """A GET of /health as wfastcgi hands it to WSGI_HANDLER (SCRIPT_NAME blanked)."""
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/VezaProvisioner/health",
        "URL": "/VezaProvisioner/health",
        "QUERY_STRING": "",
        "SERVER_NAME": "ex01.contoso.com",
        "SERVER_PORT": "443",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTPS": "on",
        "REMOTE_ADDR": "10.0.0.5",
        "HTTP_HOST": "ex01.contoso.com",
        "HTTP_X_REQUEST_ID": request_id,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def test_no_line_is_lost_when_stderr_is_replaced_for_every_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wfastcgi sets sys.stderr (and __stderr__) to a new StringIO before every request and
    drops it afterwards. Through the IIS entry, every request's JSON line is in the daily file
    with its request id, and nothing went into any of those per-request buffers. (Before: the
    JSON handler was bound to the first request's buffer and the file got plain-text lines.)"""
    from vezaprovisioner.iis_entry import IisApplication

    config = tmp_path / "vezaprovisioner.toml"
    config.write_text(
        f'backend = "simulated"\ndata_dir = {json.dumps(str(tmp_path / "data"))}\n'
        f'[simulated]\ndirectory = {json.dumps(str(TEST_DIRECTORY))}\n[auth]\nmode = "iis"\n',
        encoding="utf-8",
    )
    app = IisApplication({"VEZAPROVISIONER_CONFIG": str(config)}, start_log=tmp_path / "s.log")
    buffers: list[io.StringIO] = []
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda data: None

    try:
        for number in range(6):
            buffer = io.StringIO()
            buffers.append(buffer)
            monkeypatch.setattr(sys, "stderr", buffer)
            monkeypatch.setattr(sys, "__stderr__", buffer)
            body = app(_iis_environ(f"iis-{number}"), start_response)
            b"".join(body)
            getattr(body, "close", lambda: None)()
    finally:
        app.close()
    assert statuses == ["200 OK"] * 6
    lines = log_lines(tmp_path / "data" / "logs" / "vezaprovisioner.log")
    ids = [line.get("http.request.id") for line in lines if line.get("event.action") == "request"]
    assert ids == [f"iis-{number}" for number in range(6)]
    assert all(buffer.getvalue() == "" for buffer in buffers)
    assert any("started under IIS" in line["message"] for line in lines)


def test_the_stderr_destination_writes_to_the_current_stderr(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    logs.configure_logging(make_settings())
    log = logging.getLogger(TEST_LOGGER)
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    log.warning("one")
    assert logs.flush()
    monkeypatch.setattr(sys, "stderr", second)
    log.warning("two")
    assert logs.flush()

    def messages(buffer: io.StringIO) -> list[str]:
        lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
        return [line["message"] for line in lines if line["log.logger"] == TEST_LOGGER]

    assert messages(first) == ["one"]
    assert messages(second) == ["two"]


# --- a log file that cannot be opened --------------------------------------------------------


def test_an_unopenable_log_file_falls_back_to_stderr_and_readiness_says_so(
    make_client: Callable[..., TestClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: PermissionError at start, the service did not start. Now it starts, logs to
    standard error, and readiness names the file and the reason."""
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the log folder should be", encoding="utf-8")
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    client = make_client(logging={"file": str(blocked / "service.log")})
    response = client.get("/VezaProvisioner/health/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["logs"] == {"ok": False}
    check = client.get("/VezaProvisioner/health/ready/details").json()["checks"]["logs"]
    assert check["ok"] is False
    assert str(blocked / "service.log") in check["detail"]
    assert "standard error" in check["detail"]
    assert client.get("/VezaProvisioner/health").status_code == 200
    assert logs.flush()
    lines = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert any("cannot be opened" in line["message"] for line in lines)
    assert any(line.get("url.path") == "/VezaProvisioner/health" for line in lines)


def test_a_writable_log_file_is_ready(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = make_client(logging={"file": "service.log"})
    check = client.get("/VezaProvisioner/health/ready/details").json()["checks"]["logs"]
    assert check["ok"] is True
    assert "service-" in check["detail"]


# --- files named by day, never renamed -------------------------------------------------------


def _record(message: str, created: float) -> logging.LogRecord:
    record = logging.LogRecord("vezaprovisioner", logging.INFO, __file__, 1, message, None, None)
    record.created = created
    return record


def _handler(path: Path, **options: Any) -> DatedFileHandler:
    handler = DatedFileHandler(
        path, max_bytes=options.get("max_bytes", 10_000), backup_count=options.get("keep", 50)
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def test_the_file_changes_at_midnight_utc_without_renaming(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "service.log"
    handler = _handler(path)
    handler.handle(_record("today", NOON))
    handler.handle(_record("tomorrow", NOON + DAY))
    handler.close()
    assert [p.name for p in dated_files(path)] == [
        "service-2026-11-29.log",
        "service-2026-11-30.log",
    ]
    assert dated_name(path, "2026-11-29").read_text() == "today\n"


def test_past_max_bytes_the_next_sequence_number_and_nothing_is_renamed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    handler = _handler(path, max_bytes=100)
    for number in range(30):
        handler.handle(_record(f"line {number:02d} " + "x" * 20, NOON + number))
    handler.close()
    files = dated_files(path)
    assert [p.name for p in files[:3]] == [
        "audit-2026-11-29.jsonl",
        "audit-2026-11-29.1.jsonl",
        "audit-2026-11-29.2.jsonl",
    ]
    assert all(p.stat().st_size <= 100 for p in files)
    lines = [line for p in files for line in p.read_text().splitlines()]
    assert [line[:7] for line in lines] == [f"line {n:02d}" for n in range(30)]


def test_two_processes_append_to_the_same_files(tmp_path: Path) -> None:
    """Two handlers on one path (as two IIS worker processes): every line lands exactly once,
    in order per writer, and both move on when the file is full."""
    path = tmp_path / "service.log"
    first, second = _handler(path, max_bytes=100), _handler(path, max_bytes=100)
    written = []
    for number in range(40):
        handler, name = (first, "a") if number % 2 else (second, "b")
        text = f"{name}{number:03d}"
        handler.handle(_record(text, NOON + number))  # a new check every second of record time
        handler.flush()
        written.append(text)
    first.close()
    second.close()
    lines = [line for p in dated_files(path) for line in p.read_text().splitlines()]
    assert sorted(lines) == sorted(written)
    assert len(dated_files(path)) > 1


def test_old_files_past_backup_count_are_deleted(tmp_path: Path) -> None:
    path = tmp_path / "service.log"
    handler = _handler(path, keep=2)
    for day in range(5):
        handler.handle(_record(f"day {day}", NOON + day * DAY))
    handler.close()
    assert [p.name for p in dated_files(path)] == [
        "service-2026-12-01.log",
        "service-2026-12-02.log",
        "service-2026-12-03.log",
    ]


def test_size_and_date_are_checked_once_per_interval_not_per_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "service.log"
    handler = _handler(path)
    stats: list[Path] = []
    real_stat = Path.stat

    def counting_stat(self: Path, **kwargs: Any) -> Any:
        stats.append(self)
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", counting_stat)
    for number in range(200):
        handler.handle(_record(f"{number}", NOON + number / 100))  # two seconds of records
    handler.close()
    # The first record opens the file; the next check is due 5 s later.
    assert [p.name for p in stats if p.name.startswith("service-")] == ["service-2026-11-29.log"]


# --- the writer thread -----------------------------------------------------------------------


def test_records_are_written_by_one_thread_and_formatted_once(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs.configure_logging(make_settings(logging={"file": "service.log"}))
    threads: set[str] = set()
    formats = 0
    real_format = logs.JsonFormatter.format

    def watching(self: logs.JsonFormatter, record: logging.LogRecord) -> str:
        nonlocal formats
        if record.name == TEST_LOGGER:
            formats += 1
            threads.add(threading.current_thread().name)
        return real_format(self, record)

    monkeypatch.setattr(logs.JsonFormatter, "format", watching)
    log = logging.getLogger(TEST_LOGGER)
    workers = [
        threading.Thread(target=lambda n=n: log.info("from %d", n), name=f"worker-{n}")
        for n in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    lines = log_lines(tmp_path / "data" / "service.log", TEST_LOGGER)
    assert sorted(line["message"] for line in lines) == [f"from {n}" for n in range(4)]
    assert formats == 4
    assert len(threads) == 1
    assert not threads & {f"worker-{n}" for n in range(4)}


def test_shutdown_writes_what_is_queued(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    logs.configure_logging(make_settings(logging={"file": "service.log"}))
    log = logging.getLogger(TEST_LOGGER)
    for number in range(50):
        log.info("line %d", number)
    logs.shutdown()
    path = tmp_path / "data" / "service.log"
    text = "".join(p.read_text(encoding="utf-8") for p in dated_files(path))
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["message"] for line in lines if line["log.logger"] == TEST_LOGGER] == [
        f"line {n}" for n in range(50)
    ]
    log.info("after")  # the next record starts the writer again
    assert log_lines(path, TEST_LOGGER)[-1]["message"] == "after"


# --- nothing invisible -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "hostile",
    ["jd\u202eeod", "a\u200bb", "\u2066x\u2069", "bell\x07", "del\x7f", "nel\x85", "ls\u2028"],
)
def test_non_printable_characters_are_escaped_in_log_lines(
    make_client: Callable[..., TestClient], tmp_path: Path, hostile: str
) -> None:
    make_client(logging={"file": "service.log"})
    logging.getLogger(TEST_LOGGER).warning("caller %s", hostile)
    path = tmp_path / "data" / "service.log"
    (line,) = log_lines(path, TEST_LOGGER)
    assert line["message"] == f"caller {hostile}"  # a JSON reader gets the value back
    raw = "".join(p.read_text(encoding="utf-8") for p in dated_files(path))
    assert raw.rstrip("\n").isprintable()


@given(st.text())
def test_printable_lines_parse_back_to_the_same_value(value: str) -> None:
    line = printable(json.dumps({"v": value}, ensure_ascii=False))
    assert line.isprintable()
    assert json.loads(line) == {"v": value}


def test_two_real_processes_appending_at_once_keep_every_line_whole(tmp_path: Path) -> None:
    """Each batch is one write of whole lines to a descriptor opened for appending, so lines of
    two processes writing at the same moment never cut into each other."""
    writer = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from vezaprovisioner.logs import DatedFileHandler\n"
        "handler = DatedFileHandler(Path(sys.argv[1]), max_bytes=2**30, backup_count=5)\n"
        "handler.setFormatter(logging.Formatter('%(message)s'))\n"
        "for n in range(3000):\n"
        "    record = logging.makeLogRecord({'msg': f'{sys.argv[2]}-{n:05d}-' + 'x' * 200})\n"
        "    handler.handle(record)\n"
        "    if n % 7 == 0:\n"
        "        handler.flush()\n"
        "handler.close()\n"
    )
    path = tmp_path / "shared.log"
    processes = [
        subprocess.Popen([sys.executable, "-c", writer, str(path), name], cwd=REPO_ROOT)
        for name in ("a", "b")
    ]
    assert [process.wait(timeout=60) for process in processes] == [0, 0]
    lines = [line for file in dated_files(path) for line in file.read_text().splitlines()]
    expected = {f"{name}-{n:05d}-" + "x" * 200 for name in "ab" for n in range(3000)}
    assert len(lines) == len(expected)
    assert set(lines) == expected


def test_a_failing_write_does_not_end_the_writer_thread(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs.configure_logging(make_settings(logging={"file": "service.log"}))
    log = logging.getLogger(TEST_LOGGER)
    real = DatedFileHandler._write_pending
    failures = iter([OSError(28, "No space left on device")])

    def full_once(self: DatedFileHandler) -> None:
        failure = next(failures, None)
        if failure is not None:
            self._pending.clear()
            raise failure
        real(self)

    monkeypatch.setattr(DatedFileHandler, "_write_pending", full_once)
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    log.warning("lost")
    assert logs.flush()
    log.warning("kept")
    messages = [
        line["message"] for line in log_lines(tmp_path / "data" / "service.log", TEST_LOGGER)
    ]
    assert messages == ["kept"]
    assert "lines were lost" in stderr.getvalue()

"""Metrics: the exposition parses, counts what happened, and adds up worker processes."""

from __future__ import annotations

import platform
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT
from vezaprovisioner import __version__
from vezaprovisioner.journal.store import JOURNAL_FILE
from vezaprovisioner.services import Services

METRICS = "/VezaProvisioner/metrics"
EMAILS = "/VezaProvisioner/api/v1/emails"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    parsed: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return parsed


def value(parsed: Samples, name: str, **labels: str) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)


def test_requests_and_latencies_are_counted(client: TestClient) -> None:
    client.post(EMAILS, json={"identity": "CONTOSO\\plain"})
    client.post(EMAILS, json={"identity": "Alex Smith"})
    client.post(EMAILS, json={"identity": "Alex Smith"})
    response = client.get(METRICS)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    parsed = samples(response.text)
    route = "/VezaProvisioner/api/v1/emails"
    total = "vezaprovisioner_requests_total"
    assert value(parsed, total, route=route, method="POST", status="201", code="") == 1
    assert (
        value(parsed, total, route=route, method="POST", status="409", code="AMBIGUOUS_IDENTITY")
        == 2
    )
    assert value(parsed, "vezaprovisioner_request_duration_seconds_count", route=route) == 3
    exchange = "vezaprovisioner_exchange_duration_seconds_count"
    assert value(parsed, exchange, cmdlet="Enable-Mailbox", outcome="ok") == 1
    assert value(parsed, exchange, cmdlet="Get-User", outcome="error") == 2
    assert value(parsed, "vezaprovisioner_journal_errors_total") == 0


def test_backend_gauges_appear_only_when_a_backend_reports_them(
    client: TestClient,
) -> None:
    assert "vezaprovisioner_backend_hosts{" not in client.get(METRICS).text
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    events = services.metrics.backend_events("local")
    events.hosts({"idle": 3, "busy": 1})
    events.queue_depth(2)
    events.host_killed("ps-7", "timeout")
    parsed = samples(client.get(METRICS).text)
    assert value(parsed, "vezaprovisioner_backend_hosts", backend="local", state="idle") == 3
    assert value(parsed, "vezaprovisioner_backend_hosts", backend="local", state="busy") == 1
    assert value(parsed, "vezaprovisioner_backend_queue_depth", backend="local") == 2
    assert (
        value(parsed, "vezaprovisioner_backend_host_events_total", backend="local", event="killed")
        == 1
    )


def test_journal_errors_are_counted(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client(journal={"busy_timeout_ms": 20})
    client.get("/VezaProvisioner/health/ready")
    with closing(sqlite3.connect(tmp_path / "data" / JOURNAL_FILE, isolation_level=None)) as db:
        db.execute("BEGIN EXCLUSIVE")
        assert client.post(EMAILS, json={"identity": "plain"}).status_code == 503
        db.execute("ROLLBACK")
    parsed = samples(client.get(METRICS).text)
    assert value(parsed, "vezaprovisioner_journal_errors_total") >= 1
    assert (
        value(
            parsed,
            "vezaprovisioner_requests_total",
            route="/VezaProvisioner/api/v1/emails",
            method="POST",
            status="503",
            code="JOURNAL_UNAVAILABLE",
        )
        == 1
    )


def test_metrics_need_authentication_unless_configured(
    make_client: Callable[..., TestClient],
) -> None:
    assert make_client(authenticated=False).get(METRICS).status_code == 401
    public = make_client(authenticated=False, metrics={"require_auth": False})
    assert public.get(METRICS).status_code == 200
    disabled = make_client(metrics={"enabled": False})
    assert disabled.get(METRICS).status_code == 404


def test_multiprocess_mode_adds_up_worker_processes(tmp_path: Path) -> None:
    """Workers of a running pool add up, including one that has ended; the first worker of a
    pool in which no worker runs any more starts from an empty folder."""
    worker = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from vezaprovisioner.metrics import Metrics, use_multiprocess_dir
        metrics = Metrics(use_multiprocess_dir(Path(sys.argv[1])))
        metrics.requests.labels("/r", "POST", "201", "").inc(int(sys.argv[2]))
        if sys.argv[3:] == ["hold"]:
            print("counted", flush=True)
            sys.stdin.read()  # runs until the test closes its stdin
        elif sys.argv[3:] == ["expose"]:
            sys.stdout.write(metrics.exposition().decode())
        """
    )
    folder = tmp_path / "prom"
    command = [sys.executable, "-c", worker, str(folder)]
    environment = {"PATH": "/usr/bin:/bin"}

    def run(*args: str) -> float:
        done = subprocess.run(
            [*command, *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO_ROOT,
            env=environment,
        )
        if "expose" not in args:
            return 0.0
        labels = {"route": "/r", "method": "POST", "status": "201", "code": ""}
        return value(samples(done.stdout), "vezaprovisioner_requests_total", **labels)

    holder = subprocess.Popen(
        [*command, "2", "hold"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=environment,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "counted\n"
        run("3")
        assert run("4", "expose") == 2 + 3 + 4
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    # Every worker has ended, as when the application pool starts again.
    assert run("5", "expose") == 5


def test_create_email_is_counted_by_outcome_and_code(client: TestClient) -> None:
    client.post(EMAILS, json={"identity": "CONTOSO\\plain"})
    client.post(EMAILS, json={"identity": "CONTOSO\\plain"})
    client.post(EMAILS, json={"identity": "Alex Smith"})
    parsed = samples(client.get(METRICS).text)
    total = "vezaprovisioner_create_email_total"
    assert value(parsed, total, outcome="created", code="") == 1
    assert value(parsed, total, outcome="already_exists", code="") == 1
    assert value(parsed, total, outcome="failed", code="AMBIGUOUS_IDENTITY") == 1


def test_build_info_process_metrics_and_no_created_series(client: TestClient) -> None:
    text = client.get(METRICS).text
    parsed = samples(text)
    build = [labels for name, labels in parsed if name == "vezaprovisioner_build_info"]
    assert len(build) == 1
    assert dict(build[0])["version"] == __version__
    assert dict(build[0])["python_version"] == platform.python_version()
    if Path("/proc/self/stat").exists():  # prometheus-client reads process_* from /proc
        assert ("process_resident_memory_bytes", frozenset()) in parsed
        assert ("process_cpu_seconds_total", frozenset()) in parsed
    assert "_created" not in text


def series(text: str) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    return set(samples(text))


def test_invented_methods_and_paths_add_no_series(
    make_client: Callable[..., TestClient],
) -> None:
    """Label values come from closed sets, so a flood of inventions cannot grow /metrics."""
    client = make_client(metrics={"require_auth": False})
    stranger = make_client(authenticated=False, metrics={"require_auth": False})

    def invent(n: int) -> None:
        for c in (client, stranger):
            c.request(f"X{n}METHOD", f"/VezaProvisioner/api/v1/emails/{n}")
            c.request(f"PROPFIND{n}", f"/nowhere/{n}/\u202e")
            c.get(f"/VezaProvisioner/invented/{n}?q={n}")
            c.request("BREW", f"/VezaProvisioner/health/{n}")

    invent(0)
    client.get(METRICS)  # its own series exist from here on
    before = series(client.get(METRICS).text)
    metrics = client.app.state.services.metrics  # type: ignore[attr-defined]
    children_before = len(metrics.requests_by._children)
    for n in range(1, 60):
        invent(n)
    after = series(client.get(METRICS).text)
    assert after == before
    # ... nor the per-request cache of labelled children (metrics.Children).
    assert len(metrics.requests_by._children) == children_before
    labels = {
        dict(key[1]).get(name)
        for key in after
        if key[0] == "vezaprovisioner_requests_total"
        for name in ("method", "route")
    }
    assert "other" in labels
    assert "unmatched" in labels

"""Prometheus metrics: requests, latency (total and Exchange), journal errors, backend hosts.

One `Metrics` per app. Without multiprocess mode each has its own registry; with it (several
worker processes, as under IIS: `metrics.multiprocess_dir` or PROMETHEUS_MULTIPROC_DIR), every
process writes its values to files in that folder and /metrics adds them up. Backend host gauges
exist only when a backend reports them through `BackendEvents`; nothing is invented.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from . import __version__
from .exchange.port import (
    DirectoryUser,
    EnableMailbox,
    EnableRemoteMailbox,
    ExchangePort,
    Recipient,
)
from .journal.liveness import pid_alive
from .logs import event

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# No `*_created` series: they double every counter's series and no dashboard here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_T = TypeVar("_T")


# Seconds: Exchange cmdlets take from tens of milliseconds to minutes.
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def use_multiprocess_dir(directory: Path | None) -> Path | None:
    """Turns on multiprocess mode for `directory` (or the environment's); returns the folder.

    prometheus-client picks its value store when it is imported, from PROMETHEUS_MULTIPROC_DIR;
    a configured folder is exported there and the store picked again, before any metric exists.
    """
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        os.environ[MULTIPROC_ENV] = str(directory)
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    named = os.environ.get(MULTIPROC_ENV)
    if named:
        empty_if_no_live_owner(Path(named))
    return Path(named) if named else None


_VALUE_FILE = re.compile(r"_(\d+)\.db")


def empty_if_no_live_owner(directory: Path) -> list[Path]:
    """Deletes the value files of ended processes when no other process that wrote here still
    runs: the first worker of a freshly started application pool begins from zero (Prometheus
    reads the drop as a counter reset), while the workers of a running pool keep adding up.
    Returns what was deleted. Files are named `<kind>_<pid>.db` by prometheus-client.
    """
    own = os.getpid()
    files = {}
    for path in directory.glob("*.db"):
        match = _VALUE_FILE.search(path.name)
        if match:
            files[path] = int(match[1])
    if any(pid != own and pid_alive(pid) for pid in files.values()):
        return []
    deleted = []
    for path, pid in files.items():
        if pid != own:
            with contextlib.suppress(OSError):
                path.unlink()
                deleted.append(path)
    return deleted


_M = TypeVar("_M", Counter, Histogram)


class Children(Generic[_M]):
    """A labelled metric's children, each looked up once: prometheus-client's `labels()`
    validates, converts and takes a lock on every call. Only for label sets that are closed
    (routes, methods, statuses, failure codes, cmdlets), so the cache stays small."""

    def __init__(self, metric: _M) -> None:
        self._metric: _M = metric
        self._children: dict[tuple[str, ...], _M] = {}

    def __call__(self, *values: str) -> _M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    """The service's metrics and their exposition."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        # In multiprocess mode values live in files; registering would only duplicate them.
        registry = None if multiprocess_dir else CollectorRegistry()
        self._registry = registry
        if registry is not None:
            _add_process_collectors(registry)
        self.build_info = Gauge(
            "vezaprovisioner_build_info",
            "Always 1; the labels say which version runs on which Python",
            ["version", "python_version"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.create_email = Counter(
            "vezaprovisioner_create_email",
            "CREATE_EMAIL requests by outcome (created, already_exists, failed) and problem code",
            ["outcome", "code"],
            registry=registry,
        )
        self.requests = Counter(
            "vezaprovisioner_requests",
            "HTTP requests by route template, method, status and problem code",
            ["route", "method", "status", "code"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "vezaprovisioner_request_duration_seconds",
            "Total time per HTTP request",
            ["route"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.exchange_seconds = Histogram(
            "vezaprovisioner_exchange_duration_seconds",
            "Time per Exchange cmdlet (the Exchange share of request time)",
            ["cmdlet", "outcome"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.journal_errors = Counter(
            "vezaprovisioner_journal_errors",
            "Journal reads or writes that failed",
            [],
            registry=registry,
        )
        self.recovered = Counter(
            "vezaprovisioner_recovered_requests",
            "Requests reconciled by crash recovery, by final state",
            ["state"],
            registry=registry,
        )
        self.backend_hosts = Gauge(
            "vezaprovisioner_backend_hosts",
            "Backend hosts (PowerShell processes / sessions) by state, as the backend reports",
            ["backend", "state"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.backend_host_events = Counter(
            "vezaprovisioner_backend_host_events",
            "Backend host lifecycle events (started, recycled, killed)",
            ["backend", "event"],
            registry=registry,
        )
        self.backend_queue_depth = Gauge(
            "vezaprovisioner_backend_queue_depth",
            "Requests waiting for a backend host, as the backend reports",
            ["backend"],
            multiprocess_mode="livesum",
            registry=registry,
        )

        # The per-request ones, by their (closed) label values.
        self.requests_by = Children(self.requests)
        self.request_seconds_by = Children(self.request_seconds)
        self.exchange_seconds_by = Children(self.exchange_seconds)
        self.create_email_by = Children(self.create_email)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (of every process in multiprocess mode)."""
        if self.multiprocess_dir is None:
            assert self._registry is not None
            return generate_latest(self._registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        _add_process_collectors(registry)  # of the process that answers this scrape
        return generate_latest(registry)

    def backend_events(self, backend: str) -> BackendEvents:
        return BackendEvents(self, backend)


def _add_process_collectors(registry: CollectorRegistry) -> None:
    """process_* (CPU, memory, open files: where the platform has /proc, so not on Windows)
    and python_info, from prometheus-client's own collectors."""
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR):
        registry.register(collector)


class BackendEvents:
    """The hook a backend with hosts (the local PowerShell pool) calls; logs and counts."""

    def __init__(self, metrics: Metrics, backend: str) -> None:
        self._metrics = metrics
        self._backend = backend
        self._log = logging.getLogger(f"vezaprovisioner.backend.{backend}")

    def host_started(self, host: str, **fields: object) -> None:
        self._lifecycle("started", host, fields)

    def host_recycled(self, host: str, reason: str, **fields: object) -> None:
        self._lifecycle("recycled", host, {"reason": reason, **fields})

    def host_killed(self, host: str, reason: str, **fields: object) -> None:
        self._lifecycle("killed", host, {"reason": reason, **fields}, logging.WARNING)

    def hosts(self, by_state: Mapping[str, int]) -> None:
        """The current number of hosts in each state (e.g. idle, busy, starting)."""
        for state, count in by_state.items():
            self._metrics.backend_hosts.labels(self._backend, state).set(count)

    def queue_depth(self, waiting: int) -> None:
        self._metrics.backend_queue_depth.labels(self._backend).set(waiting)

    def _lifecycle(
        self, kind: str, host: str, fields: Mapping[str, object], level: int = logging.INFO
    ) -> None:
        self._metrics.backend_host_events.labels(self._backend, kind).inc()
        line: dict[str, object] = {
            "event.action": f"host_{kind}",
            "vezaprovisioner.backend": self._backend,
            "vezaprovisioner.host.name": host,
        }
        for name, value in fields.items():
            line["event.reason" if name == "reason" else f"vezaprovisioner.host.{name}"] = value
        event(self._log, f"backend host {kind}", line, level)


class TimedExchange:
    """An `ExchangePort` that times every cmdlet of the port it wraps."""

    def __init__(self, inner: ExchangePort, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def _timed(self, cmdlet: str, call: Callable[[], _T]) -> _T:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = call()
            outcome = "ok"
            return result
        finally:
            self._metrics.exchange_seconds_by(cmdlet, outcome).observe(
                time.perf_counter() - started
            )

    def get_user(self, identity: str, domain_controller: str | None = None) -> DirectoryUser:
        return self._timed("Get-User", lambda: self._inner.get_user(identity, domain_controller))

    def get_recipient(self, identity: str, domain_controller: str | None = None) -> Recipient:
        return self._timed(
            "Get-Recipient", lambda: self._inner.get_recipient(identity, domain_controller)
        )

    def enable_mailbox(self, request: EnableMailbox) -> Recipient:
        return self._timed("Enable-Mailbox", lambda: self._inner.enable_mailbox(request))

    def enable_remote_mailbox(self, request: EnableRemoteMailbox) -> Recipient:
        return self._timed(
            "Enable-RemoteMailbox", lambda: self._inner.enable_remote_mailbox(request)
        )

    def probe(self) -> str:
        return self._timed("probe", self._inner.probe)

    def close(self) -> None:
        self._inner.close()

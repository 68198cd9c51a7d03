"""The audit trail: one JSON line per finished CREATE_EMAIL (and per crash-recovery decision).

An append-only file a SIEM can tail (`audit.file`, rotated by size). Each line says who asked,
from where, what, the outcome, and Exchange's error id. It holds only the fields written here:
never a password, a password hash or an Authorization header.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .config import AuditSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditEvent:
    """One finished request, as the audit trail records it."""

    event: str
    request_id: str
    caller: str
    caller_method: str
    client_address: str | None
    action: str
    identity: str
    alias: str | None
    outcome: str
    code: str | None = None
    guid: str | None = None
    primary_smtp_address: str | None = None
    exchange_reason: str | None = None
    exchange_error_id: str | None = None
    duration_ms: int | None = None
    detail: str | None = None


class AuditTrail:
    """Writes `AuditEvent`s as JSON lines; thread-safe (logging handlers lock)."""

    def __init__(self, data_dir: Path, settings: AuditSettings) -> None:
        self.path = data_dir / settings.file
        self._logger = logging.Logger(f"vezaprovisioner.audit:{self.path}")
        self._logger.propagate = False
        self._handler: logging.Handler | None = None
        self._settings = settings

    def write(self, event: AuditEvent) -> None:
        """Appends one line; an unwritable file is reported on stderr by logging, not raised."""
        if self._handler is None:
            try:
                self._open()
            except OSError:
                log.exception("the audit trail %s cannot be opened", self.path)
                return
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        line.update({k: v for k, v in vars(event).items() if v is not None})
        self._logger.info(json.dumps(line, ensure_ascii=False, separators=(",", ":")))

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Several IIS worker processes may share the file: each line is one small append, and
        # rotation is best effort (Windows refuses to rename a file another process holds open).
        handler = logging.handlers.RotatingFileHandler(
            self.path,
            maxBytes=self._settings.max_bytes,
            backupCount=self._settings.backup_count,
            encoding="utf-8",
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger.addHandler(handler)
        self._handler = handler

    def close(self) -> None:
        if self._handler is not None:
            self._logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None

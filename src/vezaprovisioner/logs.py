"""Structured logs: every line of the `vezaprovisioner` loggers as one JSON object.

`configure_logging(settings)` sends them to standard error or to `logging.file` (rotated by
size) at `logging.level`. Fields passed as `extra={"fields": {...}}` become top-level keys, so a
request line reads {"time", "level", "logger", "message", "request_id", "caller", "route",
"status", "duration_ms", ...}. Nothing here ever receives a password or an Authorization header.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import datetime, timezone
from typing import Any

from .config import Settings

ROOT_LOGGER = "vezaprovisioner"
_HANDLER_NAME = "vezaprovisioner-json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":"))


def configure_logging(settings: Settings) -> logging.Handler:
    """Installs the JSON handler on the package's logger (replacing an earlier one)."""
    options = settings.logging
    handler: logging.Handler
    if options.file:
        path = settings.data_dir / options.file
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=options.max_bytes, backupCount=options.backup_count, encoding="utf-8"
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(ROOT_LOGGER)
    for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(options.level)
    return handler


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Logs `message` with structured `fields` (None values left out)."""
    logger.log(level, message, extra={"fields": {k: v for k, v in fields.items() if v is not None}})

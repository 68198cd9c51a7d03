"""Turns pydantic's validation errors into one `ValidationFailed`, one entry per field."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..failures import ValidationFailed
from ..validation import visible

_LOCATION_PARTS = frozenset({"body", "path", "query"})


def _field(error: Mapping[str, Any], prefix: Sequence[str]) -> str:
    if error.get("type") == "json_invalid":
        return "body"
    parts = list(error.get("loc", ()))
    if parts and parts[0] in _LOCATION_PARTS:
        parts = parts[1:]
    # An unknown field's name is the caller's text: it is shown, never reflected raw.
    return visible(".".join([*prefix, *map(str, parts)])) or "body"


def _message(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field; see the API reference for the accepted fields"
    if kind == "json_invalid":
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    if kind == "missing":
        return "this field is required"
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def validation_failure(
    errors: Iterable[Mapping[str, Any]], prefix: Sequence[str] = ()
) -> ValidationFailed:
    """One entry per bad field: {field, message, type}."""
    return ValidationFailed(
        [
            {"field": _field(e, prefix), "message": _message(e), "type": str(e.get("type", ""))}
            for e in errors
        ]
    )

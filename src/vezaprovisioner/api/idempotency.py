"""The Idempotency-Key request header (IETF httpapi draft) on CREATE_EMAIL.

The same key with the same body (the same validated command) replays the stored answer — the
status, body and Location of the first request, plus `Idempotent-Replayed: true` — without
calling Exchange. The same key with another body is 422 IDEMPOTENCY_KEY_MISMATCH; while the first
request still runs, 409 IDEMPOTENCY_KEY_IN_USE. Answers below 500 are stored; a 5xx (Exchange
unavailable, a timeout, the journal) is not, so a retry with the key runs the request again.
Storage: journal/idempotency.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from ..failures import as_failure
from ..journal.idempotency import IdempotencyKeyInUse, IdempotencyKeyMismatch, IdempotencyKeys
from ..journal.store import JournalUnavailable
from ..provisioning import CreateEmail
from .problems import FAILURE_CODE_STATE, problem_response
from .validation_errors import validation_failure

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
_KEY = re.compile(r"[\x21\x23-\x7e]{1,255}")  # visible ASCII without '"'
_KEPT_HEADERS = ("location",)


#: The header as an OpenAPI parameter (openapi_extra of the CREATE_EMAIL routes).
OPENAPI_PARAMETER = {
    "name": HEADER,
    "in": "header",
    "required": False,
    "description": "Makes a retry safe to repeat: the same key with the same body within "
    "journal.retention_days returns the first answer (with Idempotent-Replayed: true) without "
    "calling Exchange; with another body, 422 IDEMPOTENCY_KEY_MISMATCH.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 257},
}


def idempotency_key(request: Request) -> str | None:
    """The key, from the draft's sf-string form ("...") or a bare token; None when absent."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not _KEY.fullmatch(key):
        raise validation_failure(
            [
                {
                    "loc": (HEADER,),
                    "msg": "must be 1 to 255 visible ASCII characters without '\"', optionally "
                    'in double quotes, e.g. "8e03978e-40d5-43e8-bc93-6894a57f9324"',
                    "type": "invalid_value",
                }
            ]
        )
    return key


def fingerprint(command: CreateEmail) -> str:
    """Two bodies are "the same" when they validate to the same command."""
    canonical = json.dumps(dataclasses.asdict(command), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_once(
    keys: IdempotencyKeys,
    caller: str,
    key: str,
    command: CreateEmail,
    request: Request,
    run: Callable[[], Response],
) -> Response:
    """`run()` at most once per (caller, key); later the stored answer."""
    request_id = str(request.scope["state"]["request_id"])
    state = keys.begin(caller, key, fingerprint(command), request_id)
    if state.kind == "mismatch":
        raise IdempotencyKeyMismatch(
            f"The Idempotency-Key {key!r} was first used by request {state.request_id} with "
            "another body; a key names one request. Send a new key for a new request."
        )
    if state.kind == "running":
        raise IdempotencyKeyInUse(
            f"Request {state.request_id} with this Idempotency-Key is still running; retry "
            "after Retry-After to get its answer."
        )
    if state.kind == "replay":
        assert state.status is not None
        assert state.body is not None
        stored = json.loads(state.body)
        if stored.get("code"):  # a replayed problem is logged and counted with its code
            request.scope["state"][FAILURE_CODE_STATE] = stored["code"]
        return Response(
            stored["body"],
            status_code=state.status,
            media_type=stored["media_type"],
            headers={**stored["headers"], REPLAYED_HEADER: "true"},
        )
    try:
        response = run()
    except Exception as exc:
        failure = as_failure(exc)
        if failure.status < 500:
            answer = problem_response(failure, request_id)
            _best_effort(lambda: _store(keys, caller, key, answer, failure.code))
        else:
            _best_effort(lambda: keys.forget(caller, key))
        raise
    _best_effort(lambda: _store(keys, caller, key, response))
    return response


def _store(
    keys: IdempotencyKeys, caller: str, key: str, response: Response, code: str | None = None
) -> None:
    stored = {
        "code": code,
        "media_type": response.media_type,
        "headers": {k: v for k, v in response.headers.items() if k in _KEPT_HEADERS},
        "body": bytes(response.body).decode(),
    }
    keys.finish(caller, key, response.status_code, json.dumps(stored))


def _best_effort(write: Callable[[], None]) -> None:
    """The answer is known (Exchange acted or refused): the caller gets it even if the key's
    record cannot be written; a retry then runs the (idempotent) flow again."""
    try:
        write()
    except JournalUnavailable:
        log.exception("an Idempotency-Key outcome could not be stored")

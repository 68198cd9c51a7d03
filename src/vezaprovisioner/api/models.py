"""The JSON shapes of API v1: request bodies (strict: unknown fields are errors) and responses."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from ..journal.records import Record
from ..provisioning import CreateEmail, MailboxResult, RecipientState
from ..validation import (
    ALIAS_PATTERN,
    MAX_ALIAS_LENGTH,
    MAX_IDENTITY_LENGTH,
    InvalidValue,
    identity_pattern,
    validate_alias,
    validate_identity,
)

SUPPORTED_ACTIONS = ("CREATE_EMAIL",)


def _exchange_rule(check: Any) -> Any:
    """Runs a validation.py check and reports its sentence as the field's message."""

    def run(value: str | None) -> str | None:
        if value is None:
            return None
        try:
            result: str = check(value)
        except InvalidValue as exc:
            raise PydanticCustomError(exc.kind, exc.message) from exc
        return result

    return AfterValidator(run)


def _empty_is_absent(value: Any) -> Any:
    return None if value == "" else value


# The schemas state the rules for clients; validation.py's checks stay the ones that run (their
# messages say which character at which position is wrong).
class _IdentitySchema:
    """Like WithJsonSchema(..., mode="validation"), but the pattern is computed when the OpenAPI
    document is built (validation.identity_pattern), not when this module is imported."""

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        if handler.mode != "validation":
            return handler(core_schema)
        return {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_IDENTITY_LENGTH,
            "pattern": identity_pattern(),
            "description": "The user's AD identity: UPN, DOMAIN\\user, DN, GUID, SID or name; not "
            "only whitespace, no control characters, no '*'. Surrounding whitespace is trimmed.",
        }


_ALIAS_SCHEMA = {
    "anyOf": [
        {"type": "string", "maxLength": MAX_ALIAS_LENGTH, "pattern": f"^$|{ALIAS_PATTERN}"},
        {"type": "null"},
    ],
    "description": 'Exchange alias; omitted, null or "" lets the service choose it '
    "(exchange.alias_policy).",
}
Identity = Annotated[str, _exchange_rule(validate_identity), _IdentitySchema()]
Alias = Annotated[
    str | None,
    BeforeValidator(_empty_is_absent),
    _exchange_rule(validate_alias),
    WithJsonSchema(_ALIAS_SCHEMA, mode="validation"),
]
WindowsPath = Annotated[str, Field(min_length=1, max_length=1024)]


class EmailRequest(BaseModel):
    """CREATE_EMAIL attributes. The paths, when sent, must equal the configured ones."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"identity": "CONTOSO\\jdoe", "alias": "john.doe"}]},
    )

    identity: Identity
    alias: Alias = None
    powershell_path: WindowsPath | None = Field(
        default=None, description="Must equal exchange.powershell_path; never changes what runs"
    )
    remote_exchange_path: WindowsPath | None = Field(
        default=None,
        description="Must equal exchange.remote_exchange_path; never changes what runs",
    )

    def to_command(self) -> CreateEmail:
        return CreateEmail(
            identity=self.identity,
            alias=self.alias,
            powershell_path=self.powershell_path,
            remote_exchange_path=self.remote_exchange_path,
        )


class ActionRequest(BaseModel):
    """The platform's generic action envelope."""

    model_config = ConfigDict(extra="forbid")

    action: Literal[
        "CREATE_EMAIL", "SYNC_IDENTITIES", "MANAGE_RELATIONSHIPS", "DEPROVISION_IDENTITY"
    ]
    attributes: dict[str, Any] = Field(default_factory=dict)


class MailboxResponse(BaseModel):
    """The user's mailbox after CREATE_EMAIL (201 created, 200 already_exists)."""

    status: Literal["created", "already_exists"]
    request_id: str
    identity: str
    guid: str
    distinguished_name: str
    alias: str
    primary_smtp_address: str
    recipient_type_details: str
    database: str | None
    warnings: list[str] = Field(
        default_factory=list,
        description="What the caller should know, e.g. that the service chose the alias",
    )

    @classmethod
    def build(cls, result: MailboxResult, request_id: str) -> MailboxResponse:
        return cls(request_id=request_id, **{**vars(result), "warnings": list(result.warnings)})


class RecipientStateResponse(BaseModel):
    """A user's current mail state (GET /api/v1/emails/{identity})."""

    request_id: str
    identity: str
    guid: str
    distinguished_name: str
    user_principal_name: str
    recipient_type_details: str
    has_mailbox: bool
    provisionable: bool
    alias: str | None
    primary_smtp_address: str | None
    database: str | None

    @classmethod
    def build(cls, state: RecipientState, request_id: str) -> RecipientStateResponse:
        return cls(request_id=request_id, **vars(state))


class HealthResponse(BaseModel):
    status: Literal["ok"]
    version: str


class ReadinessCheck(BaseModel):
    """One readiness check: whether it passed and what it saw."""

    ok: bool
    detail: str


class ReadinessResponse(BaseModel):
    """Readiness with details (authenticated)."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, ReadinessCheck]


class CheckSummary(BaseModel):
    ok: bool


class ReadinessSummary(BaseModel):
    """Readiness for anyone: the status and each check's ok, no paths or error text."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, CheckSummary]


class ExchangeSaid(BaseModel):
    """What Exchange reported: CategoryInfo.Reason, FullyQualifiedErrorId and the message."""

    reason: str | None
    error_id: str | None
    message: str


class FieldError(BaseModel):
    field: str
    message: str
    type: str


class ProblemDocument(BaseModel):
    """RFC 9457 problem+json, as every error is sent."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    request_id: str
    errors: list[FieldError] | None = None
    exchange: ExchangeSaid | None = None


class RequestRecordResponse(BaseModel):
    """A journal record (GET /api/v1/requests/{request_id}); times are UTC ISO 8601."""

    request_id: str
    action: str
    identity: str
    alias: str | None
    caller: str
    caller_method: str
    client_address: str | None
    state: str
    recovered: bool
    guid: str | None
    received_at: str
    updated_at: str
    enable_sent_at: str | None
    finished_at: str | None
    duration_ms: int | None
    code: str | None
    detail: str | None
    exchange: dict[str, str | None] | None
    result_alias: str | None
    primary_smtp_address: str | None

    @classmethod
    def build(cls, record: Record) -> RequestRecordResponse:
        exchange = None
        if record.exchange_reason or record.exchange_error_id:
            exchange = {
                "reason": record.exchange_reason,
                "error_id": record.exchange_error_id,
                "message": record.exchange_message,
            }
        return cls(
            request_id=record.request_id,
            action=record.action,
            identity=record.identity,
            alias=record.alias,
            caller=record.caller,
            caller_method=record.caller_method,
            client_address=record.client_address,
            state=record.state,
            recovered=record.recovered,
            guid=record.guid,
            received_at=iso_time(record.received_at),
            updated_at=iso_time(record.updated_at),
            enable_sent_at=iso_time(record.enable_sent_at) if record.enable_sent_at else None,
            finished_at=iso_time(record.finished_at) if record.finished_at else None,
            duration_ms=record.duration_ms,
            code=record.code,
            detail=record.detail,
            exchange=exchange,
            result_alias=record.result_alias,
            primary_smtp_address=record.primary_smtp_address,
        )


class RequestListResponse(BaseModel):
    """A page of journal records, newest first (GET /api/v1/requests)."""

    items: list[RequestRecordResponse]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null on the last page"
    )


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="milliseconds")

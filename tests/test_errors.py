"""The classifier turns Exchange's real error records (message, reason, error id) into the tree."""

from __future__ import annotations

import pytest

from vezaprovisioner.exchange.errors import (
    AddressInUse,
    AmbiguousIdentity,
    ExchangeError,
    IdentityNotFound,
    PermissionDenied,
    UnexpectedExchangeError,
    WrongRecipientType,
    classify,
)

FQID = "[Server=EX01,RequestId=5f1e,TimeStamp=1/2/2026 10:00:00 AM] [FailureCategory=Cmdlet-{}] {}"

REAL_RECORDS = [
    (
        "The operation couldn't be performed because object 'CONTOSO\\nobody' couldn't be found "
        "on 'DC01.contoso.com'.",
        "ManagementObjectNotFoundException",
        FQID.format("ManagementObjectNotFoundException", "4B953CE,Microsoft.Exchange.GetUser"),
        IdentityNotFound,
    ),
    (
        "The operation couldn't be performed because 'John Doe' matches multiple entries.",
        "ManagementObjectAmbiguousException",
        FQID.format("ManagementObjectAmbiguousException", "E5DDAC9B,Microsoft.Exchange.SetMailbox"),
        AmbiguousIdentity,
    ),
    (
        'The proxy address "SMTP:jdoe@contoso.com" is already being used by the proxy addresses '
        'or LegacyExchangeDN of "John Doe". Please choose another proxy address.',
        "ProxyAddressExistsException",
        FQID.format("ProxyAddressExistsException", "A1B2C3D4,Microsoft.Exchange.EnableMailbox"),
        AddressInUse,
    ),
    (
        "The term 'Enable-Mailbox' is not recognized as the name of a cmdlet, function, script "
        "file, or operable program.",
        "CommandNotFoundException",
        "CommandNotFoundException",
        PermissionDenied,
    ),
    (
        "Active Directory operation failed on DC01.contoso.com. This error is not retriable. "
        "Additional information: Insufficient access rights to perform the operation. Active "
        "directory response: 00002098: SecErr: DSID-03150BB9, problem 4003 "
        "(INSUFF_ACCESS_RIGHTS), data 0",
        "ADOperationException",
        FQID.format("ADOperationException", "D1F1A2C3,Microsoft.Exchange.EnableMailbox"),
        PermissionDenied,
    ),
    (
        "The operation on mailbox \"jdoe\" failed because it's out of the current user's write "
        "scope. The object 'jdoe' must be within the read scope before and after it's modified.",
        "TaskInvalidOperationException",
        FQID.format("TaskInvalidOperationException", "9F1E2D3C,Microsoft.Exchange.EnableMailbox"),
        PermissionDenied,
    ),
]


@pytest.mark.parametrize(("message", "reason", "error_id", "expected"), REAL_RECORDS)
def test_real_exchange_records_are_classified_and_keep_what_exchange_said(
    message: str, reason: str, error_id: str, expected: type[ExchangeError]
) -> None:
    error = classify(message, reason=reason, error_id=error_id)
    assert type(error) is expected
    assert (error.message, error.reason, error.error_id) == (message, reason, error_id)
    assert error.from_exchange


def test_is_of_type_names_the_recipient_type() -> None:
    message = (
        "This task does not support recipients of this type. The specified recipient "
        "contoso.com/Users/John Doe is of type UserMailbox. Please make sure that this recipient "
        "matches the required recipient type for this task."
    )
    error = classify(message, reason="RecipientTaskException")
    assert isinstance(error, WrongRecipientType)
    assert error.recipient_type == "UserMailbox"


def test_recipient_task_exception_without_type_is_not_a_wrong_type() -> None:
    error = classify("Database is mandatory on UserMailbox.", reason="RecipientTaskException")
    assert type(error) is UnexpectedExchangeError


def test_reason_is_taken_from_the_error_id_when_category_info_is_missing() -> None:
    error_id = FQID.format("ManagementObjectNotFoundException", "4B953CE,X.GetUser")
    assert isinstance(classify("whatever text", error_id=error_id), IdentityNotFound)


def test_reason_is_taken_from_the_exception_type_as_a_last_resort() -> None:
    exception_type = "Microsoft.Exchange.Configuration.Tasks.ManagementObjectAmbiguousException"
    assert isinstance(classify("text", exception_type=exception_type), AmbiguousIdentity)


def test_unknown_errors_stay_unexpected_with_their_text() -> None:
    error = classify(
        "The server is unwilling to process the request.", reason="ADOperationException"
    )
    assert type(error) is UnexpectedExchangeError
    assert error.message == "The server is unwilling to process the request."

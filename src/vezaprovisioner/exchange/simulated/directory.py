"""The simulated directory file: its format, and loading it with strict validation.

A directory file describes the Active Directory forest the simulated Exchange starts from. Errors
are `DirectoryError`s that name the file, the place (``users[3].alias``) and what to change.

Directory file format (JSON, UTF-8; unknown keys are rejected)
---------------------------------------------------------------
::

    {
      "domain": "CONTOSO",                   NetBIOS domain name, for DOMAIN\\sam identities
      "upn_suffix": "contoso.com",           the forest's UPN suffix
      "smtp_domain": "contoso.com",          domain of generated primary SMTP addresses
      "domain_controller": "DC01.contoso.com",   optional, default DC01.<upn_suffix>
      "users": [
        {
          "sam_account_name": "jdoe",
          "user_principal_name": "jdoe@contoso.com",
          "name": "John Doe",                must equal the CN in distinguished_name
          "display_name": "Doe, John",
          "distinguished_name": "CN=John Doe,CN=Users,DC=contoso,DC=com",
          "guid": "74417254-c745-4b6f-8906-c43a3a533ec1",   unique
          "recipient_type_details": "User",  User, DisabledUser, UserMailbox, MailUser,
                                             RemoteUserMailbox, SharedMailbox, RoomMailbox, ...
          "alias": "jdoe",                   required for mail-enabled types, else forbidden
          "primary_smtp_address": "jdoe@contoso.com",   optional, = the "SMTP:" address
          "email_addresses": ["SMTP:jdoe@contoso.com", "smtp:john.doe@contoso.com"],
                                             proxy addresses; exactly one upper-case "SMTP:"
          "database": "DB01",                local mailboxes only, default DB01
          "appears_after_seconds": 20,       optional, default 0
          "fault": "timeout"                 optional: timeout | unavailable |
                                             permission_denied | exchange_error
        }
      ]
    }

sam account names, distinguished names, GUIDs and proxy addresses must be unique (AD and Exchange
enforce that); aliases, names and display names need not be (that is how ambiguity arises).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, NoReturn

from .naming import SMTP_ADDRESS, alias_problem, normalise_dn, primary_of, split_dn

__all__ = [
    "DEFAULT_DATABASE",
    "FAULTS",
    "KNOWN_TYPES",
    "LOCAL_MAILBOX_TYPES",
    "MAIL_USER_TYPES",
    "NON_MAIL_TYPES",
    "REMOTE_MAILBOX_TYPES",
    "DirectoryError",
    "Fault",
    "SimulatedDirectory",
    "SimulatedUser",
    "load_directory",
    "parse_directory",
]

Fault = Literal["timeout", "unavailable", "permission_denied", "exchange_error"]
_FAULT_BY_NAME: Final[dict[str, Fault]] = {
    "timeout": "timeout",
    "unavailable": "unavailable",
    "permission_denied": "permission_denied",
    "exchange_error": "exchange_error",
}
FAULTS: Final = frozenset(_FAULT_BY_NAME)

#: Database a local mailbox gets when neither the file nor the request names one.
DEFAULT_DATABASE: Final = "DB01"

# RecipientTypeDetails this simulator knows (the Get-User list of Exchange 2013-SE).
NON_MAIL_TYPES: Final = frozenset({"User", "DisabledUser", "LinkedUser"})
LOCAL_MAILBOX_TYPES: Final = frozenset(
    {
        "UserMailbox",
        "SharedMailbox",
        "RoomMailbox",
        "EquipmentMailbox",
        "LinkedMailbox",
        "LinkedRoomMailbox",
        "DiscoveryMailbox",
        "LegacyMailbox",
        "PublicFolderMailbox",
        "SchedulingMailbox",
        "TeamMailbox",
        "GroupMailbox",
    }
)
REMOTE_MAILBOX_TYPES: Final = frozenset(
    {
        "RemoteUserMailbox",
        "RemoteSharedMailbox",
        "RemoteRoomMailbox",
        "RemoteEquipmentMailbox",
        "RemoteTeamMailbox",
    }
)
MAIL_USER_TYPES: Final = frozenset({"MailUser", "GuestMailUser"})
KNOWN_TYPES: Final = NON_MAIL_TYPES | LOCAL_MAILBOX_TYPES | REMOTE_MAILBOX_TYPES | MAIL_USER_TYPES
_DNS_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DNS_NAME: Final = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})+")
_PROXY_ADDRESS: Final = re.compile(r"(?P<prefix>[A-Za-z0-9]{1,9}):(?P<value>\S.*)")


class DirectoryError(ValueError):
    """The simulated directory file is unreadable or invalid; the message says where and why."""


@dataclass(frozen=True)
class SimulatedUser:
    """One AD user as the directory file describes it (the state when the backend starts)."""

    sam_account_name: str
    user_principal_name: str
    name: str
    display_name: str
    distinguished_name: str
    guid: str
    recipient_type_details: str
    alias: str | None = None
    email_addresses: tuple[str, ...] = ()
    database: str | None = None
    appears_after_seconds: float = 0.0
    fault: Fault | None = None

    @property
    def primary_smtp_address(self) -> str | None:
        """The address of the upper-case ``SMTP:`` proxy, if any."""
        return primary_of(self.email_addresses)


@dataclass(frozen=True)
class SimulatedDirectory:
    """A validated directory: the domain and its users."""

    domain: str
    upn_suffix: str
    smtp_domain: str
    domain_controller: str
    users: tuple[SimulatedUser, ...]


# --------------------------------------------------------------------------------------------
# Loading and validating the directory file


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def load_directory(path: Path) -> SimulatedDirectory:
    """Read and strictly validate a directory file; raises DirectoryError naming what to fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DirectoryError(
            f"{path}: the directory file does not exist; check the path "
            "(examples/directory.json shows the format)"
        ) from None
    except OSError as exc:
        raise DirectoryError(
            f"{path}: the directory file cannot be read ({exc.strerror or exc}); "
            "check the path and its permissions"
        ) from None
    except UnicodeDecodeError as exc:
        raise DirectoryError(
            f"{path}: the directory file is not UTF-8 ({exc.reason} at byte {exc.start}); "
            "save it as UTF-8"
        ) from None
    try:
        document: object = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise DirectoryError(
            f"{path}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
            "fix the syntax"
        ) from None
    except _DuplicateKeyError as exc:
        raise DirectoryError(
            f"{path}: the key {exc.key!r} appears twice in one object; keep only one"
        ) from None
    return parse_directory(document, source=str(path))


_TOP_REQUIRED: Final = ("domain", "upn_suffix", "smtp_domain", "users")
_TOP_OPTIONAL: Final = ("domain_controller",)
_USER_REQUIRED: Final = (
    "sam_account_name",
    "user_principal_name",
    "name",
    "display_name",
    "distinguished_name",
    "guid",
    "recipient_type_details",
)
_USER_OPTIONAL: Final = (
    "alias",
    "primary_smtp_address",
    "email_addresses",
    "database",
    "appears_after_seconds",
    "fault",
)


def parse_directory(document: object, *, source: str = "<directory>") -> SimulatedDirectory:
    """Validate an already-parsed JSON document (see the module docstring for the format)."""

    def fail(where: str, problem: str) -> NoReturn:
        raise DirectoryError(f"{source}: {where}: {problem}")

    if not isinstance(document, dict):
        fail("top level", "expected a JSON object with domain, upn_suffix, smtp_domain and users")
    _check_keys(document, _TOP_REQUIRED, _TOP_OPTIONAL, "top level", fail)
    domain = _text(document, "domain", "domain", fail)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,14}", domain):
        fail("domain", f'{domain!r} is not a NetBIOS domain name; use e.g. "CONTOSO"')
    upn_suffix = _dns_name(document, "upn_suffix", fail)
    smtp_domain = _dns_name(document, "smtp_domain", fail)
    domain_controller = (
        _dns_name(document, "domain_controller", fail)
        if "domain_controller" in document
        else f"DC01.{upn_suffix}"
    )
    raw_users = document["users"]
    if not isinstance(raw_users, list):
        fail("users", "expected a JSON array of user objects")

    users: list[SimulatedUser] = []
    seen: dict[str, dict[str, int]] = {"guid": {}, "sam": {}, "dn": {}, "proxy": {}}
    for index, raw in enumerate(raw_users):
        user = _parse_user(raw, index, fail)
        _check_unique(seen["guid"], user.guid, index, f"users[{index}].guid", "GUID", fail)
        _check_unique(
            seen["sam"],
            user.sam_account_name.casefold(),
            index,
            f"users[{index}].sam_account_name",
            "sam account name",
            fail,
        )
        _check_unique(
            seen["dn"],
            normalise_dn(user.distinguished_name),
            index,
            f"users[{index}].distinguished_name",
            "distinguished name",
            fail,
        )
        for proxy in user.email_addresses:
            _check_unique(
                seen["proxy"],
                proxy.casefold(),
                index,
                f"users[{index}].email_addresses",
                "proxy address",
                fail,
            )
        users.append(user)
    return SimulatedDirectory(
        domain=domain,
        upn_suffix=upn_suffix,
        smtp_domain=smtp_domain,
        domain_controller=domain_controller,
        users=tuple(users),
    )


_Fail = Callable[[str, str], NoReturn]


def _check_keys(
    data: Mapping[str, object],
    required: Sequence[str],
    optional: Sequence[str],
    where: str,
    fail: _Fail,
) -> None:
    allowed = (*required, *optional)
    for key in data:
        if key not in allowed:
            fail(where, f"unknown key {key!r}; allowed keys are {', '.join(allowed)}")
    for key in required:
        if key not in data:
            fail(where, f"the required key {key!r} is missing; add it")


def _text(data: Mapping[str, object], key: str, where: str, fail: _Fail) -> str:
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        fail(where, f"expected a non-empty string, got {json.dumps(value, ensure_ascii=False)}")
    if value != value.strip():
        fail(where, f"{value!r} has leading or trailing whitespace; remove it")
    return value


def _dns_name(data: Mapping[str, object], key: str, fail: _Fail) -> str:
    value = _text(data, key, key, fail)
    if not _DNS_NAME.fullmatch(value):
        fail(key, f'{value!r} is not a DNS name; use e.g. "contoso.com"')
    return value


def _check_unique(
    seen: dict[str, int], value: str, index: int, where: str, what: str, fail: _Fail
) -> None:
    if value in seen:
        fail(where, f"{what} {value!r} is already used by users[{seen[value]}]; make it unique")
    seen[value] = index


@dataclass(frozen=True)
class _UserFields:
    """One user object of the file, with the place its errors are reported at."""

    data: Mapping[str, object]
    where: str
    fail_at: _Fail

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def text(self, key: str) -> str:
        return _text(self.data, key, f"{self.where}.{key}", self.fail_at)

    def fail(self, key: str, problem: str) -> NoReturn:
        self.fail_at(f"{self.where}.{key}", problem)


def _parse_user(raw: object, index: int, fail: _Fail) -> SimulatedUser:
    where = f"users[{index}]"
    if not isinstance(raw, dict):
        fail(where, "expected a JSON object describing one user")
    _check_keys(raw, _USER_REQUIRED, _USER_OPTIONAL, where, fail)
    fields = _UserFields(raw, where, fail)
    sam = _sam_account_name(fields)
    upn = _user_principal_name(fields)
    name = fields.text("name")
    display_name = fields.text("display_name")
    dn = _distinguished_name(fields, name)
    guid = _guid(fields)
    kind = _recipient_type(fields)
    mail_enabled = kind not in NON_MAIL_TYPES
    alias = _alias(fields, kind, mail_enabled)
    addresses = _mail_addresses(fields, kind, mail_enabled)
    return SimulatedUser(
        sam_account_name=sam,
        user_principal_name=upn,
        name=name,
        display_name=display_name,
        distinguished_name=dn,
        guid=guid,
        recipient_type_details=kind,
        alias=alias,
        email_addresses=addresses,
        database=_database(fields, kind),
        appears_after_seconds=_appears_after(fields),
        fault=_fault(fields),
    )


def _sam_account_name(fields: _UserFields) -> str:
    sam = fields.text("sam_account_name")
    if re.search(r'["/\\\[\]:;|=,+*?<>@]', sam) or len(sam) > 20:
        fields.fail(
            "sam_account_name",
            f"{sam!r} is not a valid sAMAccountName; use at most 20 characters and none of "
            '" / \\ [ ] : ; | = , + * ? < > @',
        )
    return sam


def _user_principal_name(fields: _UserFields) -> str:
    upn = fields.text("user_principal_name")
    if not SMTP_ADDRESS.fullmatch(upn):
        fields.fail("user_principal_name", f"{upn!r} is not a UPN; use the form user@domain")
    return upn


def _distinguished_name(fields: _UserFields, name: str) -> str:
    dn = fields.text("distinguished_name")
    rdns = split_dn(dn)
    if (
        rdns is None
        or rdns[0][0].upper() != "CN"
        or not any(kind.upper() == "DC" for kind, _ in rdns)
    ):
        fields.fail(
            "distinguished_name",
            f"{dn!r} is not a user DN; use the form CN=<name>,CN=Users,DC=contoso,DC=com",
        )
    if rdns[0][1] != name:
        fields.fail(
            "distinguished_name",
            f"the CN {rdns[0][1]!r} differs from name {name!r}; in AD the name is the CN, "
            "so make them equal",
        )
    return dn


def _guid(fields: _UserFields) -> str:
    raw_guid = fields.text("guid")
    try:
        return str(uuid.UUID(raw_guid))
    except ValueError:
        fields.fail(
            "guid",
            f"{raw_guid!r} is not a GUID; use 32 hex digits like "
            '"74417254-c745-4b6f-8906-c43a3a533ec1"',
        )


def _recipient_type(fields: _UserFields) -> str:
    kind = fields.text("recipient_type_details")
    if kind not in KNOWN_TYPES:
        fields.fail(
            "recipient_type_details",
            f"{kind!r} is not a RecipientTypeDetails value this simulator knows; use one of "
            f"{', '.join(sorted(KNOWN_TYPES))}",
        )
    return kind


def _alias(fields: _UserFields, kind: str, mail_enabled: bool) -> str | None:
    if "alias" not in fields:
        if mail_enabled:
            fields.fail("alias", f"a {kind} always has an alias; add one")
        return None
    alias = fields.text("alias")
    if not mail_enabled:
        fields.fail(
            "alias",
            f"a {kind} has no mail attributes; remove alias or make the user mail-enabled",
        )
    if alias_problem(alias) is not None:
        fields.fail("alias", f"{alias!r} is not a valid Exchange alias; fix it")
    return alias


def _mail_addresses(fields: _UserFields, kind: str, mail_enabled: bool) -> tuple[str, ...]:
    """email_addresses, with primary_smtp_address folded in (they must agree)."""
    addresses = _parse_addresses(fields, mail_enabled, kind)
    primary = primary_of(addresses)
    if "primary_smtp_address" in fields:
        given = fields.text("primary_smtp_address")
        if not mail_enabled:
            fields.fail("primary_smtp_address", f"a {kind} has no mail attributes; remove it")
        if not SMTP_ADDRESS.fullmatch(given):
            fields.fail("primary_smtp_address", f"{given!r} is not an SMTP address")
        if primary is None:
            addresses = (f"SMTP:{given}", *addresses)
        elif primary.casefold() != given.casefold():
            fields.fail(
                "primary_smtp_address",
                f"{given!r} differs from the SMTP: entry {primary!r} in email_addresses; "
                "make them agree or drop one",
            )
    if mail_enabled and primary_of(addresses) is None:
        fields.fail(
            "email_addresses",
            f"a {kind} needs a primary address; add primary_smtp_address or an "
            '"SMTP:user@domain" entry',
        )
    return addresses


def _parse_addresses(fields: _UserFields, mail_enabled: bool, kind: str) -> tuple[str, ...]:
    if "email_addresses" not in fields:
        return ()
    values = fields.data["email_addresses"]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        fields.fail(
            "email_addresses", 'expected an array of proxy strings like "SMTP:jdoe@contoso.com"'
        )
    if values and not mail_enabled:
        fields.fail("email_addresses", f"a {kind} has no mail attributes; remove email_addresses")
    addresses: list[str] = []
    primaries = 0
    for value in values:
        assert isinstance(value, str)  # checked above; narrows for mypy
        match = _PROXY_ADDRESS.fullmatch(value)
        if match is None:
            fields.fail(
                "email_addresses",
                f"{value!r} is not a proxy address; use PREFIX:address, e.g. SMTP:a@b.com",
            )
        if match["prefix"].casefold() == "smtp":
            if not SMTP_ADDRESS.fullmatch(match["value"]):
                fields.fail("email_addresses", f"{value!r} does not hold an SMTP address")
            if match["prefix"] == "SMTP":
                primaries += 1
        addresses.append(value)
    if primaries > 1:
        fields.fail(
            "email_addresses",
            'more than one upper-case "SMTP:" (primary) address; keep one, make the others "smtp:"',
        )
    return tuple(addresses)


def _database(fields: _UserFields, kind: str) -> str | None:
    if "database" not in fields:
        return DEFAULT_DATABASE if kind in LOCAL_MAILBOX_TYPES else None
    database = fields.text("database")
    if kind not in LOCAL_MAILBOX_TYPES:
        fields.fail("database", f"a {kind} has no mailbox database; remove it")
    return database


def _appears_after(fields: _UserFields) -> float:
    if "appears_after_seconds" not in fields:
        return 0.0
    value = fields.data["appears_after_seconds"]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        fields.fail(
            "appears_after_seconds",
            f"expected a number of seconds >= 0, got {json.dumps(value)}",
        )
    return float(value)


def _fault(fields: _UserFields) -> Fault | None:
    if "fault" not in fields:
        return None
    name = fields.data["fault"]
    if not isinstance(name, str) or name not in _FAULT_BY_NAME:
        fields.fail(
            "fault",
            f"{json.dumps(name)} is not a fault; use one of {', '.join(sorted(FAULTS))}",
        )
    return _FAULT_BY_NAME[name]

"""An in-process simulated Exchange, for the demo and for CI.

`SimulatedExchange` implements `ExchangePort` against an Active Directory described by a JSON file,
so the whole service can be run and tested without Windows, Exchange or PowerShell. It behaves
the way Exchange 2013-SE does where that matters to the service, and says so the way Exchange
does: every failure is built from Exchange's real message text, CategoryInfo.Reason and a
FullyQualifiedErrorId of Exchange's shape, then turned into the error tree by
`vezaprovisioner.exchange.errors.classify` - the same path a real backend takes. Changes
(Enable-Mailbox, Enable-RemoteMailbox) live in memory only; the file is never written.

What it simulates
-----------------
* Identity resolution (Get-User, Get-Recipient, Enable-*): a value matches a user when it equals,
  case-insensitively, its GUID (any formatting `uuid.UUID` accepts), distinguished name, canonical
  name (``contoso.com/Users/John Doe``), UPN, ``DOMAIN\\sam``, sam, Name, DisplayName, Alias, or -
  when the value looks like an SMTP address - one of its SMTP proxy addresses. A leading or
  trailing ``*`` is a wildcard, as in Exchange; an empty identity matches every object. Several
  users match: ManagementObjectAmbiguousException; none: ManagementObjectNotFoundException.
* Get-Recipient sees mail-enabled objects only (a plain User/DisabledUser is "not found").
* Enable-Mailbox accepts User, DisabledUser and MailUser (a MailUser keeps its alias: real
  Exchange behaviour), Enable-RemoteMailbox accepts User and DisabledUser; anything else fails
  with "... is of type <RecipientTypeDetails> ...".
* Without -Alias the alias is derived from the user's Name exactly like Exchange's
  ``AliasHelper.GenerateAlias``: characters are first mapped to Windows-1252 (best-fit for
  letters such as ``Ā``; anything else becomes ``?``), spaces are dropped, characters outside the
  alias set become ``?``, periods must be embedded, at most 64 characters; the result is made
  unique forest-wide by appending 1..9 (then 10, 11, ... - Exchange uses a time-based number
  there). An explicit -Alias is validated but not made unique (Exchange on-premises does not).
* The primary SMTP address is the alias mapped to best-fit ASCII (``ö`` -> ``oe``, ``ß`` -> ``ss``,
  accents stripped) ``@`` smtp_domain. If another object already has that proxy address the
  cmdlet fails with ProxyAddressExistsException and nothing changes.
* ``appears_after_seconds`` hides a user from every cmdlet until that many seconds (of the
  clock's monotonic time) after the backend was created: AD replication lag.
* ``fault`` makes Enable-Mailbox / Enable-RemoteMailbox of that user fail: ``timeout`` (waits the
  command timeout, raises ExchangeTimeout), ``unavailable`` (BackendUnavailable, retry after 5 s),
  ``permission_denied`` (Exchange's AD INSUFF_ACCESS_RIGHTS error), ``exchange_error`` (an AD
  error the service has no specific handling for).
* Latency: every cmdlet sleeps ``latency_ms`` on the injected clock, Enable-* sleeps
  ``enable_latency_ms`` on top; a command that would take longer than ``command_timeout_seconds``
  sleeps the timeout and raises ExchangeTimeout. The lock is never held while sleeping.
* Every cmdlet run is recorded in ``calls`` as ``(cmdlet, {parameter: value})``.

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

import contextlib
import json
import math
import re
import threading
import unicodedata
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Final, Literal, NoReturn

from ..clock import Clock
from .errors import BackendUnavailable, ExchangeError, ExchangeTimeout, classify
from .port import (
    LOCAL_MAILBOX_TYPE,
    REMOTE_MAILBOX_TYPE,
    DirectoryUser,
    EnableMailbox,
    EnableRemoteMailbox,
    Recipient,
    bound_parameters,
    lookup_parameters,
)

__all__ = [
    "DEFAULT_DATABASE",
    "FAULTS",
    "DirectoryError",
    "Fault",
    "SimulatedDirectory",
    "SimulatedExchange",
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
_NON_MAIL_TYPES: Final = frozenset({"User", "DisabledUser", "LinkedUser"})
_LOCAL_MAILBOX_TYPES: Final = frozenset(
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
_REMOTE_MAILBOX_TYPES: Final = frozenset(
    {
        "RemoteUserMailbox",
        "RemoteSharedMailbox",
        "RemoteRoomMailbox",
        "RemoteEquipmentMailbox",
        "RemoteTeamMailbox",
    }
)
_MAIL_USER_TYPES: Final = frozenset({"MailUser", "GuestMailUser"})
_KNOWN_TYPES: Final = (
    _NON_MAIL_TYPES | _LOCAL_MAILBOX_TYPES | _REMOTE_MAILBOX_TYPES | _MAIL_USER_TYPES
)
_ENABLE_MAILBOX_TYPES: Final = frozenset({"User", "DisabledUser", "MailUser"})
_ENABLE_REMOTE_MAILBOX_TYPES: Final = frozenset({"User", "DisabledUser"})

_MAX_ALIAS_LENGTH: Final = 64
_DNS_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DNS_NAME: Final = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})+")
_SMTP_ADDRESS: Final = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_PROXY_ADDRESS: Final = re.compile(r"(?P<prefix>[A-Za-z0-9]{1,9}):(?P<value>\S.*)")
# Characters AliasHelper treats as regular (atext) plus U+00A1-U+00FF; periods are separate.
_ALIAS_CHAR: Final = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u00a1-\u00ff]"
_VALID_ALIAS: Final = re.compile(rf"{_ALIAS_CHAR}+(?:\.{_ALIAS_CHAR}+)*")
_SMTP_ATEXT: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~."
)
# Best-fit ASCII for the U+00A1-U+00FF letters NFKD does not decompose the way Exchange maps them.
_SMTP_BEST_FIT: Final = {
    "ä": "ae",
    "ö": "oe",
    "ü": "ue",
    "Ä": "Ae",
    "Ö": "Oe",
    "Ü": "Ue",
    "ß": "ss",
    "Æ": "AE",
    "æ": "ae",
    "Ø": "O",
    "ø": "o",
    "Ð": "D",
    "ð": "d",
    "Þ": "TH",
    "þ": "th",
}

_TASK_NAMESPACE: Final = "Microsoft.Exchange.Management.RecipientTasks"
_NOT_FOUND_TYPE: Final = "Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException"
_AMBIGUOUS_TYPE: Final = "Microsoft.Exchange.Configuration.Tasks.ManagementObjectAmbiguousException"
_RECIPIENT_TASK_TYPE: Final = "Microsoft.Exchange.Management.Tasks.RecipientTaskException"
_PROXY_EXISTS_TYPE: Final = (
    "Microsoft.Exchange.Configuration.ObjectModel.ProxyAddressExistsException"
)
_AD_OPERATION_TYPE: Final = "Microsoft.Exchange.Data.Directory.ADOperationException"
_DATA_VALIDATION_TYPE: Final = "Microsoft.Exchange.Data.DataValidationException"
_BINDING_TYPE: Final = "System.Management.Automation.ParameterBindingValidationException"
# Error-site ids seen in real FullyQualifiedErrorIds (research §3.3).
_WRONG_TYPE_SITE: Final = {"EnableMailbox": "3CD6CA39", "EnableRemoteMailbox": "2882FF3D"}

_INVALID_ALIAS_TEXT: Final = (
    '"{alias}" is not valid for Alias. Valid values are: Strings formed with characters from '
    "a to z (uppercase or lowercase), digits from 0 to 9, !, #, $, %, &, ', *, +, -, /, =, ?, "
    "^, _, `, {{, |, }} or ~. One or more periods may be embedded in an alias, but each one of "
    "them should be preceded and followed by at least one of the other characters. Unicode "
    "characters from U+00A1 to U+00FF are also valid in an alias, but they will be mapped to a "
    "best-fit US-ASCII string in the email address which is generated from such an alias."
)


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
        return _primary_of(self.email_addresses)


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
            _normalise_dn(user.distinguished_name),
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


def _parse_user(raw: object, index: int, fail: _Fail) -> SimulatedUser:
    where = f"users[{index}]"
    if not isinstance(raw, dict):
        fail(where, "expected a JSON object describing one user")
    data: dict[str, object] = raw
    _check_keys(data, _USER_REQUIRED, _USER_OPTIONAL, where, fail)

    def text(key: str) -> str:
        return _text(data, key, f"{where}.{key}", fail)

    sam = text("sam_account_name")
    if re.search(r'["/\\\[\]:;|=,+*?<>@]', sam) or len(sam) > 20:
        fail(
            f"{where}.sam_account_name",
            f"{sam!r} is not a valid sAMAccountName; use at most 20 characters and none of "
            '" / \\ [ ] : ; | = , + * ? < > @',
        )
    upn = text("user_principal_name")
    if not _SMTP_ADDRESS.fullmatch(upn):
        fail(f"{where}.user_principal_name", f"{upn!r} is not a UPN; use the form user@domain")
    name = text("name")
    display_name = text("display_name")
    dn = text("distinguished_name")
    rdns = _split_dn(dn)
    if (
        rdns is None
        or rdns[0][0].upper() != "CN"
        or not any(kind.upper() == "DC" for kind, _ in rdns)
    ):
        fail(
            f"{where}.distinguished_name",
            f"{dn!r} is not a user DN; use the form CN=<name>,CN=Users,DC=contoso,DC=com",
        )
    if rdns[0][1] != name:
        fail(
            f"{where}.distinguished_name",
            f"the CN {rdns[0][1]!r} differs from name {name!r}; in AD the name is the CN, "
            "so make them equal",
        )
    raw_guid = text("guid")
    try:
        guid = str(uuid.UUID(raw_guid))
    except ValueError:
        fail(
            f"{where}.guid",
            f"{raw_guid!r} is not a GUID; use 32 hex digits like "
            '"74417254-c745-4b6f-8906-c43a3a533ec1"',
        )
    kind = text("recipient_type_details")
    if kind not in _KNOWN_TYPES:
        fail(
            f"{where}.recipient_type_details",
            f"{kind!r} is not a RecipientTypeDetails value this simulator knows; use one of "
            f"{', '.join(sorted(_KNOWN_TYPES))}",
        )
    mail_enabled = kind not in _NON_MAIL_TYPES

    alias: str | None = None
    if "alias" in data:
        alias = text("alias")
        if not mail_enabled:
            fail(
                f"{where}.alias",
                f"a {kind} has no mail attributes; remove alias or make the user mail-enabled",
            )
        if _alias_problem(alias) is not None:
            fail(f"{where}.alias", f"{alias!r} is not a valid Exchange alias; fix it")
    elif mail_enabled:
        fail(f"{where}.alias", f"a {kind} always has an alias; add one")

    addresses = _parse_addresses(data, where, mail_enabled, kind, fail)
    primary = _primary_of(addresses)
    if "primary_smtp_address" in data:
        given = text("primary_smtp_address")
        if not mail_enabled:
            fail(f"{where}.primary_smtp_address", f"a {kind} has no mail attributes; remove it")
        if not _SMTP_ADDRESS.fullmatch(given):
            fail(f"{where}.primary_smtp_address", f"{given!r} is not an SMTP address")
        if primary is None:
            addresses = (f"SMTP:{given}", *addresses)
        elif primary.casefold() != given.casefold():
            fail(
                f"{where}.primary_smtp_address",
                f"{given!r} differs from the SMTP: entry {primary!r} in email_addresses; "
                "make them agree or drop one",
            )
    if mail_enabled and _primary_of(addresses) is None:
        fail(
            f"{where}.email_addresses",
            f"a {kind} needs a primary address; add primary_smtp_address or an "
            '"SMTP:user@domain" entry',
        )

    database: str | None = None
    if "database" in data:
        database = text("database")
        if kind not in _LOCAL_MAILBOX_TYPES:
            fail(f"{where}.database", f"a {kind} has no mailbox database; remove it")
    elif kind in _LOCAL_MAILBOX_TYPES:
        database = DEFAULT_DATABASE

    appears_after = 0.0
    if "appears_after_seconds" in data:
        value = data["appears_after_seconds"]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            fail(
                f"{where}.appears_after_seconds",
                f"expected a number of seconds >= 0, got {json.dumps(value)}",
            )
        appears_after = float(value)

    fault: Fault | None = None
    if "fault" in data:
        fault_name = data["fault"]
        if not isinstance(fault_name, str) or fault_name not in _FAULT_BY_NAME:
            fail(
                f"{where}.fault",
                f"{json.dumps(fault_name)} is not a fault; use one of {', '.join(sorted(FAULTS))}",
            )
        fault = _FAULT_BY_NAME[fault_name]

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
        database=database,
        appears_after_seconds=appears_after,
        fault=fault,
    )


def _parse_addresses(
    raw: Mapping[str, object], where: str, mail_enabled: bool, kind: str, fail: _Fail
) -> tuple[str, ...]:
    if "email_addresses" not in raw:
        return ()
    field = f"{where}.email_addresses"
    values = raw["email_addresses"]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        fail(field, 'expected an array of proxy strings like "SMTP:jdoe@contoso.com"')
    if values and not mail_enabled:
        fail(field, f"a {kind} has no mail attributes; remove email_addresses")
    addresses: list[str] = []
    primaries = 0
    for value in values:
        assert isinstance(value, str)  # checked above; narrows for mypy
        match = _PROXY_ADDRESS.fullmatch(value)
        if match is None:
            fail(field, f"{value!r} is not a proxy address; use PREFIX:address, e.g. SMTP:a@b.com")
        if match["prefix"].casefold() == "smtp":
            if not _SMTP_ADDRESS.fullmatch(match["value"]):
                fail(field, f"{value!r} does not hold an SMTP address")
            if match["prefix"] == "SMTP":
                primaries += 1
        addresses.append(value)
    if primaries > 1:
        fail(
            field,
            'more than one upper-case "SMTP:" (primary) address; keep one, make the others "smtp:"',
        )
    return tuple(addresses)


def _primary_of(addresses: Sequence[str]) -> str | None:
    for proxy in addresses:
        if proxy.startswith("SMTP:"):
            return proxy[5:]
    return None


def _smtp_proxies(addresses: Sequence[str]) -> list[str]:
    return [proxy[5:] for proxy in addresses if proxy[:5].casefold() == "smtp:"]


# --------------------------------------------------------------------------------------------
# Distinguished names


def _split_dn(dn: str) -> list[tuple[str, str]] | None:
    """[(type, unescaped value), ...] of a DN, or None when it does not parse."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in dn:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        return None
    parts.append("".join(current))
    rdns: list[tuple[str, str]] = []
    for part in parts:
        kind, sep, value = part.strip().partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z]+", kind.strip()) or not value.strip():
            return None
        rdns.append((kind.strip(), value.strip()))
    return rdns


def _normalise_dn(dn: str) -> str:
    rdns = _split_dn(dn)
    if rdns is None:
        return dn.casefold()
    return ",".join(f"{kind.upper()}={value.casefold()}" for kind, value in rdns)


def _canonical_name(dn: str) -> str:
    """contoso.com/Users/John Doe for CN=John Doe,CN=Users,DC=contoso,DC=com."""
    rdns = _split_dn(dn) or []
    domain = ".".join(value for kind, value in rdns if kind.upper() == "DC")
    path = [value.replace("/", "\\/") for kind, value in reversed(rdns) if kind.upper() != "DC"]
    return "/".join([domain, *path])


# --------------------------------------------------------------------------------------------
# Aliases and addresses, the way Exchange derives them


def _alias_char_category(char: str) -> str:
    """AliasHelper.Analyze: 'regular', 'invalid', 'dot' or 'space'."""
    code = ord(char)
    if code in (9, 32):
        return "space"
    if code == 46:
        return "dot"
    if code < 32 or 127 <= code <= 160 or code > 255 or char in '"(),:;<>@[\\]':
        return "invalid"
    return "regular"


def _to_windows_1252(text: str) -> str:
    """UnicodeToAnsiConverter: keep what cp1252 encodes, best-fit letters, else '?'."""
    out: list[str] = []
    for char in text:
        try:
            char.encode("cp1252")
        except UnicodeEncodeError:
            if char == "\u0149":  # ŉ
                out.append("'n")
                continue
            decomposed = "".join(
                c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c)
            )
            fits = decomposed and decomposed != char and all(ord(c) <= 0xFF for c in decomposed)
            out.append(decomposed if fits else "?")
        else:
            out.append(char)
    return "".join(out)


def _generate_alias(name: str) -> str | None:
    """A port of Exchange's AliasHelper.GenerateAlias (None when no valid alias results)."""
    text = _to_windows_1252(name)
    out: list[str] = []
    state = "start"
    for position, char in enumerate(text):
        if len(out) >= _MAX_ALIAS_LENGTH:
            break
        category = _alias_char_category(char)
        if category == "space":
            continue
        if state == "start":
            if category != "regular":
                char = "?"
            state = "terminal"
        elif state == "terminal":
            if category == "invalid":
                char = "?"
            elif category == "dot":
                if position == len(text) - 1 or len(out) == _MAX_ALIAS_LENGTH - 1:
                    char = "?"
                else:
                    state = "middle"
        else:  # middle: the previous character was an embedded period
            if category != "regular":
                char = "?"
            state = "terminal"
        out.append(char)
    return "".join(out) if state == "terminal" else None


def _alias_problem(alias: str) -> str | None:
    """Exchange's message when `alias` is not a valid Alias, else None."""
    if len(alias) > _MAX_ALIAS_LENGTH:
        return (
            "The length of the property is too long. The maximum length is "
            f"{_MAX_ALIAS_LENGTH} and the length of the value provided is {len(alias)}."
        )
    if not _VALID_ALIAS.fullmatch(alias):
        return _INVALID_ALIAS_TEXT.format(alias=alias)
    return None


def _smtp_local_part(alias: str) -> str:
    """The alias mapped to best-fit US-ASCII, as in the generated primary SMTP address."""
    out: list[str] = []
    for char in alias:
        if char in _SMTP_BEST_FIT:
            out.append(_SMTP_BEST_FIT[char])
            continue
        out.extend(c for c in unicodedata.normalize("NFKD", char) if c in _SMTP_ATEXT)
    local = re.sub(r"\.{2,}", ".", "".join(out)).strip(".")
    return local or "User"


# --------------------------------------------------------------------------------------------
# Identity matching


def _text_matcher(value: str) -> Callable[[str], bool]:
    """Equality, or Exchange's wildcard match when the value starts or ends with '*'."""
    folded = value.casefold()
    lead, trail = folded.startswith("*"), folded.endswith("*")
    core = folded.strip("*")
    if lead and trail:
        return lambda candidate: core in candidate.casefold()
    if lead:
        return lambda candidate: candidate.casefold().endswith(core)
    if trail:
        return lambda candidate: candidate.casefold().startswith(core)
    return lambda candidate: candidate.casefold() == folded


@dataclass
class _Entry:
    """A user's current (mutable) state inside one SimulatedExchange."""

    user: SimulatedUser
    guid: uuid.UUID
    canonical_name: str
    recipient_type_details: str
    alias: str | None
    email_addresses: list[str]
    database: str | None

    @property
    def mail_enabled(self) -> bool:
        return self.recipient_type_details not in _NON_MAIL_TYPES


def _timestamp() -> str:
    """UTC now as Exchange writes it in error ids: 5/25/2019 6:06:56 PM."""
    now = datetime.now(timezone.utc)
    hour = now.hour % 12 or 12
    half = "AM" if now.hour < 12 else "PM"
    return f"{now.month}/{now.day}/{now.year} {hour}:{now.minute:02d}:{now.second:02d} {half}"


class SimulatedExchange:
    """An in-memory Exchange over a `SimulatedDirectory`; implements `ExchangePort`."""

    def __init__(
        self,
        directory: SimulatedDirectory,
        *,
        clock: Clock,
        latency_ms: int = 0,
        enable_latency_ms: int = 0,
        command_timeout_seconds: float = 120.0,
        server: str = "EXSIM01",
    ) -> None:
        if latency_ms < 0 or enable_latency_ms < 0:
            raise ValueError("latency_ms and enable_latency_ms must be >= 0")
        if command_timeout_seconds <= 0:
            raise ValueError("command_timeout_seconds must be > 0")
        self.directory = directory
        self.server = server
        self._clock = clock
        self._latency = latency_ms / 1000
        self._enable_latency = enable_latency_ms / 1000
        self._timeout = command_timeout_seconds
        self._lock = threading.Lock()
        self._started = clock.monotonic()
        self._entries = [
            _Entry(
                user=user,
                guid=uuid.UUID(user.guid),
                canonical_name=_canonical_name(user.distinguished_name),
                recipient_type_details=user.recipient_type_details,
                alias=user.alias,
                email_addresses=list(user.email_addresses),
                database=user.database,
            )
            for user in directory.users
        ]
        self._by_key: dict[str, list[_Entry]] = {}
        self._by_smtp: dict[str, list[_Entry]] = {}
        for entry in self._entries:
            self._index(entry)
        #: Every cmdlet run, in order: (cmdlet name, bound parameters).
        self.calls: list[tuple[str, dict[str, str]]] = []

    # ---- ExchangePort -----------------------------------------------------------------------

    def get_user(self, identity: str, domain_controller: str | None = None) -> DirectoryUser:
        """Get-User: users, mailboxes and mail users alike."""
        self._begin("Get-User", lookup_parameters(identity, domain_controller))
        self._pause("Get-User", self._latency)
        with self._lock:
            entry = self._resolve(identity, "GetUser", domain_controller, mail_enabled_only=False)
            return self._directory_user(entry)

    def get_recipient(self, identity: str, domain_controller: str | None = None) -> Recipient:
        """Get-Recipient: mail-enabled objects only."""
        self._begin("Get-Recipient", lookup_parameters(identity, domain_controller))
        self._pause("Get-Recipient", self._latency)
        with self._lock:
            entry = self._resolve(
                identity, "GetRecipient", domain_controller, mail_enabled_only=True
            )
            return self._recipient(entry)

    def enable_mailbox(self, request: EnableMailbox) -> Recipient:
        """Enable-Mailbox (User parameter set)."""
        cmdlet, task = "Enable-Mailbox", "EnableMailbox"
        self._begin(cmdlet, request.parameters())
        slept = self._pause(cmdlet, self._latency + self._enable_latency)
        dc = request.domain_controller
        with self._lock:
            entry = self._resolve_for_enable(request.identity, cmdlet, task, dc)
            self._check_type(entry, _ENABLE_MAILBOX_TYPES, task)
            self._check_alias(request.alias, task)
            fault = entry.user.fault
            if fault is None:
                if request.alias:
                    alias = request.alias
                elif entry.recipient_type_details in _MAIL_USER_TYPES and entry.alias:
                    alias = entry.alias  # Exchange keeps a mail user's alias
                else:
                    alias = self._unique_alias(entry)
                primary = f"{_smtp_local_part(alias)}@{self.directory.smtp_domain}"
                self._check_proxy_free(f"SMTP:{primary}", entry, task)
                self._index(entry, remove=True)
                entry.alias = alias
                entry.recipient_type_details = LOCAL_MAILBOX_TYPE
                entry.database = request.database or DEFAULT_DATABASE
                entry.email_addresses = _with_primary(entry.email_addresses, primary)
                self._index(entry)
                return self._recipient(entry)
        self._raise_fault(fault, cmdlet, task, slept, dc)

    def enable_remote_mailbox(self, request: EnableRemoteMailbox) -> Recipient:
        """Enable-RemoteMailbox (Default parameter set)."""
        cmdlet, task = "Enable-RemoteMailbox", "EnableRemoteMailbox"
        self._begin(cmdlet, request.parameters())
        slept = self._pause(cmdlet, self._latency + self._enable_latency)
        dc = request.domain_controller
        with self._lock:
            entry = self._resolve_for_enable(request.identity, cmdlet, task, dc)
            self._check_type(entry, _ENABLE_REMOTE_MAILBOX_TYPES, task)
            self._check_alias(request.alias, task)
            fault = entry.user.fault
            if fault is None:
                alias = request.alias or self._unique_alias(entry)
                primary = f"{_smtp_local_part(alias)}@{self.directory.smtp_domain}"
                self._check_proxy_free(f"SMTP:{primary}", entry, task)
                addresses = _with_primary(entry.email_addresses, primary)
                routing = request.remote_routing_address
                if routing:
                    if routing[:5].casefold() == "smtp:":
                        routing = routing[5:]
                    if routing.casefold() != primary.casefold():
                        self._check_proxy_free(f"smtp:{routing}", entry, task)
                        addresses.append(f"smtp:{routing}")
                self._index(entry, remove=True)
                entry.alias = alias
                entry.recipient_type_details = REMOTE_MAILBOX_TYPE
                entry.database = None
                entry.email_addresses = addresses
                self._index(entry)
                return self._recipient(entry)
        self._raise_fault(fault, cmdlet, task, slept, dc)

    def probe(self) -> str:
        """A cheap read: how many users are visible now."""
        self._begin("Get-ExchangeServer", bound_parameters(self.server))
        self._pause("Get-ExchangeServer", self._latency)
        with self._lock:
            visible = len(self._visible())
        return f"simulated Exchange {self.server}: {visible} users in {self.directory.domain}"

    def close(self) -> None:
        """Nothing to release."""

    # ---- for tests --------------------------------------------------------------------------

    def count(self, cmdlet: str) -> int:
        """How often `cmdlet` (e.g. "Enable-Mailbox") was run."""
        with self._lock:
            return sum(1 for name, _ in self.calls if name == cmdlet)

    def snapshot(self) -> dict[str, object]:
        """The current state as a directory document `parse_directory` accepts.

        Lets several processes (the fake PowerShell hosts of the local backend's tests) share
        one simulated forest through a file. Replication lag is not carried over.
        """
        with self._lock:
            users: list[dict[str, object]] = []
            for entry in self._entries:
                user = entry.user
                document: dict[str, object] = {
                    "sam_account_name": user.sam_account_name,
                    "user_principal_name": user.user_principal_name,
                    "name": user.name,
                    "display_name": user.display_name,
                    "distinguished_name": user.distinguished_name,
                    "guid": user.guid,
                    "recipient_type_details": entry.recipient_type_details,
                }
                if entry.alias and entry.mail_enabled:
                    document["alias"] = entry.alias
                if entry.email_addresses:
                    document["email_addresses"] = list(entry.email_addresses)
                if entry.database and entry.recipient_type_details in _LOCAL_MAILBOX_TYPES:
                    document["database"] = entry.database
                if user.fault:
                    document["fault"] = user.fault
                users.append(document)
            return {
                "domain": self.directory.domain,
                "upn_suffix": self.directory.upn_suffix,
                "smtp_domain": self.directory.smtp_domain,
                "domain_controller": self.directory.domain_controller,
                "users": users,
            }

    # ---- internals --------------------------------------------------------------------------

    def _begin(self, cmdlet: str, parameters: dict[str, str]) -> None:
        with self._lock:
            self.calls.append((cmdlet, parameters))

    def _pause(self, cmdlet: str, seconds: float) -> float:
        """Sleep the simulated latency (lock not held); time out like a stuck command."""
        if seconds > self._timeout:
            self._clock.sleep(self._timeout)
            raise self._timeout_error(cmdlet)
        if seconds > 0:
            self._clock.sleep(seconds)
        return seconds

    def _timeout_error(self, cmdlet: str) -> ExchangeTimeout:
        return ExchangeTimeout(
            f"{cmdlet} did not finish within the command timeout of {self._timeout:g} seconds "
            f"on {self.server}; its outcome is unknown"
        )

    def _is_visible(self, entry: _Entry) -> bool:
        """False while the user is still 'replicating' (appears_after_seconds)."""
        return self._clock.monotonic() - self._started >= entry.user.appears_after_seconds

    def _visible(self) -> list[_Entry]:
        return [entry for entry in self._entries if self._is_visible(entry)]

    def _names(self, entry: _Entry) -> list[str]:
        """Every value Exchange matches an identity against, but the GUID and SMTP addresses."""
        user = entry.user
        names = [
            user.distinguished_name,
            entry.canonical_name,
            user.user_principal_name,
            f"{self.directory.domain}\\{user.sam_account_name}",
            user.sam_account_name,
            user.name,
            user.display_name,
        ]
        if entry.alias:
            names.append(entry.alias)
        return names

    def _index(self, entry: _Entry, *, remove: bool = False) -> None:
        """Adds (or removes) an entry's exact-match keys; an entry is re-indexed on change."""
        keys = {name.casefold() for name in self._names(entry)} | {str(entry.guid)}
        proxies = {p.casefold() for p in _smtp_proxies(entry.email_addresses)}
        for index, values in ((self._by_key, keys), (self._by_smtp, proxies)):
            for value in values:
                entries = index.setdefault(value, [])
                if remove:
                    entries.remove(entry)
                else:
                    entries.append(entry)

    def _matching(self, identity: str) -> list[_Entry]:
        """The visible entries an identity matches, as Exchange's resolution would find them."""
        if identity == "":
            return self._visible()  # Exchange: an empty Identity returns every object
        by_smtp = bool(_SMTP_ADDRESS.fullmatch(identity))
        if identity.startswith("*") or identity.endswith("*"):
            match = _text_matcher(identity)
            return [
                entry
                for entry in self._visible()
                if any(match(name) for name in self._names(entry))
                or (by_smtp and any(match(p) for p in _smtp_proxies(entry.email_addresses)))
            ]
        hits = list(self._by_key.get(identity.casefold(), []))
        with contextlib.suppress(ValueError):  # not a GUID
            hits += self._by_key.get(str(uuid.UUID(identity)), [])
        if by_smtp:
            hits += self._by_smtp.get(identity.casefold(), [])
        unique = {id(entry): entry for entry in hits}.values()
        return [entry for entry in unique if self._is_visible(entry)]

    def _resolve(
        self, identity: str, task: str, dc: str | None, *, mail_enabled_only: bool
    ) -> _Entry:
        found = [
            entry
            for entry in self._matching(identity)
            if entry.mail_enabled or not mail_enabled_only
        ]
        if not found:
            raise self._error(
                f"The operation couldn't be performed because object '{identity}' couldn't be "
                f"found on '{dc or self.directory.domain_controller}'.",
                reason="ManagementObjectNotFoundException",
                exception_type=_NOT_FOUND_TYPE,
                task=task,
            )
        if len(found) > 1:
            raise self._error(
                f"The operation couldn't be performed because '{identity}' matches multiple "
                "entries.",
                reason="ManagementObjectAmbiguousException",
                exception_type=_AMBIGUOUS_TYPE,
                task=task,
            )
        return found[0]

    def _resolve_for_enable(self, identity: str, cmdlet: str, task: str, dc: str | None) -> _Entry:
        if identity == "":
            # PowerShell rejects an empty mandatory parameter before Exchange runs.
            raise classify(
                "Cannot bind argument to parameter 'Identity' because it is an empty string.",
                reason="ParameterBindingValidationException",
                error_id=f"ParameterArgumentValidationErrorEmptyStringNotAllowed,{cmdlet}",
                exception_type=_BINDING_TYPE,
            )
        return self._resolve(identity, task, dc, mail_enabled_only=False)

    def _check_type(self, entry: _Entry, allowed: frozenset[str], task: str) -> None:
        kind = entry.recipient_type_details
        if kind not in allowed:
            raise self._error(
                "This task does not support recipients of this type. The specified recipient "
                f"{entry.canonical_name} is of type {kind}. Please make sure that this recipient "
                "matches the required recipient type for this task.",
                reason="RecipientTaskException",
                exception_type=_RECIPIENT_TASK_TYPE,
                task=task,
                site=_WRONG_TYPE_SITE[task],
            )

    def _check_alias(self, alias: str | None, task: str) -> None:
        if alias and (problem := _alias_problem(alias)) is not None:
            raise self._error(
                problem,
                reason="DataValidationException",
                exception_type=_DATA_VALIDATION_TYPE,
                task=task,
            )

    def _unique_alias(self, entry: _Entry) -> str:
        """GenerateUniqueAlias: Name -> alias, then 1..9 appended until no object has it."""
        preferred = _generate_alias(entry.user.name) or "User"
        taken = {e.alias.casefold() for e in self._visible() if e.alias and e is not entry}
        count = 0
        while True:
            suffix = str(count) if count else ""
            candidate = preferred[: _MAX_ALIAS_LENGTH - len(suffix)] + suffix
            if candidate.casefold() not in taken:
                return candidate
            count += 1

    def _check_proxy_free(self, proxy: str, entry: _Entry, task: str) -> None:
        address = proxy.partition(":")[2].casefold()
        for other in self._by_smtp.get(address, []):
            if other is not entry and self._is_visible(other):
                raise self._error(
                    f'The proxy address "{proxy}" is already being used by the proxy addresses '
                    f'or LegacyExchangeDN of "{other.canonical_name}". Please choose another '
                    "proxy address.",
                    reason="ProxyAddressExistsException",
                    exception_type=_PROXY_EXISTS_TYPE,
                    task=task,
                )

    def _raise_fault(
        self, fault: Fault, cmdlet: str, task: str, slept: float, dc: str | None
    ) -> NoReturn:
        dc = dc or self.directory.domain_controller
        if fault == "timeout":
            self._clock.sleep(max(0.0, self._timeout - slept))
            raise self._timeout_error(cmdlet)
        if fault == "unavailable":
            raise BackendUnavailable(
                f"no Exchange session on {self.server} is available right now (simulated); "
                "retry in 5 seconds",
                retry_after_seconds=5,
            )
        if fault == "permission_denied":
            message = (
                f"Active Directory operation failed on {dc}. This error is not retriable. "
                "Additional information: Insufficient access rights to perform the operation. "
                "Active directory response: 00002098: SecErr: DSID-03150BB9, problem 4003 "
                "(INSUFF_ACCESS_RIGHTS), data 0"
            )
        else:
            message = (
                f"Active Directory operation failed on {dc}. The server is unwilling to "
                "process the request."
            )
        raise self._error(
            message, reason="ADOperationException", exception_type=_AD_OPERATION_TYPE, task=task
        )

    def _error(
        self,
        message: str,
        *,
        reason: str,
        exception_type: str,
        task: str,
        site: str | None = None,
    ) -> ExchangeError:
        """Classify an Exchange error record built like a real one."""
        site = site or f"{zlib.crc32(f'{reason}/{task}'.encode()):08X}"
        error_id = (
            f"[Server={self.server},RequestId={uuid.uuid4()},TimeStamp={_timestamp()}] "
            f"[FailureCategory=Cmdlet-{reason}] {site},{_TASK_NAMESPACE}.{task}"
        )
        return classify(message, reason=reason, error_id=error_id, exception_type=exception_type)

    @staticmethod
    def _directory_user(entry: _Entry) -> DirectoryUser:
        user = entry.user
        return DirectoryUser(
            guid=user.guid,
            distinguished_name=user.distinguished_name,
            sam_account_name=user.sam_account_name,
            user_principal_name=user.user_principal_name,
            name=user.name,
            display_name=user.display_name,
            recipient_type_details=entry.recipient_type_details,
        )

    @staticmethod
    def _recipient(entry: _Entry) -> Recipient:
        return Recipient(
            guid=entry.user.guid,
            distinguished_name=entry.user.distinguished_name,
            alias=entry.alias or "",
            primary_smtp_address=_primary_of(entry.email_addresses) or "",
            recipient_type_details=entry.recipient_type_details,
            database=entry.database,
        )


def _with_primary(addresses: Sequence[str], primary: str) -> list[str]:
    """`primary` as the SMTP: address; former primaries kept as secondary smtp: addresses."""
    result = [f"SMTP:{primary}"]
    for proxy in addresses:
        prefix, _, value = proxy.partition(":")
        if prefix.casefold() == "smtp":
            if value.casefold() == primary.casefold():
                continue
            proxy = f"smtp:{value}"
        result.append(proxy)
    return result

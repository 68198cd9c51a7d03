"""Validates the caller's identity and alias by Exchange's own rules.

Nothing here talks to Exchange: these are pure checks that run before any cmdlet is built.
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from typing import Literal

IdentityForm = Literal[
    "upn", "domain_user", "distinguished_name", "guid", "sid", "sam_account_name", "name"
]

MAX_IDENTITY_LENGTH = 1024
MAX_ALIAS_LENGTH = 64

# Exchange's alias alphabet, as its own Alias validation message lists it (the text is in
# exchange/simulated/naming.py); "." is handled separately, it must sit between two of these.
# U+00AD (soft hyphen) is in that range but invisible (category Cf), so it is left out.
_ALIAS_CHARS = frozenset(
    string.ascii_letters
    + string.digits
    + "!#$%&'*+-/=?^_`{|}~"
    + "".join(chr(c) for c in range(0xA1, 0x100) if c != 0xAD)
)
_ALIAS_RULE = (
    "an alias may contain only letters a-z and A-Z, digits 0-9, the characters "
    "! # $ % & ' * + - / = ? ^ _ ` { | } ~, the characters U+00A1 to U+00FF except U+00AD, "
    "and periods that sit between two other allowed characters"
)
# Control characters, invisible format characters (U+200B zero width space, U+202E right-to-left
# override, U+2066 left-to-right isolate, U+FEFF, ...: "jd\u202eeod" shows as "jdoe"), lone
# surrogates, and the line/paragraph separators U+2028/U+2029.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

# What a server decodes bytes that are not UTF-8 to (a path like %ED%A0%80).
_REPLACEMENT_CHARACTER = "\ufffd"


def _excluded_class() -> str:
    """A regex class body of the BMP characters an identity must not hold: '*', the replacement
    character and every character of INVISIBLE_CATEGORIES (computed from Unicode's table)."""
    codes = [c for c in range(0x10000) if unicodedata.category(chr(c)) in INVISIBLE_CATEGORIES]
    codes += [ord("*"), ord(_REPLACEMENT_CHARACTER)]
    ranges: list[tuple[int, int]] = []
    for code in sorted(set(codes)):
        if ranges and code == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    return "".join(f"\\u{a:04X}" if a == b else f"\\u{a:04X}-\\u{b:04X}" for a, b in ranges)


#: The alias rule as an ECMAScript/Python regular expression, for the OpenAPI document; it
#: accepts exactly what validate_alias accepts (tests/test_validation.py checks both agree).
ALIAS_PATTERN = (
    r"^(?!\.)(?!.*\.\.)(?!.*\.$)[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u00A1-\u00AC\u00AE-\u00FF.]{1,64}$"
)


@functools.cache
def identity_pattern() -> str:
    """The characters (of the Basic Multilingual Plane) an identity must not hold, for the OpenAPI
    document; what it cannot say (not only whitespace, astral format characters) validation does.

    Built when the document is first built, not at import: its scan of the 65,536 characters
    took 20-40 ms of every worker start, and CREATE_EMAIL never needs it."""
    return f"^[^{_excluded_class()}]+$"


_HEX = "[0-9A-Fa-f]"
_BARE_GUID = rf"(?:{_HEX}{{32}}|{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}})"
_GUID = re.compile(rf"{_BARE_GUID}|\{{{_BARE_GUID}\}}")  # braces only as a matching pair
_SID = re.compile(r"S-1-[0-9]+(?:-[0-9]+)+", re.IGNORECASE)
# type=value RDNs joined by commas; a backslash escapes the next character (e.g. "Doe\, John").
_RDN = r"[A-Za-z][A-Za-z0-9-]*=(?:\\.|[^,\\])+"
_DN = re.compile(rf"{_RDN}(?:,\s*{_RDN})+")  # unambiguous split: no backtracking blow-up
_SAM_FORBIDDEN = frozenset('"/\\[]:;|=,+*?<>@')
_MAX_SAM_LENGTH = 20


class InvalidValue(ValueError):
    """A value breaks Exchange's rules; `message` is a sentence the caller can act on."""

    #: The field error's `type` in a VALIDATION_FAILED problem.
    kind = "invalid_value"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvisibleCharacter(InvalidValue):
    """The value holds a character that would not show: control, format (Cf), surrogate,
    separator. The message names it by code point; it never contains the character."""

    kind = "invisible_character"


def _describe_char(ch: str) -> str:
    """Show one character safely: `'Ł' (U+0141)`, `U+0020 (space)`, `U+0007 (control character)`."""
    code = f"U+{ord(ch):04X}"
    if ch.isprintable() and not ch.isspace():
        quoted = f'"{ch}"' if ch == "'" else f"'{ch}'"
        return f"{quoted} ({code})"
    category = unicodedata.category(ch)
    if category == "Cc":
        label = "control character"
    elif category == "Cs":
        label = "unpaired surrogate"
    else:
        label = unicodedata.name(ch, "invisible character").lower()
    return f"{code} ({label})"


def visible(text: str) -> str:
    """`text` with every character that would not show as itself (control, format, surrogate,
    separator, unassigned) written as `<U+XXXX>`, for reflecting caller input in a response."""
    return "".join(ch if ch.isprintable() else f"<U+{ord(ch):04X}>" for ch in text)


def validate_identity(raw: str) -> str:
    """Return `raw` without surrounding whitespace, or raise `InvalidValue`."""
    identity = raw.strip()
    if not identity:
        raise InvalidValue(
            "The identity must not be empty or only whitespace: Exchange's Get-User returns "
            "every user when given an empty identity."
        )
    if len(identity) > MAX_IDENTITY_LENGTH:
        raise InvalidValue(
            f"The identity is {len(identity)} characters long after trimming whitespace; "
            f"the maximum is {MAX_IDENTITY_LENGTH}."
        )
    for position, ch in enumerate(identity, start=1):
        if ch == "*":
            raise InvalidValue(
                f"The identity has {_describe_char(ch)} at position {position}; '*' is not "
                "allowed because Exchange treats it as a wildcard that can match other users."
            )
        if ch == _REPLACEMENT_CHARACTER:
            raise InvisibleCharacter(
                f"The identity has U+FFFD (replacement character) at position {position}: it "
                "arrived as bytes that are not UTF-8; percent-encode the identity's UTF-8 bytes."
            )
        if unicodedata.category(ch) in INVISIBLE_CATEGORIES:
            raise InvisibleCharacter(
                f"The identity has {_describe_char(ch)} at position {position}; control "
                "characters, invisible formatting characters, surrogates and line or paragraph "
                "separators are not allowed."
            )
    return identity


def identity_form(identity: str) -> IdentityForm:
    """Classify an identity that `validate_identity` accepted (the first matching form wins)."""
    if _GUID.fullmatch(identity):
        return "guid"
    if _SID.fullmatch(identity):
        return "sid"
    if _DN.fullmatch(identity):
        return "distinguished_name"
    domain, backslash, user = identity.partition("\\")
    if backslash and domain and user and "\\" not in user and "@" not in domain:
        return "domain_user"
    local, at, host = identity.partition("@")
    if at and local and host and "@" not in host and not any(c.isspace() for c in identity):
        return "upn"
    if (
        len(identity) <= _MAX_SAM_LENGTH
        and not identity.endswith(".")
        and not any(c.isspace() or c in _SAM_FORBIDDEN for c in identity)
    ):
        return "sam_account_name"
    return "name"


def validate_alias(raw: str) -> str:
    """Return `raw` unchanged if Exchange accepts it as an alias, or raise `InvalidValue`."""
    if not raw:
        raise InvalidValue(
            f"The alias must not be empty; it needs 1 to {MAX_ALIAS_LENGTH} allowed characters."
        )
    if len(raw) > MAX_ALIAS_LENGTH:
        raise InvalidValue(
            f"The alias is {len(raw)} characters long; the maximum is {MAX_ALIAS_LENGTH}."
        )
    last = len(raw) - 1
    for index, ch in enumerate(raw):
        if ch == ".":
            if index == 0 or index == last or raw[index - 1] == ".":
                raise InvalidValue(
                    f"The alias has a period at position {index + 1}; a period must sit between "
                    "two other allowed characters (not first, not last, never two in a row)."
                )
        elif ch not in _ALIAS_CHARS:
            invisible = not ch.isprintable() or unicodedata.category(ch) in INVISIBLE_CATEGORIES
            raise (InvisibleCharacter if invisible else InvalidValue)(
                f"The alias has {_describe_char(ch)} at position {index + 1}, which is not "
                f"allowed; {_ALIAS_RULE}."
            )
    return raw

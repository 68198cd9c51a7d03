"""Exchange's naming rules, as the simulated Exchange applies them.

* Distinguished names: parsing (escapes included), a normal form for uniqueness checks, and the
  canonical name Exchange shows (``contoso.com/Users/John Doe``).
* Aliases: Exchange's validity rule for -Alias (with its real message text) and a port of
  ``AliasHelper.GenerateAlias``: characters are first mapped to Windows-1252 (best-fit for
  letters such as ``Ā``; anything else becomes ``?``), spaces are dropped, characters outside the
  alias set become ``?``, periods must be embedded, at most 64 characters.
* Addresses: the primary SMTP address's local part is the alias mapped to best-fit ASCII
  (``ö`` -> ``oe``, ``ß`` -> ``ss``, accents stripped); proxy address lists keep one upper-case
  ``SMTP:`` primary.
* Identity text: equality, or Exchange's wildcard match when a value starts or ends with ``*``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Final

__all__ = [
    "MAX_ALIAS_LENGTH",
    "SMTP_ADDRESS",
    "alias_problem",
    "canonical_name",
    "generate_alias",
    "normalise_dn",
    "primary_of",
    "smtp_local_part",
    "smtp_proxies",
    "split_dn",
    "text_matcher",
    "with_primary",
]

MAX_ALIAS_LENGTH: Final = 64
SMTP_ADDRESS: Final = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
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

_INVALID_ALIAS_TEXT: Final = (
    '"{alias}" is not valid for Alias. Valid values are: Strings formed with characters from '
    "a to z (uppercase or lowercase), digits from 0 to 9, !, #, $, %, &, ', *, +, -, /, =, ?, "
    "^, _, `, {{, |, }} or ~. One or more periods may be embedded in an alias, but each one of "
    "them should be preceded and followed by at least one of the other characters. Unicode "
    "characters from U+00A1 to U+00FF are also valid in an alias, but they will be mapped to a "
    "best-fit US-ASCII string in the email address which is generated from such an alias."
)


# --------------------------------------------------------------------------------------------
# Distinguished names


def split_dn(dn: str) -> list[tuple[str, str]] | None:
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


def normalise_dn(dn: str) -> str:
    rdns = split_dn(dn)
    if rdns is None:
        return dn.casefold()
    return ",".join(f"{kind.upper()}={value.casefold()}" for kind, value in rdns)


def canonical_name(dn: str) -> str:
    """contoso.com/Users/John Doe for CN=John Doe,CN=Users,DC=contoso,DC=com."""
    rdns = split_dn(dn) or []
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
    try:
        text.encode("cp1252")
    except UnicodeEncodeError:
        pass
    else:
        return text  # every character encodes: each is kept (the common case, one call)
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


def generate_alias(name: str) -> str | None:
    """A port of Exchange's AliasHelper.GenerateAlias (None when no valid alias results)."""
    text = _to_windows_1252(name)
    out: list[str] = []
    state = "start"
    for position, char in enumerate(text):
        if len(out) >= MAX_ALIAS_LENGTH:
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
                if position == len(text) - 1 or len(out) == MAX_ALIAS_LENGTH - 1:
                    char = "?"
                else:
                    state = "middle"
        else:  # middle: the previous character was an embedded period
            if category != "regular":
                char = "?"
            state = "terminal"
        out.append(char)
    return "".join(out) if state == "terminal" else None


def alias_problem(alias: str) -> str | None:
    """Exchange's message when `alias` is not a valid Alias, else None."""
    if len(alias) > MAX_ALIAS_LENGTH:
        return (
            "The length of the property is too long. The maximum length is "
            f"{MAX_ALIAS_LENGTH} and the length of the value provided is {len(alias)}."
        )
    if not _VALID_ALIAS.fullmatch(alias):
        return _INVALID_ALIAS_TEXT.format(alias=alias)
    return None


def smtp_local_part(alias: str) -> str:
    """The alias mapped to best-fit US-ASCII, as in the generated primary SMTP address."""
    if _SMTP_ATEXT.issuperset(alias):
        mapped = alias  # ASCII atext maps to itself (the common case)
    else:
        out: list[str] = []
        for char in alias:
            if char in _SMTP_BEST_FIT:
                out.append(_SMTP_BEST_FIT[char])
                continue
            out.extend(c for c in unicodedata.normalize("NFKD", char) if c in _SMTP_ATEXT)
        mapped = "".join(out)
    local = re.sub(r"\.{2,}", ".", mapped).strip(".")
    return local or "User"


# --------------------------------------------------------------------------------------------
# Identity matching


def text_matcher(value: str) -> Callable[[str], bool]:
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


def primary_of(addresses: Sequence[str]) -> str | None:
    for proxy in addresses:
        if proxy.startswith("SMTP:"):
            return proxy[5:]
    return None


def smtp_proxies(addresses: Sequence[str]) -> list[str]:
    return [proxy[5:] for proxy in addresses if proxy[:5].casefold() == "smtp:"]


def with_primary(addresses: Sequence[str], primary: str) -> list[str]:
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

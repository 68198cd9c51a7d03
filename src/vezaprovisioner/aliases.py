"""The alias of a new mailbox when the caller sent none: `exchange.alias_policy`.

Without `-Alias`, Exchange derives the alias from the user's Name and turns every character it
cannot map to Windows-1252 into "?": 山田太郎 gets the alias "????" and "????@contoso.com".
So, when the caller gave no alias:

* ``transliterate`` (default): the service derives a pure-ASCII alias from the UPN prefix, else
  the sAMAccountName, else the Name, transliterated with `anyascii` (José -> Jose, Łukasz ->
  Lukasz, Дмитрий -> Dmitriy, 山田 -> ShanTian), passes it as -Alias and says so in `warnings`.
  When none of them yields a letter or digit it answers ALIAS_REQUIRED: never "????".
* ``require``: the caller must send the alias unless Exchange's own derivation (the Name without
  spaces) is already a pure-ASCII alias; otherwise ALIAS_REQUIRED.
* ``exchange``: Exchange derives the alias, as before this setting existed.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from anyascii import anyascii

from .config import AliasPolicy
from .exchange.port import DirectoryUser
from .validation import MAX_ALIAS_LENGTH, InvalidValue, validate_alias

ALIAS_POLICIES: tuple[AliasPolicy, ...] = ("transliterate", "require", "exchange")

# A conservative subset of Exchange's alias alphabet: what people expect in an address.
_KEEP = frozenset(string.ascii_letters + string.digits + "._-")
_DOTS = re.compile(r"\.{2,}")


class NoAlias(Exception):
    """No alias was sent and the policy allows none the service or Exchange would choose.

    The flow raises it on as provisioning.AliasRequired (422 ALIAS_REQUIRED)."""


@dataclass(frozen=True)
class AliasChoice:
    """The -Alias to pass (None: Exchange derives it) and the warning to give the caller."""

    alias: str | None
    warning: str | None = None


def ascii_alias(text: str) -> str | None:
    """A valid, pure-ASCII Exchange alias made from `text`, or None when nothing usable remains.

    Transliterates, drops whitespace and every character outside a-z A-Z 0-9 . _ -, squeezes
    periods (never first, last, or doubled), cuts to 64 characters; needs a letter or a digit.
    """
    kept = "".join(c for c in anyascii(text) if c in _KEEP)
    alias = _DOTS.sub(".", kept).strip(".")[:MAX_ALIAS_LENGTH].rstrip(".")
    if not any(c.isalnum() for c in alias):
        return None
    return validate_alias(alias)


def _pure_ascii_alias(text: str) -> bool:
    try:
        validate_alias(text)
    except InvalidValue:
        return False
    return text.isascii()


def choose_alias(user: DirectoryUser, policy: AliasPolicy) -> AliasChoice:
    """The alias for a user who gets a mailbox without an alias from the caller."""
    if policy == "exchange":
        return AliasChoice(None)
    if policy == "require":
        exchange_would_use = "".join(user.name.split())
        if _pure_ascii_alias(exchange_would_use):
            return AliasChoice(None)
        raise NoAlias(
            f"No alias was sent, and the one Exchange would derive from the name "
            f"{user.name!r} is not pure ASCII; send an alias (exchange.alias_policy = "
            '"require").'
        )
    sources = (
        ("UPN prefix", user.user_principal_name.partition("@")[0]),
        ("sAMAccountName", user.sam_account_name),
        ("name", user.name),
    )
    for label, source in sources:
        alias = ascii_alias(source) if source else None
        if alias is not None:
            how = "" if alias == source else ", transliterated"
            return AliasChoice(
                alias,
                f"No alias was sent; the service chose {alias!r} from the {label} "
                f'{source!r}{how} (exchange.alias_policy = "transliterate").',
            )
    raise NoAlias(
        f"No alias was sent, and none can be derived from the UPN {user.user_principal_name!r}, "
        f"the sAMAccountName {user.sam_account_name!r} or the name {user.name!r}: none has a "
        "letter or digit after transliteration. Send an alias."
    )

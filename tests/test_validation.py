"""Identity and alias validation follows Exchange's rules (research notes §1.3, §2.1-§2.3)."""

from __future__ import annotations

import re
import string
import unicodedata
import uuid
from collections.abc import Callable
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vezaprovisioner.validation import (
    ALIAS_PATTERN,
    INVISIBLE_CATEGORIES,
    MAX_ALIAS_LENGTH,
    MAX_IDENTITY_LENGTH,
    IdentityForm,
    InvalidValue,
    identity_form,
    identity_pattern,
    validate_alias,
    validate_identity,
    visible,
)

# Written out independently of the module, straight from the Exchange documentation.
ALIAS_ALPHABET = (
    string.ascii_letters
    + string.digits
    + "!#$%&'*+-/=?^_`{|}~"
    + "".join(chr(c) for c in range(0xA1, 0x100) if c != 0xAD)  # U+00AD: soft hyphen, invisible
)
GUID = "6f9619ff-8b86-d011-b42d-00c04fc964ff"


@pytest.mark.parametrize(
    ("identity", "form"),
    [
        ("CONTOSO\\jdoe", "domain_user"),
        ("contoso.com\\jdoe", "domain_user"),
        ("jdoe@contoso.com", "upn"),
        ("CN=John Doe,OU=Users,DC=contoso,DC=com", "distinguished_name"),
        ("CN=Doe\\, John,OU=Users,DC=contoso,DC=com", "distinguished_name"),
        (GUID, "guid"),
        ("{" + GUID.upper() + "}", "guid"),
        (GUID.replace("-", ""), "guid"),
        ("{" + GUID, "name"),  # unbalanced brace
        ("S-1-5-21-1004336348-1177238915-682003330-512", "sid"),
        ("s-1-1-0", "sid"),
        ("jdoe", "sam_account_name"),
        ("j.doe", "sam_account_name"),
        ("jdoe.", "name"),  # a sAMAccountName can't end with a period
        ("abcdefghijklmnopqrstu", "name"),  # 21 characters is too long for a sAMAccountName
        ("John Doe", "name"),
        ("José Álvarez", "name"),
        ("山田太郎", "sam_account_name"),  # 4 characters, none of them forbidden
        ("CN=Users", "name"),  # a single RDN is not a path
        ("a@b@c", "name"),
        ("jdoe@contoso\\x", "upn"),  # a domain part with "@" rules out DOMAIN\user
        ("John Doe@contoso.com", "name"),  # a UPN has no spaces
    ],
)
def test_identity_forms(identity: str, form: IdentityForm) -> None:
    assert validate_identity(identity) == identity
    assert identity_form(identity) == form


def test_identity_is_trimmed() -> None:
    assert validate_identity("  \tCONTOSO\\jdoe \n") == "CONTOSO\\jdoe"


@pytest.mark.parametrize("raw", ["", " ", "\t\n  \r", "\u3000"])
def test_empty_identity_is_rejected(raw: str) -> None:
    with pytest.raises(InvalidValue, match="empty") as caught:
        validate_identity(raw)
    assert "every user" in caught.value.message


def test_identity_length_limit() -> None:
    longest = "x" * MAX_IDENTITY_LENGTH
    assert MAX_IDENTITY_LENGTH == 1024
    assert validate_identity(f"  {longest}  ") == longest
    with pytest.raises(InvalidValue) as caught:
        validate_identity(longest + "x")
    assert "1025" in caught.value.message
    assert "1024" in caught.value.message


@pytest.mark.parametrize(("raw", "position"), [("*", 1), ("jdoe*", 5), (" *jdoe", 1), ("j*d", 2)])
def test_wildcard_in_identity_is_rejected(raw: str, position: int) -> None:
    with pytest.raises(InvalidValue) as caught:
        validate_identity(raw)
    message = caught.value.message
    assert "'*'" in message
    assert f"position {position}" in message
    assert "wildcard" in message


@pytest.mark.parametrize(
    ("char", "shown"),
    [
        ("\x00", "U+0000"),
        ("\n", "U+000A"),
        ("\t", "U+0009"),
        ("\x1b", "U+001B"),
        ("\x7f", "U+007F"),
        ("\x85", "U+0085"),
        ("\u2028", "U+2028"),
        ("\u2029", "U+2029"),
        ("\ud800", "U+D800"),
        ("\u200b", "U+200B"),
        ("\u202e", "U+202E"),
        ("\u2066", "U+2066"),
        ("\ufeff", "U+FEFF"),
        ("\u00ad", "U+00AD"),
        ("\ufffd", "U+FFFD"),
    ],
)
def test_control_characters_in_identity_are_rejected(char: str, shown: str) -> None:
    with pytest.raises(InvalidValue) as caught:
        validate_identity(f"jd{char}oe")
    assert shown in caught.value.message
    assert "position 3" in caught.value.message


def test_invalid_value_carries_message() -> None:
    error = InvalidValue("Explain it.")
    assert isinstance(error, ValueError)
    assert error.message == str(error) == "Explain it."


@pytest.mark.parametrize(
    "alias",
    ["jdoe", "j.doe", "a.b.c", "o'brien", "josé", "a{b}|c~", "x" * 64, "¡ÿ", "!#$%&*+-/=?^_`"],
)
def test_good_aliases(alias: str) -> None:
    assert MAX_ALIAS_LENGTH == 64
    assert validate_alias(alias) == alias


@pytest.mark.parametrize(
    ("alias", "fragments"),
    [
        (".jdoe", ["period", "position 1"]),
        ("jdoe.", ["period", "position 5"]),
        ("j..doe", ["period", "position 3"]),
        ("j doe", ["U+0020 (space)", "position 2", "U+00A1"]),
        ("Łukasz", ["'Ł'", "U+0141", "position 1"]),
        ("山田", ["'山'", "position 1"]),
        ("jdoe\u00a0", ["U+00A0", "position 5"]),  # no-break space is just below U+00A1
        ("jdoe\u0100", ["'Ā'", "U+0100", "position 5"]),  # just above U+00FF
        ("x" * 65, ["65", "64"]),
        ("", ["empty"]),
    ],
)
def test_bad_aliases(alias: str, fragments: list[str]) -> None:
    with pytest.raises(InvalidValue) as caught:
        validate_alias(alias)
    for fragment in fragments:
        assert fragment in caught.value.message


def _aliases(max_length: int) -> st.SearchStrategy[str]:
    segment = st.text(alphabet=ALIAS_ALPHABET, min_size=1, max_size=12)
    joined = st.lists(segment, min_size=1, max_size=6).map(".".join)
    return joined.filter(lambda alias: len(alias) <= max_length)


@given(_aliases(MAX_ALIAS_LENGTH))
def test_any_well_formed_alias_is_accepted_unchanged(alias: str) -> None:
    assert validate_alias(alias) == alias


@given(
    _aliases(MAX_ALIAS_LENGTH - 1),
    st.characters().filter(lambda c: c not in ALIAS_ALPHABET and c != "."),
    st.data(),
)
def test_a_foreign_character_is_rejected_at_its_position(
    alias: str, bad: str, data: st.DataObject
) -> None:
    index = data.draw(st.integers(min_value=0, max_value=len(alias)))
    with pytest.raises(InvalidValue) as caught:
        validate_alias(alias[:index] + bad + alias[index:])
    assert f"position {index + 1}" in caught.value.message


@given(st.text())
def test_identity_validation_only_raises_invalid_value(raw: str) -> None:
    try:
        identity = validate_identity(raw)
    except InvalidValue:
        return
    assert identity == raw.strip() == identity.strip()
    assert 1 <= len(identity) <= MAX_IDENTITY_LENGTH
    assert "*" not in identity
    assert not any(unicodedata.category(c) in INVISIBLE_CATEGORIES for c in identity)


_CLEAN_CHARS = st.characters(
    exclude_categories=("Cc", "Cf", "Cs", "Zl", "Zp"), exclude_characters="*\ufffd"
)
_INVISIBLE = st.characters(categories=("Cc", "Cf", "Cs"))
_VISIBLE_TEXT = st.text(st.characters(categories=("L", "N")), min_size=1, max_size=20)


@given(_VISIBLE_TEXT, _INVISIBLE, _VISIBLE_TEXT)
def test_an_invisible_character_in_an_identity_is_named_never_shown(
    before: str, bad: str, after: str
) -> None:
    with pytest.raises(InvalidValue) as caught:
        validate_identity(before + bad + after)
    message = caught.value.message
    assert f"U+{ord(bad):04X}" in message
    assert f"position {len(before) + 1}" in message
    assert message.isprintable()


@given(_aliases(MAX_ALIAS_LENGTH - 1), _INVISIBLE, st.data())
def test_an_invisible_character_in_an_alias_is_named_never_shown(
    alias: str, bad: str, data: st.DataObject
) -> None:
    index = data.draw(st.integers(min_value=0, max_value=len(alias)))
    with pytest.raises(InvalidValue) as caught:
        validate_alias(alias[:index] + bad + alias[index:])
    assert f"U+{ord(bad):04X}" in caught.value.message
    assert caught.value.message.isprintable()


@given(st.text())
def test_visible_shows_every_character_that_would_not_show(text: str) -> None:
    shown = visible(text)
    assert shown.isprintable()
    assert all(f"<U+{ord(c):04X}>" in shown for c in text if not c.isprintable())


@given(st.text(alphabet=_CLEAN_CHARS, min_size=1, max_size=300).filter(str.strip))
def test_clean_identities_are_accepted_and_classified(raw: str) -> None:
    identity = validate_identity(raw)
    assert identity == raw.strip()
    assert identity_form(identity) in get_args(IdentityForm)


FORMATS: list[Callable[[uuid.UUID], str]] = [
    str,
    lambda u: u.hex,
    lambda u: "{" + str(u) + "}",
    lambda u: "{" + u.hex + "}",
    lambda u: str(u).upper(),
    lambda u: "{" + u.hex.upper() + "}",
]


@given(st.uuids(version=4), st.sampled_from(FORMATS))
def test_a_uuid_is_always_a_guid(value: uuid.UUID, form: Callable[[uuid.UUID], str]) -> None:
    assert identity_form(validate_identity(form(value))) == "guid"


def _accepts(check: Callable[[str], str], value: str) -> bool:
    try:
        check(value)
    except InvalidValue:
        return False
    return True


@given(
    st.one_of(
        st.text(alphabet=ALIAS_ALPHABET + ".", max_size=70),
        st.text(max_size=70),
    )
)
def test_the_openapi_alias_pattern_accepts_exactly_what_validation_accepts(alias: str) -> None:
    assert bool(re.fullmatch(ALIAS_PATTERN, alias)) == _accepts(validate_alias, alias)


@given(st.text(min_size=1, max_size=50))
def test_an_identity_the_openapi_pattern_allows_is_accepted(identity: str) -> None:
    """The schema is never looser than the service (it may be stricter about whitespace)."""
    if re.fullmatch(identity_pattern(), identity) and identity.strip():
        assert _accepts(validate_identity, identity)

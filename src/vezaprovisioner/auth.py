"""Who is calling: IIS-authenticated users or Basic credentials checked against scrypt hashes.

Authentication fails closed: a request with no identified caller is refused. Passwords and the
Authorization header are never logged or kept; verified passwords are remembered only as an HMAC
under a per-process random key, so repeated calls skip the deliberately slow scrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import AuthSettings
from .failures import Failure
from .iis import iis_server_variables

REALM = "VezaProvisioner"

# scrypt cost: about 16 MiB and tens of milliseconds per hash; stored in each hash so it can change.
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024


class AuthenticationError(Failure):
    """The request is refused before it reaches the flow."""


class NotAuthenticated(AuthenticationError):
    """No caller could be identified (401)."""

    code = "AUTHENTICATION_REQUIRED"
    status = 401
    title = "Authentication required"


class CallerNotAllowed(AuthenticationError):
    """The caller is authenticated but not in auth.allowed_users (403)."""

    code = "CALLER_NOT_ALLOWED"
    status = 403
    title = "Caller not allowed"


class HttpsRequired(AuthenticationError):
    """The request reached IIS over plain HTTP while auth.require_https is on (403)."""

    code = "HTTPS_REQUIRED"
    status = 403
    title = "HTTPS required"


@dataclass(frozen=True)
class Caller:
    """The authenticated caller, for logs and the journal."""

    name: str
    method: str


def hash_password(password: str) -> str:
    """A salted scrypt hash in the form `scrypt$N$r$p$salt$hash` (base64 parts)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        maxmem=_SCRYPT_MAXMEM,
    )
    parts = (str(_SCRYPT_N), str(_SCRYPT_R), str(_SCRYPT_P), _b64(salt), _b64(digest))
    return "scrypt$" + "$".join(parts)


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of a password against a `hash_password` result."""
    try:
        _, n, r, p, salt, expected = encoded.split("$")
        digest = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_SCRYPT_MAXMEM,
        )
        return hmac.compare_digest(digest, base64.b64decode(expected))
    except (ValueError, binascii.Error):
        return False


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Authenticator:
    """Identifies the caller of one request according to `auth.mode`."""

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._allowed = {name.strip().casefold() for name in settings.allowed_users}
        self._users = {name.casefold(): hashed for name, hashed in settings.users.items()}
        # Compared against for unknown users too, so response time does not reveal valid names.
        self._decoy_hash = hash_password(secrets.token_hex(16)) if settings.mode == "basic" else ""
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}
        self._verified_lock = threading.Lock()

    def authenticate(self, scope: Mapping[str, Any], authorization: str | None) -> Caller:
        """The caller, or an AuthenticationError saying why the request is refused."""
        if self._settings.mode == "iis":
            caller = self._iis_caller(scope)
        else:
            caller = self._basic_caller(authorization)
        if self._allowed and caller.name.casefold() not in self._allowed:
            raise CallerNotAllowed(f"{caller.name!r} is not in auth.allowed_users.")
        return caller

    def _iis_caller(self, scope: Mapping[str, Any]) -> Caller:
        variables = iis_server_variables(scope)
        if variables is None or not variables.authenticated_user:
            raise NotAuthenticated(
                "IIS passed no authenticated user: enable Basic authentication and disable "
                "Anonymous authentication for the VezaProvisioner application."
            )
        if self._settings.require_https and not variables.https:
            raise HttpsRequired(
                "This request came over plain HTTP; call https://<exchange_host>/VezaProvisioner "
                "(auth.require_https is on)."
            )
        return Caller(name=variables.authenticated_user, method=f"iis-{variables.auth_type or '?'}")

    def _basic_caller(self, authorization: str | None) -> Caller:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "basic" or not token:
            raise NotAuthenticated("Send HTTP Basic credentials of a user in [auth.users].")
        try:
            name, sep, password = (
                base64.b64decode(token, validate=True).decode("utf-8").partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise NotAuthenticated("The Basic credentials are malformed.")
        if not self._password_ok(name, password):
            raise NotAuthenticated("Unknown user or wrong password.")
        return Caller(name=name, method="basic")

    def _password_ok(self, name: str, password: str) -> bool:
        key = name.casefold()
        fingerprint = hmac.digest(self._cache_key, password.encode("utf-8"), "sha256")
        with self._verified_lock:
            remembered = self._verified.get(key)
        if remembered is not None and hmac.compare_digest(remembered, fingerprint):
            return True
        hashed = self._users.get(key)
        ok = verify_password(password, hashed or self._decoy_hash) and hashed is not None
        if ok:
            with self._verified_lock:
                self._verified[key] = fingerprint
        return ok

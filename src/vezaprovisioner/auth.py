"""Who is calling: IIS-authenticated users or Basic credentials checked against scrypt hashes.

Authentication fails closed: a request with no identified caller is refused. Passwords and the
Authorization header are never logged or kept; verified passwords are remembered only as an HMAC
under a per-process random key, so repeated calls skip the deliberately slow scrypt. User names
match exactly unless `auth.case_insensitive_users`; the caller is always named as configured.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .auth_budget import FailedLoginBudget
from .clock import Clock, SystemClock
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


class MultipleAuthorizations(AuthenticationError):
    """Basic mode: the request carries more than one Authorization header (400); which of
    several credentials counts must never be a guess."""

    code = "MULTIPLE_AUTHORIZATION_HEADERS"
    status = 400
    title = "More than one Authorization header"


class TooManyFailedLogins(AuthenticationError):
    """Basic mode: the failed-login budget of the client address or of all clients is spent
    (429); refused before any scrypt work, with Retry-After."""

    code = "TOO_MANY_FAILED_LOGINS"
    status = 429
    title = "Too many failed sign-ins"

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


@dataclass(frozen=True)
class Caller:
    """The authenticated caller, for logs and the journal."""

    name: str
    method: str
    #: Other names of the same authenticated account (under IIS: the name the client typed).
    aliases: tuple[str, ...] = ()


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
    """Identifies the caller of one request according to `auth.mode`.

    In basic mode the slow scrypt check runs on a small thread pool of its own, never on the
    event loop, and only within the failed-login budget (`auth_budget`): a flood of wrong
    passwords gets 429s that cost no scrypt work, while callers whose password was already
    verified skip both scrypt and the budget.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        clock: Clock | None = None,
        verify: Callable[[str, str], bool] = verify_password,
    ) -> None:
        self._settings = settings
        self._verify = verify
        fold = settings.case_insensitive_users
        self._fold_users = fold
        # Windows account names (IIS mode) are case-insensitive; Basic names follow the setting.
        self._fold_allowed = settings.mode == "iis" or fold
        self._allowed = {self._allowed_key(name.strip()) for name in settings.allowed_users}
        self._users = {
            (name.casefold() if fold else name): (name, hashed)
            for name, hashed in settings.users.items()
        }
        basic = settings.mode == "basic"
        # Compared against for unknown users too, so response time does not reveal valid names.
        self._decoy_hash = hash_password(secrets.token_hex(16)) if basic else ""
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}
        self._checking: dict[tuple[str, bytes], Future[bool]] = {}
        self._lock = threading.RLock()  # a check may finish (and forget itself) at once
        self._budget = FailedLoginBudget(
            settings.failed_logins_per_client_per_minute,
            settings.failed_logins_per_minute,
            clock or SystemClock(),
        )
        self._executor = ThreadPoolExecutor(
            max_workers=settings.password_check_threads, thread_name_prefix="password-check"
        )

    async def authenticate(
        self, scope: Mapping[str, Any], authorization: Sequence[str], client: str | None
    ) -> Caller:
        """The caller, or an AuthenticationError saying why the request is refused.

        `authorization` holds every Authorization header the request carried; `client` is the
        caller's address, whose failed-login budget a password check spends.
        """
        if self._settings.mode == "iis":
            caller = self._iis_caller(scope)
        else:
            caller = await self._basic_caller(authorization, client)
        names = (caller.name, *caller.aliases)
        if self._allowed and not any(self._allowed_key(name) in self._allowed for name in names):
            spelled = " or ".join(repr(name) for name in names)
            raise CallerNotAllowed(f"{spelled} is not in auth.allowed_users.")
        return caller

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _allowed_key(self, name: str) -> str:
        return name.casefold() if self._fold_allowed else name

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
        return Caller(
            name=variables.authenticated_user,
            method=f"iis-{variables.auth_type or '?'}",
            aliases=variables.user_names[1:],
        )

    async def _basic_caller(self, authorization: Sequence[str], client: str | None) -> Caller:
        name, password = _basic_credentials(authorization)
        user = self._users.get(name.casefold() if self._fold_users else name)
        configured_name, hashed = user if user is not None else (name, None)
        # A keyed BLAKE2b (a MAC by design; CPython's own, no OpenSSL provider look-up per
        # call): what the cache remembers of a verified password, never the password itself.
        fingerprint = hashlib.blake2b(
            password.encode("utf-8"), key=self._cache_key, digest_size=32
        ).digest()
        key = (configured_name, fingerprint)
        with self._lock:
            remembered = self._verified.get(configured_name) if user is not None else None
            if remembered is not None and hmac.compare_digest(remembered, fingerprint):
                return Caller(name=configured_name, method="basic")
            # The same credentials already being checked (a client's parallel first requests,
            # or a flood repeating one password) wait for that check: no token, no scrypt.
            check = self._checking.get(key)
            spent = check is None
            if check is None:
                wait = self._budget.spend(client)
                if wait is not None:
                    raise TooManyFailedLogins(
                        f"Too many failed sign-ins from this address or in total; retry in "
                        f"{wait} s.",
                        retry_after_seconds=wait,
                    )
                check = self._executor.submit(self._verify, password, hashed or self._decoy_hash)
                self._checking[key] = check
                check.add_done_callback(lambda _: self._forget_check(key))
        # Shielded: one caller going away must not cancel a check others wait for.
        ok = await asyncio.shield(asyncio.wrap_future(check))
        if not (ok and hashed is not None):
            raise NotAuthenticated("Unknown user or wrong password.")
        with self._lock:
            self._verified[configured_name] = fingerprint
        if spent:
            self._budget.refund(client)
        return Caller(name=configured_name, method="basic")

    def _forget_check(self, key: tuple[str, bytes]) -> None:
        with self._lock:
            self._checking.pop(key, None)


def _basic_credentials(authorization: Sequence[str]) -> tuple[str, str]:
    """User and password from the request's one `Authorization: Basic` header."""
    # A server that joins repeated headers (WSGI, IIS) joins them with a comma, which base64
    # never contains; either way, which of two credentials counts must never be a guess.
    if len(authorization) > 1 or "," in (authorization[0] if authorization else ""):
        raise MultipleAuthorizations(
            "The request has more than one Authorization header; send exactly one."
        )
    scheme, _, token = (authorization[0] if authorization else "").partition(" ")
    if scheme.lower() != "basic" or not token:
        raise NotAuthenticated("Send HTTP Basic credentials of a user in [auth.users].")
    try:
        name, sep, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        sep = ""
    if not sep:
        raise NotAuthenticated("The Basic credentials are malformed.")
    # A NUL would reach scrypt, which pads its key with zeros: "secret" and "secret\0" would
    # both be right. No control character belongs in a user name or password.
    if any(unicodedata.category(ch) == "Cc" for ch in name + password):
        raise NotAuthenticated(
            "The Basic credentials contain a control character; user names and passwords must not."
        )
    return name, password

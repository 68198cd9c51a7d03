"""The remote backend: Exchange's own remote PowerShell endpoint, reached with pypsrp.

`RemoteExchange` implements `ExchangePort` over WS-Man/PSRP to ``http(s)://<fqdn>/PowerShell``
(configuration ``Microsoft.Exchange``). The endpoint runs in NoLanguage mode, so every call is one
cmdlet with bound, typed parameters (`add_cmdlet`/`add_parameter`); no script text exists, so
caller data can never become PowerShell source.

Session handling (pypsrp has no locks, no keep-alive and no overall deadline):
* one warm RunspacePool per process, used under a lock by one command at a time;
* before each command the pool is checked with `is_alive()` and rebuilt when dead (Exchange drops
  idle sessions after about two minutes);
* every command has an overall deadline (`exchange.command_timeout_seconds`), enforced by polling
  the pipeline with short WS-Man receives; past it the pipeline is stopped, the pool discarded
  and `ExchangeTimeout` raised (HTTP 504);
* after a transport failure a read-only cmdlet (Get-User, Get-Recipient) is retried once on a new
  pool; Enable-* never is: a failure after it was sent is reported as `ExchangeTimeout` (outcome
  unknown), so the provisioning flow re-reads the state instead of running it again.

Errors: a pipeline failed when it ended FAILED (`had_errors`) or wrote to the error stream; the
first error record goes through `errors.classify()` with its exception message, CategoryInfo
reason, FullyQualifiedErrorId and exception type. Transport failures become `BackendUnavailable`
or `PermissionDenied` here, with the endpoint's own words.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, cast

import requests
from pypsrp.complex_objects import PSInvocationState, RunspacePoolState
from pypsrp.exceptions import AuthenticationError, WinRMError, WinRMTransportError, WSManFaultError
from pypsrp.powershell import PowerShell, RunspacePool
from pypsrp.wsman import WSMan

from ..clock import Clock
from .errors import (
    AmbiguousIdentity,
    BackendUnavailable,
    ExchangeError,
    ExchangeTimeout,
    PermissionDenied,
    UnexpectedExchangeError,
    classify,
)
from .port import (
    DirectoryUser,
    EnableMailbox,
    EnableRemoteMailbox,
    Recipient,
    lookup_parameters,
)

__all__ = ["CONFIGURATION_NAME", "PROBE_CMDLET", "RemoteCredentials", "RemoteExchange"]

log = logging.getLogger(__name__)

#: The PSRP configuration (resource URI suffix) of Exchange's endpoint.
CONFIGURATION_NAME: Final = "Microsoft.Exchange"
#: The readiness probe: cheap, read-only, and a cmdlet the service needs anyway.
PROBE_CMDLET: Final = "Get-User"

# Longest single WS-Man receive while polling a pipeline: bounds how far past its deadline a
# command can run, and keeps each HTTP request well under proxies' idle limits.
_MAX_POLL_SECONDS: Final = 5
_ALIVE_CHECK_SECONDS: Final = 5
_RESOURCE_NOT_FOUND: Final = 0x80338000
_TRANSPORT_ERRORS: Final = (WinRMError, requests.exceptions.RequestException, OSError)


class EndpointSettings(Protocol):
    """What this backend reads of the `[remote]` settings; `config.RemoteSettings` fits it.

    A protocol rather than an import: backends do not depend on the configuration module.
    """

    @property
    def server(self) -> str: ...
    @property
    def ssl(self) -> bool: ...
    @property
    def path(self) -> str: ...
    @property
    def auth(self) -> str: ...
    @property
    def cert_validation(self) -> bool: ...
    @property
    def ca_bundle(self) -> Path | None: ...
    @property
    def spn_service(self) -> str: ...
    @property
    def username_env(self) -> str: ...
    @property
    def password_env(self) -> str: ...
    @property
    def http_timeout_seconds(self) -> float: ...
    @property
    def effective_port(self) -> int: ...


class CommandSettings(Protocol):
    """What this backend reads of the `[exchange]` settings; `config.ExchangeSettings` fits it."""

    @property
    def command_timeout_seconds(self) -> float: ...


@dataclass(frozen=True)
class RemoteCredentials:
    """Explicit credentials from the environment; both None means the process identity."""

    username: str | None = None
    password: str | None = None

    @classmethod
    def from_environment(
        cls, settings: EndpointSettings, environ: Mapping[str, str]
    ) -> RemoteCredentials:
        username = environ.get(settings.username_env) if settings.username_env else None
        password = environ.get(settings.password_env) if settings.password_env else None
        return cls(username or None, password or None)

    def __repr__(self) -> str:
        return f"RemoteCredentials(username={self.username!r}, password=***)"


class _TransportFailure(Exception):
    """The way to Exchange failed; `sent` says whether the command may have run."""

    def __init__(self, cause: BaseException, *, sent: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.sent = sent


class RemoteExchange:
    """`ExchangePort` over one warm pypsrp RunspacePool to Exchange's /PowerShell endpoint."""

    def __init__(
        self,
        remote: EndpointSettings,
        exchange: CommandSettings,
        credentials: RemoteCredentials,
        *,
        clock: Clock,
    ) -> None:
        if remote.auth == "basic" and not remote.ssl:
            # Settings refuse this too; the backend never sends a password without TLS.
            raise ValueError("basic authentication is only allowed over TLS (remote.ssl = true)")
        if remote.auth == "basic" and not (credentials.username and credentials.password):
            raise ValueError(
                f"auth 'basic' needs a username and a password in the environment variables "
                f"{remote.username_env} and {remote.password_env}"
            )
        self._remote = remote
        self._credentials = credentials
        self._clock = clock
        self._timeout = exchange.command_timeout_seconds
        self._lock = threading.Lock()
        self._pool: RunspacePool | None = None
        self._closed = False
        scheme = "https" if remote.ssl else "http"
        self.endpoint = f"{scheme}://{remote.server}:{remote.effective_port}/{remote.path}"
        #: How many runspace pools this backend has opened (for diagnostics and tests).
        self.pools_opened = 0

    # ---- ExchangePort -----------------------------------------------------------------------

    def get_user(self, identity: str, domain_controller: str | None = None) -> DirectoryUser:
        out = self._run(
            "Get-User",
            lookup_parameters(identity, domain_controller),
            read_only=True,
        )
        obj = _single(out, identity, "Get-User")
        return DirectoryUser(
            guid=_prop(obj, "Guid"),
            distinguished_name=_prop(obj, "DistinguishedName"),
            sam_account_name=_prop(obj, "SamAccountName"),
            user_principal_name=_prop(obj, "UserPrincipalName"),
            name=_prop(obj, "Name"),
            display_name=_prop(obj, "DisplayName"),
            recipient_type_details=_prop(obj, "RecipientTypeDetails"),
        )

    def get_recipient(self, identity: str, domain_controller: str | None = None) -> Recipient:
        out = self._run(
            "Get-Recipient",
            lookup_parameters(identity, domain_controller),
            read_only=True,
        )
        return _recipient(_single(out, identity, "Get-Recipient"))

    def enable_mailbox(self, request: EnableMailbox) -> Recipient:
        out = self._run(
            "Enable-Mailbox",
            request.parameters(),
            read_only=False,
        )
        return _recipient(_single(out, request.identity, "Enable-Mailbox"))

    def enable_remote_mailbox(self, request: EnableRemoteMailbox) -> Recipient:
        out = self._run(
            "Enable-RemoteMailbox",
            request.parameters(),
            read_only=False,
        )
        return _recipient(_single(out, request.identity, "Enable-RemoteMailbox"))

    def probe(self) -> str:
        """Open (or check) the session and run `Get-User -ResultSize 1`."""
        self._run(PROBE_CMDLET, {"ResultSize": 1}, read_only=True)
        return f"Exchange remote PowerShell {self.endpoint}: session open, {PROBE_CMDLET} answered"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._discard()

    # ---- one command ------------------------------------------------------------------------

    def _run(self, cmdlet: str, parameters: Mapping[str, object], *, read_only: bool) -> list[Any]:
        """Run one cmdlet within the deadline; retry a read once after a transport failure."""
        deadline = self._clock.monotonic() + self._timeout
        if not self._lock.acquire(timeout=max(0.0, self._timeout)):
            raise BackendUnavailable(
                f"the Exchange session at {self.endpoint} stayed busy for "
                f"{self._timeout:g} seconds; retry later",
                retry_after_seconds=5,
            )
        try:
            if self._closed:
                raise BackendUnavailable("the remote Exchange backend is closed")
            attempts = 2 if read_only else 1
            for attempt in range(1, attempts + 1):
                try:
                    return self._invoke(cmdlet, parameters, deadline)
                except _TransportFailure as failure:
                    self._discard()
                    if _is_refusal(failure.cause):
                        # Credentials or the endpoint's address: another attempt cannot help.
                        raise _transport_error(failure.cause, self.endpoint) from failure.cause
                    if failure.sent and not read_only:
                        raise ExchangeTimeout(
                            f"the connection to {self.endpoint} failed while {cmdlet} was "
                            f"running ({failure.cause}); its outcome is unknown"
                        ) from failure.cause
                    if attempt == attempts or self._clock.monotonic() >= deadline:
                        raise _transport_error(failure.cause, self.endpoint) from failure.cause
                    log.warning(
                        "transport failure during %s (%s); retrying once on a new session",
                        cmdlet,
                        failure.cause,
                    )
            raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
        except Exception as exc:
            if not isinstance(exc, ExchangeError):
                # An unexpected pypsrp error: never reuse a pool left in an unknown state.
                self._discard()
            raise
        finally:
            self._lock.release()

    def _invoke(self, cmdlet: str, parameters: Mapping[str, object], deadline: float) -> list[Any]:
        pool = self._live_pool(deadline)
        ps = PowerShell(pool)
        ps.add_cmdlet(cmdlet)
        for name, value in parameters.items():
            ps.add_parameter(name, value)
        try:
            # From here a failure may come after Exchange started the cmdlet: the outcome of a
            # write is unknown (the Command request carries the pipeline).
            ps.begin_invoke()
            while ps.state == PSInvocationState.RUNNING:
                remaining = deadline - self._clock.monotonic()
                if remaining <= 0:
                    self._abandon(ps)
                    raise ExchangeTimeout(
                        f"{cmdlet} did not finish within the command timeout of "
                        f"{self._timeout:g} seconds on {self.endpoint}; its outcome is unknown"
                    )
                ps.poll_invoke(timeout=min(_MAX_POLL_SECONDS, max(1, math.ceil(remaining))))
        except _TRANSPORT_ERRORS as exc:
            raise _TransportFailure(exc, sent=True) from exc
        for warning in ps.streams.warning:
            log.warning("%s warned: %s", cmdlet, getattr(warning, "message", warning))
        errors = list(ps.streams.error)
        with suppress(*_TRANSPORT_ERRORS):
            ps.close()
        if errors:
            raise _classify_record(errors[0])
        if ps.had_errors:
            raise UnexpectedExchangeError(f"{cmdlet} failed on {self.endpoint} without an error")
        return list(ps.output)

    def _abandon(self, ps: PowerShell) -> None:
        """Stop a pipeline past its deadline, then drop the pool it occupied (lock held)."""
        with suppress(*_TRANSPORT_ERRORS):
            ps.stop()
        self._discard()

    # ---- the pool ---------------------------------------------------------------------------

    def _live_pool(self, deadline: float) -> RunspacePool:
        """The warm pool if the server still has it, else a new one (lock held)."""
        pool = self._pool
        if pool is not None:
            try:
                check = min(
                    _ALIVE_CHECK_SECONDS, max(1, math.ceil(deadline - self._clock.monotonic()))
                )
                if pool.state == RunspacePoolState.OPENED and pool.is_alive(timeout=check):
                    return pool
            except _TRANSPORT_ERRORS as exc:
                log.info("the Exchange session is unusable (%s); opening a new one", exc)
            else:
                log.info("the Exchange session at %s was dropped; opening a new one", self.endpoint)
            self._discard()
        try:
            # Held before open() so a half-opened shell is deleted by _discard() on failure.
            self._pool = pool = self._new_pool()
            pool.open()
        except _TRANSPORT_ERRORS as exc:
            raise _TransportFailure(exc, sent=False) from exc
        self.pools_opened += 1
        return pool

    def _discard(self) -> None:
        """Close the pool best-effort, freeing its server-side session (lock held)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        with suppress(*_TRANSPORT_ERRORS):
            # is_alive() marks a pool CLOSED without telling the server; delete the shell anyway
            # so Exchange's per-account session limit is not used up by abandoned sessions.
            pool.shell.close()
        with suppress(*_TRANSPORT_ERRORS):
            pool.close()
        pool.connection.close()  # the HTTP session and its sockets

    def _new_pool(self) -> RunspacePool:
        remote = self._remote
        read_timeout = math.ceil(remote.http_timeout_seconds)
        cert_validation: bool | str = remote.cert_validation
        if remote.ssl and remote.ca_bundle is not None:
            cert_validation = str(remote.ca_bundle)
        kwargs: dict[str, Any] = {}
        if remote.auth in ("kerberos", "negotiate"):
            kwargs["negotiate_service"] = remote.spn_service
        wsman = WSMan(
            remote.server,
            port=remote.effective_port,
            path=remote.path,
            ssl=remote.ssl,
            auth=remote.auth,
            username=self._credentials.username,
            password=self._credentials.password,
            # pypsrp passes this to requests' `verify`, which also takes a CA bundle path.
            cert_validation=cast(bool, cert_validation),
            # With TLS, messages need no WS-Man encryption; without it Kerberos/Negotiate wrap
            # them (basic without TLS is refused above).
            encryption="auto",
            connection_timeout=read_timeout,
            read_timeout=read_timeout,
            # WS-Man must answer (or time out) before the HTTP read gives up.
            operation_timeout=read_timeout - 2,
            no_proxy=True,
            **kwargs,
        )
        return RunspacePool(wsman, configuration_name=CONFIGURATION_NAME, no_profile=True)


# ---- results and errors ---------------------------------------------------------------------


def _prop(obj: Any, name: str) -> str:
    """A property of a deserialized Exchange object as text ('' when absent or null)."""
    value = _raw_prop(obj, name)
    return "" if value is None else str(value)


def _raw_prop(obj: Any, name: str) -> Any:
    for bag in ("adapted_properties", "extended_properties"):
        properties = getattr(obj, bag, None)
        if isinstance(properties, dict) and name in properties:
            return properties[name]
    return None


def _recipient(obj: Any) -> Recipient:
    database = _raw_prop(obj, "Database")
    return Recipient(
        guid=_prop(obj, "Guid"),
        distinguished_name=_prop(obj, "DistinguishedName"),
        alias=_prop(obj, "Alias"),
        primary_smtp_address=_prop(obj, "PrimarySmtpAddress"),
        recipient_type_details=_prop(obj, "RecipientTypeDetails"),
        database=None if database is None or str(database) == "" else str(database),
    )


def _single(out: list[Any], identity: str, cmdlet: str) -> Any:
    if len(out) == 1:
        return out[0]
    if not out:
        raise UnexpectedExchangeError(
            f"{cmdlet} -Identity {identity!r} returned no object and no error"
        )
    raise AmbiguousIdentity(
        f"{cmdlet} -Identity {identity!r} returned {len(out)} objects; send a unique identity"
    )


def _classify_record(record: Any) -> ExchangeError:
    """One ErrorRecord -> the error tree, through the shared classifier."""
    exception = getattr(record, "exception", None)
    message = None
    exception_type = None
    if exception is not None:
        adapted = getattr(exception, "adapted_properties", None)
        if isinstance(adapted, dict) and adapted.get("Message"):
            message = str(adapted["Message"])
        types = getattr(exception, "types", None)
        if isinstance(types, list) and types:
            exception_type = str(types[0]).removeprefix("Deserialized.")
    return classify(
        message or str(record),
        reason=_text_or_none(getattr(record, "reason", None)),
        error_id=_text_or_none(getattr(record, "fq_error", None)),
        exception_type=exception_type,
    )


def _text_or_none(value: object) -> str | None:
    return str(value) if value else None


def _is_refusal(exc: BaseException) -> bool:
    """The endpoint refused us (credentials, address): retrying cannot help."""
    return isinstance(exc, AuthenticationError) or (
        isinstance(exc, WinRMTransportError) and exc.code in (401, 403, 404)
    )


def _transport_error(exc: BaseException, endpoint: str) -> ExchangeError:
    """A failure on the way to Exchange, with what the admin should check."""
    if isinstance(exc, AuthenticationError) or (
        isinstance(exc, WinRMTransportError) and exc.code in (401, 403)
    ):
        return PermissionDenied(
            f"{endpoint} refused the service account (Access denied: {exc}). Check the "
            "credentials or Kerberos ticket, that the account has RemotePowerShellEnabled "
            "and an Exchange role group such as Recipient Management"
        )
    if isinstance(exc, WSManFaultError) and exc.code == _RESOURCE_NOT_FOUND:
        return BackendUnavailable(
            f"{endpoint} does not serve the {CONFIGURATION_NAME} configuration ({exc.reason}); "
            "point remote.server/path at Exchange's IIS endpoint http(s)://<fqdn>/PowerShell, "
            "not WinRM's /wsman on 5985/5986",
            retry_after_seconds=60,
        )
    if isinstance(exc, WinRMTransportError) and exc.code == 404:
        return BackendUnavailable(
            f"{endpoint} answered 404: check remote.path (PowerShell) and remote.port",
            retry_after_seconds=60,
        )
    return BackendUnavailable(
        f"no Exchange session at {endpoint} ({type(exc).__name__}: {exc}); retry later",
        retry_after_seconds=5,
    )

"""The service's one configuration object: a TOML file plus environment overrides, validated once.

The file is named by `--config` or `VEZAPROVISIONER_CONFIG`. Any key can be overridden from the
environment as `VEZAPROVISIONER_<KEY>`, with `__` between a section and its key, for example
`VEZAPROVISIONER_AUTH__MODE=iis` or `VEZAPROVISIONER_EXCHANGE__DOMAIN_CONTROLLER=dc01.contoso.com`.
Relative paths in the file are relative to the file. Unknown keys are errors, so a typo never
silently falls back to a default. pydantic-settings reads both sources (its TOML source and its
environment source); this module adds what it does not do: the environment wins key by key over
the file, relative paths are resolved against the file, a variable naming no key is an error,
and every message names the key, the variable it came from and the nearest valid key.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import EnvSettingsSource, TomlConfigSettingsSource

from .failures import ServiceNotStarted

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

CONFIG_ENV = "VEZAPROVISIONER_CONFIG"
ENV_PREFIX = "VEZAPROVISIONER_"

DEFAULT_POWERSHELL_PATH = r"C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe"
DEFAULT_REMOTE_EXCHANGE_PATH = (
    r"C:\Program Files\Microsoft\Exchange Server\V15\bin\RemoteExchange.ps1"
)

_BASE_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")
_SCRYPT_HASH = re.compile(r"^scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$")


#: exchange.alias_policy: what happens when the caller sends no alias (see aliases.py).
AliasPolicy = Literal["transliterate", "require", "exchange"]


class ConfigError(ServiceNotStarted):
    """The configuration cannot be used; the message lists every problem and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExchangeSettings(_Section):
    """How Exchange is reached and which optional Enable-* parameters are passed."""

    powershell_path: str = DEFAULT_POWERSHELL_PATH
    remote_exchange_path: str = DEFAULT_REMOTE_EXCHANGE_PATH
    domain_controller: str = ""
    database: str = ""
    address_book_policy: str = ""
    retention_policy: str = ""
    remote_routing_domain: str = ""
    #: Without an alias from the caller: "transliterate" (the service derives an ASCII alias),
    #: "require" (422 unless Exchange's own would be ASCII), "exchange" (Exchange derives it).
    alias_policy: AliasPolicy = "transliterate"
    command_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)

    @field_validator("powershell_path", "remote_exchange_path")
    @classmethod
    def _absolute_windows_path(cls, value: str) -> str:
        # Off Windows (tests, the benchmark's fake PowerShell) an absolute POSIX path is allowed
        # too; on Windows only a drive or UNC path is absolute.
        if PureWindowsPath(value).is_absolute():
            return value
        if os.name != "nt" and PurePosixPath(value).is_absolute():
            return value
        raise ValueError(f"must be an absolute Windows path like C:\\..., not {value!r}")

    @field_validator("domain_controller", "remote_routing_domain")
    @classmethod
    def _fqdn(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value):
            raise ValueError(f"must be a host or domain name like dc01.contoso.com, not {value!r}")
        return value


class SimulatedSettings(_Section):
    """The in-process simulated Exchange used by the demo and the tests."""

    directory: Path = Path("examples/directory.json")
    latency_ms: int = Field(default=0, ge=0, le=600_000)
    enable_latency_ms: int = Field(default=0, ge=0, le=600_000)


class RemoteSettings(_Section):
    """backend = "remote": Exchange's remote PowerShell endpoint, reached with pypsrp.

    Credentials never live in this file: with `username_env`/`password_env` unset (or naming empty
    variables) Kerberos/Negotiate use the process identity (the app pool account on Windows, the
    Kerberos ticket cache or keytab on Linux); otherwise the named environment variables hold them.
    """

    server: str = ""
    port: int | None = Field(default=None, ge=1, le=65535)
    ssl: bool = False
    path: str = "PowerShell"
    auth: Literal["kerberos", "negotiate", "basic"] = "kerberos"
    cert_validation: bool = True
    ca_bundle: Path | None = None
    spn_service: str = "HTTP"
    username_env: str = "VEZA_EXCHANGE_USERNAME"
    password_env: str = "VEZA_EXCHANGE_PASSWORD"  # noqa: S105 - the variable's name, not a secret
    #: Bound on each HTTP request to the endpoint (connect, and read of one WS-Man answer).
    http_timeout_seconds: float = Field(default=30.0, ge=5, le=300)
    #: Runspace pools (Exchange sessions) kept open, each running one command at a time. Each is
    #: one of Exchange's concurrent PowerShell connections for the account: pool_size x IIS
    #: FastCGI instances must stay below its limit of 18 per user.
    pool_size: int = Field(default=2, ge=1, le=16)

    @field_validator("server")
    @classmethod
    def _host(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value):
            raise ValueError(f"must be a host name like exch01.contoso.com, not {value!r}")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*", value):
            raise ValueError(
                f"must be a URL path without slashes around it, like PowerShell, not {value!r}"
            )
        return value

    @field_validator("spn_service")
    @classmethod
    def _spn_service(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", value):
            raise ValueError(f"must be a service class like HTTP or host, not {value!r}")
        return value

    @field_validator("username_env", "password_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"must be an environment variable name, not {value!r}")
        if value.upper().startswith(ENV_PREFIX):
            raise ValueError(
                f"{value!r} starts with {ENV_PREFIX}, which is reserved for configuration "
                "overrides; use another name such as VEZA_EXCHANGE_PASSWORD"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RemoteSettings:
        if self.auth == "basic" and not self.ssl:
            raise ValueError(
                "auth 'basic' over plain HTTP would send the password readable on the wire; "
                'set ssl = true (https://<fqdn>/PowerShell) or use auth = "kerberos"'
            )
        if self.ca_bundle is not None and not self.ssl:
            raise ValueError("ca_bundle is set but ssl is false; remove it or set ssl = true")
        if self.ca_bundle is not None and not self.cert_validation:
            raise ValueError("ca_bundle is set but cert_validation is false; choose one")
        return self

    @property
    def effective_port(self) -> int:
        """The configured port, else 443 with TLS and 80 without (Exchange's IIS site)."""
        return self.port or (443 if self.ssl else 80)


class LocalSettings(_Section):
    """The local backend's pool of Windows PowerShell hosts (see the README's "Local backend")."""

    #: Warm hosts kept connected; 0 starts a host per command. Each holds one Exchange session:
    #: pool_size x IIS FastCGI instances must stay below Exchange's limit of 18 per user.
    pool_size: int = Field(default=2, ge=0, le=16)
    #: Requests that may wait for a free host; more get 503 at once.
    queue_size: int = Field(default=32, ge=0, le=1000)
    #: How long a request waits for a free host before 503.
    queue_wait_seconds: float = Field(default=30.0, gt=0, le=600)
    #: Bound on loading RemoteExchange.ps1, and again on Connect-ExchangeServer (its own
    #: per-server limit is 180 s).
    startup_timeout_seconds: float = Field(default=180.0, gt=0, le=900)
    #: How long a starting host waits for its account's connect mutex: hosts of one account
    #: connect one at a time (they share Exchange's module cache), so the last of N starting
    #: hosts waits for N - 1 connects.
    connect_lock_wait_seconds: float = Field(default=600.0, gt=0, le=3600)
    #: Recycle a host after this many commands ...
    max_commands: int = Field(default=1000, ge=1, le=1_000_000)
    #: ... or once it is this old.
    max_age_seconds: float = Field(default=3600.0, gt=0, le=7 * 86400)
    #: First wait after a failed start; doubles per failure up to the maximum.
    restart_backoff_seconds: float = Field(default=1.0, gt=0, le=600)
    restart_backoff_max_seconds: float = Field(default=60.0, gt=0, le=3600)

    @property
    def longest_start_seconds(self) -> float:
        """The longest one host may take to become ready: loading RemoteExchange.ps1, the wait
        for the connect mutex, the connect (plus a margin for the process itself)."""
        return 2 * self.startup_timeout_seconds + self.connect_lock_wait_seconds + 5


class AuthSettings(_Section):
    """Who may call the API. Authentication fails closed: no identified caller, no access."""

    mode: Literal["iis", "basic"] = "iis"
    allowed_users: tuple[str, ...] = ()
    require_https: bool = True
    users: dict[str, str] = Field(default_factory=dict)
    #: Basic mode: match user names ignoring case (Windows-style names); the configured
    #: spelling is what logs, the journal and the audit trail show.
    case_insensitive_users: bool = False
    #: Basic mode: password checks that may fail (scrypt) per client address per minute ...
    failed_logins_per_client_per_minute: int = Field(default=10, ge=1, le=10_000)
    #: ... and for all clients together; beyond either, 429 with Retry-After and no scrypt work.
    failed_logins_per_minute: int = Field(default=60, ge=1, le=100_000)
    #: Basic mode: threads that run scrypt (about 16 MiB each), off the event loop.
    password_check_threads: int = Field(default=2, ge=1, le=8)

    @field_validator("users")
    @classmethod
    def _scrypt_hashes(cls, users: dict[str, str]) -> dict[str, str]:
        for name, hashed in users.items():
            if not name or ":" in name or any(not ch.isprintable() for ch in name):
                raise ValueError(
                    f"the user name {name!r} cannot be sent with HTTP Basic authentication; "
                    "use printable characters without ':'"
                )
            if not _SCRYPT_HASH.fullmatch(hashed):
                raise ValueError(
                    f"the entry for {name!r} is not a password hash; "
                    "run `vezaprovisioner hash-password` and paste what it prints"
                )
        return users

    @model_validator(mode="after")
    def _names_stay_apart(self) -> AuthSettings:
        if self.case_insensitive_users:
            seen: dict[str, str] = {}
            for name in self.users:
                other = seen.setdefault(name.casefold(), name)
                if other != name:
                    raise ValueError(
                        f"[auth.users] has {other!r} and {name!r}, which are the same user with "
                        "case_insensitive_users = true; keep one"
                    )
        return self

    @model_validator(mode="after")
    def _someone_can_log_in(self) -> AuthSettings:
        if self.mode == "basic" and not self.users:
            raise ValueError(
                "auth.mode is 'basic' but [auth.users] is empty, so nobody could call the API; "
                "add a user with the hash printed by `vezaprovisioner hash-password`"
            )
        return self


class JournalSettings(_Section):
    """The request journal (SQLite in data_dir) and the per-user claim that lives in it."""

    #: Finished records older than this are deleted (at start, by the maintenance pass).
    retention_days: int = Field(default=400, ge=1, le=36_500)
    #: A claim (or an unfinished record) older than this is stale even if its owner seems alive.
    stale_claim_seconds: float = Field(default=900.0, gt=0, le=86_400)
    #: How long a request waits for another request's claim on the same user before 503.
    claim_wait_seconds: float = Field(default=150.0, ge=0, le=3600)
    #: How long SQLite waits for another process's write lock before the journal is unavailable.
    busy_timeout_ms: int = Field(default=5000, ge=0, le=600_000)
    #: SQLite synchronous mode: full survives power loss; normal survives process crashes only.
    synchronous: Literal["full", "normal"] = "full"
    #: After the pass at start, retention and crash recovery run again this often (an IIS
    #: recycle can end the old worker after the new one started).
    maintenance_interval_seconds: float = Field(default=300.0, ge=1, le=86_400)


class AuditSettings(_Section):
    """The append-only JSON-lines audit trail (one line per finished request)."""

    enabled: bool = True
    #: Relative paths are relative to data_dir. Written as one file per day, never renamed:
    #: audit.jsonl → audit-2026-11-29.jsonl (then audit-2026-11-29.1.jsonl past max_bytes).
    file: Path = Path("audit.jsonl")
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=4096, le=2**40)
    #: How many files are kept besides the current one (at least one per day).
    backup_count: int = Field(default=400, ge=1, le=10_000)


class LoggingSettings(_Section):
    """Structured JSON log lines: one per request plus backend lifecycle events."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Empty: standard error (under IIS: logs/vezaprovisioner.log). Otherwise a file (relative
    #: paths relative to data_dir), written as one file per day and never renamed, like the audit.
    file: str = ""
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=4096, le=2**40)
    #: How many files are kept besides the current one (at least one per day).
    backup_count: int = Field(default=30, ge=1, le=10_000)


class MetricsSettings(_Section):
    """Prometheus metrics at <base_path>/metrics."""

    enabled: bool = True
    #: False serves /metrics without authentication (for a scraper on a trusted network).
    require_auth: bool = True
    #: Several worker processes (IIS): a folder they share (relative to data_dir); empty: one
    #: process, unless PROMETHEUS_MULTIPROC_DIR is set.
    multiprocess_dir: str = ""


class ServerSettings(_Section):
    """`vezaprovisioner serve` (uvicorn) only; under IIS, IIS's own limits apply."""

    #: A request's headers must be complete this long after its first byte; else the
    #: connection closes (slowloris).
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    #: Once the headers are in, the whole body must arrive within this long.
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    #: An idle connection waits this long for its next request (uvicorn's timeout_keep_alive).
    keep_alive_seconds: int = Field(default=5, ge=1, le=300)
    #: Open connections in total; beyond it uvicorn answers 503 (its limit_concurrency).
    max_connections: int = Field(default=256, ge=1, le=100_000)
    #: Open connections from one client address; more are closed as soon as they open.
    max_connections_per_client: int = Field(default=32, ge=1, le=100_000)


class Settings(_Section):
    """Everything the service needs, validated at start."""

    base_path: str = "/VezaProvisioner"
    backend: Literal["simulated", "local", "remote"] = "simulated"
    mailbox_kind: Literal["local", "remote"] = "local"
    not_found_retry_seconds: float = Field(default=30.0, ge=0, le=600)
    readiness_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    #: The public /health/ready answers from a run of the checks this recent (api/readiness.py).
    readiness_cache_seconds: float = Field(default=2.0, ge=0, le=60)
    #: Where the service writes its own files (journal, audit trail, logs); created on first use.
    data_dir: Path = Path("data")
    exchange: ExchangeSettings = ExchangeSettings()
    simulated: SimulatedSettings = SimulatedSettings()
    remote: RemoteSettings = RemoteSettings()
    local: LocalSettings = LocalSettings()
    auth: AuthSettings = AuthSettings()
    journal: JournalSettings = JournalSettings()
    audit: AuditSettings = AuditSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    server: ServerSettings = ServerSettings()
    #: The file the settings came from (None when built in code); shown by `check` and readiness.
    source: Path | None = None

    @field_validator("base_path")
    @classmethod
    def _base_path(cls, value: str) -> str:
        if not _BASE_PATH.fullmatch(value):
            raise ValueError(
                f"must start with '/' and not end with '/', like /VezaProvisioner, not {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _remote_routing_only_for_remote(self) -> Settings:
        if self.exchange.remote_routing_domain and self.mailbox_kind != "remote":
            raise ValueError(
                "exchange.remote_routing_domain is set but mailbox_kind is 'local'; "
                'set mailbox_kind = "remote" for hybrid, or remove remote_routing_domain'
            )
        return self

    @model_validator(mode="after")
    def _remote_needs_server(self) -> Settings:
        if self.backend != "remote":
            return self
        server = self.remote.server
        if not server:
            raise ValueError(
                'backend is "remote" but remote.server is empty; set it to the Exchange '
                "server's FQDN, like exch01.contoso.com"
            )
        if self.remote.auth != "basic" and ("." not in server or re.fullmatch(r"[0-9.]+", server)):
            raise ValueError(
                f"remote.server {server!r} is not a fully qualified domain name; Kerberos finds "
                "the server by its SPN (HTTP/<fqdn>), so use the FQDN like exch01.contoso.com, "
                "never an IP address, a short name or localhost"
            )
        return self

    @model_validator(mode="after")
    def _claims_outlive_requests(self) -> Settings:
        # A claim must not go stale while its request can still be talking to Exchange.
        longest = 3 * self.exchange.command_timeout_seconds + self.not_found_retry_seconds
        if self.journal.stale_claim_seconds <= longest:
            raise ValueError(
                f"journal.stale_claim_seconds ({self.journal.stale_claim_seconds:g}) must exceed "
                f"3 x exchange.command_timeout_seconds + not_found_retry_seconds ({longest:g}), "
                "or a slow request could lose its claim on the user"
            )
        return self

    def masked(self) -> dict[str, Any]:
        """The settings as plain data with password hashes masked, for `check` and logs."""
        data = self.model_dump(mode="json")
        data["auth"]["users"] = {name: "***" for name in self.auth.users}
        return data


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source (prefix, `__` between section and key, JSON for
    lists and tables), over the mapping it is given instead of the process environment."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._given = {name.lower(): value for name, value in environ.items()}
        super().__init__(
            Settings,  # type: ignore[arg-type]  # reads only model_fields and model_config
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            case_sensitive=False,
        )

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return self._given


def _env_overrides(
    environ: Mapping[str, str], names: dict[tuple[str, ...], str] | None = None
) -> dict[str, Any]:
    """`VEZAPROVISIONER_SECTION__KEY=value` entries as a nested dict, read by pydantic-settings;
    `names` collects which variable set which key, for error messages. A variable naming no
    section or key is kept as is, so validation reports it as an unknown key."""
    overrides: dict[str, Any] = dict(_Environment(environ)())
    for name, raw in environ.items():
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_ENV:
            continue
        keys = name[len(ENV_PREFIX) :].lower().split("__")
        if names is not None:
            names[tuple(keys)] = name
        if keys[0] not in Settings.model_fields:  # pydantic-settings skips these silently
            overrides[keys[0]] = raw if len(keys) == 1 else {"__".join(keys[1:]): raw}
    return overrides


def _read_toml(path: Path) -> dict[str, Any]:
    """The file, read by pydantic-settings' TOML source; a missing or broken file is an error."""
    try:
        path.read_bytes()  # the source would treat a missing file as empty
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    try:
        return dict(TomlConfigSettingsSource(Settings, toml_file=path)())  # type: ignore[arg-type]
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: not UTF-8 ({exc.reason})") from exc


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _keys_at(location: Sequence[str | int]) -> list[str]:
    """The keys a section accepts, for the section that holds `location`'s last key."""
    model: Any = Settings
    for part in location[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return [name for name in model.model_fields if name != "source"]


def _nearest(location: Sequence[str | int]) -> str | None:
    if not location or not isinstance(location[-1], str):
        return None
    close = difflib.get_close_matches(location[-1], _keys_at(location), n=1, cutoff=0.6)
    return close[0] if close else None


def _env_name(keys: Sequence[str]) -> str:
    return ENV_PREFIX + "__".join(keys).upper()


def _describe(
    error: ValidationError, source: str, env_names: Mapping[tuple[str, ...], str] | None = None
) -> str:
    env_names = env_names or {}
    lines: list[str] = []
    blamed_env = False
    for item in error.errors():
        location = item["loc"]
        where = ".".join(str(part) for part in location) or "(top level)"
        from_env = next(
            (
                env_names[location[:n]]  # type: ignore[index]
                for n in range(len(location), 0, -1)
                if location[:n] in env_names
            ),
            None,
        )
        if from_env:
            blamed_env = True
            where = f"{where} (from the environment variable {from_env})"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
            nearest = _nearest(location)
            if nearest is not None:
                parent = [str(part) for part in location[:-1]]
                suggestion = (
                    _env_name([*parent, nearest]) if from_env else ".".join([*parent, nearest])
                )
                message += f"; did you mean {suggestion}?"
            message += " (check the spelling against the README's configuration reference)"
        lines.append(f"  - {where}: {message}")
    origin = f"{source} with its {ENV_PREFIX}* environment overrides" if blamed_env else source
    return "\n".join([f"{origin} has {error.error_count()} problem(s):", *lines])


#: Warm hosts per FastCGI process under IIS unless `[local] pool_size` is set: wfastcgi serves
#: one request at a time per process, so a second host would only hold an Exchange session.
IIS_POOL_SIZE = 1


#: Where the service logs under IIS unless `[logging] file` is set, under data_dir:
#: `logs/vezaprovisioner-<day>.log`, one file per day, never renamed (logs.py).
IIS_LOG_FILE = "logs/vezaprovisioner.log"


def for_iis(settings: Settings) -> Settings:
    """The settings as the IIS entry uses them: `local.pool_size` defaults to `IIS_POOL_SIZE`,
    and an empty `logging.file` means `IIS_LOG_FILE`.

    IIS runs up to `maxInstances` FastCGI processes, each with its own pool, and sends each
    process one request at a time; concurrency comes from the processes, not the pool.
    wfastcgi gives every request a fresh sys.stderr, so standard error would reach nobody.
    """
    updates: dict[str, _Section] = {}
    if "pool_size" not in settings.local.model_fields_set:
        updates["local"] = settings.local.model_copy(update={"pool_size": IIS_POOL_SIZE})
    if not settings.logging.file:
        updates["logging"] = settings.logging.model_copy(update={"file": IIS_LOG_FILE})
    return settings.model_copy(update=updates) if updates else settings


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (or the one `VEZAPROVISIONER_CONFIG` names), apply overrides, validate."""
    env = os.environ if environ is None else environ
    if path is None:
        named = env.get(CONFIG_ENV)
        if not named:
            raise ConfigError(
                f"no configuration file: pass --config FILE or set {CONFIG_ENV} "
                "(examples/demo.toml is a working example)"
            )
        path = Path(named)
    path = path.resolve()
    data = _read_toml(path)
    env_names: dict[tuple[str, ...], str] = {}
    data = _merge(data, _env_overrides(env, env_names))
    if "source" in data:
        raise ConfigError(f"{path}: 'source' is not a configuration key")
    # Relative paths are relative to the file; joining an absolute path leaves it unchanged.
    data.setdefault("data_dir", str(Settings.model_fields["data_dir"].default))
    data["data_dir"] = str(path.parent / data["data_dir"])
    remote = data.get("remote")
    if isinstance(remote, dict) and remote.get("ca_bundle"):
        remote["ca_bundle"] = str(path.parent / remote["ca_bundle"])
    simulated = data.setdefault("simulated", {})
    if isinstance(simulated, dict):
        simulated["directory"] = str(
            path.parent / simulated.get("directory", SimulatedSettings().directory)
        )
    try:
        return Settings.model_validate({**data, "source": path})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(path), env_names)) from exc

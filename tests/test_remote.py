"""The remote backend, end to end: the real pypsrp client against the fake /PowerShell endpoint.

Every test here goes through pypsrp's WS-Man transport over TLS (basic auth, a CA made by the
test) to `tests.fakes.psrp_server`, whose psrpcore runspace pool runs the cmdlets against a
`SimulatedExchange`. Errors therefore travel as real PSRP ErrorRecords and come back through the
shared classifier.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trustme
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pypsrp.exceptions import AuthenticationError, WSManFaultError
from pypsrp.powershell import PowerShell, RunspacePool
from pypsrp.wsman import WSMan

from tests.conftest import AUTH, TEST_DIRECTORY, deep_merge
from tests.fakes.clock import FakeClock
from tests.fakes.psrp_server import FakeExchangeEndpoint
from vezaprovisioner.api.app import create_app
from vezaprovisioner.clock import Clock, SystemClock
from vezaprovisioner.config import ConfigError, Settings, load_settings
from vezaprovisioner.exchange.backends import open_exchange
from vezaprovisioner.exchange.errors import (
    AddressInUse,
    AmbiguousIdentity,
    BackendUnavailable,
    ExchangeError,
    ExchangeTimeout,
    IdentityNotFound,
    PermissionDenied,
    UnexpectedExchangeError,
    WrongRecipientType,
)
from vezaprovisioner.exchange.port import EnableMailbox, EnableRemoteMailbox
from vezaprovisioner.exchange.remote import IDLE_CHECK_SECONDS, RemoteCredentials, RemoteExchange
from vezaprovisioner.exchange.simulated.directory import load_directory
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange
from vezaprovisioner.provisioning import CreateEmail, Provisioner

USERNAME = "svc-veza@contoso.com"
PASSWORD = "s3cret: 'quoted' \"and\" `ticked`"
PLAIN_GUID = "00000000-0000-0000-0000-000000001001"

HOSTILE = [
    "O'Brien",
    "O\u2019Brien \u2018single\u2019 \u201cdouble\u201d",
    '"; Remove-Mailbox -Identity * -Confirm:$false; "',
    "`$(Remove-Mailbox x)`",
    "$(Get-Process)",
    "jdoe; Remove-Mailbox jdoe",
    "line1\nline2\r\nline3",
    "@{a=1}",
    "-Identity",
    "a&b|c<d>e",
    "\u00e9\u00e8\u5c71\u7530",
]


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def ca_bundle(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def simulated() -> SimulatedExchange:
    return SimulatedExchange(load_directory(TEST_DIRECTORY), clock=FakeClock())


@pytest.fixture
def endpoint(
    simulated: SimulatedExchange, server_tls: ssl.SSLContext
) -> Iterator[FakeExchangeEndpoint]:
    with FakeExchangeEndpoint(
        simulated, username=USERNAME, password=PASSWORD, tls=server_tls
    ) as fake:
        yield fake


@pytest.fixture
def remote_settings(
    endpoint: FakeExchangeEndpoint, ca_bundle: Path, password_hash: str, tmp_path: Path
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "backend": "remote",
            "data_dir": str(tmp_path / "data"),  # not ./data: no journal carried between runs
            "not_found_retry_seconds": 0,
            "exchange": {"command_timeout_seconds": 20},
            "remote": {
                "server": "localhost",
                "port": endpoint.port,
                "ssl": True,
                "auth": "basic",
                "ca_bundle": str(ca_bundle),
                "http_timeout_seconds": 10,
            },
            "auth": {"mode": "basic", "users": {"veza-svc": password_hash}},
        }
        return Settings.model_validate(deep_merge(base, overrides))

    return make


@pytest.fixture
def make_remote(
    remote_settings: Callable[..., Settings],
) -> Iterator[Callable[..., RemoteExchange]]:
    made: list[RemoteExchange] = []

    def make(clock: Clock | None = None, **overrides: Any) -> RemoteExchange:
        settings = remote_settings(**overrides)
        backend = RemoteExchange(
            settings.remote,
            settings.exchange,
            RemoteCredentials(USERNAME, PASSWORD),
            clock=clock or SystemClock(),
        )
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def remote(make_remote: Callable[..., RemoteExchange]) -> RemoteExchange:
    return make_remote()


def reference() -> SimulatedExchange:
    """A second simulated Exchange, to compare the remote answers with the in-process ones."""
    return SimulatedExchange(load_directory(TEST_DIRECTORY), clock=FakeClock())


# ---- every port operation -----------------------------------------------------------------


def test_get_user_returns_what_exchange_reports(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint
) -> None:
    assert remote.get_user("CONTOSO\\plain") == reference().get_user("CONTOSO\\plain")
    assert endpoint.commands[-1].name == "Get-User"
    assert endpoint.commands[-1].parameters == {"Identity": "CONTOSO\\plain"}


def test_get_recipient_passes_the_domain_controller(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint
) -> None:
    recipient = remote.get_recipient("mailbox@contoso.com", "dc02.contoso.com")
    assert recipient == reference().get_recipient("mailbox@contoso.com")
    assert recipient.database == "DB01"
    assert endpoint.commands[-1].parameters == {
        "Identity": "mailbox@contoso.com",
        "DomainController": "dc02.contoso.com",
    }


def test_enable_mailbox_creates_the_mailbox_once(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint, simulated: SimulatedExchange
) -> None:
    request = EnableMailbox(PLAIN_GUID, alias="pat.plain", database="DB02")
    created = remote.enable_mailbox(request)
    assert created == reference().enable_mailbox(request)
    assert (created.recipient_type_details, created.database) == ("UserMailbox", "DB02")
    assert simulated.count("Enable-Mailbox") == 1
    assert endpoint.commands[-1].parameters == {
        "Identity": PLAIN_GUID,
        "Alias": "pat.plain",
        "Database": "DB02",
    }


def test_enable_remote_mailbox_passes_the_routing_address(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint
) -> None:
    request = EnableRemoteMailbox(
        PLAIN_GUID,
        alias="pat",
        remote_routing_address="pat@contoso.mail.onmicrosoft.com",
    )
    created = remote.enable_remote_mailbox(request)
    assert created == reference().enable_remote_mailbox(request)
    assert created.database is None
    assert endpoint.commands[-1].name == "Enable-RemoteMailbox"
    assert endpoint.commands[-1].parameters["RemoteRoutingAddress"] == (
        "pat@contoso.mail.onmicrosoft.com"
    )


def test_probe_runs_a_cheap_read_only_cmdlet(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint
) -> None:
    assert "session open" in remote.probe()
    assert [(c.name, c.parameters) for c in endpoint.commands] == [("Get-User", {"ResultSize": 1})]


def test_commands_are_cmdlets_never_scripts_and_reuse_one_pool(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint
) -> None:
    remote.get_user("plain")
    remote.get_recipient("mailbox")
    remote.enable_mailbox(EnableMailbox(PLAIN_GUID))
    assert endpoint.commands
    assert not any(command.is_script for command in endpoint.commands)
    assert (remote.pools_opened, endpoint.shells_created) == (1, 1)


# ---- every error type, as real ErrorRecords ------------------------------------------------

_ERROR_CASES: list[tuple[str, type[ExchangeError], Callable[[Any], object]]] = [
    ("not found", IdentityNotFound, lambda port: port.get_user("nobody")),
    ("recipient not found", IdentityNotFound, lambda port: port.get_recipient("plain")),
    ("ambiguous", AmbiguousIdentity, lambda port: port.get_user("Alex Smith")),
    (
        "wrong type",
        WrongRecipientType,
        lambda port: port.enable_mailbox(EnableMailbox("room")),
    ),
    (
        "address in use",
        AddressInUse,
        lambda port: port.enable_mailbox(EnableMailbox(PLAIN_GUID, alias="sales.team")),
    ),
    (
        "permission",
        PermissionDenied,
        lambda port: port.enable_mailbox(EnableMailbox("denied")),
    ),
    (
        "other",
        UnexpectedExchangeError,
        lambda port: port.enable_remote_mailbox(EnableRemoteMailbox("weird")),
    ),
]


def _error_id_shape(error_id: str | None) -> str:
    """The error id without its per-call RequestId and TimeStamp."""
    return re.sub(r"RequestId=[^,]+,TimeStamp=[^\]]+", "", error_id or "")


@pytest.mark.parametrize(
    ("case", "expected", "call"), _ERROR_CASES, ids=[case[0] for case in _ERROR_CASES]
)
def test_exchange_errors_arrive_as_the_same_classified_errors(
    remote: RemoteExchange,
    case: str,
    expected: type[ExchangeError],
    call: Callable[[Any], object],
) -> None:
    with pytest.raises(expected) as over_psrp:
        call(remote)
    with pytest.raises(expected) as in_process:
        call(reference())
    got, want = over_psrp.value, in_process.value
    assert got.message == want.message
    assert got.reason == want.reason
    assert got.exception_type == want.exception_type
    assert _error_id_shape(got.error_id) == _error_id_shape(want.error_id)
    if isinstance(want, WrongRecipientType):
        assert isinstance(got, WrongRecipientType)
        assert got.recipient_type == want.recipient_type == "RoomMailbox"


def test_the_endpoint_refuses_scripts_like_a_no_language_runspace(
    endpoint: FakeExchangeEndpoint, ca_bundle: Path
) -> None:
    pool = _raw_pool(endpoint, ca_bundle)
    with pool:
        ps = PowerShell(pool)
        ps.add_script("Get-User -Identity plain")
        ps.invoke()
        assert ps.had_errors
        assert "no-language mode" in str(ps.streams.error[0])
        assert ps.streams.error[0].fq_error == "ScriptsNotAllowed"


def test_a_cmdlet_outside_the_role_is_command_not_found(
    endpoint: FakeExchangeEndpoint, ca_bundle: Path
) -> None:
    with _raw_pool(endpoint, ca_bundle) as pool:
        ps = PowerShell(pool)
        ps.add_cmdlet("Remove-Mailbox").add_parameter("Identity", "plain")
        ps.invoke()
        assert ps.had_errors
        assert ps.streams.error[0].reason == "CommandNotFoundException"
    assert endpoint.exchange.calls == []


# ---- hostile values travel as data ---------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_identities_and_aliases_arrive_byte_for_byte(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint, value: str
) -> None:
    with pytest.raises(IdentityNotFound) as caught:
        remote.get_user(value)
    assert endpoint.commands[-1].parameters == {"Identity": value}
    assert f"'{value}'" in caught.value.message
    with contextlib.suppress(ExchangeError):  # most are invalid aliases; O'Brien is not
        remote.enable_mailbox(EnableMailbox(PLAIN_GUID, alias=value))
    assert endpoint.commands[-1].parameters == {"Identity": PLAIN_GUID, "Alias": value}
    assert endpoint.exchange.count("Enable-Mailbox") == 1


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=80))
def test_any_text_reaches_the_cmdlet_parameter_unchanged(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint, value: str
) -> None:
    with contextlib.suppress(ExchangeError):
        remote.get_user(value)
    assert endpoint.commands[-1].parameters == {"Identity": value}


# ---- session handling ----------------------------------------------------------------------


def test_a_pool_dropped_by_the_server_is_rebuilt(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint
) -> None:
    remote.get_user("plain")
    endpoint.drop_idle_pools()
    assert remote.get_user("plain").sam_account_name == "plain"
    assert (remote.pools_opened, endpoint.shells_created, endpoint.open_shells) == (2, 2, 1)


def test_a_read_is_retried_once_on_a_new_pool_after_a_dropped_connection(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint
) -> None:
    remote.get_user("plain")
    endpoint.drop_connection_on("Receive")
    assert remote.get_user("mailbox").sam_account_name == "mailbox"
    assert remote.pools_opened == 2
    assert [c.name for c in endpoint.commands] == ["Get-User"] * 3


def test_a_read_that_keeps_failing_is_backend_unavailable(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint
) -> None:
    endpoint.drop_connection_on("Receive", count=2)
    with pytest.raises(BackendUnavailable, match="no Exchange session"):
        remote.get_user("plain")


def test_enable_is_never_rerun_after_a_dropped_connection(
    make_remote: Callable[..., RemoteExchange],
    remote_settings: Callable[..., Settings],
    endpoint: FakeExchangeEndpoint,
    simulated: SimulatedExchange,
) -> None:
    remote = make_remote()
    remote.get_user("plain")
    endpoint.drop_connection_on("Receive")
    with pytest.raises(ExchangeTimeout, match="outcome is unknown"):
        remote.enable_mailbox(EnableMailbox(PLAIN_GUID))
    assert simulated.count("Enable-Mailbox") == 1

    # The flow turns the unknown outcome into "created" by reading the state again.
    endpoint.drop_connection_on("Receive")
    provisioner = Provisioner(remote_settings(), remote, SystemClock())
    result = provisioner.create_email(CreateEmail("CONTOSO\\disabled"))
    assert result.status == "created"
    assert simulated.count("Enable-Mailbox") == 2


def test_a_pool_that_fails_to_open_is_deleted_on_the_server(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint
) -> None:
    endpoint.drop_connection_on("Receive")  # the first Receive belongs to opening the pool
    assert remote.get_user("plain").sam_account_name == "plain"
    assert (endpoint.shells_created, endpoint.open_shells, remote.pools_opened) == (2, 1, 1)


def test_a_read_lost_with_its_command_request_is_retried(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint
) -> None:
    endpoint.drop_connection_on("Command")
    assert remote.get_user("plain").sam_account_name == "plain"


def test_an_enable_lost_with_its_command_request_is_an_unknown_outcome(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint, simulated: SimulatedExchange
) -> None:
    endpoint.drop_connection_on("Command")
    with pytest.raises(ExchangeTimeout, match="outcome is unknown"):
        remote.enable_mailbox(EnableMailbox(PLAIN_GUID))
    assert simulated.count("Enable-Mailbox") == 0


def test_no_server_is_backend_unavailable(
    remote_settings: Callable[..., Settings], endpoint: FakeExchangeEndpoint
) -> None:
    settings = remote_settings()
    endpoint.stop()
    down = RemoteExchange(
        settings.remote,
        settings.exchange,
        RemoteCredentials(USERNAME, PASSWORD),
        clock=SystemClock(),
    )
    with pytest.raises(BackendUnavailable, match="ConnectionError") as caught:
        down.probe()
    assert caught.value.retry_after_seconds == 5


def test_a_command_past_its_deadline_is_stopped_and_the_pool_rebuilt(
    make_remote: Callable[..., RemoteExchange],
    endpoint: FakeExchangeEndpoint,
    simulated: SimulatedExchange,
) -> None:
    remote = make_remote(exchange={"command_timeout_seconds": 1})
    remote.get_user("plain")
    endpoint.hold_commands()
    with pytest.raises(ExchangeTimeout, match="within the command timeout of 1 seconds"):
        remote.enable_mailbox(EnableMailbox(PLAIN_GUID))
    assert "powershell/signal/ctrl_c" in endpoint.signals
    assert endpoint.open_shells == 0
    endpoint.release_commands()
    assert simulated.count("Enable-Mailbox") == 0
    assert remote.get_user("plain").recipient_type_details == "User"
    assert remote.pools_opened == 2


def test_the_api_answers_504_when_exchange_hangs(
    remote_settings: Callable[..., Settings],
    endpoint: FakeExchangeEndpoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VEZA_EXCHANGE_USERNAME", USERNAME)
    monkeypatch.setenv("VEZA_EXCHANGE_PASSWORD", PASSWORD)
    settings = remote_settings(exchange={"command_timeout_seconds": 1})
    with TestClient(create_app(settings), headers=AUTH) as client:
        assert client.get("/VezaProvisioner/health/ready").status_code == 200
        endpoint.hold_commands()
        response = client.post("/VezaProvisioner/api/v1/emails", json={"identity": "plain"})
    assert response.status_code == 504
    assert response.json()["code"] == "EXCHANGE_TIMEOUT"


def _in_threads(calls: list[Callable[[], object]]) -> tuple[list[object], list[BaseException]]:
    results: list[object] = []
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            results.append(call())
        except BaseException as exc:  # surfaced by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results, errors


@pytest.mark.parametrize("pool_size", [1, 2])
def test_concurrent_callers_use_at_most_pool_size_sessions(
    make_remote: Callable[..., RemoteExchange], endpoint: FakeExchangeEndpoint, pool_size: int
) -> None:
    remote = make_remote(remote={"pool_size": pool_size})
    calls: list[Callable[[], object]] = [
        lambda name=name: remote.get_user(name).sam_account_name  # type: ignore[misc]
        for name in ["plain", "mailbox"] * 4
    ]
    results, errors = _in_threads(calls)
    assert errors == []
    assert sorted(map(str, results)) == ["mailbox"] * 4 + ["plain"] * 4
    assert 1 <= remote.pools_opened <= pool_size
    assert endpoint.shells_created == remote.pools_opened


def test_two_sessions_run_two_commands_at_once(
    make_remote: Callable[..., RemoteExchange],
    endpoint: FakeExchangeEndpoint,
    simulated: SimulatedExchange,
) -> None:
    remote = make_remote(remote={"pool_size": 2})
    endpoint.hold_commands()
    threads = [
        threading.Thread(target=remote.get_user, args=("plain",)),
        threading.Thread(target=remote.enable_mailbox, args=(EnableMailbox(PLAIN_GUID),)),
    ]
    for thread in threads:
        thread.start()
    # Both cmdlets are inside Exchange at the same time: neither waits for the other.
    both_running = endpoint.wait_for_commands(2)
    endpoint.release_commands()
    for thread in threads:
        thread.join(timeout=30)
    assert both_running
    assert simulated.count("Enable-Mailbox") == 1
    assert (remote.pools_opened, endpoint.open_shells) == (2, 2)


def test_a_caller_finding_every_session_busy_gets_503(
    make_remote: Callable[..., RemoteExchange], endpoint: FakeExchangeEndpoint
) -> None:
    remote = make_remote(remote={"pool_size": 1}, exchange={"command_timeout_seconds": 1})
    taken = remote._take(deadline=float("inf"))  # another caller holds the only session
    with pytest.raises(BackendUnavailable, match="all 1 Exchange session") as caught:
        remote.get_user("plain")
    assert caught.value.retry_after_seconds == 5
    remote._give_back(taken)
    assert remote.get_user("plain").sam_account_name == "plain"
    assert [c.name for c in endpoint.commands] == ["Get-User"]


def test_liveness_is_checked_only_after_an_idle_period(
    make_remote: Callable[..., RemoteExchange], endpoint: FakeExchangeEndpoint
) -> None:
    clock = FakeClock()
    remote = make_remote(clock=clock)
    for name in ("plain", "mailbox", "plain"):
        remote.get_user(name)
    assert endpoint.actions["Get"] == 0  # no is_alive() round trip before a busy pool's commands
    clock.advance(IDLE_CHECK_SECONDS)
    remote.get_user("plain")
    assert endpoint.actions["Get"] == 1
    assert remote.pools_opened == 1


def test_a_command_on_a_warm_session_costs_three_wsman_requests(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint
) -> None:
    remote.get_user("plain")  # opens the session
    endpoint.actions.clear()
    endpoint.hold_commands()  # the cmdlet still runs when the client's Receive arrives
    with ThreadPoolExecutor(max_workers=1) as caller:
        running = caller.submit(remote.get_user, "mailbox")
        assert endpoint.wait_for_waiting_receive()
        endpoint.release_commands()
        assert running.result(timeout=30).sam_account_name == "mailbox"
    # Command, one Receive (the server reports a pipeline only when it ends, with its output)
    # and the Signal that closes the command: no liveness check, no polling.
    assert dict(endpoint.actions) == {"Command": 1, "Receive": 1, "Signal": 1}


def test_an_idle_pool_dropped_by_the_server_is_noticed_before_enable(
    make_remote: Callable[..., RemoteExchange],
    endpoint: FakeExchangeEndpoint,
    simulated: SimulatedExchange,
) -> None:
    clock = FakeClock()
    remote = make_remote(clock=clock)
    remote.get_user("plain")
    endpoint.drop_idle_pools()
    clock.advance(IDLE_CHECK_SECONDS + 1)
    assert remote.enable_mailbox(EnableMailbox(PLAIN_GUID)).recipient_type_details == "UserMailbox"
    assert (endpoint.actions["Get"], remote.pools_opened, endpoint.open_shells) == (1, 2, 1)
    assert simulated.count("Enable-Mailbox") == 1


def test_an_enable_refused_for_a_forgotten_shell_runs_on_a_new_pool(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint, simulated: SimulatedExchange
) -> None:
    # Dropped before the idle check would look: the server's "no such shell" answer to the
    # Command request proves the cmdlet never ran, so it is sent (once) on a new pool.
    remote.get_user("plain")
    endpoint.drop_idle_pools()
    assert remote.enable_mailbox(EnableMailbox(PLAIN_GUID)).recipient_type_details == "UserMailbox"
    assert simulated.count("Enable-Mailbox") == 1
    assert (remote.pools_opened, endpoint.open_shells) == (2, 1)


def test_close_waits_for_no_busy_session_and_closes_it_after_its_command(
    make_remote: Callable[..., RemoteExchange], endpoint: FakeExchangeEndpoint
) -> None:
    remote = make_remote(remote={"pool_size": 2})
    remote.get_user("plain")
    endpoint.hold_commands()
    reader = threading.Thread(target=remote.get_user, args=("mailbox",))
    reader.start()
    assert endpoint.wait_for_commands(2)
    remote.close()  # returns at once; the busy session is closed when its command ends
    endpoint.release_commands()
    reader.join(timeout=30)
    assert endpoint.open_shells == 0
    with pytest.raises(BackendUnavailable, match="closed"):
        remote.get_user("plain")


# ---- the service through the configured backend --------------------------------------------


def test_the_api_creates_a_mailbox_through_the_remote_backend(
    remote_settings: Callable[..., Settings],
    endpoint: FakeExchangeEndpoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VEZA_EXCHANGE_USERNAME", USERNAME)
    monkeypatch.setenv("VEZA_EXCHANGE_PASSWORD", PASSWORD)
    with TestClient(create_app(remote_settings()), headers=AUTH) as client:
        ready = client.get("/VezaProvisioner/health/ready/details")
        created = client.post(
            "/VezaProvisioner/api/v1/emails", json={"identity": "CONTOSO\\plain", "alias": "pp"}
        )
    assert ready.status_code == 200
    assert "session open" in ready.json()["checks"]["backend"]["detail"]
    assert created.status_code == 201
    assert created.json()["primary_smtp_address"] == "pp@contoso.com"
    assert endpoint.commands[-1].parameters == {"Identity": PLAIN_GUID, "Alias": "pp"}


# ---- authentication and addressing ---------------------------------------------------------


def test_settings_refuse_basic_auth_over_plain_http() -> None:
    with pytest.raises(ValidationError, match="basic' over plain HTTP"):
        Settings.model_validate(
            {"backend": "remote", "remote": {"server": "exch01.contoso.com", "auth": "basic"}}
        )


def test_the_backend_refuses_basic_auth_over_plain_http_even_unvalidated() -> None:
    settings = Settings.model_validate(
        {"backend": "remote", "remote": {"server": "exch01.contoso.com"}}
    )
    plain_basic = settings.remote.model_copy(update={"auth": "basic", "ssl": False})
    with pytest.raises(ValueError, match="only allowed over TLS"):
        RemoteExchange(
            plain_basic, settings.exchange, RemoteCredentials("u", "p"), clock=SystemClock()
        )


def test_the_endpoint_refuses_basic_auth_over_plain_http(simulated: SimulatedExchange) -> None:
    with FakeExchangeEndpoint(simulated, username=USERNAME, password=PASSWORD) as plain:
        wsman = WSMan(
            "127.0.0.1",
            port=plain.port,
            path="PowerShell",
            ssl=False,
            auth="basic",
            encryption="never",
            username=USERNAME,
            password=PASSWORD,
            no_proxy=True,
        )
        with pytest.raises(AuthenticationError):
            RunspacePool(wsman, configuration_name="Microsoft.Exchange").open()
    assert plain.shells_created == 0


def test_a_wrong_password_is_permission_denied(
    remote_settings: Callable[..., Settings], endpoint: FakeExchangeEndpoint
) -> None:
    settings = remote_settings()
    wrong = RemoteExchange(
        settings.remote,
        settings.exchange,
        RemoteCredentials(USERNAME, "wrong"),
        clock=SystemClock(),
    )
    with pytest.raises(PermissionDenied, match=r"Access denied.*RemotePowerShellEnabled"):
        wrong.probe()
    assert endpoint.shells_created == 0


def test_a_wrong_path_says_which_endpoint_to_use(
    make_remote: Callable[..., RemoteExchange],
) -> None:
    with pytest.raises(BackendUnavailable, match=r"remote\.path"):
        make_remote(remote={"path": "wsman"}).get_user("plain")


def test_another_configuration_is_not_in_the_catalog(
    endpoint: FakeExchangeEndpoint, ca_bundle: Path
) -> None:
    wsman = _raw_wsman(endpoint, ca_bundle)
    with pytest.raises(WSManFaultError, match="was not found in the WS-Management catalog"):
        RunspacePool(wsman, configuration_name="Microsoft.PowerShell").open()


def test_the_server_certificate_is_validated(make_remote: Callable[..., RemoteExchange]) -> None:
    with pytest.raises(BackendUnavailable, match="SSLError"):
        make_remote(remote={"ca_bundle": None}).get_user("plain")


# ---- configuration and credentials ---------------------------------------------------------


@pytest.mark.parametrize("server", ["exch01", "10.0.0.5", "localhost"])
def test_kerberos_needs_a_fully_qualified_name(server: str) -> None:
    with pytest.raises(ValidationError, match="not a fully qualified domain name"):
        Settings.model_validate({"backend": "remote", "remote": {"server": server}})


def test_remote_backend_needs_a_server() -> None:
    with pytest.raises(ValidationError, match=r"remote\.server is empty"):
        Settings.model_validate({"backend": "remote"})


def test_remote_defaults_follow_exchanges_documented_endpoint() -> None:
    remote = Settings.model_validate(
        {"backend": "remote", "remote": {"server": "exch01.contoso.com"}}
    ).remote
    assert (remote.auth, remote.ssl, remote.effective_port, remote.path) == (
        "kerberos",
        False,
        80,
        "PowerShell",
    )
    assert remote.model_copy(update={"ssl": True}).effective_port == 443


def test_credential_variables_may_not_look_like_configuration_overrides() -> None:
    with pytest.raises(ValidationError, match="reserved for configuration"):
        Settings.model_validate({"remote": {"password_env": "VEZAPROVISIONER_PASSWORD"}})


def test_the_example_configuration_is_valid(repo_root: Path) -> None:
    settings = load_settings(repo_root / "examples" / "remote.toml", environ={})
    assert (settings.backend, settings.remote.server) == ("remote", "exch01.contoso.com")


def test_ca_bundle_is_relative_to_the_configuration_file(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text(
        'backend = "remote"\n[remote]\nserver = "exch01.contoso.com"\nssl = true\n'
        'ca_bundle = "certs/ca.pem"\n',
        encoding="utf-8",
    )
    assert load_settings(config, environ={}).remote.ca_bundle == tmp_path / "certs" / "ca.pem"


def test_credentials_come_from_the_named_environment_variables() -> None:
    remote = Settings().remote
    env = {"VEZA_EXCHANGE_USERNAME": "svc@contoso.com", "VEZA_EXCHANGE_PASSWORD": "pw"}
    credentials = RemoteCredentials.from_environment(remote, env)
    assert (credentials.username, credentials.password) == ("svc@contoso.com", "pw")
    assert "pw" not in repr(credentials)
    assert RemoteCredentials.from_environment(remote, {}) == RemoteCredentials(None, None)


def test_open_exchange_refuses_basic_without_credentials(
    remote_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VEZA_EXCHANGE_USERNAME", raising=False)
    monkeypatch.delenv("VEZA_EXCHANGE_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="VEZA_EXCHANGE_USERNAME"):
        open_exchange(remote_settings(), SystemClock())


# ---- helpers -------------------------------------------------------------------------------


def _raw_wsman(endpoint: FakeExchangeEndpoint, ca_bundle: Path) -> WSMan:
    return WSMan(
        "localhost",
        port=endpoint.port,
        path="PowerShell",
        ssl=True,
        auth="basic",
        username=USERNAME,
        password=PASSWORD,
        cert_validation=str(ca_bundle),  # type: ignore[arg-type]  # requests' verify takes a path
        no_proxy=True,
    )


def _raw_pool(endpoint: FakeExchangeEndpoint, ca_bundle: Path) -> RunspacePool:
    return RunspacePool(_raw_wsman(endpoint, ca_bundle), configuration_name="Microsoft.Exchange")


def test_the_service_imports_without_pypsrp_unless_remote_is_configured() -> None:
    # IIS starts a worker per FastCGI instance: the remote backend's client stack is not paid for
    # by the other backends (measured in bench/import_time.py).
    probe = (
        "import sys, vezaprovisioner.iis_entry, vezaprovisioner.cli; "
        "assert 'pypsrp' not in sys.modules and 'requests' not in sys.modules, 'pypsrp loaded'; "
        "from vezaprovisioner.exchange.remote import RemoteExchange; "
        "assert 'pypsrp' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)


def test_enable_is_announced_only_once_it_has_a_session(
    make_remote: Callable[..., RemoteExchange],
    endpoint: FakeExchangeEndpoint,
    simulated: SimulatedExchange,
) -> None:
    # The journal marks Enable-* sent in `before_send`: never while it still waits for a session.
    remote = make_remote(remote={"pool_size": 1})
    endpoint.hold_commands()
    reader = threading.Thread(target=remote.get_user, args=("plain",))  # takes the only session
    reader.start()
    assert endpoint.wait_for_commands(1)
    announced = threading.Event()
    request = EnableMailbox(PLAIN_GUID, before_send=announced.set)
    enabler = threading.Thread(target=remote.enable_mailbox, args=(request,))
    enabler.start()
    assert remote.wait_for_waiting(1, timeout=10)
    assert not announced.is_set()  # queued for a session: not sent, not announced
    endpoint.release_commands()
    for thread in (reader, enabler):
        thread.join(30)
    assert announced.is_set()
    assert simulated.count("Enable-Mailbox") == 1


def test_a_refused_announcement_sends_nothing_and_frees_the_session(
    remote: RemoteExchange, endpoint: FakeExchangeEndpoint, simulated: SimulatedExchange
) -> None:
    class Refused(Exception):
        pass

    def refuse() -> None:
        raise Refused

    with pytest.raises(Refused):
        remote.enable_mailbox(EnableMailbox(PLAIN_GUID, before_send=refuse))
    assert simulated.count("Enable-Mailbox") == 0
    assert remote.get_user("plain").sam_account_name == "plain"  # the session came back

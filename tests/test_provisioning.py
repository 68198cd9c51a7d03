"""The provisioning flow without HTTP: decisions, the race with other servers, unknown outcomes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.fakes.clock import FakeClock
from vezaprovisioner.config import Settings
from vezaprovisioner.exchange.errors import ExchangeTimeout, WrongRecipientType
from vezaprovisioner.exchange.port import EnableMailbox, Recipient
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange
from vezaprovisioner.journal.claims import InProcessClaims
from vezaprovisioner.provisioning import (
    AliasMismatch,
    AliasRequired,
    CreateEmail,
    Provisioner,
)


class Delegating:
    """A port that delegates to the simulated Exchange; subclasses change one operation."""

    def __init__(self, inner: SimulatedExchange) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class AnotherServerWinsTheRace(Delegating):
    """Another provisioner enables the user between our Get-User and our Enable-Mailbox."""

    def enable_mailbox(self, request: EnableMailbox) -> Recipient:
        self.inner.enable_mailbox(EnableMailbox(identity=request.identity, alias="from.other"))
        return self.inner.enable_mailbox(request)  # Exchange: "... is of type UserMailbox"


class EnableThenTimeout(Delegating):
    """Enable-Mailbox takes effect, but its answer never arrives."""

    def enable_mailbox(self, request: EnableMailbox) -> Recipient:
        self.inner.enable_mailbox(request)
        raise ExchangeTimeout("Enable-Mailbox did not finish within 120 s")


@pytest.fixture
def provisioner(
    make_settings: Callable[..., Settings], exchange: SimulatedExchange, clock: FakeClock
) -> Callable[..., Provisioner]:
    def make(port: Any = None, **overrides: Any) -> Provisioner:
        return Provisioner(make_settings(**overrides), port or exchange, clock)

    return make


def test_losing_the_race_to_another_server_answers_as_existing(
    provisioner: Callable[..., Provisioner], exchange: SimulatedExchange
) -> None:
    result = provisioner(AnotherServerWinsTheRace(exchange)).create_email(CreateEmail("plain"))
    assert result.status == "already_exists"
    assert result.alias == "from.other"
    assert exchange.count("Enable-Mailbox") == 2  # theirs, then ours that Exchange refused


def test_losing_the_race_with_another_alias_is_an_alias_mismatch(
    provisioner: Callable[..., Provisioner], exchange: SimulatedExchange
) -> None:
    flow = provisioner(AnotherServerWinsTheRace(exchange))
    with pytest.raises(AliasMismatch):
        flow.create_email(CreateEmail("plain", alias="mine"))


def test_unknown_outcome_is_re_read_not_retried(
    provisioner: Callable[..., Provisioner], exchange: SimulatedExchange
) -> None:
    result = provisioner(EnableThenTimeout(exchange)).create_email(CreateEmail("plain", "pp"))
    assert result.status == "created"
    assert result.alias == "pp"
    assert exchange.count("Enable-Mailbox") == 1


def test_timeout_without_effect_stays_a_timeout(
    provisioner: Callable[..., Provisioner], exchange: SimulatedExchange
) -> None:
    with pytest.raises(ExchangeTimeout):
        provisioner().create_email(CreateEmail("slow"))
    assert exchange.count("Enable-Mailbox") == 1


def test_mail_user_is_never_converted(
    provisioner: Callable[..., Provisioner], exchange: SimulatedExchange
) -> None:
    with pytest.raises(WrongRecipientType) as caught:
        provisioner().create_email(CreateEmail("mailuser"))
    assert caught.value.recipient_type == "MailUser"
    assert not caught.value.from_exchange
    assert exchange.count("Enable-Mailbox") == 0


def test_backoff_grows_and_is_capped(
    provisioner: Callable[..., Provisioner], clock: FakeClock
) -> None:
    with pytest.raises(Exception, match="couldn't be found"):
        provisioner(not_found_retry_seconds=30).create_email(CreateEmail("ghost"))
    assert clock.sleeps[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(clock.sleeps) == 5.0
    assert sum(clock.sleeps) == pytest.approx(30)


def test_remote_routing_alias_is_derived_from_the_upn(
    provisioner: Callable[..., Provisioner], exchange: SimulatedExchange
) -> None:
    flow = provisioner(
        mailbox_kind="remote", exchange={"remote_routing_domain": "contoso.mail.onmicrosoft.com"}
    )
    result = flow.create_email(CreateEmail("jose"))
    assert result.recipient_type_details == "RemoteUserMailbox"
    assert exchange.calls[-1][1]["RemoteRoutingAddress"] == "jose@contoso.mail.onmicrosoft.com"


def test_remote_without_routing_domain_passes_no_alias(
    provisioner: Callable[..., Provisioner], exchange: SimulatedExchange
) -> None:
    flow = provisioner(mailbox_kind="remote", exchange={"alias_policy": "exchange"})
    flow.create_email(CreateEmail("plain"))
    assert exchange.calls[-1] == (
        "Enable-RemoteMailbox",
        {"Identity": "00000000-0000-0000-0000-000000001001"},
    )


def test_remote_routing_needs_some_valid_alias(
    provisioner: Callable[..., Provisioner], exchange: SimulatedExchange
) -> None:
    flow = provisioner(
        mailbox_kind="remote",
        exchange={
            "remote_routing_domain": "contoso.mail.onmicrosoft.com",
            "alias_policy": "exchange",
        },
    )
    with pytest.raises(AliasRequired):
        flow.create_email(CreateEmail("CONTOSO\\山田太郎"))
    assert exchange.count("Enable-RemoteMailbox") == 0
    given = flow.create_email(CreateEmail("CONTOSO\\山田太郎", alias="yamada"))
    assert given.alias == "yamada"


def test_the_in_process_claim_serialises_one_key_and_forgets_idle_keys() -> None:
    claims = InProcessClaims()
    with claims.hold("ABC"):
        assert claims._locks["abc"][0].locked()
    assert claims._locks == {}

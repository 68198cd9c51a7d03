"""The simulated Exchange, through its public API, with a clock that never really waits."""

from __future__ import annotations

import json
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fakes.clock import FakeClock
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
from vezaprovisioner.exchange.port import (
    DirectoryUser,
    EnableMailbox,
    EnableRemoteMailbox,
    ExchangePort,
    Recipient,
)
from vezaprovisioner.exchange.simulated import naming
from vezaprovisioner.exchange.simulated.directory import (
    DirectoryError,
    SimulatedDirectory,
    load_directory,
    parse_directory,
)
from vezaprovisioner.exchange.simulated.engine import SimulatedExchange

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "directory.json"
JDOE_GUID = "74417254-c745-4b6f-8906-c43a3a533ec1"
JDOE_DN = "CN=John Doe,CN=Users,DC=contoso,DC=com"
DC = "DC01.contoso.com"


def error_id_pattern(reason: str, task: str, site: str = "[0-9A-F]{8}") -> re.Pattern[str]:
    return re.compile(
        r"\[Server=EXSIM01,RequestId=[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12},"
        r"TimeStamp=\d{1,2}/\d{1,2}/\d{4} \d{1,2}:\d{2}:\d{2} [AP]M\] "
        rf"\[FailureCategory=Cmdlet-{reason}\] {site},"
        rf"Microsoft\.Exchange\.Management\.RecipientTasks\.{task}"
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def directory() -> SimulatedDirectory:
    return load_directory(EXAMPLE)


@pytest.fixture
def exchange(directory: SimulatedDirectory, clock: FakeClock) -> SimulatedExchange:
    return SimulatedExchange(directory, clock=clock)


def user(sam: str, name: str, **extra: Any) -> dict[str, Any]:
    """A plain User entry for hand-made directories."""
    entry: dict[str, Any] = {
        "sam_account_name": sam,
        "user_principal_name": f"{sam}@fabrikam.com",
        "name": name,
        "display_name": name,
        "distinguished_name": f"CN={name},CN=Users,DC=fabrikam,DC=com",
        "guid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sam:{sam}")),
        "recipient_type_details": "User",
    }
    entry.update(extra)
    return entry


def document(*users: dict[str, Any]) -> dict[str, Any]:
    return {
        "domain": "FABRIKAM",
        "upn_suffix": "fabrikam.com",
        "smtp_domain": "fabrikam.com",
        "users": list(users),
    }


def exchange_of(clock: FakeClock, *users: dict[str, Any], **options: Any) -> SimulatedExchange:
    return SimulatedExchange(parse_directory(document(*users)), clock=clock, **options)


# ---- the example directory -----------------------------------------------------------------


def test_example_directory_loads_and_implements_the_port(
    directory: SimulatedDirectory, exchange: SimulatedExchange
) -> None:
    port: ExchangePort = exchange
    assert directory.domain == "CONTOSO"
    assert directory.smtp_domain == "contoso.com"
    assert directory.domain_controller == DC
    assert len(directory.users) == 18
    assert port.probe() == "simulated Exchange EXSIM01: 17 users in CONTOSO"  # one lags
    states = {u.sam_account_name: u.recipient_type_details for u in directory.users}
    assert {
        "User",
        "DisabledUser",
        "UserMailbox",
        "MailUser",
        "RemoteUserMailbox",
        "SharedMailbox",
        "RoomMailbox",
    } <= set(states.values())
    assert {u.fault for u in directory.users} == {
        None,
        "timeout",
        "unavailable",
        "permission_denied",
        "exchange_error",
    }
    port.close()
    port.close()


def test_demo_user_is_a_plain_user(exchange: SimulatedExchange) -> None:
    assert exchange.get_user("CONTOSO\\jdoe") == DirectoryUser(
        guid=JDOE_GUID,
        distinguished_name=JDOE_DN,
        sam_account_name="jdoe",
        user_principal_name="jdoe@contoso.com",
        name="John Doe",
        display_name="Doe, John",
        recipient_type_details="User",
    )


def test_changes_are_never_written_to_the_file(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "directory.json"
    path.write_bytes(EXAMPLE.read_bytes())
    exchange = SimulatedExchange(load_directory(path), clock=clock)
    exchange.enable_mailbox(EnableMailbox("CONTOSO\\jdoe"))
    assert path.read_bytes() == EXAMPLE.read_bytes()
    fresh = SimulatedExchange(load_directory(path), clock=clock)
    assert fresh.get_user("jdoe").recipient_type_details == "User"


# ---- identity resolution -------------------------------------------------------------------


@pytest.mark.parametrize(
    "identity",
    [
        JDOE_GUID,
        JDOE_GUID.upper(),
        "{" + JDOE_GUID + "}",
        JDOE_GUID.replace("-", ""),
        JDOE_DN,
        JDOE_DN.lower(),
        "contoso.com/Users/John Doe",
        "jdoe@contoso.com",
        "JDOE@CONTOSO.COM",
        "CONTOSO\\jdoe",
        "contoso\\JDOE",
        "jdoe",
        "John Doe",
        "john doe",
        "Doe, John",
    ],
)
def test_resolves_every_identity_form(exchange: SimulatedExchange, identity: str) -> None:
    assert exchange.get_user(identity).guid == JDOE_GUID


@pytest.mark.parametrize(
    "identity", ["adelev", "ADELEV", "adelev@contoso.com", "Adele.Vance@contoso.com"]
)
def test_resolves_alias_and_proxy_addresses(exchange: SimulatedExchange, identity: str) -> None:
    recipient = exchange.get_recipient(identity)
    assert recipient == Recipient(
        guid="266cfd49-a26a-44ed-8e3e-83f28368ab75",
        distinguished_name="CN=Adele Vance,CN=Users,DC=contoso,DC=com",
        alias="adelev",
        primary_smtp_address="adelev@contoso.com",
        recipient_type_details="UserMailbox",
        database="DB02",
    )
    assert exchange.get_user(identity).recipient_type_details == "UserMailbox"


def test_ambiguous_identity(exchange: SimulatedExchange) -> None:
    with pytest.raises(AmbiguousIdentity) as caught:
        exchange.get_user("Alex Smith")
    error = caught.value
    assert error.message == (
        "The operation couldn't be performed because 'Alex Smith' matches multiple entries."
    )
    assert error.reason == "ManagementObjectAmbiguousException"
    assert error.exception_type == (
        "Microsoft.Exchange.Configuration.Tasks.ManagementObjectAmbiguousException"
    )
    assert error.error_id is not None
    assert error_id_pattern("ManagementObjectAmbiguousException", "GetUser").fullmatch(
        error.error_id
    )
    # Each of the two is reachable by a unique identity.
    assert exchange.get_user("CONTOSO\\asmith").distinguished_name.endswith(
        "CN=Users,DC=contoso,DC=com"
    )
    assert "OU=Sales" in exchange.get_user("alex.smith@contoso.com").distinguished_name


def test_ambiguous_enable_changes_nothing(exchange: SimulatedExchange) -> None:
    with pytest.raises(AmbiguousIdentity) as caught:
        exchange.enable_mailbox(EnableMailbox("Alex Smith"))
    assert caught.value.error_id is not None
    assert caught.value.error_id.endswith("RecipientTasks.EnableMailbox")
    assert exchange.get_user("asmith").recipient_type_details == "User"


def test_not_found(exchange: SimulatedExchange) -> None:
    with pytest.raises(IdentityNotFound) as caught:
        exchange.get_user("nobody@contoso.com")
    error = caught.value
    assert error.message == (
        "The operation couldn't be performed because object 'nobody@contoso.com' couldn't be "
        "found on 'DC01.contoso.com'."
    )
    assert error.reason == "ManagementObjectNotFoundException"
    assert error.exception_type == (
        "Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException"
    )
    assert error.error_id is not None
    assert error_id_pattern("ManagementObjectNotFoundException", "GetUser").fullmatch(
        error.error_id
    )
    assert error.from_exchange


def test_not_found_names_the_requested_domain_controller(exchange: SimulatedExchange) -> None:
    with pytest.raises(
        IdentityNotFound, match=re.escape("couldn't be found on 'DC02.contoso.com'")
    ):
        exchange.get_user("nobody", domain_controller="DC02.contoso.com")
    assert exchange.calls[-1] == (
        "Get-User",
        {"Identity": "nobody", "DomainController": "DC02.contoso.com"},
    )
    # The domain controller does not change resolution.
    assert exchange.get_user("jdoe", domain_controller="DC02.contoso.com").guid == JDOE_GUID


def test_get_recipient_does_not_see_users_without_mail_attributes(
    exchange: SimulatedExchange,
) -> None:
    with pytest.raises(IdentityNotFound) as caught:
        exchange.get_recipient("CONTOSO\\jdoe")
    assert caught.value.error_id is not None
    assert error_id_pattern("ManagementObjectNotFoundException", "GetRecipient").fullmatch(
        caught.value.error_id
    )
    # Get-User returns every kind of user, Get-Recipient every mail-enabled one.
    assert exchange.get_user("recruiting").recipient_type_details == "SharedMailbox"
    assert exchange.get_recipient("pattif").recipient_type_details == "MailUser"
    assert exchange.get_recipient("pattif").database is None
    assert exchange.get_recipient("lynner@contoso.mail.onmicrosoft.com").alias == "lynner"


def test_wildcards_and_empty_identity_behave_like_exchange(exchange: SimulatedExchange) -> None:
    assert exchange.get_user("John*").guid == JDOE_GUID
    with pytest.raises(AmbiguousIdentity):
        exchange.get_user("*Smith")
    with pytest.raises(AmbiguousIdentity):
        exchange.get_user("")  # an empty Identity returns every object
    with pytest.raises(UnexpectedExchangeError) as caught:
        exchange.enable_mailbox(EnableMailbox(""))
    assert caught.value.message == (
        "Cannot bind argument to parameter 'Identity' because it is an empty string."
    )
    assert caught.value.reason == "ParameterBindingValidationException"


# ---- replication lag -----------------------------------------------------------------------


def test_user_appears_after_replication_lag(exchange: SimulatedExchange, clock: FakeClock) -> None:
    with pytest.raises(IdentityNotFound):
        exchange.get_user("garchie")
    with pytest.raises(IdentityNotFound):
        exchange.enable_mailbox(EnableMailbox("17044f16-7876-490e-bdcc-7956194155a1"))
    clock.advance(19.5)
    with pytest.raises(IdentityNotFound):
        exchange.get_user("Grady Archie")
    clock.advance(0.5)
    assert exchange.get_user("garchie").name == "Grady Archie"
    assert exchange.enable_mailbox(EnableMailbox("garchie")).alias == "GradyArchie"
    assert exchange.probe() == "simulated Exchange EXSIM01: 18 users in CONTOSO"


def test_lag_counts_from_backend_creation(directory: SimulatedDirectory, clock: FakeClock) -> None:
    clock.advance(1000)
    exchange = SimulatedExchange(directory, clock=clock)
    with pytest.raises(IdentityNotFound):
        exchange.get_user("garchie")


# ---- faults --------------------------------------------------------------------------------


def test_timeout_fault(exchange: SimulatedExchange, clock: FakeClock) -> None:
    before = clock.monotonic()
    with pytest.raises(ExchangeTimeout) as caught:
        exchange.enable_mailbox(EnableMailbox("isayers"))
    assert "Enable-Mailbox" in caught.value.message
    assert "120 seconds" in caught.value.message
    assert not caught.value.from_exchange
    assert clock.monotonic() - before == pytest.approx(120.0)
    assert exchange.get_user("isayers").recipient_type_details == "User"


def test_timeout_fault_waits_only_what_is_left(
    directory: SimulatedDirectory, clock: FakeClock
) -> None:
    exchange = SimulatedExchange(
        directory, clock=clock, latency_ms=1000, enable_latency_ms=2000, command_timeout_seconds=10
    )
    before = clock.monotonic()
    with pytest.raises(ExchangeTimeout, match=r"Enable-RemoteMailbox.*10 seconds"):
        exchange.enable_remote_mailbox(EnableRemoteMailbox("isayers"))
    assert clock.monotonic() - before == pytest.approx(10.0)


def test_unavailable_fault(exchange: SimulatedExchange) -> None:
    with pytest.raises(BackendUnavailable) as caught:
        exchange.enable_mailbox(EnableMailbox("hmueller"))
    assert caught.value.retry_after_seconds == 5
    assert not caught.value.from_exchange
    with pytest.raises(BackendUnavailable):
        exchange.enable_remote_mailbox(EnableRemoteMailbox("hmueller"))
    assert exchange.get_user("hmueller").recipient_type_details == "User"


def test_permission_denied_fault(exchange: SimulatedExchange) -> None:
    with pytest.raises(PermissionDenied) as caught:
        exchange.enable_mailbox(EnableMailbox("ilanger"))
    error = caught.value
    assert error.message == (
        "Active Directory operation failed on DC01.contoso.com. This error is not retriable. "
        "Additional information: Insufficient access rights to perform the operation. "
        "Active directory response: 00002098: SecErr: DSID-03150BB9, problem 4003 "
        "(INSUFF_ACCESS_RIGHTS), data 0"
    )
    assert error.reason == "ADOperationException"
    assert error.exception_type == "Microsoft.Exchange.Data.Directory.ADOperationException"
    assert error.error_id is not None
    assert error_id_pattern("ADOperationException", "EnableMailbox").fullmatch(error.error_id)
    with pytest.raises(PermissionDenied, match=r"failed on DC07\.contoso\.com"):
        exchange.enable_remote_mailbox(
            EnableRemoteMailbox("ilanger", domain_controller="DC07.contoso.com")
        )
    assert exchange.get_user("ilanger").recipient_type_details == "User"


def test_exchange_error_fault(exchange: SimulatedExchange) -> None:
    with pytest.raises(UnexpectedExchangeError) as caught:
        exchange.enable_mailbox(EnableMailbox("jlorenz"))
    error = caught.value
    assert error.message == (
        "Active Directory operation failed on DC01.contoso.com. "
        "The server is unwilling to process the request."
    )
    assert error.reason == "ADOperationException"
    assert error.error_id is not None
    assert error_id_pattern("ADOperationException", "EnableMailbox").fullmatch(error.error_id)
    assert exchange.get_user("jlorenz").recipient_type_details == "User"


def test_faults_do_not_affect_reads(exchange: SimulatedExchange) -> None:
    for sam in ("isayers", "hmueller", "ilanger", "jlorenz"):
        assert exchange.get_user(sam).recipient_type_details == "User"


# ---- Enable-Mailbox ------------------------------------------------------------------------


def test_enable_mailbox_with_alias(exchange: SimulatedExchange) -> None:
    created = exchange.enable_mailbox(
        EnableMailbox("CONTOSO\\jdoe", alias="john.doe", database="DB03")
    )
    assert created == Recipient(
        guid=JDOE_GUID,
        distinguished_name=JDOE_DN,
        alias="john.doe",
        primary_smtp_address="john.doe@contoso.com",
        recipient_type_details="UserMailbox",
        database="DB03",
    )
    assert exchange.get_recipient("jdoe") == created
    assert exchange.get_recipient("john.doe@contoso.com") == created
    assert exchange.get_user(JDOE_GUID).recipient_type_details == "UserMailbox"


def test_enable_mailbox_twice_is_wrong_type(exchange: SimulatedExchange) -> None:
    exchange.enable_mailbox(EnableMailbox("jdoe"))
    with pytest.raises(WrongRecipientType) as caught:
        exchange.enable_mailbox(EnableMailbox("jdoe"))
    assert caught.value.recipient_type == "UserMailbox"
    assert "contoso.com/Users/John Doe is of type UserMailbox" in caught.value.message


def test_derived_alias_keeps_latin1_and_maps_the_address(exchange: SimulatedExchange) -> None:
    created = exchange.enable_mailbox(EnableMailbox("jalvarez"))
    assert created.alias == "JoséÁlvarez"
    assert created.primary_smtp_address == "JoseAlvarez@contoso.com"
    assert created.database == "DB01"


@pytest.mark.parametrize(
    ("identity", "alias"),
    [("lnowak", "?ukaszNowak"), ("tyamada", "????"), ("nwilke", "NestorWilke")],
)
def test_derived_alias_question_marks(
    exchange: SimulatedExchange, identity: str, alias: str
) -> None:
    created = exchange.enable_mailbox(EnableMailbox(identity))
    assert created.alias == alias
    assert created.primary_smtp_address == f"{alias}@contoso.com"


def test_derived_alias_is_made_unique(exchange: SimulatedExchange) -> None:
    assert exchange.enable_mailbox(EnableMailbox("asmith")).alias == "AlexSmith"
    second = exchange.enable_mailbox(EnableMailbox("alex.smith@contoso.com"))
    assert second.alias == "AlexSmith1"
    assert second.primary_smtp_address == "AlexSmith1@contoso.com"


def test_unique_suffix_counts_up_and_respects_the_length_limit(clock: FakeClock) -> None:
    long_name = "A" * 70
    exchange = exchange_of(
        clock,
        *(
            user(f"yt{i}", "山田太郎", distinguished_name=f"CN=山田太郎,OU=T{i},DC=fabrikam,DC=com")
            for i in range(12)
        ),
        user("long1", long_name, distinguished_name=f"CN={long_name},OU=A,DC=fabrikam,DC=com"),
        user("long2", long_name, distinguished_name=f"CN={long_name},OU=B,DC=fabrikam,DC=com"),
    )
    aliases = [exchange.enable_mailbox(EnableMailbox(f"yt{i}")).alias for i in range(12)]
    assert aliases == ["????", *(f"????{n}" for n in range(1, 12))]
    assert exchange.enable_mailbox(EnableMailbox("long1")).alias == "A" * 64
    assert exchange.enable_mailbox(EnableMailbox("long2")).alias == "A" * 63 + "1"


@pytest.mark.parametrize(
    ("name", "alias", "address"),
    [
        ("Jörg Größ", "JörgGröß", "JoergGroess"),
        ("Ümit Äker", "ÜmitÄker", "UemitAeker"),
        ("Søren Ærø", "SørenÆrø", "SorenAEro"),
        ("Ōtomo Ŀuis", "OtomoL·uis", "OtomoLuis"),  # best-fit letters outside Windows-1252
        ("Šárka Nováková", "?árkaNováková", "?arkaNovakova"),  # Š is cp1252 but not an alias char
        ("J. R. Smith", "J.R.Smith", "J.R.Smith"),
        (".NET Team", "?NETTeam", "?NETTeam"),
        ("Smith Jr.", "SmithJr?", "SmithJr?"),
        ("O'Brien (Sales)", "O'Brien?Sales?", "O'Brien?Sales?"),
        ("A..B", "A.?B", "A.?B"),
        ("x.", "x?", "x?"),
    ],
)
def test_alias_derivation_follows_exchange(
    clock: FakeClock, name: str, alias: str, address: str
) -> None:
    exchange = exchange_of(clock, user("someone", name))
    created = exchange.enable_mailbox(EnableMailbox("someone"))
    assert created.alias == alias
    assert created.primary_smtp_address == f"{address}@fabrikam.com"


@pytest.mark.parametrize("alias", ["John Doe", ".jdoe", "jdoe.", "a..b", "j@doe", "山田", "x" * 65])
def test_invalid_explicit_alias_is_refused(exchange: SimulatedExchange, alias: str) -> None:
    with pytest.raises(UnexpectedExchangeError) as caught:
        exchange.enable_mailbox(EnableMailbox("jdoe", alias=alias))
    assert caught.value.reason == "DataValidationException"
    assert caught.value.error_id is not None
    assert caught.value.error_id.endswith("RecipientTasks.EnableMailbox")
    assert exchange.get_user("jdoe").recipient_type_details == "User"


def test_explicit_alias_is_not_made_unique_but_its_address_must_be(
    exchange: SimulatedExchange,
) -> None:
    with pytest.raises(
        AddressInUse, match=r'"SMTP:adelev@contoso\.com".*"contoso\.com/Users/Adele'
    ):
        exchange.enable_mailbox(EnableMailbox("jdoe", alias="adelev"))
    created = exchange.enable_mailbox(EnableMailbox("jdoe", alias="ADELE.V"))
    assert created.primary_smtp_address == "ADELE.V@contoso.com"


def test_address_in_use_changes_nothing(exchange: SimulatedExchange) -> None:
    with pytest.raises(AddressInUse) as caught:
        exchange.enable_mailbox(EnableMailbox("mbowen"))
    error = caught.value
    assert error.message == (
        'The proxy address "SMTP:MeganBowen@contoso.com" is already being used by the proxy '
        'addresses or LegacyExchangeDN of "contoso.com/Users/Recruiting". Please choose another '
        "proxy address."
    )
    assert error.reason == "ProxyAddressExistsException"
    assert error.exception_type == (
        "Microsoft.Exchange.Configuration.ObjectModel.ProxyAddressExistsException"
    )
    assert error.error_id is not None
    assert error_id_pattern("ProxyAddressExistsException", "EnableMailbox").fullmatch(
        error.error_id
    )
    assert exchange.get_user("mbowen").recipient_type_details == "User"
    with pytest.raises(IdentityNotFound):
        exchange.get_recipient("mbowen")
    assert exchange.get_recipient("MeganBowen@contoso.com").alias == "recruiting"
    # A different alias works; the failed attempt left nothing behind.
    assert exchange.enable_mailbox(EnableMailbox("mbowen", alias="mbowen")).alias == "mbowen"


@pytest.mark.parametrize(
    ("identity", "canonical", "kind"),
    [
        ("recruiting", "contoso.com/Users/Recruiting", "SharedMailbox"),
        ("ConfRoomAdams", "contoso.com/Users/Conf Room Adams", "RoomMailbox"),
        ("lynner", "contoso.com/Users/Lynne Robbins", "RemoteUserMailbox"),
        ("adelev", "contoso.com/Users/Adele Vance", "UserMailbox"),
    ],
)
def test_enable_mailbox_refuses_other_types(
    exchange: SimulatedExchange, identity: str, canonical: str, kind: str
) -> None:
    with pytest.raises(WrongRecipientType) as caught:
        exchange.enable_mailbox(EnableMailbox(identity))
    error = caught.value
    assert error.message == (
        "This task does not support recipients of this type. The specified recipient "
        f"{canonical} is of type {kind}. Please make sure that this recipient matches the "
        "required recipient type for this task."
    )
    assert error.recipient_type == kind
    assert error.reason == "RecipientTaskException"
    assert error.exception_type == "Microsoft.Exchange.Management.Tasks.RecipientTaskException"
    assert error.error_id is not None
    assert error_id_pattern("RecipientTaskException", "EnableMailbox", "3CD6CA39").fullmatch(
        error.error_id
    )
    assert exchange.get_user(identity).recipient_type_details == kind


def test_enable_mailbox_converts_a_mail_user_keeping_its_alias(
    exchange: SimulatedExchange,
) -> None:
    created = exchange.enable_mailbox(EnableMailbox("Patti Fernandez"))
    assert created == Recipient(
        guid="d4a8689d-75c7-4dd7-bcf3-b8eec13c1241",
        distinguished_name="CN=Patti Fernandez,CN=Users,DC=contoso,DC=com",
        alias="pattif",
        primary_smtp_address="pattif@contoso.com",
        recipient_type_details="UserMailbox",
        database="DB01",
    )


def test_disabled_user_gets_a_mailbox(exchange: SimulatedExchange) -> None:
    created = exchange.enable_mailbox(EnableMailbox("nwilke", database="DB02"))
    assert (created.recipient_type_details, created.database) == ("UserMailbox", "DB02")


# ---- Enable-RemoteMailbox ------------------------------------------------------------------


def test_enable_remote_mailbox(exchange: SimulatedExchange) -> None:
    created = exchange.enable_remote_mailbox(
        EnableRemoteMailbox(
            "jdoe@contoso.com", remote_routing_address="jdoe@contoso.mail.onmicrosoft.com"
        )
    )
    assert created == Recipient(
        guid=JDOE_GUID,
        distinguished_name=JDOE_DN,
        alias="JohnDoe",
        primary_smtp_address="JohnDoe@contoso.com",
        recipient_type_details="RemoteUserMailbox",
        database=None,
    )
    assert exchange.calls[-1] == (
        "Enable-RemoteMailbox",
        {
            "Identity": "jdoe@contoso.com",
            "RemoteRoutingAddress": "jdoe@contoso.mail.onmicrosoft.com",
        },
    )
    with pytest.raises(WrongRecipientType) as caught:
        exchange.enable_remote_mailbox(EnableRemoteMailbox("jdoe"))
    assert caught.value.recipient_type == "RemoteUserMailbox"
    assert caught.value.error_id is not None
    assert error_id_pattern("RecipientTaskException", "EnableRemoteMailbox", "2882FF3D").fullmatch(
        caught.value.error_id
    )
    with pytest.raises(WrongRecipientType, match="is of type RemoteUserMailbox"):
        exchange.enable_mailbox(EnableMailbox("jdoe"))


def test_enable_remote_mailbox_refuses_mail_users(exchange: SimulatedExchange) -> None:
    with pytest.raises(WrongRecipientType, match="Patti Fernandez is of type MailUser"):
        exchange.enable_remote_mailbox(EnableRemoteMailbox("pattif"))


def test_remote_routing_address_must_be_free(exchange: SimulatedExchange) -> None:
    with pytest.raises(AddressInUse, match=re.escape('"smtp:lynner@contoso.mail.onmicrosoft.com"')):
        exchange.enable_remote_mailbox(
            EnableRemoteMailbox(
                "jdoe", alias="jd", remote_routing_address="lynner@contoso.mail.onmicrosoft.com"
            )
        )
    assert exchange.get_user("jdoe").recipient_type_details == "User"


# ---- latency, timeouts, recording ----------------------------------------------------------


def test_latency_is_slept_on_the_clock(directory: SimulatedDirectory, clock: FakeClock) -> None:
    exchange = SimulatedExchange(directory, clock=clock, latency_ms=200, enable_latency_ms=1500)
    exchange.get_user("jdoe")
    exchange.get_recipient("adelev")
    exchange.enable_mailbox(EnableMailbox("jdoe"))
    exchange.probe()
    assert clock.sleeps == pytest.approx([0.2, 0.2, 1.7, 0.2])


def test_slow_command_times_out(directory: SimulatedDirectory, clock: FakeClock) -> None:
    exchange = SimulatedExchange(
        directory, clock=clock, latency_ms=500, enable_latency_ms=5000, command_timeout_seconds=3
    )
    assert exchange.get_user("jdoe").guid == JDOE_GUID
    before = clock.monotonic()
    with pytest.raises(ExchangeTimeout, match=r"Enable-Mailbox.*3 seconds"):
        exchange.enable_mailbox(EnableMailbox("jdoe"))
    assert clock.monotonic() - before == pytest.approx(3.0)
    assert exchange.get_user("jdoe").recipient_type_details == "User"
    slow_reads = SimulatedExchange(
        directory, clock=clock, latency_ms=5000, command_timeout_seconds=3
    )
    with pytest.raises(ExchangeTimeout, match="Get-User"):
        slow_reads.get_user("jdoe")
    with pytest.raises(ExchangeTimeout, match="Get-ExchangeServer"):
        slow_reads.probe()


def test_calls_are_recorded(exchange: SimulatedExchange) -> None:
    exchange.get_user("CONTOSO\\jdoe")
    with pytest.raises(IdentityNotFound):
        exchange.get_recipient("CONTOSO\\jdoe", domain_controller=DC)
    exchange.enable_mailbox(
        EnableMailbox(
            JDOE_GUID,
            alias="jdoe",
            database="DB02",
            address_book_policy="ABP Contoso",
            retention_policy="Default MRM Policy",
            domain_controller=DC,
        )
    )
    exchange.enable_mailbox(EnableMailbox("nwilke", alias="", database=None))
    assert exchange.calls == [
        ("Get-User", {"Identity": "CONTOSO\\jdoe"}),
        ("Get-Recipient", {"Identity": "CONTOSO\\jdoe", "DomainController": DC}),
        (
            "Enable-Mailbox",
            {
                "Identity": JDOE_GUID,
                "Alias": "jdoe",
                "Database": "DB02",
                "AddressBookPolicy": "ABP Contoso",
                "RetentionPolicy": "Default MRM Policy",
                "DomainController": DC,
            },
        ),
        ("Enable-Mailbox", {"Identity": "nwilke"}),
    ]
    assert exchange.count("Enable-Mailbox") == 2
    assert exchange.count("Get-User") == 1
    assert exchange.count("Enable-RemoteMailbox") == 0


def test_concurrent_enables_create_one_mailbox(directory: SimulatedDirectory) -> None:
    exchange = SimulatedExchange(directory, clock=FakeClock())
    barrier = threading.Barrier(8)
    outcomes: list[object] = []
    lock = threading.Lock()

    def enable() -> None:
        barrier.wait()
        try:
            result: object = exchange.enable_mailbox(EnableMailbox("jdoe"))
        except ExchangeError as exc:
            result = exc
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=enable) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(o, Recipient) for o in outcomes) == 1
    assert sum(isinstance(o, WrongRecipientType) for o in outcomes) == 7
    assert exchange.count("Enable-Mailbox") == 8


# ---- directory file errors -----------------------------------------------------------------


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "dir.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(DirectoryError, match=r"nope\.json: the directory file does not exist"):
        load_directory(path)


def test_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "dir.json"
    path.write_text('{"domain": "CONTOSO",\n  "users": [}', encoding="utf-8")
    with pytest.raises(DirectoryError, match=r"dir\.json: not valid JSON at line 2 column"):
        load_directory(path)


def test_duplicate_json_key(tmp_path: Path) -> None:
    path = tmp_path / "dir.json"
    path.write_text('{"domain": "A", "domain": "B"}', encoding="utf-8")
    with pytest.raises(DirectoryError, match="'domain' appears twice"):
        load_directory(path)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(forest="x"), r"top level: unknown key 'forest'"),
        (lambda d: d.pop("smtp_domain"), r"top level: the required key 'smtp_domain' is missing"),
        (lambda d: d["users"][1].update(mail="x"), r"users\[1\]: unknown key 'mail'"),
        (lambda d: d["users"][0].pop("guid"), r"users\[0\]: the required key 'guid' is missing"),
        (
            lambda d: d["users"][1].update(guid="not-a-guid"),
            r"users\[1\]\.guid: 'not-a-guid' is not a GUID",
        ),
        (
            lambda d: d["users"][1].update(guid=d["users"][0]["guid"].upper()),
            r"users\[1\]\.guid: GUID '[0-9a-f-]+' is already used by users\[0\]",
        ),
        (
            lambda d: d["users"][1].update(sam_account_name="JDOE"),
            r"users\[1\]\.sam_account_name: .* already used by users\[0\]",
        ),
        (lambda d: d["users"][0].update(name=3), r"users\[0\]\.name: expected a non-empty string"),
        (
            lambda d: d["users"][0].update(name="Johnny Doe"),
            r"users\[0\]\.distinguished_name: the CN 'John Doe' differs from name",
        ),
        (
            lambda d: d["users"][0].update(recipient_type_details="Mailbox"),
            r"users\[0\]\.recipient_type_details: 'Mailbox' is not a RecipientTypeDetails",
        ),
        (
            lambda d: d["users"][0].update(fault="crash"),
            r'users\[0\]\.fault: "crash" is not a fault',
        ),
        (
            lambda d: d["users"][0].update(appears_after_seconds=-1),
            r"users\[0\]\.appears_after_seconds: expected a number of seconds >= 0",
        ),
        (lambda d: d["users"][0].update(alias="jdoe"), r"users\[0\]\.alias: a User has no mail"),
        (
            lambda d: d["users"][5].pop("alias"),
            r"users\[5\]\.alias: a UserMailbox always has an alias",
        ),
        (
            lambda d: d["users"][5].update(email_addresses=["smtp:x@contoso.com"]),
            r"users\[5\]\.email_addresses: a UserMailbox needs a primary address",
        ),
        (
            lambda d: d["users"][6].update(email_addresses=["SMTP:adelev@contoso.com"]),
            r"users\[6\]\.email_addresses: proxy address 'smtp:adelev@contoso.com' is already "
            r"used by users\[5\]",
        ),
        (lambda d: d.update(users={}), r"users: expected a JSON array"),
    ],
)
def test_invalid_directory(tmp_path: Path, mutate: Any, expected: str) -> None:
    data = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(DirectoryError, match=rf"^{re.escape(str(path))}: {expected}"):
        load_directory(path)


def test_directory_defaults(clock: FakeClock) -> None:
    directory = parse_directory(
        document(
            user("ann", "Ann Lee"),
            user(
                "shared",
                "Shared",
                recipient_type_details="SharedMailbox",
                alias="shared",
                primary_smtp_address="shared@fabrikam.com",
            ),
        )
    )
    assert directory.domain_controller == "DC01.fabrikam.com"
    shared = directory.users[1]
    assert shared.email_addresses == ("SMTP:shared@fabrikam.com",)
    assert shared.database == "DB01"
    assert shared.appears_after_seconds == 0.0
    assert shared.fault is None
    exchange = SimulatedExchange(directory, clock=clock)
    assert exchange.get_recipient("shared@fabrikam.com").database == "DB01"


def test_index_follows_changes_made_by_enable(exchange: SimulatedExchange) -> None:
    created = exchange.enable_mailbox(EnableMailbox(identity=JDOE_GUID, alias="Johnny.D"))
    for identity in ("johnny.d", "JOHNNY.D@contoso.com", JDOE_GUID.upper(), "CONTOSO\\jdoe"):
        assert exchange.get_user(identity).guid == created.guid
    assert exchange.get_recipient("johnny.d@contoso.com").alias == "Johnny.D"


def test_every_name_of_every_user_resolves_to_that_user(exchange: SimulatedExchange) -> None:
    for user in exchange.directory.users:
        names = [
            user.guid,
            "{" + user.guid.upper() + "}",
            user.distinguished_name.upper(),
            user.user_principal_name,
            f"contoso\\{user.sam_account_name}",
            user.sam_account_name.upper(),
        ]
        for name in names:
            if user.appears_after_seconds == 0:
                assert exchange.get_user(name).guid == user.guid, name


def test_call_history_stays_bounded_while_count_counts_every_cmdlet(
    exchange: SimulatedExchange, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A demo server runs for weeks: `calls` keeps only the most recent cmdlets."""
    monkeypatch.setattr("vezaprovisioner.exchange.simulated.engine.CALLS_KEPT", 5)
    for _ in range(23):
        exchange.get_user("jdoe")
    assert 5 <= len(exchange.calls) < 10
    assert exchange.calls[-1] == ("Get-User", {"Identity": "jdoe"})
    assert exchange.count("Get-User") == 23
    assert exchange.count("Enable-Mailbox") == 0


# Exchange's mappings go character by character; the common all-ASCII case takes a shortcut.
# Appending a character that the per-character path maps to nothing (a combining accent) or to
# a known letter forces that path, so these fail if the shortcut ever answers differently.
_NAMES = st.text(
    alphabet=st.one_of(
        st.sampled_from("a.Z9-~ "),
        st.characters(max_codepoint=0x7F),
        st.characters(max_codepoint=0x2FF),
    ),
    max_size=40,
)


@given(_NAMES)
def test_windows_1252_shortcut_agrees_with_the_per_character_mapping(text: str) -> None:
    assert naming._to_windows_1252(text) + "A" == naming._to_windows_1252(text + "\u0100")
    assert naming._to_windows_1252(text) == "".join(naming._to_windows_1252(c) for c in text)


@given(st.one_of(_NAMES, st.text(alphabet="ab.Z9-~'\u00e4", max_size=12)))
def test_smtp_local_part_shortcut_agrees_with_the_per_character_mapping(alias: str) -> None:
    assert naming.smtp_local_part(alias) == naming.smtp_local_part(alias + "\u0301")

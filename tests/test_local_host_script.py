"""host.ps1 as text: ASCII, the same allow-list as the service, no way to run text as code.

No PowerShell runs here. test_powershell_scripts.py parses the script with tree-sitter; these
tests keep the script and the Python side of the protocol from drifting apart.
"""

from __future__ import annotations

import re

from vezaprovisioner.exchange.local.backend import HOST_SCRIPT, HOST_SWITCHES, host_argv
from vezaprovisioner.exchange.local.protocol import ALLOWED_CMDLETS, FLATTENED_PROPERTIES

SOURCE = HOST_SCRIPT.read_text(encoding="ascii")  # fails if the file is not ASCII


def _ps_list(text: str) -> list[str]:
    return re.findall(r"'([^']*)'", text)


def test_host_allow_list_matches_the_service() -> None:
    block = re.search(r"\$Allowed = @\{(?P<body>.*?)\n\}", SOURCE, re.DOTALL)
    assert block is not None
    table = {
        match.group("cmdlet"): frozenset(_ps_list(match.group("params")))
        for match in re.finditer(
            r"'(?P<cmdlet>[A-Za-z-]+)'\s*=\s*@\((?P<params>[^)]*)\)", block.group("body")
        )
    }
    assert table == dict(ALLOWED_CMDLETS)


def test_host_flattens_the_properties_the_service_reads() -> None:
    line = re.search(r"^\$Properties = @\((?P<items>[^)]*)\)", SOURCE, re.MULTILINE)
    assert line is not None
    assert tuple(_ps_list(line.group("items"))) == FLATTENED_PROPERTIES


def test_cmdlets_are_invoked_only_by_allow_listed_name_with_splatting() -> None:
    assert re.findall(r"&\s*\$\w+[^\n]*", SOURCE) == ["& $cmdlet @params -ErrorAction Stop)"]
    for banned in (r"\[scriptblock\]::Create", "NewScriptBlock", "Invoke-Command", "AddScript"):
        assert banned.lower() not in SOURCE.lower()


def test_host_never_prompts_and_silences_noise() -> None:
    for preference in ("Progress", "Verbose", "Warning", "Information"):
        assert f"${preference}Preference = 'SilentlyContinue'" in SOURCE
    assert "$ConfirmPreference = 'None'" in SOURCE
    assert "Read-Host" not in SOURCE
    assert "Connect-ExchangeServer -auto -ClientApplication:ManagementShell *> $null" in SOURCE
    assert "Get-Command -Name 'Enable-Mailbox'" in SOURCE


def test_command_line_is_constant() -> None:
    argv = host_argv(r"C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe")
    assert argv[1:] == [*HOST_SWITCHES, str(HOST_SCRIPT)]
    assert HOST_SWITCHES == (
        "-NoLogo",
        "-NoProfile",
        "-NonInteractive",
        "-ExecutionPolicy",
        "Bypass",
        "-File",
    )

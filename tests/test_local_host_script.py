"""host.ps1 as text: ASCII, the same allow-list as the service, no way to run text as code,
and the PowerShell rules no fake can exercise (strict mode, scopes, step order), checked on the
tree-sitter parse.

No PowerShell runs here. test_powershell_scripts.py parses every script with tree-sitter; these
tests keep the script and the Python side of the protocol from drifting apart.
"""

from __future__ import annotations

import re

import pytest
import tree_sitter

from tests.test_powershell_scripts import (
    _PARSER,
    _command_name,
    _is_invocation,
    _nodes,
    _text,
    command_line_problems,
)
from vezaprovisioner.exchange.local.backend import HOST_SCRIPT, HOST_SWITCHES, host_argv
from vezaprovisioner.exchange.local.protocol import (
    ALLOWED_CMDLETS,
    FLATTENED_PROPERTIES,
    STARTUP_ERROR_KINDS,
)

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
    assert "Connect-ExchangeServer -auto -ClientApplication:ManagementShell *>&1" in SOURCE
    assert "$Required = @('Get-User', 'Get-Recipient', 'Enable-Mailbox')" in SOURCE


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


# --- PowerShell rules no fake can run: checked on the parse tree ------------------------------

#: Commands that run Exchange code: its connect function and the cmdlets it imports.
_EXCHANGE_COMMANDS = {"connect-exchangeserver", *(name.lower() for name in ALLOWED_CMDLETS)}


def _function_of(node: tree_sitter.Node) -> tree_sitter.Node | None:
    parent = node.parent
    while parent is not None:
        if parent.type == "function_statement":
            return parent
        parent = parent.parent
    return None


def _function_name(function: tree_sitter.Node) -> str:
    return _text(next(c for c in function.children if c.type == "function_name")).lower()


def _runs_exchange_code(command: tree_sitter.Node) -> bool:
    """A call of Exchange's commands, or `&`/`.` on a name held in a variable (the allow-listed
    cmdlet of a request, RemoteExchange.ps1's path)."""
    return _command_name(command).lower() in _EXCHANGE_COMMANDS or _is_invocation(command)


def strict_mode_problems(source: bytes) -> list[str]:
    """Where Exchange code could run under strict mode; [] when it never can.

    Strict mode applies to the scope that sets it and every child scope, and Exchange's
    scripts are not strict-clean (Connect-ExchangeServer reads an unset $credential). So: no
    Set-StrictMode in script scope except -Off, and no function that sets it runs Exchange code,
    directly or through the script's other functions.
    """
    root = _PARSER.parse(source).root_node
    problems = []
    strict: set[str] = set()
    calls: dict[str, set[str]] = {}
    exchange: dict[str, list[str]] = {}
    for declared in _nodes(root, "function_statement"):
        calls[_function_name(declared)] = set()
        exchange[_function_name(declared)] = []
    for command in _nodes(root, "command"):
        name = _command_name(command).lower()
        enclosing = _function_of(command)
        owner = _function_name(enclosing) if enclosing is not None else None
        line = command.start_point[0] + 1
        if name == "set-strictmode":
            if owner is None and "-off" not in _text(command).lower():
                problems.append(f"line {line}: script-scope {_text(command)}")
            elif owner is not None and "-version" in _text(command).lower():
                strict.add(owner)
        if owner is None:
            continue
        if _runs_exchange_code(command):
            exchange[owner].append(f"line {line}: {_text(command)}")
        elif name in calls:
            calls[owner].add(name)
    for function in sorted(strict):
        seen, pending = {function}, [function]
        while pending:
            current = pending.pop()
            for found in exchange[current]:
                via = "" if current == function else f" (through {current})"
                problems.append(f"{function} sets strict mode and runs Exchange code{via}: {found}")
            for callee in calls[current] - seen:
                seen.add(callee)
                pending.append(callee)
    return problems


@pytest.mark.parametrize(
    "bad",
    [
        b"Set-StrictMode -Version 2.0\nConnect-ExchangeServer -auto\n",
        b"Set-StrictMode -Version Latest\n",
        b"& { Set-StrictMode -Version 1.0; Connect-ExchangeServer -auto }\n",
        b"function Run {\n    param($c)\n    Set-StrictMode -Version 2.0\n    & $c @p\n}\n",
        b"function Run {\n    Set-StrictMode -Version 2.0\n    Enable-Mailbox -Identity $i\n}\n",
        b"function Inner {\n    Connect-ExchangeServer -auto\n}\n"
        b"function Outer {\n    Set-StrictMode -Version 2.0\n    Inner\n}\n",
        b"function Load {\n    Set-StrictMode -Version 2.0\n    . $path\n}\n",
    ],
)
def test_the_strict_mode_check_catches(bad: bytes) -> None:
    assert strict_mode_problems(bad) != []


def test_the_strict_mode_check_allows_strict_helpers_beside_exchange_calls() -> None:
    good = b"""Set-StrictMode -Off
function Format-It {
    param($x)
    Set-StrictMode -Version 2.0
    return [string]$x
}
function Run {
    param($c)
    $out = & $c @p -ErrorAction Stop
    Format-It $out
}
. $path *>&1
Connect-ExchangeServer -auto
"""
    assert strict_mode_problems(good) == []


def test_exchange_code_never_runs_under_strict_mode() -> None:
    assert strict_mode_problems(SOURCE.encode("ascii")) == []
    root = _PARSER.parse(SOURCE.encode("ascii")).root_node
    functions = {_function_name(f): _text(f) for f in _nodes(root, "function_statement")}
    # Not vacuous: helpers are strict, and the one function that runs cmdlets is not.
    strict = {name for name, text in functions.items() if "Set-StrictMode -Version" in text}
    assert {"convertto-asciijson", "convertto-flat", "read-request"} <= strict
    assert "invoke-exchangecmdlet" in functions
    assert "invoke-exchangecmdlet" not in strict


def _statement_index(needle: str) -> int:
    index = SOURCE.find(needle)
    assert index >= 0, needle
    return index


def test_dot_source_and_connect_are_separate_steps_checked_by_their_effect() -> None:
    root = _PARSER.parse(SOURCE.encode("ascii")).root_node
    tries = [_text(node) for node in _nodes(root, "try_statement")]
    dot_source = [t for t in tries if ". $remoteExchange" in t]
    connect = [t for t in tries if "Connect-ExchangeServer -auto" in t]
    assert len(dot_source) == len(connect) == 1
    assert "Connect-ExchangeServer -auto" not in dot_source[0]
    assert ". $remoteExchange" not in connect[0]
    order = [
        ". $remoteExchange *>&1",
        "Get-Command -Name 'Connect-ExchangeServer' -CommandType Function",
        "$lock = Enter-ConnectLock $lockWaitMs",
        "Send-Message @{ type = 'connecting' }",
        "Connect-ExchangeServer -auto -ClientApplication:ManagementShell *>&1",
        "Exit-ConnectLock $lock",  # in the connect's finally: released after the import
        "$_.ConfigurationName -eq 'Microsoft.Exchange' -and $_.State -eq 'Opened'",
        "Get-Command -Name $name -ErrorAction SilentlyContinue",
        "Send-StartupError 'module_import'",
        "Send-StartupError 'rbac'",
        "Send-Message @{ type = 'ready'",
    ]
    positions = [_statement_index(needle) for needle in order]
    assert positions == sorted(positions)
    assert "finally" in connect[0]
    assert "Exit-ConnectLock $lock" in connect[0].split("finally", 1)[1]
    # Errors pass as in the shell while Exchange's code runs; success is judged by effect.
    for block in (dot_source[0], connect[0]):
        start = SOURCE.index(block)
        assert SOURCE.rfind("$ErrorActionPreference = 'Continue'", 0, start) > SOURCE.rfind(
            "$ErrorActionPreference = 'Stop'", 0, start
        )


def test_every_startup_error_kind_is_one_the_service_knows() -> None:
    sent = set(re.findall(r"Send-StartupError '([a-z_]+)'", SOURCE))
    assert sent == set(STARTUP_ERROR_KINDS)


def test_the_transcript_is_started_only_from_the_hello() -> None:
    assert re.findall(r"^\$transcriptPath = .*$", SOURCE, re.MULTILINE) == [
        "$transcriptPath = [string]$hello.transcript"
    ]
    assert SOURCE.count("Start-Transcript") == 1
    assert command_line_problems(SOURCE.encode("ascii")) == []


def test_the_connect_mutex_is_per_account_and_bounded() -> None:
    assert "$LockPrefix = 'Global\\VezaProvisioner-Connect'" in SOURCE
    assert "GetCurrent().User.Value" in SOURCE  # the account's SID completes the name
    assert "$mutex.WaitOne($TimeoutMs)" in SOURCE
    assert "[System.Threading.AbandonedMutexException]" in SOURCE

"""Every PowerShell script in the repository parses, and none evaluates text as code.

No machine here runs PowerShell, so a parser (tree-sitter-powershell) is the first line of
defence against a script that would fail on the server before doing anything.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tree_sitter
import tree_sitter_powershell

REPO_ROOT = Path(__file__).resolve().parents[1]
_SKIPPED_DIRS = {"build", "dist", "node_modules"}
_PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
_EVALUATES_TEXT = re.compile(r"\b(Invoke-Expression|iex)\b", re.IGNORECASE)


def repository_scripts() -> list[Path]:
    return sorted(
        path
        for path in REPO_ROOT.rglob("*.ps1")
        if not any(part.startswith(".") or part in _SKIPPED_DIRS for part in path.parts)
    )


def syntax_errors(source: bytes) -> list[str]:
    """The positions of ERROR and MISSING nodes, empty when the script parses cleanly."""
    found: list[str] = []
    stack = [_PARSER.parse(source).root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            row, column = node.start_point
            found.append(f"line {row + 1}, column {column + 1}: {node.type}")
        stack.extend(node.children)
    return found


def test_the_check_catches_broken_scripts() -> None:
    assert syntax_errors(b"$params = @{ Identity = $id }\nEnable-Mailbox @params\n") == []
    assert syntax_errors(b"if ($true) { Write-Output 1\n") != []


@pytest.mark.parametrize(
    "script", repository_scripts(), ids=lambda p: str(p.relative_to(REPO_ROOT))
)
def test_script_parses_and_never_evaluates_text(script: Path) -> None:
    source = script.read_bytes()
    assert syntax_errors(source) == []
    assert not _EVALUATES_TEXT.search(source.decode("utf-8-sig")), "Invoke-Expression is banned"


# --- no command line is ever built from strings ---------------------------------------------------

#: Commands that run text as code or hand a command line to another interpreter.
_BANNED_COMMANDS = {
    "invoke-expression",
    "iex",
    "cmd",
    "cmd.exe",
    "start-process",  # its -ArgumentList is one string on the other side
    "powershell",
    "powershell.exe",
    "pwsh",
    "pwsh.exe",
    "start-transcript",  # would record every value the script handles (see below)
}
#: The one transcript allowed: host.ps1's, started only when the hello asks for one, which only
#: `vezaprovisioner probe --transcript` does (test_local_host_script.py checks the variable).
_TRANSCRIPT_REQUEST = "$transcriptPath"
#: .NET and engine entry points that turn strings into code.
_EVALUATES_STRINGS = re.compile(
    r"\[scriptblock\]::Create|NewScriptBlock|InvokeScript\(|ExpandString\(|"
    r"ConvertTo-SecureString[^\n]*-AsPlainText",
    re.IGNORECASE,
)
#: Commands that change the machine: each must run only where ShouldProcess said yes (-WhatIf).
_MUTATING = {
    "new-item",
    "remove-item",
    "set-acl",
    "set-itemproperty",
    "new-webapppool",
    "remove-webapppool",
    "restart-webapppool",
    "start-webapppool",
    "stop-webapppool",
    "new-webapplication",
    "remove-webapplication",
    "set-webconfigurationproperty",
    "add-webconfigurationproperty",
    "remove-webconfigurationproperty",
    "clear-webconfiguration",
    "set-folderaccess",
}
#: `& "..."` whose string holds a variable plus a space, or a switch: a whole command line.
_COMMAND_LINE_IN_STRING = re.compile(r'^"(?=.*\s)(?=.*(\$|\s[-/])).*"$', re.DOTALL)
_WRITES = re.compile(
    r"\b(Write-\w+|Out-File|Set-Content|Add-Content|Export-\w+|Tee-Object)\b", re.I
)


def _nodes(node: tree_sitter.Node, kind: str) -> list[tree_sitter.Node]:
    found = []
    stack = [node]
    while stack:
        current = stack.pop()
        if current.type == kind:
            found.append(current)
        stack.extend(current.children)
    return found


def _text(node: tree_sitter.Node | None) -> str:
    return node.text.decode("utf-8") if node is not None and node.text is not None else ""


def _command_name(command: tree_sitter.Node) -> str:
    for child in command.children:
        if child.type in ("command_name", "command_name_expr"):
            return _text(child)
    return ""


def _is_invocation(command: tree_sitter.Node) -> bool:
    return any(child.type == "command_invokation_operator" for child in command.children)


def _guarded_by_should_process(command: tree_sitter.Node) -> bool:
    """True inside a function (its callers are checked) or in the block of an `if` / `elseif`
    whose condition calls ShouldProcess."""
    node = command
    while node.parent is not None:
        parent = node.parent
        if parent.type == "function_statement":
            return True
        if node.type == "statement_block" and parent.type in ("if_statement", "elseif_clause"):
            condition = next((c for c in parent.children if c.type == "pipeline"), None)
            if "ShouldProcess" in _text(condition):
                return True
        node = parent
    return False


def _requested_transcript(command: tree_sitter.Node) -> bool:
    """Start-Transcript directly in the block of `if ($transcriptPath)`."""
    if _command_name(command).lower() != "start-transcript":
        return False
    node = command
    while node.parent is not None:
        parent = node.parent
        if node.type == "statement_block" and parent.type == "if_statement":
            condition = next((c for c in parent.children if c.type == "pipeline"), None)
            return _text(condition) == _TRANSCRIPT_REQUEST
        node = parent
    return False


def command_line_problems(source: bytes) -> list[str]:
    """Why a script builds or evaluates command lines, or handles secrets unsafely; [] if not."""
    root = _PARSER.parse(source).root_node
    problems = []
    for command in _nodes(root, "command"):
        name = _command_name(command)
        line = command.start_point[0] + 1
        if name.lower() in _BANNED_COMMANDS and not _requested_transcript(command):
            problems.append(f"line {line}: {name} is banned")
        if _is_invocation(command) and _COMMAND_LINE_IN_STRING.search(name):
            problems.append(f"line {line}: & runs a command line built in a string: {name}")
        if name.lower() in _MUTATING and not _guarded_by_should_process(command):
            problems.append(f"line {line}: {name} runs without ShouldProcess (-WhatIf)")
    for parameter in _nodes(root, "script_parameter"):
        variable = next((c for c in parameter.children if c.type == "variable"), None)
        if re.search(r"password|secret", _text(variable), re.IGNORECASE):
            problems.append(
                f"line {parameter.start_point[0] + 1}: {_text(variable)} - take a "
                "[PSCredential] (-Credential) instead of a password parameter"
            )
    text = source.decode("utf-8-sig")
    for number, line_text in enumerate(text.splitlines(), 1):
        if _EVALUATES_STRINGS.search(line_text):
            problems.append(f"line {number}: turns a string into code: {line_text.strip()}")
        if "GetNetworkCredential" in line_text and _WRITES.search(line_text):
            problems.append(f"line {number}: writes a password out: {line_text.strip()}")
    return problems


@pytest.mark.parametrize(
    "bad",
    [
        b'& "$python -m pip install $name"\n',
        b'& "$env:windir\\system32\\inetsrv\\appcmd.exe set config /commit:apphost"\n',
        b'Start-Process -FilePath $exe -ArgumentList "install $name"\n',
        b'cmd.exe /c "appcmd set config $site"\n',
        b"cmd /c dir\n",
        b'powershell -Command "Enable-Mailbox $id"\n',
        b"iex $command\n",
        b"Invoke-Expression -Command $line\n",
        b"$sb = [scriptblock]::Create($text)\n",
        b"$ExecutionContext.InvokeCommand.ExpandString($template)\n",
        b"$s = ConvertTo-SecureString $plain -AsPlainText -Force\n",
        b"param([string] $Password)\nWrite-Output 1\n",
        b"param([string] $ServiceAccountPassword)\nWrite-Output 1\n",
        b"Write-Host $Credential.GetNetworkCredential().Password\n",
        b"New-WebAppPool -Name $pool\n",
        b"if ($x) { Set-ItemProperty -LiteralPath $p -Name a -Value 1 }\n",
        b"Start-Transcript -Path $log\n",
        b"if ($log) { Start-Transcript -Path $log }\n",
    ],
)
def test_the_command_line_check_catches(bad: bytes) -> None:
    assert command_line_problems(bad) != []


def test_the_command_line_check_allows_argument_arrays() -> None:
    good = b"""[CmdletBinding(SupportsShouldProcess = $true)]
param([System.Management.Automation.PSCredential] $Credential)
& $python @('-m', 'pip', 'install', '--no-index', $name)
& "C:\\Program Files\\Python312\\python.exe" -V
if ($PSCmdlet.ShouldProcess($pool, 'Create')) { New-WebAppPool -Name $pool }
if ($exists) { Write-Host 'kept' } elseif ($PSCmdlet.ShouldProcess($p, 'Set')) {
    Set-ItemProperty -LiteralPath $p -Name processModel -Value @{
        userName = $Credential.UserName; password = $Credential.GetNetworkCredential().Password }
}
function Set-Thing { param([string] $Path) Set-Acl -LiteralPath $Path -AclObject $acl }
"""
    assert command_line_problems(good) == []


@pytest.mark.parametrize(
    "script", repository_scripts(), ids=lambda p: str(p.relative_to(REPO_ROOT))
)
def test_script_builds_no_command_line_and_honours_whatif(script: Path) -> None:
    assert command_line_problems(script.read_bytes()) == []


# --- the IIS scripts ------------------------------------------------------------------------------

IIS_SCRIPTS = [REPO_ROOT / "deploy" / "iis" / name for name in ("install.ps1", "uninstall.ps1")]


@pytest.mark.parametrize("script", IIS_SCRIPTS, ids=lambda p: p.name)
def test_iis_scripts_support_whatif_and_stop_at_the_first_failure(script: Path) -> None:
    text = script.read_text(encoding="utf-8")
    assert "[CmdletBinding(SupportsShouldProcess = $true" in text
    assert "Set-StrictMode -Version Latest" in text
    assert "$ErrorActionPreference = 'Stop'" in text
    assert "exit 1" in text
    # Every step says what to do when it fails.
    steps = re.findall(r"Invoke-Step '([^']+)' ('[^']*'|\"[^\"]*\") \{", text)
    assert len(steps) >= 5
    assert all(len(fix) > 20 for _, fix in steps)


def test_install_covers_every_manual_step() -> None:
    text = (REPO_ROOT / "deploy" / "iis" / "install.ps1").read_text(encoding="utf-8")
    for needle in (
        "IsInRole",  # admin rights
        "'Web-CGI', 'Web-Basic-Auth', 'Web-AppInit'",  # IIS features
        "-Name startMode -Value 'AlwaysRunning'",  # Application Initialization: the pool ...
        "-Name preloadEnabled -Value $true",  # ... the application ...
        '$warmup = "$Location/warmup"',  # ... and its page, let in anonymously over HTTP
        "anonymousAuthentication' = @{ enabled = $true }",
        "sslFlags = 'None'",
        "'--no-index', '--find-links'",  # offline install from the wheelhouse
        "ExchangeInstallPath",
        "MsiInstallPath",
        "vezaprovisioner.toml",
        "instanceMaxRequests",
        "'ReturnGeneric500'",
        "managedRuntimeVersion -Value ''",  # No Managed Code
        "identityType = 'SpecificUser'",
        "processModel.loadUserProfile -Value $true",
        "processModel.setProfileEnvironment -Value $true",
        "'iis-settings', '--config', $ConfigFile",
        "https://$hostName/$AppName",
        "New-WebApplication",
        "anonymousAuthentication' = @{ enabled = $false }",
        "basicAuthentication'     = @{ enabled = $true }",
        "sslFlags = 'Ssl'",
        "-PSPath $AppHost -Location $Location",
        "Set-FolderAccess",
        "'doctor', '--config'",
        "Instance URL",
        "PowerShell Path",
        "Remote Exchange Path",
    ):
        assert needle in text, needle


def test_install_defaults_match_web_config() -> None:
    """install.ps1 rewrites web.config's paths for -InstallRoot; web.config ships its default."""
    text = (REPO_ROOT / "deploy" / "iis" / "install.ps1").read_text(encoding="utf-8")
    web_config = (REPO_ROOT / "web.config").read_text(encoding="utf-8")
    root = re.search(r"\[string\] \$InstallRoot = '([^']+)'", text)
    assert root is not None
    # The same rule as install.ps1's ValidatePattern on -InstallRoot.
    allowed = re.compile(r"^[A-Za-z]:\\[^\s'\";|%]*$")
    assert allowed.match(root.group(1))
    assert not allowed.match("C:\\Program Files\\VezaProvisioner")
    assert not allowed.match("C:\\Veza;Provisioner")
    for relative in (
        "venv\\Scripts\\python.exe|",
        "venv\\Lib\\site-packages\\wfastcgi.py",
        "config\\vezaprovisioner.toml",
    ):
        assert f"{root.group(1)}\\{relative}" in web_config


def test_the_configuration_install_ps1_writes_is_valid(tmp_path: Path) -> None:
    """install.ps1 fills the template's placeholders literally; the result must load as-is."""
    from vezaprovisioner.config import load_settings

    script = (REPO_ROOT / "deploy" / "iis" / "install.ps1").read_text(encoding="utf-8")
    template = (REPO_ROOT / "deploy" / "iis" / "vezaprovisioner.toml.template").read_text(
        encoding="utf-8"
    )
    filled = set(re.findall(r"'(\{\{[A-Z_]+\}\})'\s*=", script))
    assert filled == set(re.findall(r"\{\{[A-Z_]+\}\}", template))
    values = {
        "{{APP_NAME}}": "VezaProvisioner",
        "{{DATA_DIR}}": "C:\\VezaProvisioner\\data",
        "{{POWERSHELL_PATH}}": "C:\\Windows\\System32\\WindowsPowerShell\\v1.0\\powershell.exe",
        "{{REMOTE_EXCHANGE_PATH}}": (
            "C:\\Program Files\\Microsoft\\Exchange Server\\V15\\bin\\RemoteExchange.ps1"
        ),
        # ConvertTo-TomlList: TOML literal strings; install.ps1 refuses values with a quote.
        "{{ALLOWED_USERS}}": "['CONTOSO\\veza-integration', 'veza@contoso.com']",
    }
    text = template
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    written = tmp_path / "vezaprovisioner.toml"
    written.write_text(text, encoding="utf-8")
    settings = load_settings(written, environ={})
    assert settings.backend == "local"
    assert settings.auth.mode == "iis"
    assert settings.auth.require_https
    assert settings.auth.allowed_users == ("CONTOSO\\veza-integration", "veza@contoso.com")
    assert settings.exchange.remote_exchange_path == values["{{REMOTE_EXCHANGE_PATH}}"]
    assert settings.base_path == "/VezaProvisioner"
    assert str(settings.data_dir).endswith("C:\\VezaProvisioner\\data")
    # IIS runs up to maxInstances processes: without a shared folder each scrape showed one
    # random process's counters.
    assert settings.metrics.multiprocess_dir == "metrics"
    empty = template
    for placeholder, value in {**values, "{{ALLOWED_USERS}}": "[]"}.items():
        empty = empty.replace(placeholder, value)
    written.write_text(empty, encoding="utf-8")
    assert load_settings(written, environ={}).auth.allowed_users == ()


# --- what the MSI relies on -------------------------------------------------------------------


def _statement_block_of(if_node: tree_sitter.Node) -> str:
    """The text of an if statement's first (then) block."""
    block = next(child for child in if_node.children if child.type == "statement_block")
    return _text(block)


def test_keep_pool_identity_never_sets_the_pool_identity() -> None:
    """-KeepPoolIdentity (the MSI's parameter set) changes the pool's runtime settings only; the
    identity is set only in the branch that has an account (-Credential or -Gmsa)."""
    source = (REPO_ROOT / "deploy" / "iis" / "install.ps1").read_bytes()
    root = _PARSER.parse(source).root_node
    branches = [
        node
        for node in _nodes(root, "if_statement")
        if _text(next((c for c in node.children if c.type == "pipeline"), None)).startswith(
            "$KeepPoolIdentity -and $PSCmdlet.ShouldProcess"
        )
    ]
    assert len(branches) == 1
    keep = _statement_block_of(branches[0])
    assert "processModel.loadUserProfile" in keep
    assert "processModel.setProfileEnvironment -Value $true" in keep
    assert "identityType" not in keep
    assert "userName" not in keep
    otherwise = _text(next(c for c in branches[0].children if c.type == "elseif_clauses"))
    assert "identityType = 'SpecificUser'" in otherwise
    assert "processModel.setProfileEnvironment -Value $true" in otherwise


def test_uninstall_removes_only_the_pool_install_created() -> None:
    """install.ps1 names the pool it creates in a marker file, right after creating it;
    uninstall.ps1 removes the pool that file names and no other (never -AppPoolName)."""
    install = (REPO_ROOT / "deploy" / "iis" / "install.ps1").read_text(encoding="utf-8")
    uninstall = (REPO_ROOT / "deploy" / "iis" / "uninstall.ps1").read_text(encoding="utf-8")
    marker = "$PoolMarker = Join-Path $ConfigDir 'created-app-pool.txt'"
    assert marker in install
    assert marker in uninstall
    assert re.search(
        r"New-WebAppPool -Name \$AppPoolName \| Out-Null\n(\s*#[^\n]*\n)*"
        r"\s*\[System\.IO\.File\]::WriteAllText\(\$PoolMarker, \$AppPoolName",
        install,
    )
    assert "AppPoolName" not in uninstall
    removals = re.findall(r"Remove-WebAppPool -Name (\$\w+)", uninstall)
    # The MSI's rollback (-Rollback) removes a pool the failed run listed as created, right
    # after creating it; the uninstall proper the pool the marker names.
    assert removals == ["$what", "$pool"]
    assert re.search(
        r"WriteAllText\(\$PoolMarker, \$AppPoolName, \$Utf8\)\n\s*Add-Created 'pool'", install
    )
    assert "$kind -eq 'pool'" in uninstall
    assert "$pool = (Get-Content -LiteralPath $PoolMarker -TotalCount 1).Trim()" in uninstall


def test_the_checks_install_ps1_downgrades_under_the_msi_are_doctors_identity_checks(
    tmp_path: Path,
) -> None:
    """Under -FromMsi, install.ps1 reads the doctor's --json report and only warns for the
    checks that need the pool's service account. Those names, and the report's keys, must be
    the doctor's own."""
    from vezaprovisioner.doctor import Doctor, report_data

    text = (REPO_ROOT / "deploy" / "iis" / "install.ps1").read_text(encoding="utf-8")
    declared = re.search(r"\$IdentityChecks = @\(([^)]*)\)", text)
    assert declared is not None
    downgraded = set(re.findall(r"'([^']+)'", declared.group(1)))
    checks = Doctor(config=tmp_path / "missing.toml", environ={}, iis=None).run()
    names = {check.name for check in checks}
    assert downgraded == {"exchange", "get-user"}
    assert downgraded <= names
    rows = report_data(checks)["checks"]
    assert isinstance(rows, list)
    assert rows
    for key in ("status", "name", "detail", "fix"):
        assert f"$check.{key}" in text
        assert all(key in row for row in rows)
    assert "'--json'" in text


# --- IIS settings that fit the app -----------------------------------------------------------


def _install_text() -> str:
    return (REPO_ROOT / "deploy" / "iis" / "install.ps1").read_text(encoding="utf-8")


def _fastcgi_tuning() -> dict[str, str]:
    """The FastCGI attributes install.ps1 sets, name → the expression it sets them to."""
    source = (REPO_ROOT / "deploy" / "iis" / "install.ps1").read_bytes()
    root = _PARSER.parse(source).root_node
    for table in _nodes(root, "hash_literal_expression"):
        entries = {}
        for entry in _nodes(table, "hash_entry"):
            key = _text(entry.child_by_field_name("key") or entry.children[0]).strip()
            value = _text(entry.children[-1]).strip()
            entries[key] = value
        if "requestTimeout" in entries:
            return entries
    raise AssertionError("no FastCGI tuning table in install.ps1")


def test_fastcgi_timeouts_come_from_the_service_not_from_literals() -> None:
    """Before: requestTimeout and activityTimeout 300 (less than the app's 645 s worst case) and
    idleTimeout 1800. Now the three come from `vezaprovisioner iis-settings`, whose JSON keys
    are the ones the script reads."""
    from vezaprovisioner.config import Settings
    from vezaprovisioner.iis_settings import fastcgi_timeouts

    tuning = _fastcgi_tuning()
    for name in ("requestTimeout", "activityTimeout", "idleTimeout"):
        assert tuning[name] == f"$timeouts.{name}", tuning[name]
    printed = fastcgi_timeouts(Settings(backend="local")).as_data()
    assert set(re.findall(r"\$timeouts\.(\w+)", _install_text())) <= set(printed)
    assert tuning["signalBeforeTerminateSeconds"] == "30"


def test_the_instance_url_uses_the_public_host_name() -> None:
    text = _install_text()
    assert "[string] $PublicHostName = ''" in text
    assert re.search(
        r"\$hostName = \$PublicHostName\n\s*if \(-not \$hostName\) \{\n\s*"
        r"\$hostName = \[System\.Net\.Dns\]::GetHostEntry\(''\)\.HostName",
        text,
    )


def test_uninstall_stops_the_pool_and_waits_for_its_processes_before_removing_files() -> None:
    text = (REPO_ROOT / "deploy" / "iis" / "uninstall.ps1").read_text(encoding="utf-8")
    steps = re.findall(r"Invoke-Step '([^']+)'", text)
    stop = steps.index("Stop the application pool and wait for its processes")
    assert stop < steps.index("Remove the application") < steps.index("Remove the files")
    assert "Stop-WebAppPool -Name $pool" in text
    assert "$_.Path.StartsWith($VenvDir" in text  # waits for the venv's python.exe processes
    # A pool the admin built (not named by the marker) is started again.
    assert "Start-WebAppPool -Name $StoppedPool" in text


def test_both_pool_branches_of_install_set_always_running() -> None:
    """-KeepPoolIdentity and a service account both get a pool that starts before any caller."""
    text = (REPO_ROOT / "deploy" / "iis" / "install.ps1").read_text(encoding="utf-8")
    step = text[text.index("Invoke-Step 'Create the application pool'") :]
    step = step[: step.index("Invoke-Step", 10)]
    assert step.count("-Name startMode -Value 'AlwaysRunning'") == 2


def test_uninstall_clears_what_install_opened_for_the_warm_up() -> None:
    install = (REPO_ROOT / "deploy" / "iis" / "install.ps1").read_text(encoding="utf-8")
    uninstall = (REPO_ROOT / "deploy" / "iis" / "uninstall.ps1").read_text(encoding="utf-8")
    for script in (install, uninstall):
        assert '$warmup = "$Location/warmup"' in script
    assert "Clear-WebConfiguration -PSPath $AppHost -Location $warmup" in uninstall

"""deploy/msi/build_msi.py: the MSI builds from a bundle, its tables say what Windows will do,
and it carries the bundle file for file.

The tables are read back with msiinfo and the custom actions are replayed by a small model of
the parts of Windows Installer they rely on: the launch conditions, the InstallExecuteSequence
order, conditions (the subset the package uses), "[PROPERTY]" formatting, and the splitting of
the resulting command line into argv (CommandLineToArgvW rules, which powershell.exe follows).
tests/test_msi_wine.py runs the same MSI through a real Windows Installer engine (Wine's).
That argv is then bound against deploy/iis/install.ps1's and uninstall.ps1's param() blocks
(parsed with tree-sitter-powershell) the way PowerShell's binder would, so the MSI and the
scripts cannot drift apart.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
import tree_sitter
import tree_sitter_powershell
from hypothesis import given
from hypothesis import strategies as st

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO_ROOT / "deploy" / "msi" / "build_msi.py"


def _load_build_msi() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_msi", BUILD_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_msi_module = _load_build_msi()
DEFAULT_HELP_URL: str = build_msi_module.DEFAULT_HELP_URL
#: Pinned on purpose: a new UpgradeCode makes the next MSI install beside the old one instead of
#: upgrading it. Never change this value (see deploy/msi/README.md).
UPGRADE_CODE = "{71AB0217-5251-4548-A08C-66881B77A871}"
VERSION = metadata.version("vezaprovisioner")
INSTALLDIR = "C:\\Program Files\\VezaProvisioner\\"
#: install.ps1's -InstallRoot default: venv, configuration, data and logs (no space allowed).
INSTALLROOT = "C:\\VezaProvisioner"
SYSTEM64 = "C:\\Windows\\system32\\"
POWERSHELL = SYSTEM64 + "WindowsPowerShell\\v1.0\\powershell.exe"
PYTHON = "C:\\Program Files\\Python312\\python.exe"
#: What AppSearch finds on a server with a 64-bit CPython 3.12 installed for all users.
PYTHON_312: dict[tuple[str, str], str] = {
    ("SOFTWARE\\Python\\PythonCore\\3.12\\InstallPath", "ExecutablePath"): PYTHON
}
POWERSHELL_OPTIONS = [
    "-NoLogo",
    "-NoProfile",
    "-NonInteractive",
    "-ExecutionPolicy",
    "Bypass",
    "-File",
]

# CustomAction Type bits (msidbCustomActionType*).
BASE_TYPE_MASK = 0x3F
EXE_PROPERTY = 50
SET_PROPERTY = 51
CONTINUE = 0x40  # "ignore return code"
ASYNC = 0x80
ROLLBACK = 0x100
COMMIT = 0x200
IN_SCRIPT = 0x400  # deferred
ROLLBACK_OR_COMMIT = ROLLBACK | COMMIT
NO_IMPERSONATE = 0x800

_TOOLS = ("wixl", "msibuild", "msiinfo", "msiextract")
_MISSING = [tool for tool in _TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"{', '.join(_MISSING)} not installed: apt-get install wixl msitools (.ci/run does)",
)


# --- building --------------------------------------------------------------------------------


def make_bundle(root: Path) -> Path:
    """A stand-in for the offline bundle: nested folders, a wheel, web.config, the scripts."""
    files = {
        "README.md": b"# VezaProvisioner offline bundle\n",
        "web.config": b'<?xml version="1.0"?>\n<configuration />\n',
        "deploy/iis/install.ps1": b"param([string]$SiteName)\nWrite-Output 'install'\n",
        "deploy/iis/uninstall.ps1": b"param([string]$SiteName)\nWrite-Output 'uninstall'\n",
        "deploy/iis/Admin Guide.txt": b"a name with a space\n",
        "wheelhouse/vezaprovisioner-0.1.0-py3-none-any.whl": bytes(range(256)) * 64,
        "wheelhouse/pydantic_core-2.27.2-cp313-cp313-win_amd64.whl": b"PK\x03\x04" + b"\0" * 900,
        "examples/config/nested/deeper/sample.toml": b'data_dir = "data"\n',
        "examples/empty.txt": b"",
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def run_build(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def build(bundle: Path, output_dir: Path, *extra: str) -> Path:
    result = run_build("--bundle", bundle, "--output-dir", output_dir, *extra)
    assert result.returncode == 0, result.stderr
    msi = Path(result.stdout.strip())
    assert msi.is_file()
    return msi


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def msi(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(bundle, tmp_path_factory.mktemp("dist"))


# --- reading the MSI back --------------------------------------------------------------------


@cache
def table(msi: Path, name: str) -> list[dict[str, str]]:
    """Rows of table `name` as column → value, from `msiinfo export` (.idt format)."""
    result = subprocess.run(
        ["msiinfo", "export", str(msi), name], capture_output=True, text=True, check=True
    )
    lines = result.stdout.splitlines()
    columns = lines[0].split("\t")
    rows = []
    for line in lines[3:]:
        values = line.split("\t")
        rows.append(dict(zip(columns, values + [""] * (len(columns) - len(values)), strict=True)))
    return rows


def properties(msi: Path) -> dict[str, str]:
    return {row["Property"]: row["Value"] for row in table(msi, "Property")}


def sequence(msi: Path) -> dict[str, tuple[int, str]]:
    """InstallExecuteSequence: action → (sequence number, condition)."""
    return {
        row["Action"]: (int(row["Sequence"]), row["Condition"])
        for row in table(msi, "InstallExecuteSequence")
    }


def custom_actions(msi: Path) -> dict[str, dict[str, str]]:
    return {row["Action"]: row for row in table(msi, "CustomAction")}


def tree_digest(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def extracted(msi: Path, into: Path) -> Path:
    subprocess.run(
        ["msiextract", "-C", str(into), str(msi)], capture_output=True, text=True, check=True
    )
    return into / "VezaProvisioner"


# --- a model of what Windows Installer does with these tables --------------------------------

_TOKEN = re.compile(
    r'\s*(?:(NOT|AND|OR)\b|(<>|=|><|>>|<<|\(|\))|"([^"]*)"|([A-Za-z_][A-Za-z0-9_.]*))'
)


def condition_holds(condition: str, props: Mapping[str, str]) -> bool:
    """Evaluate the condition subset the package uses: properties, "strings", =, <>, the
    substring operators >< (contains), >> (ends with) and << (starts with), NOT, AND, OR and
    parentheses; an empty condition is true, as in the sequence tables."""
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(condition.rstrip()):
        match = _TOKEN.match(condition, position)
        assert match, f"unsupported condition syntax at {condition[position:]!r}"
        keyword, operator, string, name = match.groups()
        if keyword:
            tokens.append(("keyword", keyword))
        elif operator:
            tokens.append(("operator", operator))
        elif string is not None:
            tokens.append(("string", string))
        else:
            tokens.append(("property", name))
        position = match.end()
    if not tokens:
        return True

    def peek() -> tuple[str, str] | None:
        return tokens[0] if tokens else None

    def take() -> tuple[str, str]:
        return tokens.pop(0)

    def term() -> str | bool:
        kind, value = take()
        if (kind, value) == ("operator", "("):
            result = either()
            assert take() == ("operator", ")")
            return result
        if kind == "property":
            return props.get(value, "")
        assert kind == "string", f"unexpected {value!r}"
        return value

    def comparison() -> bool:
        left = term()
        operators = {"=", "<>", "><", ">>", "<<"}
        next_token = peek()
        if next_token is not None and next_token[0] == "operator" and next_token[1] in operators:
            operator = take()[1]
            right = term()
            assert isinstance(left, str)
            assert isinstance(right, str)
            if operator in ("><", ">>", "<<") and not (left and right):
                return False  # Windows Installer: a substring test with an empty side is false
            return {
                "=": left == right,
                "<>": left != right,
                "><": right in left,
                ">>": left.endswith(right),
                "<<": left.startswith(right),
            }[operator]
        return bool(left)

    def negation() -> bool:
        if peek() == ("keyword", "NOT"):
            take()
            return not negation()
        return comparison()

    def both() -> bool:
        result = negation()
        while peek() == ("keyword", "AND"):
            take()
            right = negation()
            result = result and right
        return result

    def either() -> bool:
        result = both()
        while peek() == ("keyword", "OR"):
            take()
            right = both()
            result = result or right
        return result

    result = either()
    assert not tokens, f"trailing tokens in {condition!r}: {tokens}"
    return result


def format_text(text: str, props: Mapping[str, str]) -> str:
    """MsiFormatRecord for [PROPERTY] references: an unset property formats to ""."""
    return re.sub(r"\[([A-Za-z_][A-Za-z0-9_.]*)\]", lambda m: props.get(m.group(1), ""), text)


def split_command_line(command_line: str) -> list[str]:
    """argv as CommandLineToArgvW (and so powershell.exe) splits a command line: 2n backslashes
    before a quote give n and the quote delimits, 2n+1 give n and a literal quote."""
    argv: list[str] = []
    current: list[str] = []
    in_quotes = has_arg = False
    index = 0
    while index < len(command_line):
        char = command_line[index]
        if char == "\\":
            run = len(command_line[index:]) - len(command_line[index:].lstrip("\\"))
            index += run
            if index < len(command_line) and command_line[index] == '"':
                current.append("\\" * (run // 2))
                if run % 2:
                    current.append('"')
                    index += 1
            else:
                current.append("\\" * run)
            has_arg = True
            continue
        if char == '"':
            in_quotes = not in_quotes
            has_arg = True
        elif char in " \t" and not in_quotes:
            if has_arg:
                argv.append("".join(current))
                current, has_arg = [], False
        else:
            current.append(char)
            has_arg = True
        index += 1
    if has_arg:
        argv.append("".join(current))
    return argv


@dataclass(frozen=True)
class Launch:
    """A deferred EXE custom action as Windows Installer would start it."""

    action: str
    executable: str
    argv: list[str]


class Refused(Exception):
    """A launch condition is false: Windows Installer shows its message and changes nothing."""


Registry = dict[tuple[str, str], str]
"""HKLM (64-bit view) as the model sees it: (key, value name) → value."""


def replay(
    msi: Path,
    command_line_properties: Mapping[str, str],
    registry: Registry | None = None,
    *,
    rollback: bool = False,
) -> list[Launch]:
    """Walk InstallExecuteSequence in order, as one installation session: AppSearch reads
    `registry` (by default, a server with Python 3.12); LaunchConditions raises Refused when a
    condition is false; the set-property actions whose condition holds set their property; the
    deferred EXE actions that would be scheduled are collected, formatted as Windows Installer
    formats them when it writes the installation script (rollback actions only with
    `rollback`: they run only when the installation fails); Write/RemoveRegistryValues update
    `registry`."""
    registry = dict(PYTHON_312) if registry is None else registry
    props = {**properties(msi), **command_line_properties}
    props.update(INSTALLDIR=INSTALLDIR, System64Folder=SYSTEM64)
    removing = props.get("REMOVE") == "ALL"
    actions = custom_actions(msi)
    launches = []
    for name, (_, condition) in sorted(sequence(msi).items(), key=lambda item: item[1][0]):
        if not condition_holds(condition, props):
            continue
        if name == "LaunchConditions":
            for row in table(msi, "LaunchCondition"):
                if not condition_holds(row["Condition"], props):
                    raise Refused(format_text(row["Description"], props))
        elif name == "AppSearch":
            locators = {row["Signature_"]: row for row in table(msi, "RegLocator")}
            for search in table(msi, "AppSearch"):
                locator = locators[search["Signature_"]]
                assert locator["Root"] == "2"  # HKLM
                assert int(locator["Type"]) & 0x10  # the 64-bit view, where the values go
                found = registry.get((locator["Key"], locator["Name"]))
                if found:
                    props[search["Property"]] = found
        elif name == "WriteRegistryValues" and not removing:
            for row in table(msi, "Registry"):
                assert row["Root"] == "2"
                registry[(row["Key"], row["Name"])] = format_text(row["Value"], props)
        elif name == "RemoveRegistryValues" and removing:
            for row in table(msi, "Registry"):
                registry.pop((row["Key"], row["Name"]), None)
        elif name in actions:
            action = actions[name]
            base_type = int(action["Type"]) & BASE_TYPE_MASK
            if base_type == SET_PROPERTY:
                props[action["Source"]] = format_text(action["Target"], props)
            else:
                assert base_type == EXE_PROPERTY, f"{name}: unexpected type {action['Type']}"
                if int(action["Type"]) & ROLLBACK and not rollback:
                    continue
                command_line = format_text(action["Target"], props)
                launches.append(
                    Launch(name, props[action["Source"]], split_command_line(command_line))
                )
    return launches


def install_argv(*extra: str, site: str = "Default Web Site") -> list[str]:
    return [
        *POWERSHELL_OPTIONS,
        f"{INSTALLDIR}deploy\\iis\\install.ps1",
        "-KeepPoolIdentity",
        "-InstallRoot",
        INSTALLROOT,
        "-SiteName",
        site,
        "-AppName",
        "VezaProvisioner",
        "-AppPoolName",
        "VezaProvisionerPool",
        "-PythonExe",
        PYTHON,
        *extra,
        "-FromMsi",
    ]


def uninstall_argv(*extra: str) -> list[str]:
    return [
        *POWERSHELL_OPTIONS,
        f"{INSTALLDIR}deploy\\iis\\uninstall.ps1",
        "-InstallRoot",
        INSTALLROOT,
        "-SiteName",
        "Default Web Site",
        "-AppName",
        "VezaProvisioner",
        *extra,
        "-FromMsi",
    ]


# --- the model itself ------------------------------------------------------------------------


def test_condition_model_evaluates_the_msi_condition_forms() -> None:
    props = {"REMOVE": "ALL", "UPGRADINGPRODUCTCODE": "{X}", "REMOVEDATA": "0"}
    assert condition_holds("", props)
    assert condition_holds('REMOVE="ALL"', props)
    assert not condition_holds('NOT REMOVE="ALL"', props)
    assert not condition_holds('REMOVE="ALL" AND NOT UPGRADINGPRODUCTCODE', props)
    assert condition_holds('REMOVE="ALL" AND NOT (POWERSHELLPATH OR REMOVEDATA="1")', props)
    assert condition_holds("REMOVEDATA", props)
    assert not condition_holds("POWERSHELLPATH", props)


def test_command_line_model_follows_windows_backslash_quote_rules() -> None:
    assert split_command_line(r'-a "C:\Program Files\X\." -b') == [
        "-a",
        r"C:\Program Files\X\.",
        "-b",
    ]
    # The trap the package avoids: a directory property ends with "\", which escapes the quote.
    assert split_command_line(r'-a "C:\Program Files\X\" -b') == ["-a", r'C:\Program Files\X" -b']
    assert split_command_line(r'"a\\" b') == ["a\\", "b"]
    assert split_command_line('x  ""  y') == ["x", "", "y"]


# --- building --------------------------------------------------------------------------------


def test_msi_is_named_and_versioned_after_the_package(msi: Path) -> None:
    assert msi.name == f"VezaProvisioner-{VERSION}-x64.msi"
    props = properties(msi)
    assert props["ProductVersion"] == VERSION
    assert props["ProductName"] == "VezaProvisioner"
    assert props["ALLUSERS"] == "1"  # per-machine
    summary = subprocess.run(
        ["msiinfo", "suminfo", str(msi)], capture_output=True, text=True, check=True
    ).stdout
    assert "Template: x64;1033" in summary


def test_msi_carries_the_bundle_file_for_file(msi: Path, bundle: Path, tmp_path: Path) -> None:
    assert tree_digest(extracted(msi, tmp_path)) == tree_digest(bundle)


def test_files_go_to_program_files_as_64_bit_components(msi: Path) -> None:
    directories = {row["Directory"]: row for row in table(msi, "Directory")}
    assert directories["INSTALLDIR"]["Directory_Parent"] == "ProgramFiles64Folder"
    assert directories["INSTALLDIR"]["DefaultDir"] == "VEZAPR~1|VezaProvisioner"
    components = table(msi, "Component")
    assert components
    assert all(
        int(row["Attributes"]) & 0x100 for row in components
    )  # msidbComponentAttributes64bit


def test_zip_bundle_with_a_top_folder_installs_its_content(bundle: Path, tmp_path: Path) -> None:
    archive = tmp_path / f"vezaprovisioner-{VERSION}-win-amd64.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(bundle.rglob("*")):
            if path.is_file():
                zipped.write(
                    path, f"vezaprovisioner-{VERSION}-win-amd64/{path.relative_to(bundle)}"
                )
    built = build(archive, tmp_path / "dist")
    assert tree_digest(extracted(built, tmp_path / "out")) == tree_digest(bundle)


def test_each_build_is_a_new_product_of_the_same_upgrade_family(
    msi: Path, bundle: Path, tmp_path: Path
) -> None:
    newer = build(bundle, tmp_path, "--version", "0.2.0")
    assert newer.name == "VezaProvisioner-0.2.0-x64.msi"
    old, new = properties(msi), properties(newer)
    assert old["UpgradeCode"] == new["UpgradeCode"] == UPGRADE_CODE
    assert old["ProductCode"] != new["ProductCode"]
    # Same path, same component GUID: Windows Installer's component rules across versions.
    guids = [
        {row["Component"]: row["ComponentId"] for row in table(m, "Component")}
        for m in (msi, newer)
    ]
    assert guids[0] == guids[1]


@pytest.mark.parametrize(
    ("version", "message"),
    [("1.0.0rc1", "MAJOR.MINOR.PATCH"), ("1.0", "MAJOR.MINOR.PATCH"), ("256.0.0", "limits")],
)
def test_refuses_versions_windows_installer_cannot_compare(
    bundle: Path, tmp_path: Path, version: str, message: str
) -> None:
    result = run_build("--bundle", bundle, "--output-dir", tmp_path, "--version", version)
    assert result.returncode == 1
    assert message in result.stderr
    assert not list(tmp_path.iterdir())


def test_the_msi_takes_the_bundles_version_and_refuses_another(
    bundle: Path, tmp_path: Path
) -> None:
    """install.ps1 installs the bundle's VERSION: the MSI must not claim another one."""
    versioned = tmp_path / "versioned"
    shutil.copytree(bundle, versioned)
    (versioned / "VERSION").write_text("0.3.1\n")
    assert build(versioned, tmp_path / "ok").name == "VezaProvisioner-0.3.1-x64.msi"
    assert build(versioned, tmp_path / "same", "--version", "0.3.1").is_file()
    result = run_build("--bundle", versioned, "--output-dir", tmp_path / "no", "--version", "0.3.2")
    assert result.returncode == 1
    assert "differs from the bundle's VERSION 0.3.1" in result.stderr
    assert not (tmp_path / "no").exists()


def test_refuses_a_bundle_without_the_iis_scripts(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "deploy" / "iis" / "uninstall.ps1").unlink()
    result = run_build("--bundle", bundle, "--output-dir", tmp_path / "dist")
    assert result.returncode == 1
    assert "missing deploy/iis/uninstall.ps1" in result.stderr


def test_a_bundle_holding_only_deploy_is_installed_as_is(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    for name in ("install.ps1", "uninstall.ps1", "README.md"):
        (bundle / "deploy" / "iis").mkdir(parents=True, exist_ok=True)
        (bundle / "deploy" / "iis" / name).write_text(name)
    built = build(bundle, tmp_path / "dist")
    assert tree_digest(extracted(built, tmp_path / "out")) == tree_digest(bundle)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["wheelhouse/Foo.whl", "wheelhouse/foo.whl"], "are the same file on Windows"),
        (["examples/what?.txt"], "not a valid Windows file name"),
        (["examples/trailing./x.txt"], "not a valid Windows file name"),
    ],
)
def test_refuses_names_windows_cannot_hold(tmp_path: Path, names: list[str], message: str) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    for name in names:
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_text(name)
    result = run_build("--bundle", bundle, "--output-dir", tmp_path / "dist")
    assert result.returncode == 1
    assert message in result.stderr


def test_refuses_a_zip_that_writes_outside_its_folder(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("deploy/iis/install.ps1", "")
        zipped.writestr("../escaped.txt", "")
    result = run_build("--bundle", archive, "--output-dir", tmp_path / "dist")
    assert result.returncode == 1
    assert "unsafe path" in result.stderr
    assert not (tmp_path.parent / "escaped.txt").exists()


# --- properties ------------------------------------------------------------------------------


PUBLIC = [
    "INSTALLROOT",
    "SITE",
    "APPALIAS",
    "APPPOOL",
    "POWERSHELLPATH",
    "REMOTEEXCHANGEPATH",
    "PYTHONEXE",
    "ALLOWEDUSERS",
    "REMOVEDATA",
]


def test_public_properties_reach_the_elevated_session(msi: Path) -> None:
    props = properties(msi)
    # No value in the Property table: empty means "not given" (defaults come from actions).
    assert not [name for name in PUBLIC if name in props]
    secure = props["SecureCustomProperties"].split(";")
    for name in [*PUBLIC, "UPGRADEFOUND", "NEWERVERSIONFOUND"]:
        assert name in secure


def test_what_appsearch_finds_reaches_the_elevated_session_in_a_ui_run(msi: Path) -> None:
    """In a run with a UI (double-click, msiexec without /q, Programs and Features), AppSearch
    runs in the client's InstallUISequence and only public properties listed in
    SecureCustomProperties are handed to the elevated server (ICE52 flags private ones). Wine
    cannot drive a UI run, so this is checked in the tables: every property AppSearch sets (the
    remembered values and the Python search) is public (upper case) and secure, AppSearch runs
    in both sequences, and the restore actions read exactly those properties."""
    secure = set(properties(msi)["SecureCustomProperties"].split(";"))
    found = {row["Property"] for row in table(msi, "AppSearch")}
    assert {f"VPSAVED{name}" for name in ("INSTALLROOT", "SITE", "APPALIAS", "APPPOOL")} <= found
    assert {f"VPPYTHON31{minor}" for minor in "0123"} <= found
    for name in found:
        assert name == name.upper(), f"{name} is private: lost in a UI run"
        assert name in secure, f"{name} is not in SecureCustomProperties"
    ui = {row["Action"] for row in table(msi, "InstallUISequence")}
    assert {"AppSearch", "LaunchConditions", "FindRelatedProducts"} <= ui
    restores = {
        row["Source"]: row["Target"]
        for row in table(msi, "CustomAction")
        if row["Action"].startswith("VpRestore")
    }
    for target in restores.values():
        assert target.strip("[]") in found


def test_no_password_ever_passes_through_the_msi(msi: Path) -> None:
    """MSI logs record property values, so no property may be meant for a password."""
    names = set(properties(msi)) | set(properties(msi)["SecureCustomProperties"].split(";"))
    for action in custom_actions(msi).values():
        names.add(action["Source"])
        names.update(re.findall(r"\[([^\]]+)\]", action["Target"]))
        assert "password" not in action["Target"].lower()
        assert "credential" not in action["Target"].lower()
    assert not [name for name in names if "PASSWORD" in name.upper()]


def test_programs_and_features_entry(msi: Path) -> None:
    props = properties(msi)
    assert props["ARPCOMMENTS"]
    assert props["ARPNOMODIFY"] == "1"
    # Links to a web page (a local .md file would not open from Programs and Features).
    assert props["ARPHELPLINK"] == props["ARPURLINFOABOUT"] == DEFAULT_HELP_URL
    assert DEFAULT_HELP_URL.startswith("https://")
    launches = {
        row["Source"]: row["Target"]
        for row in table(msi, "CustomAction")
        if int(row["Type"]) & BASE_TYPE_MASK == SET_PROPERTY
    }
    assert launches["ARPINSTALLLOCATION"] == "[INSTALLDIR]"  # set at install time


def test_the_help_url_is_set_at_build_time(bundle: Path, tmp_path: Path) -> None:
    url = "https://intranet.contoso.com/apps/veza-provisioner?lang=en"
    built = build(bundle, tmp_path, "--help-url", url)
    assert properties(built)["ARPHELPLINK"] == properties(built)["ARPURLINFOABOUT"] == url
    for bad in ("C:\\Program Files\\VezaProvisioner\\README.md", "https://a b", "ftp://x"):
        result = run_build("--bundle", bundle, "--output-dir", tmp_path / "bad", "--help-url", bad)
        assert result.returncode == 1
        assert "--help-url" in result.stderr


def test_windows_installer_logs_every_run(msi: Path) -> None:
    """MsiLogging: a verbose log even without /l*v (Programs and Features, double-click)."""
    assert set("voicewarmup") <= set(properties(msi)["MsiLogging"])


# --- custom actions --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["VpConfigureIis", "VpRemoveIis"])
def test_iis_actions_are_deferred_unimpersonated_and_checked(msi: Path, name: str) -> None:
    action = custom_actions(msi)[name]
    action_type = int(action["Type"])
    assert action_type & BASE_TYPE_MASK == EXE_PROPERTY
    assert action_type & IN_SCRIPT  # deferred: inside the transaction, rolled back on failure
    assert action_type & NO_IMPERSONATE  # runs as LocalSystem
    assert not action_type & CONTINUE  # a non-zero exit code fails the installation
    assert not action_type & ASYNC
    assert not action_type & ROLLBACK_OR_COMMIT
    assert action["Source"] == "VpPowerShellExe"


def test_iis_actions_run_inside_the_transaction_around_the_files(msi: Path) -> None:
    order = {action: number for action, (number, _) in sequence(msi).items()}
    assert order["CostFinalize"] < order["VpSetPowerShellExe"] < order["InstallInitialize"]
    assert order["InstallInitialize"] < order["VpRemoveIis"] < order["RemoveFiles"]
    assert order["InstallFiles"] < order["VpConfigureIis"] < order["InstallFinalize"]
    conditions = {action: condition for action, (_, condition) in sequence(msi).items()}
    assert conditions["VpConfigureIis"] == 'NOT REMOVE="ALL"'
    assert conditions["VpRemoveIis"] == 'REMOVE="ALL" AND NOT UPGRADINGPRODUCTCODE'


def test_set_property_actions_are_type_51(msi: Path) -> None:
    """wixl writes 2099 (51 with the no-impersonate bit, invalid for them: ICE68)."""
    types = {row["Action"]: int(row["Type"]) for row in table(msi, "CustomAction")}
    assert 2099 not in types.values()
    setters = [a for a, t in types.items() if t & BASE_TYPE_MASK == SET_PROPERTY]
    assert len(setters) > 15
    assert all(types[action] == SET_PROPERTY for action in setters)


def test_install_ps1_has_a_rollback_action_that_undoes_what_it_created(msi: Path) -> None:
    """VpRollbackIis is deferred, not impersonated, has the rollback bit and ignores its exit
    code (a rollback must not stop halfway); it is scheduled right before install.ps1 under the
    same condition, so it is in the rollback script whenever install.ps1 runs (first install,
    upgrade, repair) and runs before the engine deletes the new files, uninstall.ps1 included."""
    action = custom_actions(msi)["VpRollbackIis"]
    action_type = int(action["Type"])
    assert action_type & BASE_TYPE_MASK == EXE_PROPERTY
    assert action_type & IN_SCRIPT
    assert action_type & ROLLBACK
    assert not action_type & COMMIT
    assert action_type & NO_IMPERSONATE
    assert action_type & CONTINUE
    assert action["Source"] == "VpPowerShellExe"
    order = sequence(msi)
    assert order["VpRollbackIis"][0] == order["VpConfigureIis"][0] - 1
    assert order["VpRollbackIis"][1] == order["VpConfigureIis"][1]
    assert order["InstallFiles"][0] < order["VpRollbackIis"][0]
    for session in ({}, {"REINSTALL": "ALL"}, {"UPGRADEFOUND": "{OLD}", "SITE": "Exchange"}):
        rollback, install = replay(msi, session, rollback=True)
        assert (rollback.action, install.action) == ("VpRollbackIis", "VpConfigureIis")
        script, arguments = script_arguments(rollback)
        assert script.name == "uninstall.ps1"
        _, bound = bind(script_signature(script), arguments)
        assert "Rollback" in bound
        assert "FromMsi" in bound
        assert "RemoveData" not in bound
        # The same installation it undoes.
        for name, parameter in (("InstallRoot", "-InstallRoot"), ("SiteName", "-SiteName")):
            assert bound[name] == install.argv[install.argv.index(parameter) + 1]
    assert replay(msi, {"REMOVE": "ALL"}, rollback=True)[0].action == "VpRemoveIis"


def test_what_install_ps1_records_the_rollback_undoes() -> None:
    """install.ps1 lists what its run created (Add-Created <kind>); uninstall.ps1 -Rollback
    handles every kind it lists, and reads the list install.ps1 writes."""
    install = (IIS_DIR / "install.ps1").read_text(encoding="utf-8")
    uninstall = (IIS_DIR / "uninstall.ps1").read_text(encoding="utf-8")
    recorded = set(re.findall(r"Add-Created '(\w+)'", install))
    assert recorded == {"folder", "file", "fastcgi", "pool", "application"}
    handled = set(re.findall(r"\$kind -eq '(\w+)'", uninstall))
    assert recorded == handled
    assert "Join-Path $InstallRoot 'logs\\created-this-run.txt'" in install
    assert "Join-Path $LogsDir 'created-this-run.txt'" in uninstall
    # A list is never replayed: install.ps1 deletes it on success (its last statement in the
    # try block), -Rollback once it has undone it. Otherwise a run that failed before starting
    # its list (a parameter refused) would roll back the previous, successful run.
    success = install[install.index("if ($CreatedList) {") :]
    assert success.index("[System.IO.File]::Delete($CreatedList)") < success.index("catch {")
    assert "Remove-Item -LiteralPath $CreatedList -Force" in uninstall
    for creation in ("New-WebApplication", "New-WebAppPool", "Add-WebConfigurationProperty"):
        following = install[install.index(creation) :][:400]
        assert "Add-Created" in following, f"{creation} is not recorded for the rollback"


def test_table_values_fit_their_columns(msi: Path) -> None:
    """ICE03: CustomAction.Target, LaunchCondition.Condition/Description and sequence
    conditions hold at most 255 characters."""
    for row in table(msi, "CustomAction"):
        assert len(row["Target"]) <= 255, row["Action"]
    for row in table(msi, "LaunchCondition"):
        assert len(row["Condition"]) <= 255
        assert len(row["Description"]) <= 255, row["Description"]
    for row in table(msi, "InstallExecuteSequence"):
        assert len(row["Condition"]) <= 255, row["Action"]


_SHORT = re.compile(r"[A-Za-z0-9$%'`@~!(){}^#&_-]{1,8}(\.[A-Za-z0-9$%'`@~!(){}^#&_-]{1,3})?")


def test_every_file_and_folder_has_an_8_3_name(msi: Path) -> None:
    """ICE03 and SHORTFILENAMES=1: each name is a short name, or "SHORT|long", and the short
    names are unique (ignoring case) among a folder's files and subfolders."""
    directory_of = {row["Component"]: row["Directory_"] for row in table(msi, "Component")}
    in_folder: dict[str, list[str]] = {}
    for row in table(msi, "Directory"):
        if row["DefaultDir"] not in (".", "SourceDir"):
            in_folder.setdefault(row["Directory_Parent"], []).append(row["DefaultDir"])
    for row in table(msi, "File"):
        in_folder.setdefault(directory_of[row["Component_"]], []).append(row["FileName"])
    assert sum(map(len, in_folder.values())) > 10
    for names in in_folder.values():
        shorts = [name.split("|")[0] for name in names]
        assert all(_SHORT.fullmatch(short) for short in shorts), shorts
        assert len({short.upper() for short in shorts}) == len(shorts), shorts
    assert any("|Admin Guide.txt" in name for names in in_folder.values() for name in names)


@given(
    names=st.lists(
        st.text(st.characters(codec="ascii", exclude_characters='<>:"/\\|?*'), min_size=1),
        max_size=30,
        unique_by=str.upper,
    )
)
def test_short_names_are_valid_and_unique(names: list[str]) -> None:
    shorts = build_msi_module.short_names(names)
    assert set(shorts) == set(names)
    assert all(_SHORT.fullmatch(short) for short in shorts.values()), shorts
    assert len({short.upper() for short in shorts.values()}) == len(names)


def test_install_runs_install_ps1_with_the_defaults(msi: Path) -> None:
    assert replay(msi, {}) == [Launch("VpConfigureIis", POWERSHELL, install_argv())]


def _python(*versions: str) -> Registry:
    return {
        (
            f"SOFTWARE\\Python\\PythonCore\\{v}\\InstallPath",
            "ExecutablePath",
        ): f"C:\\Py{v}\\python.exe"
        for v in versions
    }


def _python_argument(launch: Launch) -> str:
    return launch.argv[launch.argv.index("-PythonExe") + 1]


def test_python_is_checked_before_anything_changes(msi: Path) -> None:
    """The launch condition refuses an installation without a 64-bit CPython 3.10-3.13
    registered for all users (PEP 514, HKLM, 64-bit view); the newest one found goes to
    install.ps1 -PythonExe; PYTHONEXE on the command line wins, and is remembered."""
    with pytest.raises(Refused, match=r"64-bit Python 3\.10-3\.13.*PYTHONEXE="):
        replay(msi, {}, {})
    with pytest.raises(Refused):  # 3.9 and free-threaded 3.13t are not supported
        replay(msi, {}, _python("3.9", "3.13t", "3.12-32"))
    for versions, chosen in [
        (("3.10",), "3.10"),
        (("3.10", "3.11"), "3.11"),
        (("3.13", "3.10", "3.12"), "3.13"),
        (("3.12", "3.11"), "3.12"),
    ]:
        (launch,) = replay(msi, {}, _python(*versions))
        assert _python_argument(launch) == f"C:\\Py{chosen}\\python.exe"
    registry: Registry = {}
    (given_exe,) = replay(msi, {"PYTHONEXE": "D:\\Python\\python.exe"}, registry)
    assert _python_argument(given_exe) == "D:\\Python\\python.exe"
    (upgrade,) = replay(msi, {"UPGRADEFOUND": "{OLD}"}, registry)  # remembered
    assert _python_argument(upgrade) == "D:\\Python\\python.exe"
    locators = {row["Signature_"]: row for row in table(msi, "RegLocator")}
    for search in table(msi, "AppSearch"):
        if search["Property"].startswith("VPPYTHON"):
            locator = locators[search["Signature_"]]
            assert (locator["Root"], locator["Name"]) == ("2", "ExecutablePath")  # HKLM
            assert int(locator["Type"]) == 0x2 | 0x10  # raw value, 64-bit view


_PASSED_ON = ["INSTALLROOT", "SITE", "APPALIAS", "APPPOOL", "POWERSHELLPATH", "REMOTEEXCHANGEPATH"]


@given(
    name=st.sampled_from([*_PASSED_ON, "PYTHONEXE", "ALLOWEDUSERS"]),
    value=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1),
    bad=st.sampled_from(["trailing", "quote"]),
)
def test_a_value_that_would_shift_the_arguments_is_refused(
    msi: Path, name: str, value: str, bad: str
) -> None:
    """A trailing backslash escapes the closing quote (CommandLineToArgvW) and a double quote
    ends the value early: either shifts every later argument, so the launch conditions refuse
    both, from the command line and from the remembered values, before anything changes."""
    value = value + "\\" if bad == "trailing" else value[:1] + '"' + value[1:]
    with pytest.raises(Refused, match=name):
        replay(msi, {name: value})
    if name in _PASSED_ON or name == "PYTHONEXE":
        remembered = {
            "INSTALLROOT": "InstallRoot",
            "APPALIAS": "AppAlias",
            "APPPOOL": "AppPool",
            "POWERSHELLPATH": "PowerShellPath",
            "REMOTEEXCHANGEPATH": "RemoteExchangePath",
            "PYTHONEXE": "PythonExe",
            "SITE": "Site",
        }[name]
        registry: Registry = {**PYTHON_312, ("SOFTWARE\\VezaProvisioner", remembered): value}
        with pytest.raises(Refused, match=name):
            replay(msi, {}, registry)


def test_install_passes_the_admins_properties(msi: Path) -> None:
    shell = r"C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe"
    remote = r"C:\Program Files\Microsoft\Exchange Server\V15\bin\RemoteExchange.ps1"
    launches = replay(
        msi,
        {
            "INSTALLROOT": "D:\\Veza",
            "SITE": "Exchange Back End",
            "APPALIAS": "Veza",
            "APPPOOL": "VezaPool",
            "POWERSHELLPATH": shell,
            "REMOTEEXCHANGEPATH": remote,
            "ALLOWEDUSERS": "CONTOSO\\veza-integration,veza@contoso.com",
        },
    )
    assert [launch.argv for launch in launches] == [
        [
            *POWERSHELL_OPTIONS,
            f"{INSTALLDIR}deploy\\iis\\install.ps1",
            "-KeepPoolIdentity",
            "-InstallRoot",
            "D:\\Veza",
            "-SiteName",
            "Exchange Back End",
            "-AppName",
            "Veza",
            "-AppPoolName",
            "VezaPool",
            "-PythonExe",
            PYTHON,
            "-PowerShellPath",
            shell,
            "-RemoteExchangePath",
            remote,
            "-AllowedUsers",
            "CONTOSO\\veza-integration,veza@contoso.com",
            "-FromMsi",
        ]
    ]


def test_repair_and_upgrade_run_install_ps1_again(msi: Path) -> None:
    repair = replay(msi, {"REINSTALL": "ALL", "REINSTALLMODE": "omus"})
    upgrade = replay(msi, {"UPGRADEFOUND": "{00000000-0000-0000-0000-000000000001}"})
    assert [launch.action for launch in repair + upgrade] == ["VpConfigureIis", "VpConfigureIis"]


def test_uninstall_runs_uninstall_ps1_and_keeps_data_unless_asked(msi: Path) -> None:
    keep = replay(msi, {"REMOVE": "ALL"})
    assert keep == [Launch("VpRemoveIis", POWERSHELL, uninstall_argv())]
    remove = replay(msi, {"REMOVE": "ALL", "REMOVEDATA": "1"})
    assert [launch.argv for launch in remove] == [uninstall_argv("-RemoveData")]
    assert replay(msi, {"REMOVE": "ALL", "REMOVEDATA": "0"}) == keep


def test_properties_are_remembered_for_repair_upgrade_and_uninstall(msi: Path) -> None:
    registry: Registry = dict(PYTHON_312)
    custom = {
        "INSTALLROOT": "D:\\Veza",
        "SITE": "Exchange Back End",
        "APPALIAS": "Veza",
        "APPPOOL": "VezaPool",
    }
    remote = r"D:\Exchange\V15\bin\RemoteExchange.ps1"
    (install,) = replay(msi, {**custom, "REMOTEEXCHANGEPATH": remote}, registry)
    assert registry[("SOFTWARE\\VezaProvisioner", "Site")] == "Exchange Back End"

    (repair,) = replay(msi, {"REINSTALL": "ALL"}, registry)
    assert repair == install
    (upgrade,) = replay(msi, {"UPGRADEFOUND": "{OLD}", "APPPOOL": "OtherPool"}, registry)
    assert upgrade.argv[upgrade.argv.index("-AppPoolName") + 1] == "OtherPool"  # command line wins
    assert upgrade.argv[upgrade.argv.index("-SiteName") + 1] == "Exchange Back End"
    assert registry[("SOFTWARE\\VezaProvisioner", "AppPool")] == "OtherPool"

    # Uninstall from Programs and Features passes no properties, yet reaches the same application.
    (uninstall,) = replay(msi, {"REMOVE": "ALL"}, registry)
    assert uninstall.argv[uninstall.argv.index("-InstallRoot") :][:6] == [
        "-InstallRoot",
        "D:\\Veza",
        "-SiteName",
        "Exchange Back End",
        "-AppName",
        "Veza",
    ]
    assert "-RemoteExchangePath" not in uninstall.argv
    assert registry == PYTHON_312


def test_upgrade_removing_the_old_version_leaves_iis_alone(msi: Path) -> None:
    """The old product's removal during a major upgrade runs with UPGRADINGPRODUCTCODE set."""
    assert replay(msi, {"REMOVE": "ALL", "UPGRADINGPRODUCTCODE": "{NEW-PRODUCT}"}) == []


_SITE_NAMES = st.text(
    st.characters(codec="utf-8", exclude_characters='"\\', exclude_categories=("Cs", "Cc")),
    min_size=1,
    max_size=40,
).filter(lambda name: name.strip() == name)


@given(site=_SITE_NAMES)
def test_a_site_name_stays_one_argument(msi: Path, site: str) -> None:
    """Any site name without a double quote or backslash (IIS forbids both) reaches install.ps1
    as exactly one argument, spaces and all."""
    (launch,) = replay(msi, {"SITE": site})
    assert launch.argv == install_argv(site=site)


# --- upgrades --------------------------------------------------------------------------------


def test_upgrade_table_replaces_older_and_same_versions_and_refuses_downgrades(msi: Path) -> None:
    rows = {row["ActionProperty"]: row for row in table(msi, "Upgrade")}
    assert {row["UpgradeCode"] for row in rows.values()} == {UPGRADE_CODE}
    older = rows["UPGRADEFOUND"]
    assert (older["VersionMin"], older["VersionMax"]) == ("0.0.0", VERSION)
    # MigrateFeatures | VersionMinInclusive | VersionMaxInclusive, and not OnlyDetect: remove them.
    assert int(older["Attributes"]) == 0x1 | 0x100 | 0x200
    newer = rows["NEWERVERSIONFOUND"]
    assert (newer["VersionMin"], newer["VersionMax"]) == (VERSION, "")
    assert int(newer["Attributes"]) == 0x2  # OnlyDetect, VersionMin exclusive
    conditions = {row["Condition"] for row in table(msi, "LaunchCondition")}
    assert "NOT NEWERVERSIONFOUND" in conditions
    order = {action: number for action, (number, _) in sequence(msi).items()}
    assert order["FindRelatedProducts"] < order["InstallValidate"]


def test_a_failed_upgrade_rolls_back_to_the_old_version(msi: Path) -> None:
    """RemoveExistingProducts right after InstallInitialize: the old version is removed inside
    this installation's transaction, so when install.ps1 (or anything later) fails, Windows
    Installer rolls the removal back too: old files, remembered values and Programs and
    Features entry. Before InstallInitialize (it was at 1401) it ran in its own transaction
    and a failure left neither version. Nothing that changes the machine comes between
    InstallInitialize and it. (Wine runs RemoveExistingProducts as a separate msiexec process,
    so tests/test_msi_wine.py cannot show this; it checks the rollback action instead.)"""
    order = {action: number for action, (number, _) in sequence(msi).items()}
    removal = order["RemoveExistingProducts"]
    assert order["InstallInitialize"] < removal
    changing = [
        action for action, number in order.items() if order["InstallInitialize"] < number < removal
    ]
    assert changing == []
    for action in ("RemoveRegistryValues", "VpRemoveIis", "RemoveFiles", "InstallFiles"):
        assert removal < order[action]
    for action in ("WriteRegistryValues", "VpRollbackIis", "VpConfigureIis"):
        assert removal < order[action] < order["InstallFinalize"]


def test_build_leaves_only_the_msi_behind(bundle: Path, tmp_path: Path) -> None:
    build(bundle, tmp_path)
    assert [path.name for path in tmp_path.rglob("*")] == [f"VezaProvisioner-{VERSION}-x64.msi"]


# --- the scripts accept what the MSI passes --------------------------------------------------

_PS_PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
IIS_DIR = REPO_ROOT / "deploy" / "iis"
#: The set a parameter without ParameterSetName belongs to: every set.
ALL_SETS = "__AllParameterSets"


@dataclass(frozen=True)
class ScriptParameter:
    """One parameter of a script's param() block, as PowerShell's binder sees it."""

    name: str
    type: str
    #: parameter set → mandatory there; ALL_SETS when the parameter is in every set.
    sets: Mapping[str, bool]
    default: str | None
    pattern: str | None

    def in_set(self, name: str) -> bool:
        return ALL_SETS in self.sets or name in self.sets

    def mandatory_in(self, name: str) -> bool:
        return self.sets.get(name, False) or self.sets.get(ALL_SETS, False)


@dataclass(frozen=True)
class ScriptSignature:
    default_set: str
    parameters: Mapping[str, ScriptParameter]  # by lower-case name: PowerShell ignores case

    @property
    def sets(self) -> set[str]:
        named = {s for p in self.parameters.values() for s in p.sets if s != ALL_SETS}
        return named or {ALL_SETS}


def _walk(node: tree_sitter.Node, kind: str) -> list[tree_sitter.Node]:
    found, stack = [], [node]
    while stack:
        current = stack.pop()
        if current.type == kind:
            found.append(current)
        stack.extend(reversed(current.children))
    return found


def _node_text(node: tree_sitter.Node) -> str:
    return node.text.decode("utf-8") if node.text is not None else ""


def _literal(text: str) -> str:
    """A PowerShell literal's value: 'single-quoted' ('' is a quote), "double", or as written."""
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def _attribute_arguments(attribute: tree_sitter.Node) -> dict[str, str]:
    """`[Name(A = x, 'positional')]` → {"a": "x", "": "positional"}."""
    arguments = {}
    for argument in _walk(attribute, "attribute_argument"):
        name = next((c for c in argument.children if c.type == "simple_name"), None)
        value = argument.children[-1]
        arguments[_node_text(name).lower() if name else ""] = _literal(_node_text(value))
    return arguments


def script_signature(script: Path) -> ScriptSignature:
    """The param() block of `script`: names, types, parameter sets, defaults, ValidatePattern."""
    root = _PS_PARSER.parse(script.read_bytes()).root_node
    (param_block,) = [n for n in root.children if n.type == "param_block"]
    binding = {}
    for attribute in _walk(param_block, "attribute"):
        if attribute.parent is not None and attribute.parent.parent == param_block:
            binding = _attribute_arguments(attribute)  # [CmdletBinding(...)]
    parameters = {}
    for parameter in _walk(param_block, "script_parameter"):
        variable = next(c for c in parameter.children if c.type == "variable")
        name = _node_text(variable).lstrip("$")
        kind, pattern, sets = "", None, {}
        for attribute in _walk(parameter, "attribute"):
            literal = next((c for c in attribute.children if c.type == "type_literal"), None)
            if literal is not None:
                kind = _node_text(literal)[1:-1].lower()
                continue
            attribute_name = _node_text(attribute.children[1]).lower()
            arguments = _attribute_arguments(attribute)
            if attribute_name == "parameter":
                set_name = arguments.get("parametersetname", ALL_SETS)
                sets[set_name] = arguments.get("mandatory", "$false").lower() == "$true"
            elif attribute_name == "validatepattern":
                pattern = arguments[""]
        default_node = next(
            (c for c in parameter.children if c.type == "script_parameter_default"), None
        )
        default = _literal(_node_text(default_node.children[-1])) if default_node else None
        parameters[name.lower()] = ScriptParameter(
            name, kind, sets or {ALL_SETS: False}, default, pattern
        )
    return ScriptSignature(binding.get("defaultparametersetname", ALL_SETS), parameters)


def bind(signature: ScriptSignature, arguments: list[str]) -> tuple[str, dict[str, str | None]]:
    """Bind named arguments as `powershell -File script.ps1 <arguments>` would: each `-Name` is a
    declared parameter, a switch takes no value, any other parameter takes the next argument;
    then the one parameter set that holds every bound parameter (the default set when several
    do) must have all its mandatory parameters bound. Returns (set, name → value or None)."""
    bound: dict[str, str | None] = {}
    position = 0
    while position < len(arguments):
        token = arguments[position]
        assert token.startswith("-"), f"positional argument {token!r}: pass it by name"
        parameter = signature.parameters.get(token[1:].lower())
        assert parameter is not None, f"{token} is not a parameter of the script"
        assert parameter.name not in bound, f"{token} is passed twice"
        if parameter.type == "switch":
            following = arguments[position + 1] if position + 1 < len(arguments) else "-"
            assert following.startswith("-"), f"switch {token} is passed a value {following!r}"
            bound[parameter.name] = None
            position += 1
        else:
            assert position + 1 < len(arguments), f"{token} has no value"
            value = arguments[position + 1]
            assert not value.startswith("-"), f"{token} is followed by {value!r}, not a value"
            bound[parameter.name] = value
            position += 2
    candidates = {
        name
        for name in signature.sets
        if all(signature.parameters[p.lower()].in_set(name) for p in bound)
    }
    assert candidates, f"no parameter set holds all of {sorted(bound)}"
    if len(candidates) > 1:
        assert signature.default_set in candidates, f"ambiguous parameter sets {candidates}"
        candidates = {signature.default_set}
    (chosen,) = candidates
    unbound = [
        p.name
        for p in signature.parameters.values()
        if p.in_set(chosen) and p.mandatory_in(chosen) and p.name not in bound
    ]
    assert not unbound, f"parameter set {chosen} leaves mandatory {unbound} unbound"
    for bound_name, bound_value in bound.items():
        pattern = signature.parameters[bound_name.lower()].pattern
        if pattern is not None and bound_value is not None:
            # ValidatePattern matches case-insensitively; these patterns are plain regexes.
            assert re.search(pattern, bound_value, re.I), f"-{bound_name} {bound_value!r} fails"
    return chosen, bound


def script_arguments(launch: Launch) -> tuple[Path, list[str]]:
    """The script a launch runs (from the repository) and the arguments after its path."""
    file_index = launch.argv.index("-File")
    script = launch.argv[file_index + 1].removeprefix(INSTALLDIR).replace("\\", "/")
    return REPO_ROOT / script, launch.argv[file_index + 2 :]


def test_the_binding_model_catches_what_powershell_would_refuse() -> None:
    install = script_signature(IIS_DIR / "install.ps1")
    with pytest.raises(AssertionError, match="not a parameter"):
        bind(install, ["-KeepPoolIdentity", "-InstallDir", "C:\\Program Files\\X\\."])
    with pytest.raises(AssertionError, match="is passed a value"):
        bind(install, ["-KeepPoolIdentity", "-FromMsi", "1"])
    with pytest.raises(AssertionError, match=r"Credential'\] unbound"):
        bind(install, ["-SiteName", "Default Web Site", "-FromMsi"])  # the default set prompts
    with pytest.raises(AssertionError, match="no parameter set holds"):
        bind(install, ["-KeepPoolIdentity", "-GroupManagedServiceAccount", "CONTOSO\\g$"])
    with pytest.raises(AssertionError, match="fails"):  # "Program Files" has a space
        bind(install, ["-KeepPoolIdentity", "-InstallRoot", "C:\\Program Files\\Veza"])
    assert bind(install, ["-GroupManagedServiceAccount", "CONTOSO\\gmsa-veza$"])[0] == "Gmsa"


_SESSIONS = {
    "install": {},
    "install with every property": {
        "PYTHONEXE": "C:\\Program Files\\Python313\\python.exe",
        "INSTALLROOT": "D:\\Veza",
        "SITE": "Exchange Back End",
        "APPALIAS": "Veza",
        "APPPOOL": "VezaPool",
        "POWERSHELLPATH": "C:\\Windows\\System32\\WindowsPowerShell\\v1.0\\powershell.exe",
        "REMOTEEXCHANGEPATH": "C:\\Program Files\\Microsoft\\Exchange Server\\V15\\bin\\x.ps1",
        "ALLOWEDUSERS": "CONTOSO\\veza-integration",
    },
    "repair": {"REINSTALL": "ALL"},
    "upgrade": {"UPGRADEFOUND": "{OLD}"},
    "uninstall": {"REMOVE": "ALL"},
    "uninstall with REMOVEDATA=1": {"REMOVE": "ALL", "REMOVEDATA": "1"},
}


@pytest.mark.parametrize("session", list(_SESSIONS))
def test_every_script_action_binds_to_its_script(msi: Path, session: str) -> None:
    """What each custom action passes is what the script declares: known names, switches
    without values, and a parameter set with every mandatory parameter bound (no prompt, which
    -NonInteractive would turn into a failed installation)."""
    (launch,) = replay(msi, _SESSIONS[session])
    script, arguments = script_arguments(launch)
    parameter_set, bound = bind(script_signature(script), arguments)
    assert "FromMsi" in bound
    if script.name == "install.ps1":
        assert parameter_set == "KeepPoolIdentity"  # no account, so never a password
    assert not [name for name in bound if re.search("password|credential", name, re.I)]


def test_msi_defaults_are_the_scripts_defaults(msi: Path) -> None:
    """Installing with the MSI or running the scripts by hand reaches the same folder, site,
    application and pool, and so uninstall.ps1 by hand undoes an MSI install."""
    (install,) = replay(msi, {})
    (uninstall,) = replay(msi, {"REMOVE": "ALL"})
    for launch in (install, uninstall):
        script, arguments = script_arguments(launch)
        signature = script_signature(script)
        _, bound = bind(signature, arguments)
        for name, value in bound.items():
            default = signature.parameters[name.lower()].default
            # install.ps1 searches for Python itself when run by hand; the MSI searched already.
            if value is not None and default is not None and name != "PythonExe":
                assert value == default, f"{script.name} -{name}: MSI {value!r}, script {default!r}"


def test_the_scripts_find_the_bundle_the_msi_installed() -> None:
    """The MSI passes no -BundleRoot: install.ps1's default, two folders above the script, is
    INSTALLDIR, where the MSI put the bundle."""
    signature = script_signature(IIS_DIR / "install.ps1")
    assert signature.parameters["bundleroot"].default == "(Join-Path $PSScriptRoot '..\\..')"


def test_the_msi_log_names_the_transcripts_the_scripts_write(msi: Path) -> None:
    """Windows Installer keeps no output of an EXE action; the verbose MSI log records property
    changes, so VpScriptLog carries where the scripts' transcripts are, under INSTALLROOT."""
    note = {row["Source"]: row["Target"] for row in table(msi, "CustomAction")}["VpScriptLog"]
    assert "[INSTALLROOT]\\logs" in note
    assert "install-msi.log" in note
    assert "uninstall-msi.log" in note
    assert "rollback-msi.log" in note
    number, condition = sequence(msi)["VpSetScriptLog"]
    assert condition == ""
    assert number > sequence(msi)["VpDefaultInstallRoot"][0]  # INSTALLROOT has its value then
    for script, log in (("install.ps1", "install-msi.log"), ("uninstall.ps1", "uninstall-msi.log")):
        text = (IIS_DIR / script).read_text(encoding="utf-8")
        assert f"'{log}'" in text
        assert "Join-Path $InstallRoot 'logs'" in text

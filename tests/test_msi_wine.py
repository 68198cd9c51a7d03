"""VezaProvisioner.msi through a real Windows Installer engine: Wine's msiexec.

Wine's msi.dll is an independent implementation of Windows Installer (not a model written here):
it reads the tables, evaluates the launch conditions, runs AppSearch, the sequences and the
custom actions, writes the installation script, rolls it back on failure, registers the product
in Programs and Features and refuses what the Upgrade table refuses. powershell.exe is the one
part replaced: tests/fakes/powershell_exe.c, a Windows program built with mingw-w64, stands in
for it, records the argv Windows Installer gave it and exits with the code a test chose.

Where Wine differs from Windows (read in Wine 8.0's msi.dll: its RemoveExistingProducts starts
`msiexec /qn /i <ProductCode> REMOVE=ALL` as a separate process):
- the old version's removal during an upgrade is not part of the new installation's
  transaction, so a failed upgrade cannot bring the old version back in Wine; and that
  removal runs without UPGRADINGPRODUCTCODE, so the old version's uninstall.ps1 runs. The
  tests say where this matters and check the table instead (tests/test_msi.py:
  test_a_failed_upgrade_rolls_back_to_the_old_version, test_upgrade_removing_the_old_version_
  leaves_iis_alone);
- a refused launch condition ends msiexec with another code than Windows' 1603, so the tests
  check "not 0" and that nothing was installed;
- Wine's msiexec does not implement /f: the repair test uses the equivalent
  `msiexec /i <msi> REINSTALL=ALL REINSTALLMODE=vomus`.
A run with a full UI cannot be driven here (no display): test_msi.py checks the hand-off of
AppSearch's properties to the elevated server in the tables (public, in SecureCustomProperties).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import pytest

from tests.test_msi import (
    DEFAULT_HELP_URL,
    PYTHON,
    build,
    install_argv,
    make_bundle,
    tree_digest,
    uninstall_argv,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_SOURCE = REPO_ROOT / "tests" / "fakes" / "powershell_exe.c"
_TOOLS = ("wine", "wineserver", "x86_64-w64-mingw32-gcc", "wixl", "msibuild", "msiinfo")
_MISSING = [tool for tool in _TOOLS if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(_MISSING),
        reason=f"{', '.join(_MISSING)} not installed: apt-get install wine wine64 "
        "gcc-mingw-w64-x86-64 wixl msitools (.ci/run does)",
    ),
]

REMEMBERED_KEY = r"HKLM\SOFTWARE\VezaProvisioner"
UNINSTALL_KEY = r"HKLM\Software\Microsoft\Windows\CurrentVersion\Uninstall"
PYTHON_KEY = r"HKLM\SOFTWARE\Python\PythonCore\3.12\InstallPath"
CUSTOM = {
    "INSTALLROOT": r"D:\Veza",
    "SITE": "Exchange Back End",
    "APPALIAS": "Veza",
    "APPPOOL": "Veza Pool",
}
_REG_VALUE = re.compile(r"^\s{4}(\S.*?)\s{4}(REG_\w+)(?:\s{4}(.*))?$")


@dataclass
class Wine:
    """One Wine prefix with the fake powershell.exe, shared by the tests of a session."""

    prefix: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`wine <args>`; its output goes through a file, not a pipe: the Wine services a
        command starts inherit its handles and would keep a pipe open after it exits."""
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as output:
            done = subprocess.run(
                ["wine", *args],
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                check=False,
                timeout=timeout,
            )
            output.seek(0)
            return subprocess.CompletedProcess(done.args, done.returncode, output.read(), "")

    def host_path(self, windows_path: str) -> Path:
        path = PureWindowsPath(windows_path)
        assert path.drive.upper() == "C:"
        return self.prefix.joinpath("drive_c", *path.parts[1:])

    def msiexec(self, *args: str, log: str = "msiexec") -> int:
        """msiexec with a verbose log in C:\\vpfake\\<log>.log; returns its exit code.

        The log is deleted first: msiexec creates it (MsiEnableLogW, read in Wine's
        programs/msiexec/msiexec.c) while it parses its command line, before Windows Installer
        does anything, and Wine 8's MsiEnableLogW never fails (dlls/msi/msi.c). Exit 1 with no
        log at all therefore means msiexec.exe never ran: Wine itself failed to start the
        process (its loader's fatal_error() exits 1, e.g. when it cannot reach the wineserver:
        dlls/ntdll/unix/server.c), and no installation state was touched. Only then is the
        same command started once more; every other exit is returned as it is, so a product
        failure is never retried away."""
        verbose = self.host_path(f"C:\\vpfake\\{log}.log")
        for attempt in (1, 2):
            verbose.unlink(missing_ok=True)
            done = self.run("msiexec", *args, "/qn", "/l*v", f"C:\\vpfake\\{log}.log")
            started = verbose.exists()
            if done.returncode != 0:  # shown by pytest when the test fails
                tail = verbose.read_text("utf-8", "replace")[-4000:] if started else "(no log)"
                print(
                    f"msiexec {args} exited {done.returncode} (attempt {attempt})\n"
                    f"{done.stdout}\n{tail}",
                    file=sys.stderr,
                )
            if done.returncode != 1 or started:
                return done.returncode
        raise AssertionError(
            f"Wine could not start msiexec {args} twice (exit {done.returncode}, no log): "
            f"{done.stdout}"
        )

    def registry(self, key: str) -> dict[str, str]:
        """The values of `key` (64-bit view); {} when it does not exist."""
        done = self.run("reg", "query", key, "/reg:64")
        if done.returncode != 0:
            return {}
        values = {}
        for line in done.stdout.splitlines():
            match = _REG_VALUE.match(line)
            if match:
                values[match.group(1)] = match.group(3) or ""
        return values

    def products(self) -> dict[str, str]:
        """Installed VezaProvisioner products in Programs and Features: ProductCode → version."""
        done = self.run("reg", "query", UNINSTALL_KEY, "/s", "/reg:64")
        found: dict[str, str] = {}
        current, values = "", dict[str, str]()
        for line in [*done.stdout.splitlines(), "HKEY_END"]:
            if line.startswith("HKEY_"):
                if values.get("DisplayName") == "VezaProvisioner":
                    found[current.rsplit("\\", 1)[-1]] = values.get("DisplayVersion", "")
                current, values = line.strip(), {}
            elif match := _REG_VALUE.match(line):
                values[match.group(1)] = match.group(3) or ""
        return found

    def calls(self) -> list[tuple[list[str], int]]:
        """What the fake powershell.exe was started with, in order: (argv[1:], exit code)."""
        log = self.host_path("C:\\vpfake\\calls.log")
        if not log.exists():
            return []
        calls: list[tuple[list[str], int]] = []
        argv: list[str] = []
        for line in log.read_text(encoding="utf-8").splitlines():
            kind, _, value = line.partition("\t")
            if kind == "CALL":
                argv = []
            elif kind == "ARG":
                argv.append(value)
            elif kind == "EXIT":
                calls.append((argv, int(value)))
        return calls

    def fail_when(self, *fragments: str) -> None:
        """The fake exits 1 when its command line contains any of `fragments`."""
        rules = self.host_path("C:\\vpfake\\fail-when.txt")
        rules.write_text("".join(f"{fragment}\n" for fragment in fragments), encoding="utf-8")

    def installed_files(self) -> list[str]:
        folder = self.host_path("C:\\Program Files\\VezaProvisioner")
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def wine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wine]:
    """One prefix per session: wineboot takes seconds, every later msiexec about one."""
    prefix = tmp_path_factory.mktemp("wineprefix")
    env = {
        **{name: value for name, value in os.environ.items() if name != "DISPLAY"},
        "WINEPREFIX": str(prefix),
        "WINEARCH": "win64",
        "WINEDEBUG": "-all",
        # No Mono or Gecko download prompts; and no DISPLAY: msiexec /qn needs no window.
        "WINEDLLOVERRIDES": "mscoree,mshtml=",
    }
    engine = Wine(prefix, env)
    # One wineserver for the whole session (it forks into the background), instead of one
    # started, and stopped when idle, around every command.
    subprocess.run(
        ["wineserver", "--persistent"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=60,
    )
    boot = engine.run("wineboot", "--init", timeout=300)
    assert boot.returncode == 0, boot.stdout
    fake = engine.host_path("C:\\windows\\system32\\WindowsPowerShell\\v1.0\\powershell.exe")
    fake.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "x86_64-w64-mingw32-gcc",
            "-municode",
            "-O2",
            "-o",
            str(fake),
            str(FAKE_SOURCE),
            "-lshell32",
        ],
        check=True,
        timeout=120,
    )
    engine.host_path("C:\\vpfake").mkdir()
    try:
        yield engine
    finally:
        subprocess.run(["wineserver", "--kill"], env=env, check=False, timeout=60)


@pytest.fixture(scope="session")
def wine_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("wine-bundle"))


@pytest.fixture(scope="session")
def msis(wine_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same bundle as two versions, so upgrades and a downgrade can be tried."""
    out = tmp_path_factory.mktemp("wine-msi")
    return {v: build(wine_bundle, out, "--version", v) for v in ("0.1.0", "0.2.0")}


@pytest.fixture
def machine(wine: Wine) -> Iterator[Wine]:
    """A server with 64-bit Python 3.12 for all users and no VezaProvisioner; afterwards
    every VezaProvisioner the test left is uninstalled."""
    wine.run("reg", "add", PYTHON_KEY, "/v", "ExecutablePath", "/d", PYTHON, "/f", "/reg:64")
    yield wine
    wine.fail_when()
    for code in wine.products():
        wine.msiexec("/x", code, log="cleanup")
    wine.run("reg", "delete", REMEMBERED_KEY, "/f", "/reg:64")
    wine.host_path("C:\\vpfake\\calls.log").unlink(missing_ok=True)
    # A product left behind would change what the next test installs (an upgrade, a refused
    # downgrade): say so here, at the test that left it, not as a puzzle in the next one.
    assert wine.products() == {}, "cleanup could not uninstall what the test left"


def scripts(calls: list[tuple[list[str], int]]) -> list[str]:
    """Which script each call ran, with -Rollback marked: "install", "uninstall", "rollback"."""
    names = []
    for argv, _ in calls:
        script = PureWindowsPath(argv[argv.index("-File") + 1]).stem
        names.append("rollback" if "-Rollback" in argv else script)
    return names


def argument(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def custom_install_argv(**overrides: str) -> list[str]:
    values = {
        "-InstallRoot": CUSTOM["INSTALLROOT"],
        "-SiteName": CUSTOM["SITE"],
        "-AppName": CUSTOM["APPALIAS"],
        "-AppPoolName": CUSTOM["APPPOOL"],
        **overrides,
    }
    argv = install_argv()
    for name, value in values.items():
        argv[argv.index(name) + 1] = value
    return argv


def with_properties(properties: dict[str, str]) -> list[str]:
    return [f"{name}={value}" for name, value in properties.items()]


def test_first_install_runs_install_ps1_exactly_as_documented(
    machine: Wine, msis: dict[str, Path], wine_bundle: Path
) -> None:
    assert machine.msiexec("/i", str(msis["0.1.0"]), "SITE=Default Web Site") == 0
    assert machine.calls() == [(install_argv(), 0)]
    ((code, version),) = machine.products().items()
    assert version == "0.1.0"
    entry = machine.registry(f"{UNINSTALL_KEY}\\{code}")
    assert entry["HelpLink"] == entry["URLInfoAbout"] == DEFAULT_HELP_URL
    assert machine.installed_files() == sorted(tree_digest(wine_bundle))
    remembered = machine.registry(REMEMBERED_KEY)
    assert remembered["Site"] == "Default Web Site"
    assert remembered["InstallRoot"] == "C:\\VezaProvisioner"
    assert remembered["PythonExe"] == PYTHON

    machine.host_path("C:\\vpfake\\calls.log").unlink()
    assert machine.msiexec("/x", str(msis["0.1.0"])) == 0
    assert machine.calls() == [(uninstall_argv(), 0)]
    assert machine.products() == {}
    assert machine.installed_files() == []
    assert machine.registry(REMEMBERED_KEY) == {}


def test_custom_values_with_spaces_reach_the_scripts_and_are_remembered(
    machine: Wine, msis: dict[str, Path], wine_bundle: Path
) -> None:
    """Install with custom values (spaces included), then a silent repair and an upgrade
    without properties: install.ps1 gets the same values each time."""
    msi = str(msis["0.1.0"])
    assert machine.msiexec("/i", msi, *with_properties(CUSTOM)) == 0
    # Wine's msiexec does not implement /f ("Product code treatment not implemented yet"):
    # REINSTALL=ALL is the same repair, as Windows documents it for msiexec /i.
    assert machine.msiexec("/i", msi, "REINSTALL=ALL", "REINSTALLMODE=vomus", log="repair") == 0
    assert machine.msiexec("/i", str(msis["0.2.0"]), log="upgrade") == 0
    calls = machine.calls()
    # Wine only: the old version's removal runs uninstall.ps1 (no UPGRADINGPRODUCTCODE there).
    installs = [
        argv for (argv, _), name in zip(calls, scripts(calls), strict=True) if name == "install"
    ]
    assert installs == [custom_install_argv()] * 3
    assert list(machine.products().values()) == ["0.2.0"]
    assert machine.installed_files() == sorted(tree_digest(wine_bundle))
    remembered = machine.registry(REMEMBERED_KEY)
    assert (remembered["Site"], remembered["AppPool"]) == (CUSTOM["SITE"], CUSTOM["APPPOOL"])


def test_a_command_line_value_wins_over_the_remembered_one(
    machine: Wine, msis: dict[str, Path]
) -> None:
    assert machine.msiexec("/i", str(msis["0.1.0"]), *with_properties(CUSTOM)) == 0
    upgrade = ["APPPOOL=Other Pool", "PYTHONEXE=C:\\Python\\python.exe"]
    assert machine.msiexec("/i", str(msis["0.2.0"]), *upgrade, log="upgrade") == 0
    last_argv, _ = machine.calls()[-1]
    assert last_argv == custom_install_argv(
        **{"-AppPoolName": "Other Pool", "-PythonExe": "C:\\Python\\python.exe"}
    )
    remembered = machine.registry(REMEMBERED_KEY)
    assert remembered["AppPool"] == "Other Pool"
    assert remembered["Site"] == CUSTOM["SITE"]  # the others are still remembered


def test_a_failed_first_install_rolls_back_and_leaves_nothing(
    machine: Wine, msis: dict[str, Path]
) -> None:
    machine.fail_when("iis\\install.ps1")
    assert machine.msiexec("/i", str(msis["0.1.0"]), *with_properties(CUSTOM)) != 0
    calls = machine.calls()
    assert scripts(calls) == ["install", "rollback"]
    (install, install_exit), (rollback, _) = calls
    assert install_exit == 1
    # The rollback undoes that very installation, with the new uninstall.ps1 still on disk.
    assert rollback[: rollback.index("-File") + 2] == [
        *install[: install.index("-File")],
        "-File",
        "C:\\Program Files\\VezaProvisioner\\deploy\\iis\\uninstall.ps1",
    ]
    for name in ("-InstallRoot", "-SiteName", "-AppName"):
        assert argument(rollback, name) == argument(install, name)
    assert rollback[-2:] == ["-Rollback", "-FromMsi"]
    assert machine.products() == {}
    assert machine.installed_files() == []
    assert machine.registry(REMEMBERED_KEY) == {}


def test_a_failed_upgrade_runs_the_rollback_and_installs_nothing_new(
    machine: Wine, msis: dict[str, Path]
) -> None:
    """install.ps1 of the new version fails: its rollback action runs, and the new version is
    not installed. On Windows the old version, its files and its remembered values are back
    afterwards (RemoveExistingProducts runs inside the transaction: test_msi.py checks the
    sequence); Wine removes the old version in a separate msiexec process, outside the
    transaction, so that part cannot be shown here."""
    assert machine.msiexec("/i", str(msis["0.1.0"]), *with_properties(CUSTOM)) == 0
    machine.fail_when("iis\\install.ps1")
    assert machine.msiexec("/i", str(msis["0.2.0"]), log="upgrade") != 0
    calls = machine.calls()
    names = scripts(calls)
    assert names[-2:] == ["install", "rollback"]
    rollback, _ = calls[-1]
    for name, property_name in (("-InstallRoot", "INSTALLROOT"), ("-SiteName", "SITE")):
        assert argument(rollback, name) == CUSTOM[property_name]  # remembered values
    assert "0.2.0" not in machine.products().values()


def test_a_downgrade_is_refused_and_changes_nothing(machine: Wine, msis: dict[str, Path]) -> None:
    assert machine.msiexec("/i", str(msis["0.2.0"])) == 0
    before = (machine.calls(), machine.installed_files(), machine.registry(REMEMBERED_KEY))
    assert machine.msiexec("/i", str(msis["0.1.0"]), log="downgrade") != 0
    assert list(machine.products().values()) == ["0.2.0"]
    assert (machine.calls(), machine.installed_files(), machine.registry(REMEMBERED_KEY)) == before


def test_uninstall_keeps_data_unless_removedata(machine: Wine, msis: dict[str, Path]) -> None:
    msi = str(msis["0.1.0"])
    assert machine.msiexec("/i", msi, *with_properties(CUSTOM)) == 0
    assert machine.msiexec("/x", msi, log="uninstall") == 0
    assert machine.msiexec("/i", msi, log="again") == 0  # no properties: nothing remembered now
    assert machine.msiexec("/x", msi, "REMOVEDATA=1", log="uninstall-data") == 0
    uninstalls = [argv for argv, _ in machine.calls() if "-Rollback" not in argv]
    assert uninstalls[1] == [
        *uninstall_argv()[: uninstall_argv().index("-InstallRoot")],
        "-InstallRoot",
        CUSTOM["INSTALLROOT"],
        "-SiteName",
        CUSTOM["SITE"],
        "-AppName",
        CUSTOM["APPALIAS"],
        "-FromMsi",
    ]
    assert uninstalls[2] == install_argv()
    assert uninstalls[3] == uninstall_argv("-RemoveData")
    assert machine.products() == {}


def test_python_is_required_before_anything_changes(machine: Wine, msis: dict[str, Path]) -> None:
    machine.run("reg", "delete", PYTHON_KEY, "/f", "/reg:64")
    msi = str(msis["0.1.0"])
    assert machine.msiexec("/i", msi, log="no-python") != 0
    assert (machine.calls(), machine.products(), machine.installed_files()) == ([], {}, [])
    # PYTHONEXE stands in for the search: a Python the installer does not register.
    assert machine.msiexec("/i", msi, "PYTHONEXE=D:\\Python\\python.exe", log="python") == 0
    ((argv, _),) = machine.calls()
    assert argument(argv, "-PythonExe") == "D:\\Python\\python.exe"


def test_a_value_ending_in_a_backslash_is_refused(machine: Wine, msis: dict[str, Path]) -> None:
    """INSTALLROOT=D:\\Veza\\ would put D:\\Veza\\" on the command line: the quote escaped, every
    later argument shifted. The launch condition refuses it before anything changes."""
    assert machine.msiexec("/i", str(msis["0.1.0"]), "INSTALLROOT=D:\\Veza\\") != 0
    assert (machine.calls(), machine.products(), machine.installed_files()) == ([], {}, [])


@pytest.mark.skipif(
    not (shutil.which("osslsigncode") and shutil.which("openssl")),
    reason="osslsigncode and openssl not installed (.ci/run installs them)",
)
def test_a_signed_msi_installs_the_same(machine: Wine, wine_bundle: Path, tmp_path: Path) -> None:
    """Signing adds a DigitalSignature stream and signature blocks to the scripts: the engine
    still reads the package and installs the bundle (the signed scripts) file for file."""
    from tests.test_signing import make_certificate, signed_build

    pfx, _ = make_certificate(tmp_path)
    done = signed_build(wine_bundle, tmp_path / "dist", pfx)
    assert done.returncode == 0, done.stderr
    assert machine.msiexec("/i", done.stdout.strip(), log="signed") == 0
    assert machine.calls() == [(install_argv(), 0)]
    assert machine.installed_files() == sorted(tree_digest(wine_bundle))
    installed = machine.host_path("C:\\Program Files\\VezaProvisioner\\deploy\\iis\\install.ps1")
    assert b"# SIG # Begin signature block" in installed.read_bytes()


class _ScriptedWine(Wine):
    """`wine` replaced by a script of outcomes: (exit code, whether msiexec wrote its log)."""

    def __init__(self, prefix: Path, outcomes: list[tuple[int, bool]]) -> None:
        super().__init__(prefix, {})
        self.outcomes = outcomes
        self.started = 0

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        code, writes_log = self.outcomes[self.started]
        self.started += 1
        if writes_log:
            self.host_path(args[-1]).write_text("=== Verbose logging started\n", encoding="utf-8")
        return subprocess.CompletedProcess(["wine", *args], code, "wine: said something\n", "")


@pytest.mark.parametrize(
    ("outcomes", "expected", "started"),
    [
        ([(1, False), (0, True)], 0, 2),  # Wine failed to start it: the same command once more
        ([(1, True)], 1, 1),  # msiexec ran and said 1: returned, never repeated
        ([(1603, True)], 1603, 1),
        ([(2, False)], 2, 1),  # not Wine's start failure: returned as it is
    ],
)
def test_msiexec_is_started_again_only_when_wine_could_not_start_it(
    tmp_path: Path, outcomes: list[tuple[int, bool]], expected: int, started: int
) -> None:
    machine = _ScriptedWine(tmp_path, outcomes)
    machine.host_path("C:\\vpfake").mkdir(parents=True)
    machine.host_path("C:\\vpfake\\msiexec.log").write_text("an earlier run's log")
    assert machine.msiexec("/x", "x.msi") == expected
    assert machine.started == started


def test_msiexec_that_wine_cannot_start_twice_fails_the_test(tmp_path: Path) -> None:
    machine = _ScriptedWine(tmp_path, [(1, False), (1, False)])
    machine.host_path("C:\\vpfake").mkdir(parents=True)
    with pytest.raises(AssertionError, match="Wine could not start msiexec"):
        machine.msiexec("/x", "x.msi")

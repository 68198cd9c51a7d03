#!/usr/bin/env python3
"""Build dist/VezaProvisioner-<version>-x64.msi from the offline bundle, on Linux, with wixl.

The MSI installs the bundle's tree as-is into Program Files\\VezaProvisioner, then runs
deploy\\iis\\install.ps1 (see VezaProvisioner.wxs for the custom actions). wixl has no `heat`
harvester that fits, so this script generates the file list: one component per file, with ids
derived from the file's path, so the same path keeps the same component across versions.

    python3 deploy/msi/build_msi.py --bundle dist/vezaprovisioner-0.1.0-win-amd64.zip \
        [--sign org-codesigning.pfx] [--help-url https://intranet.example/veza]

Needs the Debian packages wixl (the compiler) and msitools (msibuild, msiinfo, msiextract), and
osslsigncode for --sign (Authenticode: every .ps1 of the bundle, then the MSI).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from xml.etree import ElementTree as ET

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
WXS = HERE / "VezaProvisioner.wxs"
WIX_NS = "http://schemas.microsoft.com/wix/2006/wi"

#: The scripts the custom actions run; a bundle without them cannot configure IIS.
REQUIRED_FILES = (
    PurePosixPath("deploy/iis/install.ps1"),
    PurePosixPath("deploy/iis/uninstall.ps1"),
)
#: Where Programs and Features' help and "about" links point unless --help-url says otherwise:
#: the product page (a web page: a local file would not open from Programs and Features).
DEFAULT_HELP_URL = (
    "https://docs.veza.com/4yItIzMvkpAvMVFAamTf/integrations/integrations/exchange-online"
)
#: The environment variable holding the signing certificate's password (never an argument,
#: which other users of the build machine could read in the process list).
SIGN_PASSWORD_ENV = "VEZAPROVISIONER_SIGN_PASSWORD"  # noqa: S105 - a variable name
#: What osslsigncode appends to a signed PowerShell script.
PS1_SIGNATURE_START = "# SIG # Begin signature block"
#: Public properties the admin may pass on the msiexec command line. Listed in
#: SecureCustomProperties so they reach the elevated (server-side) part of the installation.
PUBLIC_PROPERTIES = (
    "INSTALLROOT",
    "SITE",
    "APPALIAS",
    "APPPOOL",
    "POWERSHELLPATH",
    "REMOTEEXCHANGEPATH",
    "PYTHONEXE",
    "ALLOWEDUSERS",
    "REMOVEDATA",
)
#: CustomAction types build_msi.py writes itself, because wixl 0.101 cannot: the rollback bit
#: (msidbCustomActionTypeRollback 0x100) on the deferred, no-impersonate EXE action whose return
#: code is ignored (50 | 0x40 | 0x400 | 0x800 = 3186).
ROLLBACK_ACTIONS = ("VpRollbackIis",)
#: wixl writes set-property actions as 51 | 0x800 (no-impersonate, meaningless for them; ICE68).
_WIXL_SET_PROPERTY, _SET_PROPERTY = 2099, 51
#: Characters an 8.3 short file name may hold besides letters and digits.
_SHORT_NAME_PART = re.compile(r"[A-Za-z0-9$%'`@~!(){}^#&_-]+")
#: Characters Windows forbids in file names (besides the separators).
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"|?*\\\x00-\x1f]')
#: Windows Installer compares only the first three fields, each within these bounds.
_VERSION_LIMITS = (255, 255, 65535)


class BuildError(Exception):
    """The MSI cannot be built; the message says why and what to do."""


def package_version() -> str:
    """The version in pyproject.toml, or of the installed package when there is no checkout."""
    pyproject = REPO_ROOT / "pyproject.toml"
    if pyproject.is_file():
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        version = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
        return str(version)
    from importlib.metadata import version as installed_version

    return installed_version("vezaprovisioner")


def msi_version(version: str) -> str:
    """`version` as an MSI ProductVersion; refuse what Windows Installer cannot compare.

    A major upgrade compares MAJOR.MINOR.PATCH numerically, so a pre-release such as
    "1.0.0rc1" would look equal to "1.0.0" and never replace it.
    """
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise BuildError(
            f"version {version!r} is not MAJOR.MINOR.PATCH: an MSI needs a numeric release version"
            " (pass --version to override)"
        )
    for field, limit in zip(version.split("."), _VERSION_LIMITS, strict=True):
        if int(field) > limit:
            raise BuildError(f"version {version!r}: MSI limits the fields to {_VERSION_LIMITS}")
    return ".".join(str(int(field)) for field in version.split("."))


def stage_bundle(bundle: Path, work: Path) -> Path:
    """The bundle's tree on disk: a directory as given, or a zip extracted under `work`.

    When the scripts are not at the top but the only entry is one folder
    (vezaprovisioner-<version>-win-amd64/), that folder is the bundle, so the scripts land in
    INSTALLDIR\\deploy\\iis where the custom actions run them.
    """
    if bundle.is_dir():
        root = bundle
    elif zipfile.is_zipfile(bundle):
        root = work / "bundle"
        with zipfile.ZipFile(bundle) as archive:
            for name in archive.namelist():
                path = PurePosixPath(name)
                if path.is_absolute() or ".." in path.parts or "\\" in name:
                    raise BuildError(f"{bundle}: unsafe path in the zip: {name!r}")
            archive.extractall(root)
    else:
        raise BuildError(f"{bundle}: neither a directory nor a zip file")
    entries = list(root.iterdir())
    if not _has_scripts(root) and len(entries) == 1 and entries[0].is_dir():
        root = entries[0]
    missing = [str(path) for path in REQUIRED_FILES if not (root / path).is_file()]
    if missing:
        raise BuildError(f"{bundle}: not an offline bundle, missing {', '.join(missing)}")
    return root


def _has_scripts(root: Path) -> bool:
    return all((root / path).is_file() for path in REQUIRED_FILES)


def bundle_files(root: Path) -> list[PurePosixPath]:
    """Every regular file under `root`, as sorted relative paths (empty folders are not kept).

    Refuses what would break on Windows: names it forbids, and names that differ only in case
    (one would overwrite the other in the same folder).
    """
    files: list[PurePosixPath] = []
    seen: dict[str, PurePosixPath] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise BuildError(f"{path}: symbolic links cannot go into an MSI")
        if not path.is_file():
            continue
        relative = PurePosixPath(path.relative_to(root).as_posix())
        for part in relative.parts:
            if _WINDOWS_FORBIDDEN.search(part) or part.endswith((" ", ".")):
                raise BuildError(f"{relative}: {part!r} is not a valid Windows file name")
        folded = str(relative).casefold()
        if folded in seen:
            raise BuildError(f"{relative} and {seen[folded]} are the same file on Windows")
        seen[folded] = relative
        files.append(relative)
    return files


def _identifier(prefix: str, path: PurePosixPath) -> str:
    """An MSI identifier (letters, digits, _ and .; at most 72) that stays the same per path."""
    return prefix + hashlib.sha256(str(path).encode()).hexdigest()[:32]


def files_fragment(files: Sequence[PurePosixPath], source_dir: str) -> str:
    """WiX source declaring `files` under INSTALLDIR, grouped as the ComponentGroup BundleFiles.

    `source_dir` is the bundle's folder relative to this fragment's own folder, because wixl 0.101
    looks files up relative to its input files only.
    """
    ET.register_namespace("", WIX_NS)

    def element(parent: ET.Element, tag: str, **attributes: str) -> ET.Element:
        return ET.SubElement(parent, f"{{{WIX_NS}}}{tag}", attributes)

    wix = ET.Element(f"{{{WIX_NS}}}Wix")
    fragment = element(wix, "Fragment")
    install_dir = element(fragment, "DirectoryRef", Id="INSTALLDIR")
    group = element(fragment, "ComponentGroup", Id="BundleFiles")
    directories: dict[PurePosixPath, ET.Element] = {PurePosixPath("."): install_dir}

    def directory(path: PurePosixPath) -> ET.Element:
        if path not in directories:
            parent = directory(path.parent)
            directories[path] = element(
                parent, "Directory", Id=_identifier("d_", path), Name=path.name
            )
        return directories[path]

    for path in files:
        component_id = _identifier("c_", path)
        # Guid="*": wixl derives the component GUID from the installed path, stable per path.
        component = element(directory(path.parent), "Component", Id=component_id, Guid="*")
        component.set("Win64", "yes")
        element(
            component,
            "File",
            Id=_identifier("f_", path),
            Name=path.name,
            Source=f"{source_dir}/{path}",
            KeyPath="yes",
        )
        element(group, "ComponentRef", Id=component_id)
    ET.indent(wix)
    return ET.tostring(wix, encoding="unicode", xml_declaration=True) + "\n"


def check_help_url(url: str) -> str:
    """`url` when it can be a Programs and Features link: http(s), no spaces, quotes or brackets."""
    if not re.fullmatch(r"https?://[^\s\"'<>\[\]{}]+", url):
        raise BuildError(f"--help-url {url!r}: give an http:// or https:// address without spaces")
    return url


def _is_short_name(name: str) -> bool:
    """Whether `name` is a valid 8.3 name already (then it needs no separate short form)."""
    stem, dot, extension = name.partition(".")
    return (
        0 < len(stem) <= 8
        and bool(_SHORT_NAME_PART.fullmatch(stem))
        and (not dot or (0 < len(extension) <= 3 and bool(_SHORT_NAME_PART.fullmatch(extension))))
    )


def short_names(names: Iterable[str]) -> dict[str, str]:
    """An 8.3 name for each entry (file or folder) of one folder, unique in it (Windows compares
    them without case): the name itself when it is one, else STEM~N.EXT from its letters.

    Windows Installer uses them when SHORTFILENAMES is set or the volume has no long names;
    a name without one fails ICE03. They do not affect component rules, so they may change
    between versions.
    """
    entries = sorted(set(names))
    taken = {name.upper() for name in entries if _is_short_name(name)}
    result: dict[str, str] = {}
    for name in entries:
        if _is_short_name(name):
            result[name] = name
            continue
        stem, dot, extension = name.rpartition(".")
        if not dot or not stem:
            stem, extension = name, ""
        base = re.sub(r"[^A-Z0-9_-]", "", stem.upper()) or "F"
        extension = re.sub(r"[^A-Z0-9_-]", "", extension.upper())[:3]
        number = 1
        while True:
            suffix = f"~{number}"
            candidate = base[: 8 - len(suffix)] + suffix + (f".{extension}" if extension else "")
            if candidate.upper() not in taken:
                break
            number += 1
        taken.add(candidate.upper())
        result[name] = candidate
    return result


def _with_short(name: str, short: str) -> str:
    return name if short == name else f"{short}|{name}"


# The SQL below is built from our own constants, the validated version and a GUID: never text
# that could hold a quote.
def _sql_set_property(name: str, value: str) -> str:
    return f"UPDATE `Property` SET `Value` = '{value}' WHERE `Property` = '{name}'"  # noqa: S608


def _sql_upgrade_row(upgrade_code: str, version: str) -> tuple[str, str]:
    """Replace the UPGRADEFOUND row: versions 0.0.0 to `version`, both inclusive, migrating
    feature states (msidbUpgradeAttributesMigrateFeatures | VersionMinInclusive |
    VersionMaxInclusive)."""
    if not re.fullmatch(r"\{[0-9A-F]{8}(-[0-9A-F]{4}){3}-[0-9A-F]{12}\}", upgrade_code):
        raise BuildError(f"UpgradeCode {upgrade_code!r} is not a braced upper-case GUID")
    attributes = 0x1 | 0x100 | 0x200
    columns = "`UpgradeCode`, `VersionMin`, `VersionMax`, `Attributes`, `ActionProperty`"
    values = f"'{upgrade_code}', '0.0.0', '{version}', {attributes}, 'UPGRADEFOUND'"
    return (
        "DELETE FROM `Upgrade` WHERE `ActionProperty` = 'UPGRADEFOUND'",
        f"INSERT INTO `Upgrade` ({columns}) VALUES ({values})",  # noqa: S608
    )


def _sql_action_types() -> list[str]:
    """The CustomAction types wixl cannot write: set-property actions as plain 51, and the
    rollback bit on the rollback actions."""
    queries = [
        f"UPDATE `CustomAction` SET `Type` = {_SET_PROPERTY} "  # noqa: S608
        f"WHERE `Type` = {_WIXL_SET_PROPERTY}"
    ]
    for action in ROLLBACK_ACTIONS:
        queries.append(
            f"UPDATE `CustomAction` SET `Type` = {50 | 0x40 | 0x100 | 0x400 | 0x800} "  # noqa: S608
            f"WHERE `Action` = '{action}'"
        )
    return queries


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BuildError(
            f"{name} not found: install it with `apt-get install wixl msitools` (Debian/Ubuntu)"
        )
    return path


def _run(command: Sequence[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        raise BuildError(f"{Path(command[0]).name} failed:\n{result.stderr}{result.stdout}")
    return result.stdout


def msi_property(msi: Path, name: str) -> str:
    """The value of property `name` in `msi`'s Property table (via `msiinfo export`)."""
    lines = _run([_tool("msiinfo"), "export", str(msi), "Property"]).splitlines()
    # An .idt export: column names, column types, table name and key, then one row per line.
    for line in lines[3:]:
        key, _, value = line.partition("\t")
        if key == name:
            return value
    raise BuildError(f"{msi}: no property {name}")


def _export(msi: Path, table: str, work: Path) -> tuple[list[str], list[list[str]]]:
    """`table`'s .idt export: its three header lines, and its rows as lists of fields."""
    lines = _run([_tool("msiinfo"), "export", str(msi), table]).split("\n")
    lines = [line.removesuffix("\r") for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    return lines[:3], [line.split("\t") for line in lines[3:]]


def _import(msi: Path, table: str, header: list[str], rows: list[list[str]], work: Path) -> None:
    path = work / f"{table}.idt"
    path.write_text("\r\n".join([*header, *("\t".join(row) for row in rows)]) + "\r\n", "utf-8")
    _run([_tool("msibuild"), str(msi), "-i", str(path)])


def add_short_names(msi: Path, work: Path) -> None:
    """Give every long file and folder name its 8.3 form ("SHORT~1.TXT|long name.txt")."""
    dir_header, dirs = _export(msi, "Directory", work)
    file_header, files = _export(msi, "File", work)
    _, components = _export(msi, "Component", work)
    component_dir = {row[0]: row[2] for row in components}  # Component, ComponentId, Directory_
    # Names in the same folder share one namespace, files and folders alike.
    folders: dict[str, list[str]] = {}
    for _directory, parent, default_dir in dirs:
        if parent and default_dir not in (".", "SourceDir"):
            folders.setdefault(parent, []).append(default_dir)
    for row in files:
        folders.setdefault(component_dir[row[1]], []).append(row[2])
    shorts = {parent: short_names(names) for parent, names in folders.items()}
    for row in dirs:
        if row[1] and row[2] not in (".", "SourceDir"):
            row[2] = _with_short(row[2], shorts[row[1]][row[2]])
    for row in files:
        row[2] = _with_short(row[2], shorts[component_dir[row[1]]][row[2]])
    _import(msi, "Directory", dir_header, dirs, work)
    _import(msi, "File", file_header, files, work)


def sign(path: Path, certificate: Path, timestamp_url: str | None, work: Path) -> None:
    """Authenticode-sign `path` in place with osslsigncode (SHA-256); the password of the
    PKCS#12 `certificate` comes from SIGN_PASSWORD_ENV, through a file only this user reads."""
    password = work / "sign-password"
    password.touch(mode=0o600)
    password.write_text(os.environ.get(SIGN_PASSWORD_ENV, ""), encoding="utf-8")
    signed = work / f"signed-{path.name}"
    command = [_tool_sign(), "sign", "-pkcs12", str(certificate), "-readpass", str(password)]
    command += ["-h", "sha256", "-n", "VezaProvisioner"]
    if timestamp_url:
        command += ["-ts", timestamp_url]
    try:
        _run([*command, "-in", str(path), "-out", str(signed)])
    finally:
        password.unlink()
    shutil.move(signed, path)


def _tool_sign() -> str:
    path = shutil.which("osslsigncode")
    if path is None:
        raise BuildError("osslsigncode not found: install it with `apt-get install osslsigncode`")
    return path


def sign_scripts(root: Path, certificate: Path, timestamp_url: str | None, work: Path) -> None:
    """Sign every .ps1 under `root` that is not signed yet (the bundle build signs its own)."""
    for script in sorted(root.rglob("*.ps1")):
        if PS1_SIGNATURE_START not in script.read_text(encoding="utf-8", errors="replace"):
            sign(script, certificate, timestamp_url, work)


def bundle_version(root: Path, requested: str | None) -> str:
    """The MSI's version: the bundle's VERSION, which install.ps1 installs and checks; a
    `requested` version (--version) must be the same. A bundle without VERSION (not made by
    deploy/bundle/build.py) takes `requested`, or the package version."""
    path = root / "VERSION"
    if not path.is_file():
        return msi_version(requested or package_version())
    found = msi_version(path.read_text(encoding="utf-8").strip())
    if requested is not None and msi_version(requested) != found:
        raise BuildError(
            f"--version {requested} differs from the bundle's VERSION {found}: the MSI would"
            " claim one version and install another (omit --version)"
        )
    return found


def build_msi(
    bundle: Path,
    version: str | None,
    output_dir: Path,
    *,
    help_url: str = DEFAULT_HELP_URL,
    certificate: Path | None = None,
    timestamp_url: str | None = None,
) -> Path:
    """Compile the MSI for `bundle` into `output_dir` and return its path; with `certificate`,
    its scripts and the MSI are Authenticode-signed. `version`: see bundle_version."""
    if version is not None:
        msi_version(version)  # refuse it before any work
    help_url = check_help_url(help_url)
    wixl, msibuild = _tool("wixl"), _tool("msibuild")
    if certificate is not None and not certificate.is_file():
        raise BuildError(f"--sign {certificate}: no such file")
    with tempfile.TemporaryDirectory(prefix="vezaprovisioner-msi-") as temp:
        work = Path(temp)
        root = stage_bundle(bundle, work)
        version = bundle_version(root, version)
        output = output_dir / f"VezaProvisioner-{version}-x64.msi"
        if certificate is not None:
            if root.resolve() == bundle.resolve():  # a folder: sign a copy, never the original
                root = Path(shutil.copytree(root, work / "signed-bundle", symlinks=True))
            sign_scripts(root, certificate, timestamp_url, work)
        files = bundle_files(root)
        link = work / "source"
        link.symlink_to(root.resolve(), target_is_directory=True)
        fragment = work / "bundle-files.wxs"
        fragment.write_text(files_fragment(files, link.name), encoding="utf-8")
        built = work / output.name
        # The fragment comes first: wixl searches the input files' folders in order.
        defines = [f"Version={version}", f"HelpLink={help_url}"]
        _run(
            [
                wixl,
                "--arch",
                "x64",
                *(arg for define in defines for arg in ("--define", define)),
                "--output",
                str(built),
                str(fragment),
                str(WXS),
            ]
        )
        # wixl writes SecureCustomProperties for its upgrade properties only, and a Property
        # element of the same name would clash: extend its row instead.
        # Every property AppSearch sets is public and secure too: in a run with a UI, AppSearch
        # runs in the client, and only secure public properties reach the elevated server.
        _, searches = _export(built, "AppSearch", work)
        found = sorted({row[0] for row in searches})
        secure = ";".join(
            [msi_property(built, "SecureCustomProperties"), *PUBLIC_PROPERTIES, *found]
        )
        queries = [_sql_set_property("SecureCustomProperties", secure)]
        # wixl 0.101 drops IncludeMaximum and MigrateFeatures: write the upgrade row in full.
        upgrade_code = msi_property(built, "UpgradeCode").upper()
        queries += _sql_upgrade_row(upgrade_code, version)
        queries += _sql_action_types()
        _run([msibuild, str(built), *(arg for query in queries for arg in ("-q", query))])
        add_short_names(built, work)
        if certificate is not None:
            sign(built, certificate, timestamp_url, work)
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(built, output)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle",
        type=Path,
        required=True,
        help="the offline bundle: vezaprovisioner-<version>-win-amd64.zip or its unpacked folder",
    )
    parser.add_argument(
        "--version",
        help="the product version (default: the bundle's VERSION; without one, the package's"
        " from pyproject.toml); must equal the bundle's VERSION",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=REPO_ROOT / "dist", help="default: dist/"
    )
    parser.add_argument(
        "--help-url",
        default=DEFAULT_HELP_URL,
        help="the web page Programs and Features links to (default: the product page)",
    )
    parser.add_argument(
        "--sign",
        type=Path,
        metavar="PFX",
        help="Authenticode-sign every .ps1 and the MSI with this PKCS#12 certificate (its"
        f" password in ${SIGN_PASSWORD_ENV}); without it, the artifacts are unsigned",
    )
    parser.add_argument(
        "--timestamp-url",
        help="an RFC 3161 time-stamping server, so signatures outlive the certificate",
    )
    args = parser.parse_args(argv)
    try:
        output = build_msi(
            args.bundle,
            args.version,
            args.output_dir,
            help_url=args.help_url,
            certificate=args.sign,
            timestamp_url=args.timestamp_url,
        )
    except BuildError as error:
        print(f"build_msi.py: {error}", file=sys.stderr)
        return 1
    if args.sign is None:
        print(
            "build_msi.py: UNSIGNED build: UAC shows 'Unknown publisher', and AllSigned,"
            " AppLocker or WDAC policies block the MSI and its scripts (deploy/msi/README.md)",
            file=sys.stderr,
        )
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

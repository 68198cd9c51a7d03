#!/usr/bin/env python3
"""Build dist/VezaProvisioner-<version>-x64.msi from the offline bundle, on Linux, with wixl.

The MSI installs the bundle's tree as-is into Program Files\\VezaProvisioner, then runs
deploy\\iis\\install.ps1 (see VezaProvisioner.wxs for the custom actions). wixl has no `heat`
harvester that fits, so this script generates the file list: one component per file, with ids
derived from the file's path, so the same path keeps the same component across versions.

    python3 deploy/msi/build_msi.py --bundle dist/vezaprovisioner-0.1.0-win-amd64.zip

Needs the Debian packages wixl (the compiler) and msitools (msibuild, msiinfo, msiextract).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
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
#: Where Programs and Features' help link points, the first one the bundle has.
README_CANDIDATES = (
    PurePosixPath("README.md"),
    PurePosixPath("deploy/iis/README.md"),
    PurePosixPath("deploy/msi/README.md"),
)
#: Public properties the admin may pass on the msiexec command line. Listed in
#: SecureCustomProperties so they reach the elevated (server-side) part of the installation.
PUBLIC_PROPERTIES = (
    "INSTALLROOT",
    "SITE",
    "APPALIAS",
    "APPPOOL",
    "POWERSHELLPATH",
    "REMOTEEXCHANGEPATH",
    "ALLOWEDUSERS",
    "REMOVEDATA",
)
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


def help_link(files: Sequence[PurePosixPath]) -> str:
    """The installed README that Programs and Features links to, as a formatted MSI string."""
    for candidate in README_CANDIDATES:
        if candidate in files:
            return "[INSTALLDIR]" + str(candidate).replace("/", "\\")
    raise BuildError(f"the bundle has no README ({', '.join(map(str, README_CANDIDATES))})")


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


def build_msi(bundle: Path, version: str, output_dir: Path) -> Path:
    """Compile the MSI for `bundle` into `output_dir` and return its path."""
    version = msi_version(version)
    wixl, msibuild = _tool("wixl"), _tool("msibuild")
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / f"VezaProvisioner-{version}-x64.msi"
    with tempfile.TemporaryDirectory(prefix="vezaprovisioner-msi-") as temp:
        work = Path(temp)
        root = stage_bundle(bundle, work)
        files = bundle_files(root)
        link = work / "source"
        link.symlink_to(root.resolve(), target_is_directory=True)
        fragment = work / "bundle-files.wxs"
        fragment.write_text(files_fragment(files, link.name), encoding="utf-8")
        built = work / output.name
        # The fragment comes first: wixl searches the input files' folders in order.
        defines = [f"Version={version}", f"HelpLink={help_link(files)}"]
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
        secure = ";".join([msi_property(built, "SecureCustomProperties"), *PUBLIC_PROPERTIES])
        _run([msibuild, str(built), "-q", _sql_set_property("SecureCustomProperties", secure)])
        # wixl 0.101 drops IncludeMaximum and MigrateFeatures: write the upgrade row in full.
        upgrade_code = msi_property(built, "UpgradeCode").upper()
        for query in _sql_upgrade_row(upgrade_code, version):
            _run([msibuild, str(built), "-q", query])
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
        "--version", help="the product version (default: the package's, from pyproject.toml)"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=REPO_ROOT / "dist", help="default: dist/"
    )
    args = parser.parse_args(argv)
    try:
        output = build_msi(args.bundle, args.version or package_version(), args.output_dir)
    except BuildError as error:
        print(f"build_msi.py: {error}", file=sys.stderr)
        return 1
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Builds the offline bundle for Windows: dist/vezaprovisioner-<version>-win-amd64.zip.

Runs on Linux (or anywhere) with network access to PyPI:

    python -m pip install uv      # the resolver that understands another platform's markers
    python deploy/bundle/build.py [--dist dist] [--cache-dir DIR] [--sign org-codesigning.pfx]
    python deploy/bundle/build.py --lock     # after changing dependencies: new lock files

The zip holds one folder, vezaprovisioner-<version>-win-amd64/, with:

    wheelhouse/          every wheel needed on 64-bit Windows for CPython 3.10-3.13
    web.config           the IIS configuration install.ps1 lays down
    deploy/iis/          install.ps1, uninstall.ps1 and the admin README
    README.md            the admin README (same as deploy/iis/README.md)
    VERSION              the package version install.ps1 installs (checked against its wheel)
    requirements-cp3XX.txt   per Python version, every wheel install.ps1 installs: one
                         `name==version --hash=sha256:...` each, the hash of the file in
                         wheelhouse/ (install.ps1: pip install --require-hashes --no-index -r)

Pinned: the versions come from the lock files next to this script,
requirements-lock-cp3XX.txt, which `--lock` writes with `uv pip compile --generate-hashes
--python-platform x86_64-pc-windows-msvc --python-version 3.X` (uv evaluates the environment
markers for 64-bit Windows and that Python; `pip download --platform` would evaluate them for
this machine and leave out, for example, what only Python 3.10 or only Windows needs). The
build downloads exactly those versions with pip --require-hashes, so a wheel that differs from
the one locked fails the build; it never resolves anew. wfastcgi is published only as an
sdist: its locked sdist is hash-checked and built into a pure-Python wheel here. Finally the
wheelhouse alone is checked twice per Python version: uv resolves vezaprovisioner from it
(--no-index), and pip runs install.ps1's very command (--require-hashes --no-index -r) as a
dry run for win_amd64.

Signed: with --sign, the PowerShell scripts (deploy/iis/*.ps1, and host.ps1 inside the
package wheel) are Authenticode-signed with osslsigncode before they are packed; see
deploy/msi/README.md.
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
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT / "deploy" / "msi"))
import build_msi  # noqa: E402 - the one Authenticode signing helper, shared with the MSI build

PYTHON_VERSIONS = ("3.10", "3.11", "3.12", "3.13")
UV_PLATFORM = "x86_64-pc-windows-msvc"
PIP_PLATFORM = "win_amd64"
#: Requirements PyPI has no wheel for; pure Python, so a wheel built here is platform-independent.
SDIST_ONLY = ("wfastcgi",)
#: What the bundle carries besides the wheelhouse (repository path -> path in the bundle).
FILES = {
    "web.config": "web.config",
    "deploy/iis/install.ps1": "deploy/iis/install.ps1",
    "deploy/iis/uninstall.ps1": "deploy/iis/uninstall.ps1",
    "deploy/iis/README.md": "deploy/iis/README.md",
    "deploy/iis/vezaprovisioner.toml.template": "deploy/iis/vezaprovisioner.toml.template",
}
ADMIN_README = "deploy/iis/README.md"
#: The PowerShell script inside the package (the local backend's host), signed with --sign.
HOST_SCRIPT = "src/vezaprovisioner/exchange/local/host.ps1"
_PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;]+)")


def lock_file(python: str) -> Path:
    """The lock for CPython `python` on 64-bit Windows: requirements-lock-cp3XX.txt."""
    return HERE / f"requirements-lock-cp{python.replace('.', '')}.txt"


def locked_pins(python: str) -> dict[str, str]:
    """name (normalized) -> version, from the lock file of `python`."""
    pins = {}
    for line in lock_file(python).read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            pins[_normalize(match.group(1))] = match.group(2)
    return pins


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked_entries(python: str) -> dict[str, str]:
    """name (normalized) -> its whole entry in the lock (the pin and its --hash lines)."""
    entries: dict[str, str] = {}
    current = ""
    for line in lock_file(python).read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            current = _normalize(match.group(1))
            entries[current] = line
        elif current and line.strip().startswith("--hash"):
            entries[current] += "\n" + line
        else:
            current = ""
    return entries


class BuildError(Exception):
    """A step of the build failed; the message says which and why."""


def _run(arguments: Sequence[str | Path], what: str) -> str:
    command = [str(part) for part in arguments]
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        raise BuildError(f"{what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _uv() -> str:
    try:
        from uv import find_uv_bin
    except ImportError as exc:
        raise BuildError("uv is not installed: python -m pip install uv") from exc
    return str(find_uv_bin())


def _pip(cache_dir: Path | None) -> list[str]:
    # --isolated: this machine's pip configuration (extra indexes, constraints) must not decide
    # what ships to another machine.
    base = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check"]
    return base + (["--cache-dir", str(cache_dir)] if cache_dir else [])


def _windows_wheels(python: str) -> list[str]:
    """pip's options that pick wheels for 64-bit Windows and CPython `python`, not this machine."""
    return [
        "--only-binary=:all:",
        "--platform",
        PIP_PLATFORM,
        "--python-version",
        python,
        "--implementation",
        "cp",
    ]


def _uv_compile(
    requirement: str, python: str, links: Sequence[Path], cache_dir: Path | None, *, offline: bool
) -> list[str]:
    """The exact requirements for 64-bit Windows and CPython `python`, one `name==version` each."""
    arguments: list[str | Path] = [
        _uv(),
        "pip",
        "compile",
        "-",
        "--python-version",
        python,
        "--python-platform",
        UV_PLATFORM,
        "--only-binary",
        ":all:",
        "--no-python-downloads",
        "--no-header",
        "--no-annotate",
        "--quiet",
    ]
    for link in links:
        arguments += ["--find-links", link]
    if offline:
        arguments.append("--no-index")
    if cache_dir:
        arguments += ["--cache-dir", cache_dir / "uv"]
    command = [str(part) for part in arguments]
    done = subprocess.run(  # noqa: S603 - fixed executable, argument list
        command, input=requirement + "\n", capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        where = "the wheelhouse alone" if offline else "PyPI"
        raise BuildError(
            f"resolving {requirement} for CPython {python} on {PIP_PLATFORM} from {where} "
            f"failed:\n{done.stderr}"
        )
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def write_locks(cache_dir: Path | None = None) -> list[Path]:
    """Resolve pyproject.toml's dependencies for each Python on 64-bit Windows, with hashes."""
    written = []
    for python in PYTHON_VERSIONS:
        arguments: list[str | Path] = [
            _uv(),
            "pip",
            "compile",
            REPO_ROOT / "pyproject.toml",
            "--generate-hashes",
            "--python-version",
            python,
            "--python-platform",
            UV_PLATFORM,
            "--no-python-downloads",
            "--quiet",
            "--custom-compile-command",
            "python deploy/bundle/build.py --lock",
            "--output-file",
            lock_file(python),
        ]
        if cache_dir:
            arguments += ["--cache-dir", cache_dir / "uv"]
        _run(arguments, f"locking the dependencies for CPython {python}")
        written.append(lock_file(python))
    return written


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def project_version() -> str:
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return str(data["project"]["version"])


def verify_wheelhouse(
    wheelhouse: Path, version: str, cache_dir: Path | None = None
) -> dict[str, list[str]]:
    """Resolve vezaprovisioner==version from the wheelhouse alone for each Python version."""
    return {
        python: _uv_compile(
            f"vezaprovisioner=={version}", python, [wheelhouse], cache_dir, offline=True
        )
        for python in PYTHON_VERSIONS
    }


def verify_requirements(bundle: Path) -> None:
    """Run install.ps1's pip command for each Python as a dry run for win_amd64: every wheel
    requirements-cp3XX.txt names is in the wheelhouse with that hash, and nothing is missing."""
    for python in PYTHON_VERSIONS:
        tag = "cp" + python.replace(".", "")
        with tempfile.TemporaryDirectory(prefix="vezaprovisioner-dry-run-") as target:
            _run(
                [
                    *_pip(None),
                    "install",
                    "--dry-run",
                    "--ignore-installed",
                    "--target",
                    target,
                    *_windows_wheels(python),
                    "--no-index",
                    "--find-links",
                    bundle / "wheelhouse",
                    "--require-hashes",
                    "-r",
                    bundle / f"requirements-{tag}.txt",
                ],
                f"installing requirements-{tag}.txt from the wheelhouse alone (dry run)",
            )


def build(
    dist: Path,
    cache_dir: Path | None = None,
    *,
    certificate: Path | None = None,
    timestamp_url: str | None = None,
) -> Path:
    """Build the bundle into `dist` and return the zip's path; with `certificate`, every
    PowerShell script in it is Authenticode-signed."""
    version = project_version()
    name = f"vezaprovisioner-{version}-win-amd64"
    with tempfile.TemporaryDirectory(prefix="vezaprovisioner-bundle-") as scratch:
        work = Path(scratch)
        package_dir = work / "package"
        bundle = work / name
        wheelhouse = bundle / "wheelhouse"
        wheelhouse.mkdir(parents=True)

        # Built from a clean copy: an in-tree build/ folder could carry stale modules along.
        source = work / "source"
        shutil.copytree(
            REPO_ROOT / "src",
            source / "src",
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
        )
        for top_level in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO_ROOT / top_level, source / top_level)
        if certificate is not None:
            build_msi.sign(source / HOST_SCRIPT, certificate, timestamp_url, work)
        _run(
            [*_pip(cache_dir), "wheel", "--use-pep517", "--no-deps", "-w", package_dir, source],
            "building the vezaprovisioner wheel",
        )
        (package_wheel,) = package_dir.glob("vezaprovisioner-*.whl")
        sdist_only = {_normalize(re.split(r"[<>=!~;\s\[]", r)[0]) for r in SDIST_ONLY}
        requirements: dict[str, list[str]] = {}
        for python in PYTHON_VERSIONS:
            tag = "cp" + python.replace(".", "")
            entries = _locked_entries(python)
            if not entries:
                raise BuildError(f"{lock_file(python)} is missing or empty: run build.py --lock")
            downloads = work / "downloads" / tag
            binary = work / f"lock-{tag}.txt"
            binary.write_text(
                "\n".join(e for p, e in entries.items() if p not in sdist_only) + "\n", "utf-8"
            )
            _run(
                [
                    *_pip(cache_dir),
                    "download",
                    "--no-deps",
                    "--require-hashes",
                    *_windows_wheels(python),
                    "--dest",
                    downloads,
                    "-r",
                    binary,
                ],
                f"downloading the locked wheels for CPython {python}",
            )
            for sdist_name in sorted(sdist_only & set(entries)):
                # Pure Python, published only as an sdist: the locked sdist, built here.
                sdist = work / f"lock-{tag}-{sdist_name}.txt"
                sdist.write_text(entries[sdist_name] + "\n", encoding="utf-8")
                _run(
                    [
                        *_pip(cache_dir),
                        "wheel",
                        "--use-pep517",
                        "--no-deps",
                        "--require-hashes",
                        "-w",
                        downloads,
                        "-r",
                        sdist,
                    ],
                    f"building a wheel for {sdist_name} from its locked sdist",
                )
            lines = []
            for wheel in sorted(downloads.glob("*.whl")):
                project, wheel_version = wheel.name.split("-")[:2]
                lines.append(f"{project}=={wheel_version} --hash=sha256:{_sha256(wheel)}")
                shutil.copy2(wheel, wheelhouse / wheel.name)
            package_version = package_wheel.name.split("-")[1]
            if package_version != version:
                raise BuildError(f"{package_wheel.name} is not version {version} (VERSION)")
            lines.insert(0, f"vezaprovisioner=={version} --hash=sha256:{_sha256(package_wheel)}")
            requirements[tag] = lines
        shutil.copy2(package_wheel, wheelhouse)

        verify_wheelhouse(wheelhouse, version, cache_dir)

        for shipped, target in FILES.items():
            destination = bundle / target
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / shipped, destination)
        shutil.copy2(REPO_ROOT / ADMIN_README, bundle / "README.md")
        if certificate is not None:
            build_msi.sign_scripts(bundle / "deploy", certificate, timestamp_url, work)
        (bundle / "VERSION").write_text(version + "\n", encoding="utf-8")
        for tag, lines in requirements.items():
            (bundle / f"requirements-{tag}.txt").write_text(
                "\n".join(lines) + "\n", encoding="utf-8"
            )
        verify_requirements(bundle)

        dist.mkdir(parents=True, exist_ok=True)
        archive = dist / f"{name}.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
            for path in sorted(bundle.rglob("*")):
                if path.is_file():
                    zipped.write(path, path.relative_to(work).as_posix())
    return archive


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--dist", type=Path, default=REPO_ROOT / "dist")
    parser.add_argument("--cache-dir", type=Path, default=None, help="pip and uv download cache")
    parser.add_argument(
        "--lock",
        action="store_true",
        help="resolve the dependencies anew into requirements-lock-cp3XX.txt and stop",
    )
    parser.add_argument(
        "--sign",
        type=Path,
        metavar="PFX",
        help="Authenticode-sign every .ps1 (host.ps1 included) with this PKCS#12 certificate"
        f" (password in ${build_msi.SIGN_PASSWORD_ENV}); without it, the scripts are unsigned",
    )
    parser.add_argument("--timestamp-url", help="an RFC 3161 time-stamping server")
    args = parser.parse_args(argv)
    try:
        if args.lock:
            for path in write_locks(args.cache_dir):
                print(path)
            return 0
        archive = build(
            args.dist, args.cache_dir, certificate=args.sign, timestamp_url=args.timestamp_url
        )
    except BuildError as exc:
        print(f"bundle build failed: {exc}", file=sys.stderr)
        return 1
    print(archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())

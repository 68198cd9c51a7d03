"""Builds the offline bundle for Windows: dist/vezaprovisioner-<version>-win-amd64.zip.

Runs on Linux (or anywhere) with network access to PyPI:

    python -m pip install uv      # the resolver that understands another platform's markers
    python deploy/bundle/build.py [--dist dist] [--cache-dir DIR]

The zip holds one folder, vezaprovisioner-<version>-win-amd64/, with:

    wheelhouse/          every wheel needed on 64-bit Windows for CPython 3.10-3.13
    web.config           the IIS configuration install.ps1 lays down
    deploy/iis/          install.ps1, uninstall.ps1 and the admin README
    README.md            the admin README (same as deploy/iis/README.md)
    VERSION              the package version install.ps1 installs
    requirements-cp3XX.txt   the exact versions, per Python version, for auditing

Why uv resolves and pip downloads: `pip download --platform win_amd64 --python-version 3.10`
picks Windows wheels but evaluates environment markers for the machine it runs on, so
`tomli; python_version < "3.11"` or `colorama; platform_system == "Windows"` would be left out.
`uv pip compile --python-platform x86_64-pc-windows-msvc --python-version 3.X` resolves for the
target; pip then downloads exactly those pins (--no-deps) for win_amd64. wfastcgi is published
only as an sdist: it is pure Python, so its wheel is built here and works on Windows unchanged.
Finally the wheelhouse alone (--no-index) is resolved again for each Python version.
"""

from __future__ import annotations

import argparse
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


def project_version() -> str:
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return str(data["project"]["version"])


def _sdist_only_requirements() -> list[str]:
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    found = []
    for requirement in data["project"]["dependencies"]:
        name = re.split(r"[<>=!~;\s\[]", requirement, maxsplit=1)[0]
        if name.lower() in SDIST_ONLY:
            found.append(requirement.split(";")[0].strip())
    return found


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


def build(dist: Path, cache_dir: Path | None = None) -> Path:
    """Build the bundle into `dist` and return the zip's path."""
    version = project_version()
    name = f"vezaprovisioner-{version}-win-amd64"
    with tempfile.TemporaryDirectory(prefix="vezaprovisioner-bundle-") as scratch:
        work = Path(scratch)
        package_dir, local_dir = work / "package", work / "local"
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
        _run(
            [*_pip(cache_dir), "wheel", "--use-pep517", "--no-deps", "-w", package_dir, source],
            "building the vezaprovisioner wheel",
        )
        (package_wheel,) = package_dir.glob("vezaprovisioner-*.whl")
        for requirement in _sdist_only_requirements():
            _run(
                [
                    *_pip(cache_dir),
                    "wheel",
                    "--use-pep517",
                    "--no-deps",
                    "-w",
                    local_dir,
                    requirement,
                ],
                f"building a wheel for {requirement}",
            )

        pins: dict[str, list[str]] = {}
        for python in PYTHON_VERSIONS:
            pinned = _uv_compile(
                f"vezaprovisioner @ {package_wheel.as_uri()}",
                python,
                [local_dir],
                cache_dir,
                offline=False,
            )
            third_party = [pin for pin in pinned if not pin.startswith("vezaprovisioner")]
            pins[python] = [f"vezaprovisioner=={version}", *third_party]
            requirements = work / f"requirements-{python}.txt"
            requirements.write_text("\n".join(third_party) + "\n", encoding="utf-8")
            _run(
                [
                    *_pip(cache_dir),
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--platform",
                    PIP_PLATFORM,
                    "--python-version",
                    python,
                    "--implementation",
                    "cp",
                    "--find-links",
                    local_dir,
                    "--dest",
                    wheelhouse,
                    "-r",
                    requirements,
                ],
                f"downloading the wheels for CPython {python}",
            )
        shutil.copy2(package_wheel, wheelhouse)

        verify_wheelhouse(wheelhouse, version, cache_dir)

        for shipped, target in FILES.items():
            destination = bundle / target
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / shipped, destination)
        shutil.copy2(REPO_ROOT / ADMIN_README, bundle / "README.md")
        (bundle / "VERSION").write_text(version + "\n", encoding="utf-8")
        for python, pinned in pins.items():
            tag = "cp" + python.replace(".", "")
            (bundle / f"requirements-{tag}.txt").write_text(
                "\n".join(pinned) + "\n", encoding="utf-8"
            )

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
    args = parser.parse_args(argv)
    try:
        archive = build(args.dist, args.cache_dir)
    except BuildError as exc:
        print(f"bundle build failed: {exc}", file=sys.stderr)
        return 1
    print(archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The offline bundle: built here from PyPI from the lock files, pinned and hash-checked, signed,
and its wheelhouse alone installs on Windows.

"Alone" is checked the strict way: the wheelhouse is resolved with --no-index for 64-bit Windows
and each CPython 3.10-3.13, with markers evaluated for that target (uv --python-platform).
`pip install --dry-run --platform win_amd64` would evaluate markers for this Linux machine and
miss, for example, what only Python 3.10 or only Windows needs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bundle_build", REPO_ROOT / "deploy" / "bundle" / "build.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()


CAN_SIGN = all(shutil.which(tool) for tool in ("osslsigncode", "openssl"))


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path] | None:
    """A throwaway code-signing certificate (PKCS#12, PEM) when osslsigncode is there."""
    if not CAN_SIGN:
        return None
    from tests.test_signing import PASSWORD, make_certificate

    pfx, pem = make_certificate(tmp_path_factory.mktemp("certificate"))
    os.environ[builder.build_msi.SIGN_PASSWORD_ENV] = PASSWORD
    return pfx, pem


@pytest.fixture(scope="module")
def bundle(
    tmp_path_factory: pytest.TempPathFactory, signing: tuple[Path, Path] | None
) -> tuple[Path, Path]:
    """(zip, unpacked folder), signed when osslsigncode is installed (as in CI); downloads are
    cached in the test's own tmp folder."""
    root = tmp_path_factory.mktemp("bundle")
    certificate = signing[0] if signing else None
    try:
        archive: Path = builder.build(
            root / "dist", cache_dir=root / "cache", certificate=certificate
        )
    finally:
        os.environ.pop(builder.build_msi.SIGN_PASSWORD_ENV, None)
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(root / "unpacked")
    (folder,) = (root / "unpacked").iterdir()
    return archive, folder


def test_the_bundle_is_named_and_laid_out_for_install_ps1(bundle: tuple[Path, Path]) -> None:
    archive, folder = bundle
    version = builder.project_version()
    assert archive.name == f"vezaprovisioner-{version}-win-amd64.zip"
    assert folder.name == f"vezaprovisioner-{version}-win-amd64"
    assert (folder / "VERSION").read_text().strip() == version
    for name in ("web.config", "deploy/iis/vezaprovisioner.toml.template"):
        assert (folder / name).read_bytes() == (REPO_ROOT / name).read_bytes(), name
    for name in ("deploy/iis/install.ps1", "deploy/iis/uninstall.ps1"):  # signed or not
        assert (folder / name).read_bytes().startswith((REPO_ROOT / name).read_bytes()), name
    assert (folder / "README.md").read_text() == (REPO_ROOT / "deploy/iis/README.md").read_text()
    # install.ps1's default -BundleRoot is two folders above itself: the bundle's root.
    assert (folder / "deploy" / "iis" / ".." / ".." / "wheelhouse").resolve().is_dir()


def test_the_wheelhouse_holds_only_windows_and_pure_wheels(bundle: tuple[Path, Path]) -> None:
    _, folder = bundle
    wheels = sorted(p.name for p in (folder / "wheelhouse").iterdir())
    assert all(name.endswith(".whl") for name in wheels)
    assert all(name.endswith(("-win_amd64.whl", "-none-any.whl")) for name in wheels), wheels
    version = builder.project_version()
    assert f"vezaprovisioner-{version}-py3-none-any.whl" in wheels
    assert any(name.startswith("wfastcgi-") for name in wheels)  # built from its sdist
    assert any(name.startswith("a2wsgi-") for name in wheels)
    for tag in ("cp310", "cp311", "cp312", "cp313"):
        assert any(n.startswith("pydantic_core-") and f"-{tag}-{tag}-" in n for n in wheels), tag
    # Only Python 3.10 needs these; they are there because markers were evaluated per target.
    assert any(name.startswith("tomli-") for name in wheels)
    pins = (folder / "requirements-cp310.txt").read_text()
    assert "tomli==" in pins
    assert "tomli==" not in (folder / "requirements-cp312.txt").read_text()


def test_the_wheelhouse_alone_satisfies_every_supported_python(bundle: tuple[Path, Path]) -> None:
    _, folder = bundle
    resolved = builder.verify_wheelhouse(folder / "wheelhouse", builder.project_version())
    assert set(resolved) == {"3.10", "3.11", "3.12", "3.13"}
    for python, pins in resolved.items():
        names = {pin.split("==")[0].lower() for pin in pins}
        assert {"vezaprovisioner", "fastapi", "a2wsgi", "wfastcgi", "pydantic-core"} <= names
        assert ("tomli" in names) == (python == "3.10"), python


@pytest.mark.parametrize(
    ("missing", "python"), [("tomli-", "3.10"), ("pydantic_core-2", "3.13"), ("wfastcgi-", "3.10")]
)
def test_the_check_fails_when_a_wheel_is_missing(
    bundle: tuple[Path, Path], tmp_path: Path, missing: str, python: str
) -> None:
    _, folder = bundle
    partial = tmp_path / "wheelhouse"
    shutil.copytree(folder / "wheelhouse", partial)
    for wheel in partial.glob(f"{missing}*"):
        if missing != "pydantic_core-2" or "cp313" in wheel.name:
            wheel.unlink()
    with pytest.raises(builder.BuildError, match=f"CPython {python}") as failure:
        builder.verify_wheelhouse(partial, builder.project_version())
    assert missing.rstrip("-2").replace("_", "-") in str(failure.value)


def test_the_package_wheel_carries_the_iis_entry(bundle: tuple[Path, Path]) -> None:
    _, folder = bundle
    (wheel,) = (folder / "wheelhouse").glob("vezaprovisioner-*.whl")
    with zipfile.ZipFile(wheel) as zipped:
        names = set(zipped.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [
            line
            for line in zipped.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    assert {"vezaprovisioner/iis_entry.py", "vezaprovisioner/doctor.py"} <= names
    assert any(line.startswith("Requires-Dist: a2wsgi") for line in requires)
    assert any("wfastcgi" in line and "sys_platform" in line for line in requires)


_REQUIREMENT = re.compile(r"^([A-Za-z0-9._-]+)==(\S+) --hash=sha256:([0-9a-f]{64})$")


def _requirements(folder: Path, tag: str) -> dict[str, tuple[str, str]]:
    """requirements-<tag>.txt: normalized name -> (version, sha256); one line per package."""
    found: dict[str, tuple[str, str]] = {}
    for line in (folder / f"requirements-{tag}.txt").read_text().splitlines():
        match = _REQUIREMENT.match(line)
        assert match, f"{tag}: not `name==version --hash=sha256:...`: {line!r}"
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        assert name not in found, f"{tag}: {name} twice"
        found[name] = (match.group(2), match.group(3))
    return found


def test_each_python_gets_one_hash_pinned_version_of_each_package(
    bundle: tuple[Path, Path],
) -> None:
    """install.ps1 runs pip install --require-hashes --no-index -r requirements-cp3XY.txt:
    every line is pinned with the SHA-256 of a wheel in the wheelhouse, the versions are the
    lock's, vezaprovisioner is VERSION, and the wheelhouse holds nothing no file names."""
    _, folder = bundle
    version = (folder / "VERSION").read_text().strip()
    wheels = {p.name: p for p in (folder / "wheelhouse").iterdir()}
    hashes = {name: builder._sha256(path) for name, path in wheels.items()}
    named = set()
    for python in ("3.10", "3.11", "3.12", "3.13"):
        tag = "cp" + python.replace(".", "")
        pins = _requirements(folder, tag)
        assert pins["vezaprovisioner"][0] == version
        locked = builder.locked_pins(python)
        assert {n: v for n, (v, _) in pins.items() if n != "vezaprovisioner"} == locked
        for name, (pinned, digest) in pins.items():
            matching = [w for w, h in hashes.items() if h == digest]
            assert len(matching) == 1, f"{tag} {name}: no wheel with its hash"
            assert matching[0].split("-")[1] == pinned
            named.add(matching[0])
    assert named == set(wheels), f"wheels no requirements file names: {set(wheels) - named}"
    builder.verify_requirements(folder)  # pip's own hash check, as install.ps1 runs it


def test_a_wheel_that_differs_from_its_hash_is_refused(
    bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    _, folder = bundle
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    (wheel,) = (copy / "wheelhouse").glob("a2wsgi-*.whl")
    with zipfile.ZipFile(wheel, "a") as zipped:
        zipped.writestr("a2wsgi/extra.py", "# not what was locked\n")
    with pytest.raises(builder.BuildError, match="requirements-cp310"):
        builder.verify_requirements(copy)


@pytest.mark.skipif(not CAN_SIGN, reason="osslsigncode and openssl not installed")
def test_every_powershell_script_is_signed(
    bundle: tuple[Path, Path], signing: tuple[Path, Path] | None, tmp_path: Path
) -> None:
    """deploy/iis/*.ps1 and host.ps1 inside the package wheel: the one the service runs."""
    assert signing is not None
    _, folder = bundle
    (wheel,) = (folder / "wheelhouse").glob("vezaprovisioner-*.whl")
    with zipfile.ZipFile(wheel) as zipped:
        (host,) = [n for n in zipped.namelist() if n.endswith("/host.ps1")]
        (tmp_path / "host.ps1").write_bytes(zipped.read(host))
    scripts = [tmp_path / "host.ps1", *sorted((folder / "deploy").rglob("*.ps1"))]
    assert len(scripts) == 3
    for script in scripts:
        done = subprocess.run(
            ["osslsigncode", "verify", "-in", str(script), "-CAfile", str(signing[1])],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, f"{script.name}: {done.stdout}{done.stderr}"


def test_the_locks_cover_the_declared_dependencies() -> None:
    """Each lock pins every dependency pyproject.toml declares for 64-bit Windows and its
    Python, at a version the declaration allows (run build.py --lock after changing them)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    declared = [
        Requirement(text)
        for text in builder.tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
            "dependencies"
        ]
    ]
    for python in ("3.10", "3.11", "3.12", "3.13"):
        environment: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
        environment.update(
            python_version=python,
            python_full_version=f"{python}.0",
            sys_platform="win32",
            platform_system="Windows",
            os_name="nt",
            platform_machine="AMD64",
        )
        pins = builder.locked_pins(python)
        for requirement in declared:
            name = re.sub(r"[-_.]+", "-", requirement.name).lower()
            applies = requirement.marker is None or requirement.marker.evaluate(environment)
            if applies:
                assert name in pins, f"lock for {python} lacks {name}"
                assert requirement.specifier.contains(pins[name], prereleases=True)


def test_install_ps1_installs_exactly_the_bundles_pins() -> None:
    """No PowerShell here: read install.ps1's venv step. It installs from the requirements file
    this build writes for the venv's Python (requirements-cp3XY.txt), hash-checked and offline,
    and then compares the installed vezaprovisioner with VERSION."""
    text = (REPO_ROOT / "deploy" / "iis" / "install.ps1").read_text(encoding="utf-8")
    assert "print(''cp{0}{1}''.format(*sys.version_info))" in text
    assert 'Join-Path $BundleRoot "requirements-$tag.txt"' in text
    (pip,) = re.findall(r"Invoke-Native \$VenvPython @\('-m', 'pip', 'install'[^)]*\)", text)
    for argument in ("'--no-index'", "'--require-hashes'", "'--only-binary', ':all:'"):
        assert argument in pip
    assert pip.endswith("'-r', $requirements)")
    assert "m.version(''vezaprovisioner'')" in text
    assert '"$installed".Trim() -ne $Version' in text

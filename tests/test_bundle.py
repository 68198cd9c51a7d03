"""The offline bundle: built here from PyPI, and its wheelhouse alone installs on Windows.

"Alone" is checked the strict way: the wheelhouse is resolved with --no-index for 64-bit Windows
and each CPython 3.10-3.13, with markers evaluated for that target (uv --python-platform).
`pip install --dry-run --platform win_amd64` would evaluate markers for this Linux machine and
miss, for example, what only Python 3.10 or only Windows needs.
"""

from __future__ import annotations

import importlib.util
import shutil
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


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(zip, unpacked folder); downloads are cached in the test's own tmp folder."""
    root = tmp_path_factory.mktemp("bundle")
    archive: Path = builder.build(root / "dist", cache_dir=root / "cache")
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
    for name in (
        "web.config",
        "deploy/iis/install.ps1",
        "deploy/iis/uninstall.ps1",
        "deploy/iis/vezaprovisioner.toml.template",
    ):
        assert (folder / name).read_bytes() == (REPO_ROOT / name).read_bytes(), name
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

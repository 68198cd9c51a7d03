"""`vezaprovisioner.__version__` is a constant; it must name the release pyproject.toml builds."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from vezaprovisioner import __version__

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_the_version_constant_is_pyprojects() -> None:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    assert __version__ == project["version"]


def test_the_version_constant_is_the_installed_distributions() -> None:
    # What pip recorded when it installed this checkout (editable or not); /health, /metrics'
    # build info and the status page show the constant.
    assert __version__ == metadata.version("vezaprovisioner")

"""VezaProvisioner: gives existing Active Directory users an Exchange mailbox on request."""

from __future__ import annotations

#: The release, kept equal to pyproject.toml's `version` by hand (tests/test_version.py checks it
#: against pyproject.toml and the installed distribution's metadata). A constant, not
#: `importlib.metadata.version()`, whose search of sys.path for the distribution cost about 5 ms
#: of every worker start (pydantic imports importlib.metadata itself, so that import stays).
__version__ = "0.1.0"

__all__ = ["__version__"]

"""What IIS tells the app about a request: its server variables, read in exactly one place.

Under IIS, wfastcgi puts IIS's server variables into the WSGI environ and the IIS entry hands
that environ to the ASGI app as `scope["wsgi_environ"]`. Those variables are set by IIS after it
authenticated the caller; a client cannot set them (unlike HTTP headers, which arrive as HTTP_*
and are never read here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The variables that name the IIS-authenticated user, most specific first.
_USER_VARIABLES = ("REMOTE_USER", "AUTH_USER", "LOGON_USER")


@dataclass(frozen=True)
class IisServerVariables:
    """The few IIS server variables the app uses."""

    authenticated_user: str | None
    auth_type: str | None
    https: bool
    remote_addr: str | None


def iis_server_variables(scope: Mapping[str, Any]) -> IisServerVariables | None:
    """The request's IIS server variables, or None when the request did not come through IIS."""
    environ = scope.get("wsgi_environ")
    if not isinstance(environ, Mapping):
        return None
    user = next(
        (environ[v].strip() for v in _USER_VARIABLES if str(environ.get(v, "")).strip()), None
    )
    return IisServerVariables(
        authenticated_user=user,
        auth_type=environ.get("AUTH_TYPE") or None,
        https=str(environ.get("HTTPS", "")).lower() == "on",
        remote_addr=environ.get("REMOTE_ADDR") or None,
    )

"""What IIS tells the app about a request: its server variables, read in exactly one place.

Under IIS, wfastcgi puts IIS's server variables into the WSGI environ and the IIS entry hands
that environ to the ASGI app as `scope["wsgi_environ"]`. Those variables are set by IIS after it
authenticated the caller; a client cannot set them (unlike HTTP headers, which arrive as HTTP_*
and are never read here).

Who the caller is. With Basic authentication IIS logs the caller on with the name and password
the client sent; AUTH_USER and REMOTE_USER hold the name as the client typed it (`CONTOSO\\veza`,
`veza@contoso.com`, or a bare `veza` completed by `defaultLogonDomain`), LOGON_USER the Windows
account IIS logged on (IIS's server-variables reference: the same text unless an authentication
filter maps the name; not observed on a server here). The account, LOGON_USER, is the caller;
the typed name is the same account's other spelling, so `allowed_users` may list either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The variables that name the IIS-authenticated user: the account first, then the typed name.
_USER_VARIABLES = ("LOGON_USER", "REMOTE_USER", "AUTH_USER")


@dataclass(frozen=True)
class IisServerVariables:
    """The few IIS server variables the app uses."""

    #: The account IIS logged on (LOGON_USER; the typed name when IIS sent no LOGON_USER).
    authenticated_user: str | None
    #: Every distinct name IIS gave the authenticated caller: the account, then the typed name.
    user_names: tuple[str, ...]
    auth_type: str | None
    https: bool
    remote_addr: str | None


def iis_server_variables(scope: Mapping[str, Any]) -> IisServerVariables | None:
    """The request's IIS server variables, or None when the request did not come through IIS."""
    environ = scope.get("wsgi_environ")
    if not isinstance(environ, Mapping):
        return None
    names: list[str] = []
    for variable in _USER_VARIABLES:
        name = str(environ.get(variable, "")).strip()
        if name and name.casefold() not in (known.casefold() for known in names):
            names.append(name)
    return IisServerVariables(
        authenticated_user=names[0] if names else None,
        user_names=tuple(names),
        auth_type=environ.get("AUTH_TYPE") or None,
        https=str(environ.get("HTTPS", "")).lower() == "on",
        remote_addr=environ.get("REMOTE_ADDR") or None,
    )

"""The test plays IIS's FastCGI module in front of the real wfastcgi (wfastcgi_runner.py).

`IisSite` is the application folder IIS points APPL_PHYSICAL_PATH at: it holds the shipped
web.config as `Web.config`, with the two paths install.ps1 rewrites (PYTHONPATH,
VEZAPROVISIONER_CONFIG) set for this machine. `WfastcgiProcess` is one FastCGI process of the
application pool (IIS runs up to maxInstances of them): stdin a socket, one request at a time.

What IIS sends, and where it was read:
- FCGI_BEGIN_REQUEST (responder, FCGI_KEEP_CONN: IIS reuses the process), then FCGI_PARAMS with
  the server variables, an empty FCGI_PARAMS, FCGI_STDIN with the body, an empty FCGI_STDIN; it
  reads FCGI_STDOUT (a CGI response: `Status:` and headers, a blank line, the body),
  FCGI_STDERR and FCGI_END_REQUEST (the FastCGI 1.0 specification; wfastcgi's record handling).
- The server variables (IIS's server-variables reference, learn.microsoft.com/iis/web-dev-
  reference/server-variables): APPL_PHYSICAL_PATH, APPL_MD_PATH, INSTANCE_ID, HTTPS ("on"/"off"),
  SERVER_PORT_SECURE, AUTH_TYPE, AUTH_USER, REMOTE_USER, LOGON_USER, AUTH_PASSWORD, URL (the path
  without the query), PATH_INFO (the full path: wfastcgi's own comment; IIS's SCRIPT_NAME is sent
  the same here, and wfastcgi blanks it either way), QUERY_STRING, CONTENT_TYPE/CONTENT_LENGTH
  and HTTP_<HEADER> for each request header. Values are bytes; IIS sends the path's UTF-8
  bytes, wfastcgi decodes latin-1.
- With Basic authentication, AUTH_USER and REMOTE_USER hold the name as the client typed it
  (DOMAIN\\user or a UPN); LOGON_USER the Windows account (README, "Authentication").
  Which exact variables IIS's FastCGI module passes was not observed on a server (research notes
  iis-pypsrp.md §2: UNCONFIRMED); `server_variables` in iis_entry.py lists them on the server.
Not modelled: IIS's own request filtering, authentication and error pages, the FastCGI queue,
timeouts (activityTimeout, requestTimeout) and process recycling: the test does what IIS would.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().with_name("wfastcgi_runner.py")
WEB_CONFIG = REPO_ROOT / "web.config"
BASE = "/VezaProvisioner"
IIS_PASSWORD = "Sup3r-secret-IIS-password"
DEFAULT_USER = "CONTOSO\\svc-veza"

FCGI_VERSION_1 = 1
FCGI_BEGIN_REQUEST = 1
FCGI_END_REQUEST = 3
FCGI_PARAMS = 4
FCGI_STDIN = 5
FCGI_STDOUT = 6
FCGI_STDERR = 7
FCGI_RESPONDER = 1
FCGI_KEEP_CONN = 1
_MAX_CONTENT = 0xFFFF


def record(kind: int, request_id: int, content: bytes = b"") -> bytes:
    """One FastCGI record, padded to 8 bytes as IIS pads them."""
    padding = -len(content) % 8
    header = struct.pack(">BBHHBB", FCGI_VERSION_1, kind, request_id, len(content), padding, 0)
    return header + content + b"\0" * padding


def stream(kind: int, request_id: int, content: bytes) -> bytes:
    """A FastCGI stream: the content in records of at most 65535 bytes, then an empty one."""
    chunks = [content[i : i + _MAX_CONTENT] for i in range(0, len(content), _MAX_CONTENT)]
    return b"".join(record(kind, request_id, chunk) for chunk in chunks) + record(kind, request_id)


def _length(size: int) -> bytes:
    return struct.pack(">B", size) if size < 0x80 else struct.pack(">I", size | 0x80000000)


def name_values(pairs: dict[str, bytes]) -> bytes:
    out = bytearray()
    for name, value in pairs.items():
        key = name.encode("latin-1")
        out += _length(len(key)) + _length(len(value)) + key + value
    return bytes(out)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    stderr: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


def iis_server_variables(
    method: str,
    path: str,
    user: str | None,
    *,
    logon_user: str | None = None,
    https: bool = True,
    physical_path: str,
    headers: Mapping[str, str],
) -> dict[str, str]:
    """The server variables IIS sends for a request of `path` (with an optional ?query) after
    Basic authentication of `user` (None: anonymous, the variables empty), as listed above;
    SCRIPT_NAME, PATH_INFO and URL all hold the path. Without CONTENT_TYPE/CONTENT_LENGTH."""
    path, _, query = path.partition("?")
    user = user or ""
    logon = logon_user if logon_user is not None else user
    variables = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": path,
        "PATH_INFO": path,
        "URL": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "ex01.contoso.com",
        "SERVER_PORT": "443" if https else "80",
        "SERVER_PORT_SECURE": "1" if https else "0",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_SOFTWARE": "Microsoft-IIS/10.0",
        "GATEWAY_INTERFACE": "CGI/1.1",
        "HTTPS": "on" if https else "off",
        "REMOTE_ADDR": "10.0.0.5",
        "REMOTE_HOST": "10.0.0.5",
        "REMOTE_PORT": "50123",
        "LOCAL_ADDR": "10.0.0.10",
        "INSTANCE_ID": "1",
        "APPL_MD_PATH": "/LM/W3SVC/1/ROOT/VezaProvisioner",
        "APPL_PHYSICAL_PATH": physical_path,
        # IIS sends these empty when Anonymous authentication let the request in.
        "AUTH_TYPE": "Basic" if user else "",
        "AUTH_USER": user,
        "REMOTE_USER": user,
        "LOGON_USER": logon,
        "AUTH_PASSWORD": IIS_PASSWORD if user else "",
        "HTTP_HOST": "ex01.contoso.com",
        "HTTP_USER_AGENT": "Veza/1.0",
    }
    if user:
        token = base64.b64encode(f"{user}:{IIS_PASSWORD}".encode()).decode()
        variables["HTTP_AUTHORIZATION"] = f"Basic {token}"
    for name, value in headers.items():
        variables["HTTP_" + name.upper().replace("-", "_")] = value
    return variables


@dataclass
class IisRequest:
    """One request as IIS's FastCGI module hands it over, after IIS authenticated the caller."""

    method: str
    path: str  # the URL path, with an optional ?query
    user: str | None = DEFAULT_USER  # None: an anonymous request (IIS sends the variables empty)
    logon_user: str | None = None  # the Windows account; defaults to `user`
    https: bool = True
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    def params(self, site: Path) -> dict[str, bytes]:
        variables = iis_server_variables(
            self.method,
            self.path,
            self.user,
            logon_user=self.logon_user,
            https=self.https,
            physical_path=f"{site}{os.sep}",
            headers=self.headers,
        )
        variables["CONTENT_LENGTH"] = str(len(self.body))
        if self.body and self.content_type:
            variables["CONTENT_TYPE"] = self.content_type
        # IIS sends the path's UTF-8 bytes (wfastcgi decodes latin-1).
        return {name: value.encode() for name, value in variables.items()}


def post(path: str, payload: object, **kwargs: Any) -> IisRequest:
    return IisRequest("POST", path, body=json.dumps(payload).encode(), **kwargs)


def get(path: str, **kwargs: Any) -> IisRequest:
    return IisRequest("GET", path, **kwargs)


@dataclass
class IisSite:
    """The application folder: the shipped web.config as Web.config, paths set like install.ps1."""

    folder: Path
    config: Path

    @classmethod
    def create(cls, folder: Path, config: Path) -> IisSite:
        folder.mkdir(parents=True, exist_ok=True)
        tree = ET.parse(WEB_CONFIG)
        site_packages = sysconfig.get_paths()["purelib"]
        for add in tree.getroot().iterfind("appSettings/add"):
            if add.attrib["key"] == "VEZAPROVISIONER_CONFIG":
                add.set("value", str(config))
            if add.attrib["key"] == "PYTHONPATH":
                add.set("value", site_packages)
        tree.write(folder / "Web.config", encoding="utf-8", xml_declaration=True)
        return cls(folder, config)

    def start(self, env: dict[str, str] | None = None) -> WfastcgiProcess:
        return WfastcgiProcess(self, env)


class WfastcgiProcess:
    """One FastCGI process as IIS starts it: the real wfastcgi.py, stdin a duplex socket."""

    def __init__(self, site: IisSite, env: dict[str, str] | None = None) -> None:
        self.site = site
        self._sock, child = socket.socketpair()
        event_read, self._event = os.pipe()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("VEZAPROVISIONER_")}
        environ.update(env or {})
        # IIS names its shutdown event here when signalBeforeTerminateSeconds > 0.
        environ["_FCGI_SHUTDOWN_EVENT_"] = str(event_read)
        self.stderr_path = site.folder.parent / f"wfastcgi-{id(self)}.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(RUNNER)],
                stdin=child.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                pass_fds=(event_read,),
                env=environ,
                cwd=site.folder.parent,
            )
        child.close()
        os.close(event_read)
        self._reader = self._sock.makefile("rb")

    @property
    def pid(self) -> int:
        return self.process.pid

    def request(self, request: IisRequest, request_id: int = 1) -> Reply:
        """Send one request the way IIS does and read the response to FCGI_END_REQUEST."""
        begin = struct.pack(">HB5x", FCGI_RESPONDER, FCGI_KEEP_CONN)
        wire = (
            record(FCGI_BEGIN_REQUEST, request_id, begin)
            + stream(FCGI_PARAMS, request_id, name_values(request.params(self.site.folder)))
            + stream(FCGI_STDIN, request_id, request.body)
        )
        self._sock.sendall(wire)
        stdout = bytearray()
        stderr = bytearray()
        while True:
            header = self._read(8)
            _, kind, _, length, padding, _ = struct.unpack(">BBHHBB", header)
            content = self._read(length)
            self._read(padding)
            if kind == FCGI_STDOUT:
                stdout += content
            elif kind == FCGI_STDERR:
                stderr += content
            elif kind == FCGI_END_REQUEST:
                break
        return _parse_cgi(bytes(stdout), stderr.decode("utf-8", "replace"))

    def _read(self, size: int) -> bytes:
        data = self._reader.read(size)
        if len(data) != size:
            raise ConnectionError(
                f"wfastcgi closed the pipe (exit {self.process.poll()}): "
                + self.stderr_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            )
        return data

    def signal_shutdown(self) -> None:
        """IIS signals `_FCGI_SHUTDOWN_EVENT_` before it terminates the process."""
        os.write(self._event, b"x")

    def close_pipe(self) -> None:
        """IIS closes the process's stdin pipe (recycle, idle timeout, IIS stopping)."""
        self._reader.close()
        self._sock.close()

    def wait(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        """IIS's last resort after its wait; the test's cleanup."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for closable in (self._reader, self._sock):
            closable.close()
        with contextlib.suppress(OSError):
            os.close(self._event)


def _parse_cgi(stdout: bytes, stderr: str) -> Reply:
    head, _, body = stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    status = 0
    for line in lines:
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.split()[0])
        elif name:
            headers[name.strip().lower()] = value.strip()
    return Reply(status, headers, body, stderr)

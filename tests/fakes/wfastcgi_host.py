"""Plays wfastcgi for one process: what it does between IIS and WSGI_HANDLER, per its source.

Run as `python -m tests.fakes.wfastcgi_host WEB_CONFIG REQUESTS_JSON`. Like wfastcgi 3.0 it
copies web.config's appSettings into os.environ, adds PYTHONPATH to sys.path, imports the
dotted WSGI_HANDLER, and for each request blanks SCRIPT_NAME (the full path stays in PATH_INFO),
sets wsgi.url_scheme from HTTPS, and replaces sys.stdout / sys.stderr with fresh buffers. It
prints one JSON line per response: status, headers, body.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
import xml.etree.ElementTree as ET
from typing import Any


def app_settings(web_config: str) -> dict[str, str]:
    root = ET.parse(web_config).getroot()
    return {add.attrib["key"]: add.attrib["value"] for add in root.iterfind("appSettings/add")}


def load_handler(dotted: str) -> Any:
    module_name, _, attribute = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def serve(handler: Any, params: dict[str, Any]) -> dict[str, Any]:
    """One request, as wfastcgi runs it; returns status, headers and body."""
    body = params.pop("body", "").encode()
    environ: dict[str, Any] = dict(params)
    environ["SCRIPT_NAME"] = ""
    environ["wsgi.url_scheme"] = "https" if environ.get("HTTPS", "").lower() == "on" else "http"
    environ["wsgi.input"] = io.BytesIO(body)
    environ["wsgi.errors"] = sys.stderr = io.StringIO()
    environ.update({"wsgi.version": (1, 0), "wsgi.multithread": False})
    environ.update({"wsgi.multiprocess": True, "wsgi.run_once": False})
    if body:
        environ["CONTENT_LENGTH"] = str(len(body))
    sys.stdout = io.StringIO()
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured.update(status=status, headers=dict(headers))
        return lambda data: None

    result = handler(environ, start_response)
    try:
        payload = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    captured["body"] = payload.decode("utf-8", "replace")
    return captured


def main() -> int:
    web_config, requests_file = sys.argv[1], sys.argv[2]
    settings = app_settings(web_config)
    os.environ.update(settings)
    sys.path.extend(p for p in settings.get("PYTHONPATH", "").split(";") if p)
    handler = load_handler(os.environ["WSGI_HANDLER"])
    real_stdout = sys.stdout
    with open(requests_file, encoding="utf-8") as f:
        requests = json.load(f)
    for params in requests:
        print(json.dumps(serve(handler, params)), file=real_stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs the real, unmodified wfastcgi.py 3.0.0 the way IIS runs it, on Linux.

IIS starts `python.exe <venv>\\Lib\\site-packages\\wfastcgi.py` (the handler's scriptProcessor)
with the FastCGI conversation on stdin, a duplex named pipe. This script does the same: it runs
the installed `wfastcgi.py` as `__main__` (runpy, as `python wfastcgi.py` would), after checking
that the file is byte for byte the one in the 3.0.0 sdist. The test gives it a socket as stdin
(duplex, like the pipe) and plays IIS's FastCGI module (tests/harness/iis.py).

Real, as on the server (all of wfastcgi.py): reading the records, Web.config's appSettings into
os.environ, PYTHONPATH, the import of WSGI_HANDLER, the per-request swap of sys.stdout/stderr,
SCRIPT_NAME blanking, X-Original-URL, the latin-1 decoding of parameters, one request at a time,
error reporting on FCGI_STDERR, `on_exit` and its shutdown-event thread, the exit tasks at
end-of-file, and the process ending by ExitProcess.

Stubbed: only `ctypes.windll.kernel32`, the Windows API wfastcgi binds at import (Linux has no
`_winapi`, so wfastcgi falls back to ctypes for all of them):
- WaitForSingleObject(handle, INFINITE): `_FCGI_SHUTDOWN_EVENT_` names an inherited pipe's read
  end instead of an event handle; the call returns when the test writes a byte to it (IIS
  signalling the event). End-of-file (the test went away without signalling) never signals.
- ExitProcess(code): `os._exit(code)`: the process ends at once, as on Windows (no atexit, no
  thread joins).
- CreateFileW returns an invalid handle: wfastcgi's file watcher logs "Unable to create watcher"
  and stops (the watcher is off; ReadDirectoryChangesW, CloseHandle and GetLastError are never
  reached and answer 0).
Not modelled: IIS's process management itself (the test starts and ends processes), the named
pipe's Windows semantics, `msvcrt.setmode` (wfastcgi skips it when msvcrt is missing).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import runpy
import sys
import threading
from types import SimpleNamespace
from typing import Any

#: SHA-256 of wfastcgi.py inside wfastcgi-3.0.0.tar.gz (sdist sha256 cbce266e…dd493, pinned in
#: pyproject's test extra). Any other file is refused: the harness must run the real one.
WFASTCGI_PY_SHA256 = "13efd298820fd83c8fbfa4470ad8b31d3dd71fa3ab15db318d26cae32f8ed9c3"
INVALID_HANDLE_VALUE = 0xFFFFFFFF


class _Function:
    """A kernel32 function: wfastcgi sets restype/argtypes on it, then calls it."""

    def __init__(self, implementation: Any) -> None:
        self._implementation = implementation
        self.restype: Any = None
        self.argtypes: Any = None

    def __call__(self, *args: Any) -> Any:
        return self._implementation(*args)


def _wait_for_single_object(handle: int, _milliseconds: int) -> int:
    if os.read(handle, 1):
        return 0  # WAIT_OBJECT_0: the test signalled IIS's shutdown event
    threading.Event().wait()  # the test closed its end without signalling: never returns
    return 0


def _exit_process(code: int) -> None:
    os._exit(code)


def _kernel32() -> SimpleNamespace:
    return SimpleNamespace(
        ReadDirectoryChangesW=_Function(lambda *args: 0),
        CreateFileW=_Function(lambda *args: INVALID_HANDLE_VALUE),
        CloseHandle=_Function(lambda *args: 0),
        GetLastError=_Function(lambda: 0),
        ExitProcess=_Function(_exit_process),
        WaitForSingleObject=_Function(_wait_for_single_object),
    )


def wfastcgi_path() -> str:
    spec = importlib.util.find_spec("wfastcgi")
    if spec is None or spec.origin is None:
        raise SystemExit("wfastcgi is not installed: pip install -e '.[test]'")
    return spec.origin


def main() -> None:
    path = wfastcgi_path()
    with open(path, "rb") as source:
        digest = hashlib.sha256(source.read()).hexdigest()
    if digest != WFASTCGI_PY_SHA256:
        raise SystemExit(f"{path} is not wfastcgi 3.0.0's wfastcgi.py (sha256 {digest})")
    ctypes.windll = SimpleNamespace(kernel32=_kernel32())  # type: ignore[attr-defined]
    sys.argv = [path]
    runpy.run_path(path, run_name="__main__")


if __name__ == "__main__":
    main()

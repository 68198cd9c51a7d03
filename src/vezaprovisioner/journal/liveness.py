"""Process liveness: whether the process that owns a claim or a record is still running.

Records and claims name their owner as (host, pid, token): the machine, the process id, and a
random token of the process (`process_token`), so a process that reuses a dead one's pid is not
taken for it. Only processes on this machine can be checked; another machine's owner is judged
by expiry alone.
"""

from __future__ import annotations

import os
import sys
import uuid

_process_tokens: dict[int, str] = {}


def process_token() -> str:
    """A random id of this process (per pid, so a forked child gets its own)."""
    return _process_tokens.setdefault(os.getpid(), uuid.uuid4().hex)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (a reused id counts as alive)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # pragma: no cover - Windows only, verified by reading
        import ctypes
        from ctypes import wintypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = wintypes.HANDLE
        kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
        kernel32.WaitForSingleObject.restype = wintypes.DWORD
        kernel32.WaitForSingleObject.argtypes = (wintypes.HANDLE, wintypes.DWORD)
        kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
        synchronize, query_limited_information = 0x00100000, 0x1000
        handle = kernel32.OpenProcess(synchronize | query_limited_information, False, pid)
        if not handle:
            return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists
        try:
            return bool(kernel32.WaitForSingleObject(handle, 0) == 0x102)  # WAIT_TIMEOUT: running
        finally:
            kernel32.CloseHandle(handle)
    # os.kill(pid, 0) only asks; on Windows it would terminate the process, hence the branch.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(
    this_host: str, host: str, pid: int, token: str, expires_at: float, now: float
) -> bool:
    """Expired, or its process is gone: only processes on this machine can be checked.

    A pid equal to ours with another token is a dead predecessor that had our pid (a
    restarted container's PID 1, say); any other live pid might be reused, so it waits
    for the expiry instead.
    """
    if expires_at <= now:
        return True
    if host != this_host:
        return False
    if pid == os.getpid():
        return token != process_token()
    return not pid_alive(pid)

"""Starting a host so that its whole process tree can be killed, and dies with the service.

The one OS-specific seam of the local backend:

* **POSIX** (tests and the benchmark; no Exchange runs there): the host leads a new session and
  process group; killing sends SIGKILL to the group. If the service dies, an idle host reads EOF
  on stdin and exits (host.ps1 and the fake both do). On **Linux** the host is also started with
  PR_SET_PDEATHSIG = SIGKILL, so one stuck inside a command dies with the service too. Two
  limits of that: the signal follows the *thread* that started the host, not the process (the
  pool's slot threads therefore stay until their host has stopped; a `pool_size = 0` host is
  started by the request's thread, and is killed rather than closed should that thread end
  while the host still has its grace period), and it covers the host only, not processes the
  host started itself.
* **Windows**: each host is assigned to its own Job Object with
  JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE. Killing terminates the job (the host and every child it
  started); when the service process dies for any reason Windows closes its handles and so kills
  every job. IIS runs FastCGI processes in a job already; nesting jobs needs Windows 8 / Server
  2012 or later. This branch is ctypes calls only and was verified by reading, not run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

if sys.platform == "linux":
    import ctypes

    _PR_SET_PDEATHSIG = 1
    _SIGKILL = int(signal.SIGKILL)
    # Resolved in the parent, at import: the forked child then only makes this one call.
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    _prctl.restype = ctypes.c_int

    def _die_with_parent(parent: int) -> Callable[[], None]:
        """A preexec_fn: SIGKILL this child when the thread that started it (the service) dies.

        preexec_fn runs between fork and exec in a copy of a multi-threaded parent, where taking
        a lock another thread held at fork time would deadlock. This one calls only the
        prctl() foreign function prepared above and os.getppid/os._exit: no import, no logging,
        no lock of ours. The attribute survives exec (it is cleared only for set-user-ID
        programs). If the parent died before prctl took effect, the child exits at once. Should
        prctl fail (it does not on Linux 2.1.57+), the host still exits on stdin end-of-file.
        """

        def preexec() -> None:
            _prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)

        return preexec


if sys.platform == "win32":
    import ctypes
    from ctypes import wintypes

    _JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x00002000
    _JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9
    _CREATE_NO_WINDOW = 0x08000000

    class _BasicLimits(ctypes.Structure):
        _fields_ = (
            ("PerProcessUserTimeLimit", ctypes.c_int64),
            ("PerJobUserTimeLimit", ctypes.c_int64),
            ("LimitFlags", wintypes.DWORD),
            ("MinimumWorkingSetSize", ctypes.c_size_t),
            ("MaximumWorkingSetSize", ctypes.c_size_t),
            ("ActiveProcessLimit", wintypes.DWORD),
            ("Affinity", ctypes.c_size_t),
            ("PriorityClass", wintypes.DWORD),
            ("SchedulingClass", wintypes.DWORD),
        )

    class _IoCounters(ctypes.Structure):
        _fields_ = tuple((name, ctypes.c_uint64) for name in ("r", "w", "o", "rb", "wb", "ob"))

    class _ExtendedLimits(ctypes.Structure):
        _fields_ = (
            ("BasicLimitInformation", _BasicLimits),
            ("IoInfo", _IoCounters),
            ("ProcessMemoryLimit", ctypes.c_size_t),
            ("JobMemoryLimit", ctypes.c_size_t),
            ("PeakProcessMemoryUsed", ctypes.c_size_t),
            ("PeakJobMemoryUsed", ctypes.c_size_t),
        )

    _kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    _kernel32.CreateJobObjectW.restype = wintypes.HANDLE
    _kernel32.CreateJobObjectW.argtypes = (wintypes.LPVOID, wintypes.LPCWSTR)
    _kernel32.SetInformationJobObject.argtypes = (
        wintypes.HANDLE,
        ctypes.c_int,
        wintypes.LPVOID,
        wintypes.DWORD,
    )
    _kernel32.AssignProcessToJobObject.argtypes = (wintypes.HANDLE, wintypes.HANDLE)
    _kernel32.TerminateJobObject.argtypes = (wintypes.HANDLE, wintypes.UINT)
    _kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)

    def _new_kill_on_close_job() -> Any:
        job = _kernel32.CreateJobObjectW(None, None)
        if not job:
            raise ctypes.WinError(ctypes.get_last_error())
        info = _ExtendedLimits()
        info.BasicLimitInformation.LimitFlags = _JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        if not _kernel32.SetInformationJobObject(
            job,
            _JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS,
            ctypes.byref(info),
            ctypes.sizeof(info),
        ):
            error = ctypes.get_last_error()
            _kernel32.CloseHandle(job)
            raise ctypes.WinError(error)
        return job


def _popen(argv: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
    """An argument list and no shell: nothing is ever parsed by cmd.exe or /bin/sh."""
    return subprocess.Popen(  # noqa: S603 - the configured executable, constant arguments
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        shell=False,
        close_fds=True,
        **options,
    )


class ProcessTree:
    """One started host process and everything it starts; `kill()` ends them all."""

    def __init__(self, argv: Sequence[str]) -> None:
        self._job: Any = None
        if sys.platform == "win32":
            # The host starts no child before it has read its hello line from stdin, so
            # assigning the job right after creation cannot miss a grandchild.
            self.process = _popen(argv, creationflags=_CREATE_NO_WINDOW)
            job = _new_kill_on_close_job()
            if not _kernel32.AssignProcessToJobObject(job, int(self.process._handle)):  # type: ignore[attr-defined]
                error = ctypes.get_last_error()
                self.process.kill()
                _kernel32.CloseHandle(job)
                raise ctypes.WinError(error)
            self._job = job
        elif sys.platform == "linux":
            self.process = _popen(
                argv, start_new_session=True, preexec_fn=_die_with_parent(os.getpid())
            )
        else:
            self.process = _popen(argv, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """Kill the host and all its descendants, then reap the host. Safe to call twice."""
        if sys.platform == "win32":
            if self._job is not None:
                _kernel32.TerminateJobObject(self._job, 1)
                _kernel32.CloseHandle(self._job)
                self._job = None
        else:
            # An empty group raises; a pid is never reused while its group has members.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

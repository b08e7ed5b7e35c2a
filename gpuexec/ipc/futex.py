"""Linux futexes on shared memory, through ``syscall(2)`` with ctypes.

A futex lets a process sleep in the kernel until another process changes a 32-bit word
in memory they share and wakes it: the blocking half of the shared-memory ring's
"spin a little, then sleep" (:mod:`gpuexec.ipc.shm_ring`). Shared (not ``PRIVATE``)
operations are used because the word lives in a shared-memory mapping of several
processes. Every wait has a timeout, so a lost wake-up costs at most that long and can
never hang a process.

Without Linux or without a known syscall number for this machine, :func:`available`
is False and the ring sleeps with short timed naps instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import platform
import sys

_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc: ctypes.CDLL | None = None
_nr: int | None = None
if sys.platform.startswith("linux"):
    _nr = _SYS_FUTEX.get(platform.machine())
    if _nr is not None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.syscall.restype = ctypes.c_long


def available() -> bool:
    return _libc is not None and _nr is not None


def wait(address: int, expected: int, timeout: float) -> bool:
    """Sleep while the 32-bit word at ``address`` equals ``expected``, at most ``timeout``
    seconds. True when woken or the value already differed, False on timeout."""
    if _libc is None or _nr is None:
        raise OSError(errno.ENOSYS, "futex is not available here")
    ts = _Timespec(int(timeout), int((timeout % 1) * 1e9))
    r = _libc.syscall(ctypes.c_long(_nr), ctypes.c_void_p(address), _FUTEX_WAIT,
                      ctypes.c_uint32(expected & 0xFFFFFFFF), ctypes.byref(ts), None, 0)
    if r == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ETIMEDOUT:
        return False
    if err in (errno.EAGAIN, errno.EINTR):
        return True
    raise OSError(err, f"futex wait failed: {errno.errorcode.get(err, err)}")


def wake(address: int, count: int = 0x7FFFFFFF) -> int:
    """Wake up to ``count`` processes sleeping on the word at ``address``."""
    if _libc is None or _nr is None:
        raise OSError(errno.ENOSYS, "futex is not available here")
    r = _libc.syscall(ctypes.c_long(_nr), ctypes.c_void_p(address), _FUTEX_WAKE, count,
                      None, None, 0)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"futex wake failed: {errno.errorcode.get(err, err)}")
    return int(r)


_PR_SET_TIMERSLACK = 29


def set_timer_slack(ns: int) -> bool:
    """Let the kernel end this thread's timed sleeps at most ``ns`` late (default 50 us):
    a reader that wakes just before a forecast arrival needs its timer on time. True when
    it was set."""
    if _libc is None:
        return False
    return int(_libc.prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(ns), 0, 0, 0)) == 0

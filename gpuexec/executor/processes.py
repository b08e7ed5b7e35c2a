"""The process kinds a worker can run in, behind one small interface.

``multiprocessing`` processes (fork, spawn, forkserver) already have it. A worker
started with ``subprocess`` is a fresh interpreter running ``python -m gpuexec.worker``:
it never imports the user's ``__main__`` (no guard needed) and inherits nothing but its
environment and stdio. Its encoded spec arrives on its stdin (a pipe only the driver
holds), and a pidfd of it is the sentinel (readable when it exits; unlike a pipe, it
cannot be held open by the worker's own children).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Protocol

UNKNOWN_EXIT = -255  # exited, but nobody could tell with what code


class ProcessLike(Protocol):
    """What the launcher needs from a worker process."""

    @property
    def pid(self) -> int | None: ...

    @property
    def sentinel(self) -> int: ...

    @property
    def exitcode(self) -> int | None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def close(self) -> None: ...


def pidfd(pid: int) -> int:
    """A pidfd of ``pid`` (Linux >= 5.3): readable once the process has exited."""
    return os.pidfd_open(pid)


def package_path() -> str:
    """The directory that holds the ``gpuexec`` package (for a child's PYTHONPATH)."""
    return str(Path(__file__).resolve().parent.parent.parent)


def child_env() -> dict[str, str]:
    """This process's environment, with gpuexec importable first."""
    env = dict(os.environ)
    path = [package_path(), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    return env


class PopenProcess:
    """A ``subprocess.Popen`` child with the :class:`ProcessLike` interface."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self._pidfd = pidfd(popen.pid)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def sentinel(self) -> int:
        return self._pidfd

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self._popen.poll() is None:
            self._popen.terminate()

    def kill(self) -> None:
        if self._popen.poll() is None:
            self._popen.kill()

    def close(self) -> None:
        if self._popen.poll() is None:
            raise ValueError("cannot close a running process")
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def start_subprocess(spec: bytes) -> PopenProcess:
    """Start ``python -m gpuexec.worker`` and hand it ``spec`` on its stdin."""
    popen = subprocess.Popen(
        [sys.executable, "-m", "gpuexec.worker"], stdin=subprocess.PIPE, env=child_env(),
        close_fds=True)
    proc = PopenProcess(popen)
    stdin = popen.stdin
    if stdin is not None:
        try:
            stdin.write(spec)
            stdin.close()
        except BrokenPipeError:
            pass  # it died at once: its sentinel and exit code tell the launcher
    return proc

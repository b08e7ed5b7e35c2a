"""Driver side of the zygote launcher (start_method ``"zygote"``).

One zygote per driver process and preload list, started on first use as a fresh
interpreter (see :mod:`gpuexec.worker.zygote_server`) and shared by every executor that
starts while it runs: the first executor pays one interpreter start and ``import torch``,
the others only a ``fork`` per worker ("warm start"). Each executor holds its preload
list's zygote from its start to its shutdown (``_users``, counted per preload list, so a
zygote replaced meanwhile is held the same); when the last one shuts down the zygote is
stopped, so no process of gpuexec's outlives the executors, unless that executor asked to
keep it warm (``keep_zygote``): then it waits for the next executor and ends with the
interpreter. A zygote that died is replaced at the next start; the workers it already
forked are not orphaned by that (they watch the driver, not the zygote), but their exit
codes can no longer be known.

Workers forked by the zygote are its children, not the driver's: the driver watches each
through a pidfd the zygote sends along (race-free: opened by the parent before it could
reap the child), signals it with ``pidfd_send_signal`` (never a recycled pid), and learns
its exit code from the zygote's ``WorkerExited`` messages.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import msgspec

from ..errors import ZygoteError
from ..ipc.fdwait import readable
from ..ipc.framing import recv_message, send_message
from ..ipc.messages import (
    PROTOCOL_VERSION,
    FromZygote,
    SpawnWorker,
    StopZygote,
    WorkerExited,
    WorkerForked,
    ZygoteHello,
)
from .processes import UNKNOWN_EXIT, child_env

log = logging.getLogger("gpuexec")


class ZygoteClient:
    """The driver's handle on one zygote. Thread-safe (one lock for the channel)."""

    def __init__(self, preload: tuple[str, ...], timeout: float) -> None:
        self.preload = preload
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = ours
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._exits: dict[int, int] = {}  # pid -> exit code, from WorkerExited
        self._pidfds: dict[int, int] = {}  # pid -> the pidfd that came with WorkerForked
        self._decoder = msgspec.msgpack.Decoder(FromZygote)
        t = time.perf_counter()
        self._popen = subprocess.Popen(
            [sys.executable, "-m", "gpuexec.worker.zygote_server", str(theirs.fileno()),
             str(os.getpid()), *preload],
            pass_fds=[theirs.fileno()], env=child_env(), stdin=subprocess.DEVNULL)
        theirs.close()
        try:
            hello = self._recv(timeout)
        except Exception:
            self.close()
            raise
        if not isinstance(hello, ZygoteHello) or hello.protocol != PROTOCOL_VERSION:
            self.close()
            raise ZygoteError(f"the zygote answered {hello!r}")
        self.hello = hello
        self.start_seconds = time.perf_counter() - t
        if hello.cuda_initialized or hello.threads != 1:
            self.close()
            raise ZygoteError(
                f"the zygote is not safe to fork from after preloading {list(preload)}: "
                f"{hello.cuda}; {hello.threads} Python thread(s)")
        if hello.failed:
            log.warning("gpuexec: the zygote could not preload %s", hello.failed)

    @property
    def pid(self) -> int:
        return self._popen.pid

    def alive(self) -> bool:
        return self._popen.poll() is None

    def _recv(self, timeout: float | None) -> object:
        """One message (the caller holds the lock, or is the constructor)."""
        if timeout is not None:
            if not readable([self._sock.fileno()], timeout):
                raise ZygoteError(f"the zygote did not answer within {timeout:g} s")
        try:
            data, fds = recv_message(self._sock)
        except (EOFError, ConnectionError) as e:
            raise ZygoteError(f"the zygote (pid {self._popen.pid}) is gone") from e
        msg = self._decoder.decode(data)
        if isinstance(msg, WorkerForked) and fds:
            self._pidfds[msg.pid] = fds[0]
            for fd in fds[1:]:
                os.close(fd)
        else:
            for fd in fds:
                os.close(fd)
        if isinstance(msg, WorkerExited):
            self._exits[msg.pid] = msg.exitcode
        return msg

    def spawn(self, spec: bytes, timeout: float = 30.0) -> ZygoteProcess:
        """Fork a worker running ``spec``; its environment is this process's, now."""
        with self._lock:
            request_id = next(self._ids)
            send_message(self._sock, msgspec.msgpack.encode(
                SpawnWorker(request_id, spec, dict(os.environ), os.getcwd())),
                [1, 2])  # the worker writes where this process writes, now
            deadline = time.monotonic() + timeout
            while True:
                msg = self._recv(max(0.0, deadline - time.monotonic()))
                if isinstance(msg, WorkerForked) and msg.request_id == request_id:
                    fd = self._pidfds.pop(msg.pid, -1)
                    if fd < 0:
                        raise ZygoteError("the zygote sent no pidfd for its child")
                    return ZygoteProcess(self, msg.pid, fd)

    def exitcode(self, pid: int) -> int | None:
        """The exit code of a child that has exited (None while unknown)."""
        with self._lock:
            while pid not in self._exits:
                if not readable([self._sock.fileno()], 0.5):
                    return None
                try:
                    self._recv(None)
                except ZygoteError:
                    return None
            return self._exits.pop(pid)  # asked once per child: ZygoteProcess keeps it

    def close(self) -> None:
        try:
            send_message(self._sock, msgspec.msgpack.encode(StopZygote()))
        except OSError:
            pass
        try:
            self._popen.wait(5)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()
        self._sock.close()


class ZygoteProcess:
    """A worker forked by the zygote, with the ``ProcessLike`` interface."""

    def __init__(self, zygote: ZygoteClient, pid: int, pidfd: int) -> None:
        self._zygote = zygote
        self.pid = pid
        self._pidfd = pidfd
        self._exitcode: int | None = None
        self._exited = False

    @property
    def sentinel(self) -> int:
        return self._pidfd

    def _has_exited(self) -> bool:
        if not self._exited and self._pidfd >= 0:
            self._exited = bool(readable([self._pidfd], 0))
        return self._exited

    @property
    def exitcode(self) -> int | None:
        """None while running; once exited, the code the zygote reported (-255 when the
        zygote died first and the code cannot be known)."""
        if self._exitcode is None and self._has_exited():
            code = self._zygote.exitcode(self.pid)
            self._exitcode = code if code is not None else UNKNOWN_EXIT
        return self._exitcode

    def join(self, timeout: float | None = None) -> None:
        if self._pidfd >= 0:
            readable([self._pidfd], timeout)

    def _signal(self, signum: int) -> None:
        if self._pidfd >= 0 and not self._has_exited():
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def close(self) -> None:
        if not self._has_exited():
            raise ValueError("cannot close a running process")
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


_zygotes: dict[tuple[str, ...], ZygoteClient] = {}
_users: dict[tuple[str, ...], int] = {}  # preload list -> executors holding its zygote
_zygotes_lock = threading.Lock()  # guards _zygotes and _users


def default_preload() -> tuple[str, ...]:
    """torch when it is installed: the import every GPU worker pays, paid once here."""
    return ("torch",) if importlib.util.find_spec("torch") is not None else ()


def get_zygote(preload: tuple[str, ...], timeout: float,
               hold: bool = True) -> tuple[ZygoteClient, bool]:
    """The live zygote for ``preload`` (started or replaced when needed), and whether it
    was already running (a warm start). ``hold``: an executor starts on it, and holds it
    until :func:`release_zygote`; False for more workers of an executor that holds it."""
    with _zygotes_lock:
        if hold:
            _users[preload] = _users.get(preload, 0) + 1
        zygote = _zygotes.get(preload)
        if zygote is not None and zygote.alive():
            return zygote, True
        if zygote is not None:
            log.warning("gpuexec: the zygote (pid %d) died; starting a new one", zygote.pid)
            zygote.close()
        try:
            zygote = ZygoteClient(preload, timeout)
        except BaseException:
            if hold:
                _users[preload] -= 1
            raise
        _zygotes[preload] = zygote
        return zygote, False


def release_zygote(preload: tuple[str, ...], keep_warm: bool) -> None:
    """An executor that held ``preload``'s zygote has shut down: stop the zygote if that
    was its last user, unless ``keep_warm`` (then it waits for the next executor)."""
    with _zygotes_lock:
        users = _users[preload] = max(0, _users.get(preload, 0) - 1)
        if users or keep_warm:
            return
        zygote = _zygotes.pop(preload, None)
    if zygote is not None:
        zygote.close()


def zygote_pids() -> set[int]:
    """The pids of this process's zygotes (running ones, and those kept warm)."""
    with _zygotes_lock:
        return {z.pid for z in _zygotes.values()}


def close_zygotes() -> None:
    with _zygotes_lock:
        for zygote in _zygotes.values():
            zygote.close()
        _zygotes.clear()


_inherited: list[ZygoteClient] = []  # a fork's copies of the parent's zygotes, never used


def _forget_zygotes_in_child() -> None:
    """A fork of the driver must not talk to the driver's zygotes (their socket is shared:
    both would read its replies) nor stop them at exit: it drops them untouched (kept
    referenced, so not even their socket is closed) and starts its own when it needs one.
    The lock may have been held by a parent thread at the moment of the fork."""
    global _zygotes_lock, _zygotes, _users
    _inherited.extend(_zygotes.values())
    _zygotes = {}
    _users = {}
    _zygotes_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_zygotes_in_child)

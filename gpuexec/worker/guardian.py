"""The guardian: nothing a worker started outlives the worker, nor the driver.

Every worker gpuexec starts (zygote, subprocess, fork, spawn, forkserver) makes itself the
leader of its own process group and forks a *guardian* first thing, before any user
code runs::

    driver ── (zygote | forkserver) ── worker W (pgid W) ── guardian (pgid W, "gpuexec-guard")
                                        └── what W starts (pgid W unless it leaves)

The guardian is a separate process: it shares no GIL with the worker, so it acts while
the worker sits in a C call that holds the GIL (a ``time.sleep`` releases the GIL, a
tight loop in a C extension or a ``ctypes.PyDLL`` call does not, and a watchdog *thread*
waits for the call to end). It closes every descriptor it inherited and sleeps in one
``poll`` on two pidfds (Linux >= 5.3), the driver's and the worker's:

==================  =====================================================================
event               what the guardian does
==================  =====================================================================
the driver exits    reads W's descendant tree from ``/proc`` (with those that left the
(any way, SIGKILL   group), SIGKILLs W, then that tree, removes the dead driver's private
included)           directory, then SIGKILLs the process group W (itself included)
W exits (any way:   SIGKILLs the process group W: every process W started that is still in
crash, SIGKILL,     it, wherever it was reparented (itself included; init reaps it, or a
OOM kill)           driver that runs as pid 1 without an init, as it would any orphan)
W stops cleanly     W kills its descendants, then the guardian last, and reaps it (no
(shutdown, SIGTERM) zombie left for init, or for a driver that runs as pid 1)
==================  =====================================================================

One process is spared for a moment in every case: ``multiprocessing``'s resource tracker
(W's child when W used ``multiprocessing.shared_memory``) removes the shared memory W
created and did not remove once W and the rest of its group are gone, and then exits;
the guardian gives it up to half a second before the group's SIGKILL.

The guardian stays in the group on purpose: a process group id stays allocated while any
member lives, so the pid W cannot be given to an unrelated process while the guardian
can still signal the group.

What is not covered: a descendant that leaves the group (``setsid``, ``setpgid``) *and*
is no longer below W when W is SIGKILLed or crashes (a daemon that double-forked, or any
process after W died) is out of reach; while W lives, such processes are found through
the tree and killed when the driver dies or W stops cleanly. Start-up before
:func:`start_guardian` (the interpreter, and ``__main__`` re-imported under spawn and
forkserver) is unguarded. Without pidfds (an older kernel, macOS) the guardian polls both
pids every 100 ms instead.

Why not ``prctl(PR_SET_PDEATHSIG)``: it fires when the *thread* that forked the worker
exits (an executor built in a short-lived thread would lose its workers), under the
zygote and forkserver the parent is not the driver, and it takes none of the worker's
own children along. A ``PR_SET_CHILD_SUBREAPER`` worker would keep double-forked daemons
in its tree, but then it must reap every orphan below it or collect zombies, and it
still loses them when it is SIGKILLed: the guardian's tree read covers the same ground
while the worker lives, without changing who reaps what.
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import signal
import sys
import time
import traceback
from typing import NoReturn

EXIT_DRIVER_GONE = 70
GUARDIAN_NAME = b"gpuexec-guard"
_PR_SET_NAME = 15
_POLL_S = 0.1  # only without pidfds
_TRACKER = b"multiprocessing.resource_tracker"
_TRACKER_GRACE_S = 0.5  # a spared resource tracker's time to clean up after its worker

_guardian = 0  # pid of this worker's guardian; 0: none (touched by the main thread only)


def _processes() -> list[tuple[int, int, int]]:
    """``(pid, ppid, pgid)`` of every live process, read from ``/proc`` (Linux)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    out = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2:
            out.append((int(entry), int(fields[1]), int(fields[2])))
    return out


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid``, read from ``/proc`` (Linux)."""
    children: dict[int, list[int]] = {}
    for child, parent, _ in _processes():
        children.setdefault(parent, []).append(child)
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _is_tracker(pid: int) -> bool:
    """Whether ``pid`` is a ``multiprocessing`` resource tracker."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return _TRACKER in f.read()
    except OSError:
        return False


def _kill_spare_trackers(pids: list[int], spare: int = 0) -> list[int]:
    """SIGKILL ``pids`` but ``spare`` and any ``multiprocessing`` resource tracker; the
    trackers spared. A tracker removes the shared memory its users created and did not
    remove (an engine's ``/dev/shm`` ring of a worker killed mid-step) once every user is
    gone, then exits by itself: killing it would leave those segments for good."""
    trackers = []
    for pid in pids:
        if pid == spare:
            continue
        if _is_tracker(pid):
            trackers.append(pid)
        else:
            _kill(pid)
    return trackers


def _await_trackers(trackers: list[int]) -> None:
    """Give spared trackers up to :data:`_TRACKER_GRACE_S` to finish (then the group's
    SIGKILL ends them: nothing outlives its worker by more than that)."""
    deadline = time.monotonic() + _TRACKER_GRACE_S
    while any(alive(p) for p in trackers) and time.monotonic() < deadline:
        time.sleep(0.01)


def kill_children() -> None:
    """SIGKILL every descendant of this process but its guardian, which stays until the
    worker is gone (see :func:`stop_guardian`), and ``multiprocessing``'s resource
    tracker, which cleans up after this worker once it has exited, then exits itself."""
    _kill_spare_trackers(descendants(os.getpid()), spare=_guardian)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pidfd(pid: int) -> int | None:
    """A pidfd of ``pid``; None where pidfds do not exist. Raises ProcessLookupError."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except (AttributeError, OSError):
        return None


def start_guardian(driver_pid: int, driver_is_parent: bool, ipc_dir: str) -> None:
    """Put this worker in its own process group and fork its guardian; exit at once
    (code 70) if the driver is already gone. Call it before any user code runs and
    before this process starts a thread (a fork copies only the calling thread)."""
    global _guardian
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # already a session (hence group) leader
    me = os.getpid()
    try:
        driver = _pidfd(driver_pid)
    except ProcessLookupError:
        _driver_gone_early(ipc_dir)
    # A pidfd opened after the driver died could name a new process with its pid:
    # the driver's child checks its parent, every worker that the driver is alive.
    if (driver_is_parent and os.getppid() != driver_pid) or not alive(driver_pid):
        _driver_gone_early(ipc_dir)
    worker = _pidfd(me)
    libc = _libc()  # loaded here: the loader's lock is not taken after the fork
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _guard(me, driver_pid, driver, worker, ipc_dir, libc)
            code = 0  # only where the group could not be signalled
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _guardian = pid
    for fd in (driver, worker):
        if fd is not None:
            os.close(fd)


def stop_guardian() -> None:
    """The worker stops cleanly: end its guardian last and reap it."""
    global _guardian
    pid, _guardian = _guardian, 0
    if pid:
        _kill(pid)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _driver_gone_early(ipc_dir: str) -> NoReturn:
    if ipc_dir:  # nobody else will remove the dead driver's private directory
        shutil.rmtree(ipc_dir, ignore_errors=True)
    os._exit(EXIT_DRIVER_GONE)


def _guard(worker_pid: int, driver_pid: int, driver: int | None, worker: int | None,
           ipc_dir: str, libc: ctypes.CDLL | None) -> None:
    """The guardian's whole life (in the forked child). Never returns normally: it ends
    in the SIGKILL of its own process group."""
    keep = sorted(fd for fd in (driver, worker) if fd is not None)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # stderr stays: a failure here should be seen
    start = 3
    for fd in keep:  # every inherited socket, pipe and sentinel goes
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, _max_fd())
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # only SIGKILL ends a guardian
    if libc is not None:  # the name ps and top show
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(GUARDIAN_NAME), 0, 0, 0)
    if driver is not None and worker is not None:
        poller = select.poll()  # not select(): descriptor numbers may pass 1024
        poller.register(driver, select.POLLIN)
        poller.register(worker, select.POLLIN)
        fired = {fd for fd, _ in poller.poll()}
        driver_gone, worker_gone = driver in fired, worker in fired
    else:
        while alive(driver_pid) and os.getppid() == worker_pid:
            time.sleep(_POLL_S)
        driver_gone, worker_gone = not alive(driver_pid), os.getppid() != worker_pid
    me = os.getpid()
    if driver_gone and not worker_gone:
        tree = descendants(worker_pid)  # while W lives: with those that left its group
        _kill(worker_pid)
        trackers = _kill_spare_trackers(tree, spare=me)
    else:
        trackers = _kill_spare_trackers(
            [pid for pid, _, pgid in _processes() if pgid == worker_pid], spare=me)
    _await_trackers(trackers)
    if driver_gone and ipc_dir:  # nobody else will remove the dead driver's directory
        shutil.rmtree(ipc_dir, ignore_errors=True)
    os.killpg(worker_pid, signal.SIGKILL)


def _max_fd() -> int:
    try:
        return max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")


def _libc() -> ctypes.CDLL | None:
    """This process's own symbols, libc's ``prctl`` among them (Linux; None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.prctl  # noqa: B018 - present?
    except (OSError, AttributeError):
        return None
    return libc

"""Parent-death watchdog: a worker never outlives its driver.

A daemon thread blocks on a pidfd of the driver (``pidfd_open``, Linux >= 5.3): it
becomes readable the moment the driver exits, for any reason including SIGKILL, and
the thread then ends the worker with ``os._exit`` even while the main thread is busy
in a long call. The pidfd is opened first thing in the worker and the driver's pid is
checked against ``getppid()`` afterwards where the driver is the parent, which closes
the race of a driver dying before the watchdog starts. Without pidfd support the
thread polls the driver's liveness every 100 ms instead. Before exiting, the worker
kills its own child processes so that none is orphaned.

Why not ``prctl(PR_SET_PDEATHSIG)``: it fires when the *thread* that started the
worker exits, not the driver process, so an executor built in a short-lived thread
would lose its workers; and under forkserver the worker's parent is not the driver.
A pidfd of the driver has neither problem.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import threading

EXIT_DRIVER_GONE = 70


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid``, read from ``/proc`` (Linux)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _resource_tracker_pid() -> int | None:
    """The pid of multiprocessing's resource tracker, if this process started one."""
    module = sys.modules.get("multiprocessing.resource_tracker")
    tracker = getattr(module, "_resource_tracker", None)
    pid = getattr(tracker, "_pid", None)
    return pid if isinstance(pid, int) else None


def kill_children() -> None:
    """SIGKILL every descendant of this worker, so that none outlives it -- except
    multiprocessing's resource tracker: once this worker has exited it removes the
    shared memory the worker created and did not remove (an engine's /dev/shm ring of a
    worker killed mid-step), then exits by itself."""
    spare = _resource_tracker_pid()
    for pid in descendants(os.getpid()):
        if pid == spare:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _driver_gone(ipc_dir: str) -> None:
    kill_children()
    if ipc_dir:  # nobody else will remove the dead driver's private directory
        shutil.rmtree(ipc_dir, ignore_errors=True)
    os._exit(EXIT_DRIVER_GONE)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_watchdog(driver_pid: int, driver_is_parent: bool, ipc_dir: str = "") -> None:
    """Start the watchdog thread; exit at once if the driver is already gone. A worker
    that outlives its driver also removes the driver's ``ipc_dir``. ``driver_pid`` 0:
    nothing to watch here (a Ray actor, which Ray ties to its driver)."""
    if driver_pid <= 0:
        return
    pidfd: int | None
    try:
        pidfd = os.pidfd_open(driver_pid)
    except ProcessLookupError:
        _driver_gone(ipc_dir)
        return
    except (AttributeError, OSError):
        pidfd = None
    if (driver_is_parent and os.getppid() != driver_pid) or not _alive(driver_pid):
        _driver_gone(ipc_dir)

    def watch() -> None:
        if pidfd is not None:
            while True:
                ready, _, _ = select.select([pidfd], [], [])
                if ready:
                    _driver_gone(ipc_dir)
        while _alive(driver_pid) and (not driver_is_parent or os.getppid() == driver_pid):
            threading.Event().wait(0.1)
        _driver_gone(ipc_dir)

    threading.Thread(target=watch, name="gpuexec-watchdog", daemon=True).start()

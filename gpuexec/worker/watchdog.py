"""Parent-death watchdog thread, for workers in processes gpuexec does not own (Ray actors).

A worker that gpuexec started is guarded by a separate process instead (see
:mod:`gpuexec.worker.guardian`), which acts even while the worker holds the GIL. A Ray
actor's process belongs to Ray: gpuexec neither moves it to a process group of its own
nor forks beside it, and Ray ends a job's actors when the job's driver exits. On the
driver's node this thread ends the actor sooner: it blocks on a pidfd of the driver
(Linux >= 5.3), which becomes readable the moment the driver exits for any reason
including SIGKILL, and then kills the actor's own children and ends it with ``os._exit``,
even while the main thread is busy in a long call that releases the GIL. A call that
holds the GIL delays it until the call returns (or Ray's own clean-up ends the actor).
Without pidfd support the thread polls the driver's liveness every 100 ms instead.
"""

from __future__ import annotations

import os
import shutil
import threading

from ..ipc.fdwait import readable
from .guardian import EXIT_DRIVER_GONE, alive, kill_children


def _driver_gone(ipc_dir: str) -> None:
    kill_children()
    if ipc_dir:  # nobody else will remove the dead driver's private directory
        shutil.rmtree(ipc_dir, ignore_errors=True)
    os._exit(EXIT_DRIVER_GONE)


def start_watchdog(driver_pid: int, ipc_dir: str = "") -> None:
    """Start the watchdog thread; exit at once if the driver is already gone. An actor
    that outlives its driver also removes the driver's ``ipc_dir``. ``driver_pid`` 0:
    nothing to watch here (an actor on another node, which Ray ties to its driver)."""
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
    if not alive(driver_pid):
        _driver_gone(ipc_dir)

    def watch() -> None:
        if pidfd is not None:
            readable([pidfd], None)
            _driver_gone(ipc_dir)
        while alive(driver_pid):
            threading.Event().wait(0.1)
        _driver_gone(ipc_dir)

    threading.Thread(target=watch, name="gpuexec-watchdog", daemon=True).start()

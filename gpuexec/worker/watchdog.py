"""Parent-death watchdog: a worker never outlives its driver.

A daemon thread blocks on a pidfd of the driver (``pidfd_open``, Linux >= 5.3): it
becomes readable the moment the driver exits, for any reason including SIGKILL, and
the thread then ends the worker with ``os._exit`` even while the main thread is busy
in a long call. The pidfd is opened first thing in the worker and the driver's pid is
checked against ``getppid()`` afterwards where the driver is the parent, which closes
the race of a driver dying before the watchdog starts. Without pidfd support the
thread polls the driver's liveness every 100 ms instead. Before exiting, the worker
kills its own child processes (psutil, when installed) so that none is orphaned.
"""

from __future__ import annotations

import os
import select
import signal
import threading

EXIT_DRIVER_GONE = 70


def _kill_children() -> None:
    try:
        import psutil
    except ImportError:
        return
    try:
        for child in psutil.Process().children(recursive=True):
            try:
                child.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
    except psutil.Error:
        pass


def _driver_gone() -> None:
    _kill_children()
    os._exit(EXIT_DRIVER_GONE)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_watchdog(driver_pid: int, driver_is_parent: bool) -> None:
    """Start the watchdog thread; exit at once if the driver is already gone."""
    pidfd: int | None
    try:
        pidfd = os.pidfd_open(driver_pid)
    except ProcessLookupError:
        _driver_gone()
        return
    except (AttributeError, OSError):
        pidfd = None
    if (driver_is_parent and os.getppid() != driver_pid) or not _alive(driver_pid):
        _driver_gone()

    def watch() -> None:
        if pidfd is not None:
            while True:
                ready, _, _ = select.select([pidfd], [], [])
                if ready:
                    _driver_gone()
        while _alive(driver_pid) and (not driver_is_parent or os.getppid() == driver_pid):
            threading.Event().wait(0.1)
        _driver_gone()

    threading.Thread(target=watch, name="gpuexec-watchdog", daemon=True).start()

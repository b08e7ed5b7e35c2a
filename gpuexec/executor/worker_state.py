"""A worker's lifecycle as the driver sees it: its states and the only transitions.

::

    state      ──event (who makes it)───────────────────────────▶ next
    STARTING   its Ready arrives (launcher.wait_ready)             READY
    STARTING   the start is abandoned: a failure, the deadline     STOPPING
               (launcher.stop_workers)
    READY      shutdown, or the executor's failure clean-up        STOPPING
               (launcher.stop_workers)
    STOPPING   exited and reaped, its exit code kept, the process  EXITED
               object closed (launcher.stop_workers)

A worker that dies on its own stays READY (its handle still answers ``exitcode``, and
the monitor records the death in a :class:`~gpuexec.executor.monitor.WorkerDeath`) until
the executor stops its workers; only ``stop_workers`` retires a handle. A respawn
(:mod:`.respawn`) gives the rank a new handle and keeps the old one, READY and exited,
until shutdown stops it with the rest. A transition
not in the table is a bug in the driver and raises ``AssertionError`` at once;
:meth:`WorkerLifecycle.advance` is the one place a state changes.
"""

from __future__ import annotations

import enum


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    EXITED = "exited"


_LEGAL = {
    (WorkerState.STARTING, WorkerState.READY),
    (WorkerState.STARTING, WorkerState.STOPPING),
    (WorkerState.READY, WorkerState.STOPPING),
    (WorkerState.STOPPING, WorkerState.EXITED),
}


class WorkerLifecycle:
    """One worker's state. Changed by the thread that starts or stops the workers, under
    the handle's reap lock; read by anyone (a stale read is harmless: it only decides
    whether to wait or to report)."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = WorkerState.STARTING

    def advance(self, to: WorkerState) -> None:
        """Move to ``to`` (a no-op when already there: stopping twice is allowed)."""
        if self.state is to:
            return
        if (self.state, to) not in _LEGAL:
            raise AssertionError(f"no worker transition {self.state.name} -> {to.name} "
                                 "(see gpuexec.executor.worker_state)")
        self.state = to

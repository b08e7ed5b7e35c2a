"""An executor's lifecycle: its states and the only transitions between them.

::

    state      ──event──────────────────────────▶ next      what holds there
    STARTING   constructor returns                RUNNING   calls are accepted
    STARTING   constructor raises                 (stays)   nothing is owned: the start
                                                            released it; shutdown is a no-op
    RUNNING    shutdown() (any thread, once)      CLOSED    every call raises
                                                            ExecutorClosedError
    CLOSED     shutdown() again                   (stays)   nothing to do

A worker's death does not change the lifecycle: the executor stays RUNNING and *failed*
(:attr:`~gpuexec.Executor.is_failed`; every call raises ``WorkerDiedError``) until it is
shut down, or its dead ranks are replaced (:mod:`.respawn`). :meth:`Lifecycle.advance`
is the one place a state changes.
"""

from __future__ import annotations

import enum
import threading


class ExecutorState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    CLOSED = "closed"


_LEGAL = {
    (ExecutorState.STARTING, ExecutorState.RUNNING),
    (ExecutorState.RUNNING, ExecutorState.CLOSED),
}


class Lifecycle:
    """The state of one executor; any thread (one lock, a leaf)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = ExecutorState.STARTING

    @property
    def state(self) -> ExecutorState:
        return self._state

    def advance(self, frm: ExecutorState, to: ExecutorState) -> bool:
        """Move from ``frm`` to ``to``; False (nothing changes) when the state is not
        ``frm`` now, so of two threads racing to the same transition exactly one wins."""
        if (frm, to) not in _LEGAL:
            raise AssertionError(f"no transition {frm.name} -> {to.name} (see the table)")
        with self._lock:
            if self._state is not frm:
                return False
            self._state = to
            return True

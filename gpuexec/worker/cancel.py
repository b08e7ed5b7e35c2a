"""Cancellation inside a worker: the signal handler, and regions that must not be cut.

::

    driver: board.post(rank, call id) ──▶ tgkill(pid, pid, CANCEL_SIGNAL)  (main thread)
    worker main thread: a blocking wait returns EINTR (time.sleep, Event.wait, select,
      poll, socket reads, subprocess waits), or the next bytecode comes
        ──▶ _on_signal: is the board naming the call that runs now?
              not armed, or another call ──▶ return (a late or early signal: nothing)
              inside uncancellable()     ──▶ remembered; raised when the region ends
              yes                        ──▶ disarm, raise CallCancelled in the method

The method sees :class:`~gpuexec.errors.CallCancelled` (a ``BaseException``: ``except
Exception`` does not swallow it), its ``finally`` blocks and context managers run, and
the worker answers the call with that error (the driver, which already finished the
call, drops the answer and counts the rank as stopped). The worker then serves the next
call as usual. A method stuck in C code never returns to the interpreter: after
``cancel_grace`` the driver kills it (see :mod:`gpuexec.executor.cancel`). A method
that returned a ``Future`` (a deferred reply, :mod:`.deferred`) has returned: its call
is not interrupted, and its reply must come within ``cancel_grace``.

Exactly one ``CallCancelled`` per call: the handler disarms before it raises, so a
second signal (or one racing with the method's return) cannot raise again, and the
request loop catches the one raise wherever it lands between arming and disarming
(see ``_Server.serve``). The request loop's cost per call: one attribute test and
four attribute stores (on the compiled core, whose serving loop answers most calls, four
stores and a test of the fields of a C struct, the base class ``CancelFields``), and a
board read only for the calls that follow a cancellation (``recheck``).

State, on the main thread only (the handler runs there too):

* ``running``: id of the call whose method runs; ``method``: its name.
* ``armed``: True while that method may be interrupted; cleared before the one raise.
* ``protected``: depth of :func:`uncancellable` regions; ``pending``: a cancellation
  that arrived inside one, raised when the outermost region ends.
* ``recheck``: calls left to look up on the board before they start (a call cancelled
  while queued is skipped): set to the in-flight limit by every signal.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING

from ..errors import CallCancelled
from ..ipc import ringcore
from ..ipc.cancel_board import BoardReader
from ..ipc.signals import CANCEL_SIGNAL

if TYPE_CHECKING:
    _CancelFields = object
else:  # running, method, armed and recheck in a C struct where the compiled core is
    # built, which its serving loop writes per call with no lookup (see ringcore.fields)
    _CancelFields = ringcore.fields("CancelFields")


class CancelPoint(_CancelFields):
    """A worker's side of cancellation; see the module docstring."""

    def __init__(self, board: BoardReader | None, recheck_calls: int) -> None:
        self.board = board
        self.recheck_calls = recheck_calls
        self.running = 0
        self.method = ""
        self.armed = False
        self.protected = 0
        self.pending = False
        self.recheck = 0

    def install(self) -> None:
        """Handle CANCEL_SIGNAL (main thread, before the worker is ready)."""
        if self.board is not None:
            signal.signal(CANCEL_SIGNAL, self._on_signal)
            # A blocking call that returns EINTR is retried by Python only when the
            # handler returns; ours raises, so the wait ends.
            signal.siginterrupt(CANCEL_SIGNAL, True)

    def queued_cancelled(self, call_id: int) -> bool:
        """Whether ``call_id`` was cancelled before it started (the loop, per call, only
        while ``recheck``)."""
        self.recheck -= 1
        board = self.board
        return board is not None and board.cancelled(call_id)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.recheck = self.recheck_calls
        board = self.board
        if not self.armed or board is None or not board.cancelled(self.running):
            return
        if self.protected:
            self.pending = True
            return
        self.raise_now()

    def raise_now(self) -> None:
        self.armed = False
        self.pending = False
        raise CallCancelled(self.running, self.method)

    @contextlib.contextmanager
    def region(self) -> Iterator[None]:
        self.protected += 1
        try:
            yield
        finally:
            self.protected -= 1
        if not self.protected and self.pending and self.armed:
            self.raise_now()


_point: CancelPoint | None = None  # the worker's, set once by the request loop


def set_point(point: CancelPoint) -> None:
    global _point
    _point = point


@contextlib.contextmanager
def uncancellable() -> Iterator[None]:
    """A region of a worker's method that a cancellation must not cut::

        with gpuexec.worker.uncancellable():
            write_checkpoint()   # a cancel arriving here waits for the block to end

    A cancellation that arrives inside waits until the outermost region ends and is
    raised there (as :class:`~gpuexec.errors.CallCancelled`); the driver's
    ``cancel_grace`` still applies, so keep regions short. Regions nest; outside a
    worker (or in a thread other than the worker's main thread, which the signal never
    interrupts) it does nothing.
    """
    point = _point
    if point is None:
        yield
        return
    with point.region():
        yield

"""Taking a call back: the driver's side of cancellation.

::

    Future.cancel() / task cancelled / Ctrl-C in a wait / timeout / check_health timeout
    / shutdown
        ──▶ DriverChannel.cancel: the call table finishes the call (Future cancelled, or
            failed with the error of that path) and records a CancelWatch of the ranks
            that still owe an answer, in one take of its lock
        ──▶ Interrupter.interrupt: post the call id on the cancel board
            (:mod:`gpuexec.ipc.cancel_board`), then CANCEL_SIGNAL to each such worker's
            main thread (tgkill: another thread would take the signal without waking
            the main thread from its wait)
    worker: the method raises CallCancelled (:mod:`gpuexec.worker.cancel`), answers
        ──▶ the answer clears the rank from the watch (``stats().cancelled_replies``)
    monitor, while watches remain: a rank that runs the cancelled call and has not
        answered is signalled again every 0.2 s (one signal that went astray must not
        leave the method running); one that has not answered ``cancel_grace`` seconds
        after it reached the cancelled call (a method stuck in C with the GIL held, in a
        CUDA or NCCL wait) ──▶ SIGKILL; its guardian takes its process group along; the
        death is a WorkerDiedError whose ``reason`` says why (``stats().cancel_kills``)

The hot path pays nothing: a blocking call that completes never touches this module; a
``non_block`` call's future is a :class:`CallFuture` (a ``Future`` with one more field).

Only workers this executor started as processes are interrupted (``backend="mp"``);
Ray actors get no board: a cancelled call is finished in the driver and its late
answer dropped, as a timed-out call's was before.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from ..errors import CallCancelledError, RpcTimeoutError
from ..ipc.cancel_board import BoardWriter
from ..ipc.signals import CANCEL_SIGNAL
from .calls import CallTable, FutureCancelled, PendingCall
from .launcher import WorkerHandle
from .worker_state import WorkerState

log = logging.getLogger("gpuexec")


class CallFuture(Future[Any]):
    """The ``Future`` of a ``non_block`` call: :meth:`cancel` takes the call back from
    every worker still running it (True), unless it already finished everywhere
    (False, as for any ``Future`` that is done)."""

    def __init__(self) -> None:
        super().__init__()
        self._take_back: Callable[[], bool] | None = None  # set once by the channel

    def bind(self, take_back: Callable[[], bool]) -> None:
        self._take_back = take_back

    def cancel(self) -> bool:
        take_back = self._take_back
        if take_back is None or self.done():
            return super().cancel()
        if take_back():  # the call table cancelled this future (see calls.settle_one)
            return True
        return self.cancelled()


def _tgkill() -> Callable[[int, int, int], int] | None:
    """libc's ``tgkill`` (glibc 2.30+), None where it is missing."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).tgkill
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_TGKILL = _tgkill()


class Interrupter:
    """Posts cancellations and signals workers' main threads; kills the ones that do
    not stop. Any thread: the board's slots are single stores, and each worker is
    signalled under its handle's reap lock (a reaped pid is never signalled)."""

    def __init__(self, board: BoardWriter, handles: Sequence[WorkerHandle]) -> None:
        self.board = board
        self.handles = handles

    def interrupt(self, call_id: int, ranks: Sequence[int]) -> None:
        for rank in ranks:
            self.board.post(rank, call_id)
        for rank in ranks:
            self._signal(self.handles[rank], CANCEL_SIGNAL)

    def kill(self, rank: int) -> None:
        self._signal(self.handles[rank], signal.SIGKILL)

    def _signal(self, handle: WorkerHandle, signum: int) -> None:
        with handle.reap_lock:
            if handle.life.state is WorkerState.EXITED or handle.process.exitcode is not None:
                return
            try:
                if signum == signal.SIGKILL:
                    handle.process.kill()
                elif _TGKILL is not None:
                    if _TGKILL(handle.pid, handle.pid, signum) != 0:
                        raise OSError(ctypes.get_errno(), "tgkill")
                else:  # pragma: no cover - a libc without tgkill: any thread may take it
                    os.kill(handle.pid, signum)
            except (OSError, ValueError) as e:
                log.debug("gpuexec: could not signal worker rank %d: %s", handle.rank, e)

    def close(self) -> None:
        self.board.close()


class Canceller:
    """How a call is taken back, and what a deadline that passes does (the channel's,
    any thread holding no channel lock, or the pump lock with ``settle=False``)."""

    def __init__(self, table: CallTable, interrupter: Interrupter | None,
                 cancel_on_timeout: bool) -> None:
        self._table = table
        self.interrupter = interrupter  # None: nothing is interrupted (Ray actors)
        self._cancel_on_timeout = cancel_on_timeout
        # a rank's failure interrupts the others still running the call (see .monitor)
        self.fail_fast = interrupter is not None and cancel_on_timeout

    def cancel(self, call: PendingCall, reason: str, error: BaseException | None = None,
               settle: bool = True, watch: bool = True) -> bool:
        """Take ``call`` back: finish it with ``error`` (None: its future is cancelled)
        and interrupt it in every rank that has not answered; False when it had already
        finished. ``settle=False``: the pump lock may be held; the future is settled
        later. ``watch=False``: the request may never have left (no rank is held to
        ``cancel_grace`` for it)."""
        watched = reason if self.interrupter is not None and watch else None
        if not self._table.finish(call, FutureCancelled() if error is None else error, settle,
                                  watch=watched):
            return False
        if not isinstance(error, RpcTimeoutError):  # timeouts are counted as such
            with self._table.lock:
                self._table.stats.cancelled += 1
        ranks = sorted(call.owed)
        what = reason if isinstance(error, RpcTimeoutError) else f"cancelled ({reason})"
        log.info("gpuexec: call %d %r %s; interrupting ranks %s", call.call_id, call.method,
                 what, ranks)
        if self.interrupter is not None and ranks and not call.ping:
            self.interrupter.interrupt(call.call_id, ranks)
        return True

    def interrupted(self, call: PendingCall, reason: str, error: BaseException | None = None,
                    watch: bool = True) -> None:
        """Cancel ``call`` because its caller's thread was interrupted (``error``, when an
        ``Exception``, is what the call ends with; else ``CallCancelledError``)."""
        if not isinstance(error, Exception):
            error = CallCancelledError(call.method, sorted(call.owed), reason)
        self.cancel(call, reason, error, watch=watch)

    def expire(self, call: PendingCall, settle: bool = True) -> None:
        """``call``'s deadline passed: ``RpcTimeoutError``, and (``cancel_on_timeout``)
        the call interrupted in the ranks that did not answer; a ``check_health`` ping
        interrupts the calls those ranks are running instead. Nothing, when its last
        replies are being delivered right now. Holding no lock: the stacks of the silent
        ranks are collected first (see :meth:`CallTable.timed_out`)."""
        error = self._table.timed_out(call)  # the silent ranks' stacks first
        if error is None:
            return
        ranks = list(error.ranks)
        timeout = call.timeout or 0.0
        if not self._cancel_on_timeout:
            if self._table.finish(call, error, settle):
                log.info("gpuexec: call %d %r timed out after %g s; ranks %s run on",
                         call.call_id, call.method, timeout, ranks)
            return
        if not call.ping:
            self.cancel(call, f"timed out after {timeout:g} s", error, settle)
            return
        if not self._table.finish(call, error, settle):
            return
        for rank in ranks:  # each silent rank: the call it runs
            running = self._table.running_call(rank)
            if running is not None:
                reason = f"check_health found rank {rank} silent for {timeout:g} s"
                self.cancel(running, reason,
                            CallCancelledError(running.method, sorted(running.owed), reason),
                            settle)

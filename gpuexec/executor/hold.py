"""The gate that holds calls in the driver while the executor is suspended.

A suspended worker is locked by the CUDA driver: its Python still runs, but its next CUDA
call would block until resume. Sending it work would only park that work inside the
worker, out of reach of the caller's timeout, so calls made while suspended wait *here*,
unsent, until ``resume()`` opens the gate, each bounded by its own timeout
(:class:`~gpuexec.errors.HeldCallTimeoutError`, retry-safe since nothing was sent). A
worker's death or shutdown wakes every held call, which then fails as any call does
(``WorkerDiedError``, ``ExecutorClosedError``). Health pings do not pass the gate: a locked
worker's Python answers them.

::

    blocking call ──▶ hold(): wait on _cond until open, dead/closed, or deadline ──▶ send
    non_block     ──▶ defer(): its Future now; the call waits in ``_deferred``, unsent
    asyncio       ──▶ defer() too, its Future awaited (a cancelled task cancels it)

    one "gpuexec-held-calls" thread while anything is deferred (not one per call):
      gate open      ──▶ sends every deferred call still wanted, in the order made
      dead / closed  ──▶ fails them with the channel's error
      a deadline     ──▶ HeldCallTimeoutError for that call

A call is checked (its arguments, ranks, timeout, and that its values can be carried)
before it is held, so a bad one fails at once in every mode, as it would unsuspended. A
deferred call whose Future was cancelled while held is never sent.

``holding`` is read without the lock on every call (one attribute load on the hot path);
a call that reads a stale False races with a suspend that has not locked anything yet,
and the suspender waits for nothing the call does, so the call is simply one that
arrived before the suspend (the driver lock then waits for its GPU work).

Fields and threads: ``holding`` is written under ``_cond`` by the suspending/resuming
thread (``close``/``open``) and read by any caller thread; ``_deferred`` and ``_thread``
are touched under ``_cond`` by callers (``defer``) and the held-calls thread; ``_check``
is the channel's ``check_usable``, called by any thread; it takes no lock (it reads two
flags), so the held-calls thread calls it under ``_cond``. Lock order: the suspension's
lock may be held while taking ``_cond``, never the reverse; ``_cond`` is never held while
a held call is sent or a Future is completed (its callbacks run user code).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from ..errors import HeldCallTimeoutError


class _Deferred:
    """A ``non_block`` call held while suspended: sent by ``send(timeout left)`` once the
    gate opens (it returns the sent call's own Future, whose outcome is copied over)."""

    __slots__ = ("deadline", "future", "method", "send", "timeout")

    def __init__(self, send: Callable[[float | None], Future[Any]], timeout: float | None,
                 method: str) -> None:
        self.send = send
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.method = method
        self.future: Future[Any] = Future()

    def left(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 1e-3)


class CallGate:
    """Open while the executor runs; closed while it is suspended (see the module doc)."""

    def __init__(self, check: Callable[[], None]) -> None:
        self._check = check  # raises WorkerDiedError / ExecutorClosedError when unusable
        self._cond = threading.Condition()
        self.holding = False  # True from the start of a suspend until resume completes
        self._deferred: list[_Deferred] = []  # held non_block calls, in the order made
        self._thread: threading.Thread | None = None  # the held-calls thread, while any

    def close(self) -> None:
        """Hold calls from now on (the start of a suspend)."""
        with self._cond:
            self.holding = True

    def open(self) -> None:
        """Let every held call through (a resume, or a suspend rolled back)."""
        with self._cond:
            self.holding = False
            self._cond.notify_all()

    def poke(self) -> None:
        """Wake the held calls so that they re-check the executor (a death, shutdown)."""
        with self._cond:
            self._cond.notify_all()

    def hold(self, timeout: float | None, method: str) -> float | None:
        """Wait until the gate is open; return what is left of ``timeout``.

        Raises ``HeldCallTimeoutError`` at the deadline, the channel's error when a worker
        died or the executor shut down meanwhile.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:  # checked under _cond: a poke cannot slip in before the wait
                self._check()
                if not self.holding:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise HeldCallTimeoutError(method, timeout or 0.0)
                self._cond.wait(left)
        self._check()
        return None if deadline is None else max(deadline - time.monotonic(), 1e-3)

    def defer(self, send: Callable[[float | None], Future[Any]], timeout: float | None,
              method: str) -> Future[Any]:
        """A ``non_block`` call made while suspended: its Future now, the call sent by the
        held-calls thread once the gate opens (see the module doc). Cancelling the Future
        before then withdraws the call: it is never sent."""
        held = _Deferred(send, timeout, method)
        with self._cond:
            resumed = not self.holding  # meanwhile: nothing to wait for
            if not resumed:
                self._deferred.append(held)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, daemon=True,
                                                    name="gpuexec-held-calls")
                    self._thread.start()
                elif held.deadline is not None:
                    self._cond.notify_all()  # the thread may now have a nearer deadline
        return send(timeout) if resumed else held.future

    def _run(self) -> None:
        """The held-calls thread: waits for the gate to open, a death or shutdown, or the
        next deadline; exits once nothing is deferred any more."""
        while True:
            with self._cond:  # checked under _cond: a poke cannot slip in before the wait
                error = self._unusable()
                now = time.monotonic()
                expired: list[_Deferred] = []
                waiting: list[_Deferred] = []
                for d in self._deferred:
                    if d.future.done():  # cancelled while held: dropped, never sent
                        continue
                    late = d.deadline is not None and d.deadline <= now
                    (expired if error is not None or late else waiting).append(d)
                ready: list[_Deferred] = []
                if not self.holding:
                    ready, waiting = waiting, []
                self._deferred = waiting
                finished = not waiting
                if finished:
                    self._thread = None
                elif not expired:
                    deadlines = [d.deadline for d in waiting if d.deadline is not None]
                    self._cond.wait(min(deadlines) - now if deadlines else None)
            for d in expired:
                _outcome(d.future, error=error or HeldCallTimeoutError(d.method,
                                                                       d.timeout or 0.0))
            for d in ready:
                self._send(d)
            if finished:
                return

    def _unusable(self) -> BaseException | None:
        try:
            self._check()
        except BaseException as e:
            return e
        return None

    @staticmethod
    def _send(held: _Deferred) -> None:
        if not held.future.set_running_or_notify_cancel():
            return  # cancelled while held: withdrawn, never sent
        try:
            inner = held.send(held.left())
        except BaseException as e:
            _outcome(held.future, error=e)
            return
        inner.add_done_callback(lambda f: _copy(f, held.future))


def _outcome(future: Future[Any], value: Any = None, error: BaseException | None = None
             ) -> None:
    """Complete ``future`` unless its owner cancelled it meanwhile (nobody waits then)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass


def _copy(inner: Future[Any], outer: Future[Any]) -> None:
    if inner.cancelled():
        outer.cancel()
        return
    error = inner.exception()
    _outcome(outer, inner.result() if error is None else None, error)

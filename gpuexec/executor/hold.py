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
    non_block     ──▶ defer(): a thread does the same, then chains the call's Future
    asyncio       ──▶ hold_async(): a loop future woken by call_soon_threadsafe at open

``holding`` is read without the lock on every call (one attribute load on the hot path);
a call that reads a stale False races with a suspend that has not locked anything yet,
and the suspender waits for nothing the call does, so the call is simply one that
arrived before the suspend (the driver lock then waits for its GPU work).

Fields and threads: ``holding``, ``_waiters`` are written under ``_cond`` by the
suspending/resuming thread (``close``/``open``) and read by any caller thread; ``_check``
is the channel's ``check_usable``, called by any thread. Lock order: the suspension's
lock may be held while taking ``_cond``, never the reverse; ``_cond`` is never held while
calling ``_check`` or waking an event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..errors import HeldCallTimeoutError


class CallGate:
    """Open while the executor runs; closed while it is suspended (see the module doc)."""

    def __init__(self, check: Callable[[], None]) -> None:
        self._check = check  # raises WorkerDiedError / ExecutorClosedError when unusable
        self._cond = threading.Condition()
        self.holding = False  # True from the start of a suspend until resume completes
        # event loop futures of held async calls, woken when the gate opens
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def close(self) -> None:
        """Hold calls from now on (the start of a suspend)."""
        with self._cond:
            self.holding = True

    def open(self) -> None:
        """Let every held call through (a resume, or a suspend rolled back)."""
        with self._cond:
            self.holding = False
            self._cond.notify_all()
        self._wake_loops()

    def poke(self) -> None:
        """Wake the held calls so that they re-check the executor (a death, shutdown)."""
        with self._cond:
            self._cond.notify_all()
        self._wake_loops()

    def _wake_loops(self) -> None:
        with self._cond:
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(_set, waiter)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass

    def hold(self, timeout: float | None, method: str) -> float | None:
        """Wait until the gate is open; return what is left of ``timeout``.

        Raises ``HeldCallTimeoutError`` at the deadline, the channel's error when a worker
        died or the executor shut down meanwhile.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check()
            with self._cond:
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
        """A ``non_block`` call made while suspended: its Future now, the call sent by a
        helper thread once the gate opens (``send(timeout_left)`` returns the call's own
        Future, whose outcome is copied over)."""
        outer: Future[Any] = Future()

        def run() -> None:
            try:
                inner = send(self.hold(timeout, method))
            except BaseException as e:
                outer.set_exception(e)
                return
            inner.add_done_callback(lambda f: _copy(f, outer))

        threading.Thread(target=run, name="gpuexec-held-call", daemon=True).start()
        return outer

    async def hold_async(self, timeout: float | None, method: str) -> float | None:
        """:meth:`hold` for an event loop: awaits without blocking it."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check()
            waiter: asyncio.Future[None] = loop.create_future()
            with self._cond:
                if not self.holding:
                    break
                self._waiters.append((loop, waiter))
            left = None if deadline is None else deadline - time.monotonic()
            try:
                await asyncio.wait_for(waiter, left)
            except TimeoutError:
                raise HeldCallTimeoutError(method, timeout or 0.0) from None
        self._check()
        return None if deadline is None else max(deadline - time.monotonic(), 1e-3)


def _set(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _copy(inner: Future[Any], outer: Future[Any]) -> None:
    error = inner.exception()
    if error is not None:
        outer.set_exception(error)
    else:
        outer.set_result(inner.result())

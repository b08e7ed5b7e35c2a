"""asyncio on top of the channel: ``collective_rpc_async`` without a thread per call.

::

    event loop task                         gpuexec threads (monitor / any pumper)
    ───────────────                         ──────────────────────────────────────
    async with slot (max_concurrent_batches)
      submit(non_block) ──▶ Call sent        replies pumped, call completed
      await waiter  ◀── call_soon_threadsafe ◀── the Future's done callback
      return call.outcome()

The calls are the ``non_block`` calls the channel already has: the monitor thread pumps
replies while one is outstanding, and the call's ``concurrent.futures.Future`` done
callback wakes the loop through ``call_soon_threadsafe``. No thread is started or
borrowed per call, and the loop never blocks.

A cancelled task *cancels* its call (``Future.cancel()`` of the call's future, see
:mod:`.cancel`): it leaves the pending table at once and every worker still running it
is interrupted, so the next call runs at once; the task sees ``asyncio.CancelledError``.
A call that had already finished everywhere stays finished (its outcome is dropped).

``max_concurrent_batches`` bounds the calls a loop has outstanding, with one
``asyncio.Semaphore`` per event loop (an engine runs one). Workers still run calls in
the order they were sent, one at a time; a second batch in flight hides the dispatch of
the next step and the gather of the previous one behind the compute of the current one.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from concurrent.futures import Future
from typing import Any

from .channel import PendingCall


class AsyncSlots:
    """One ``asyncio.Semaphore`` of ``limit`` slots per event loop.

    ``_by_loop`` is touched by any thread that runs a loop, under ``_lock``; each
    semaphore only by its own loop's thread.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] \
            = weakref.WeakKeyDictionary()

    def for_running_loop(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        with self._lock:
            slots = self._by_loop.get(loop)
            if slots is None:
                slots = self._by_loop[loop] = asyncio.Semaphore(self.limit)
            return slots


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def await_call(call: PendingCall) -> Any:
    """The outcome of a ``non_block`` call, awaited; cancelling the task cancels the
    call."""
    future: Future[Any] | None = call.future
    if future is None:
        raise ValueError("await_call needs a non_block call")
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def relay(_: Future[Any]) -> None:  # runs on whichever thread completed the call
        try:
            loop.call_soon_threadsafe(_wake, waiter)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    future.add_done_callback(relay)
    try:
        await waiter
    except asyncio.CancelledError:
        future.cancel()
        raise
    return call.outcome()

"""Deferred replies: a worker method that returns a :class:`concurrent.futures.Future`.

The serving thread does not wait for such a future: it goes on taking requests, and the
reply is sent from the thread that resolves the future (a done-callback). So two threads
may send replies, while the reply path (a ZeroMQ PUSH socket, or this worker's reply
ring and doorbell) has room for one writer at a time: every reply of the worker goes
through :meth:`ReplyGate.send`, which serialises them.

    serving thread ── Call ─▶ method ─▶ value ──────────────▶ gate.send(Reply)
                                  └─▶ Future ── resolves in thread T ─▶ gate.send(Reply)

Replies carry their call id, so the driver matches a late deferred reply to its call
whatever order replies arrive in. Once the worker has begun to shut down the gate is
closed: a future that resolves after that has nobody to answer (the driver has failed
its pending calls with ``ExecutorClosedError``) and its reply is dropped. The gate closes
*before* the worker's ``on_shutdown`` runs, so a hook that cancels its pending futures
drops their replies instead of writing them into a reply ring nobody reads any more
(which would fill up and hang the hook).

A future that is not quite a Future (a subclass whose ``add_done_callback`` raises) ends
its own call with that error, as a raising method would; the worker lives on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ..ipc import ringcore

if TYPE_CHECKING:
    _GateFields = object
else:  # ``closed`` in a C struct where the compiled core is built (see ringcore.fields)
    _GateFields = ringcore.fields("GateFields")


class ReplyGate(_GateFields):
    """The one way out for a worker's replies, safe to call from any thread.

    Lock order: ``_lock`` is the innermost lock of the worker; ``send`` (called with it
    held) takes no other lock of gpuexec. It is taken only once a reply may come from
    another thread (a method returned a Future).
    """

    def __init__(self, send: Callable[[Any, str], None]) -> None:
        self._send = send               # set once; called only under _lock once shared
        self._lock = threading.Lock()   # guards closed and every call of _send
        # Any thread, under _lock; read without it by the ring core's serving loop
        # (ipc.shm_ring.RingReader.serve), between a method's return and its reply.
        self.closed = False
        # Whether another thread may send: from the first deferred reply on (set by the
        # serving thread before it hands a future its callback). Until then only the
        # serving thread sends (signal handlers run on it, between its bytecodes), and
        # a reply leaves without the lock.
        self.shared = False

    def send(self, reply: Any, method: str) -> bool:
        """Send ``reply`` (from any thread); False when the gate is already closed.
        Checked before the lock too: after :meth:`close_now` the lock may be held for
        good by the main thread a signal interrupted mid-send."""
        if self.closed:
            return False
        if not self.shared:
            self._send(reply, method)
            return True
        with self._lock:
            if self.closed:
                return False
            self._send(reply, method)
            return True

    def defer(self, future: Future[Any], method: str,
              finish: Callable[[Future[Any]], Any],
              failed: Callable[[BaseException], Any]) -> None:
        """Send ``finish(future)`` once ``future`` is done (at once if it already is);
        should the future refuse the callback, send ``failed(error)`` now instead."""
        self.shared = True  # before the callback exists: it may run on another thread
        try:
            future.add_done_callback(lambda f: self.send(finish(f), method))
        except BaseException as e:  # SystemExit too: the worker lives on
            self.send(failed(e), method)

    def close(self) -> None:
        """No reply leaves after this; waits for a send in progress to finish."""
        with self._lock:
            self.closed = True

    def close_now(self) -> None:
        """:meth:`close` from a signal handler, which may have interrupted a send on
        this very thread: no waiting for the lock (a bool store is atomic)."""
        self.closed = True

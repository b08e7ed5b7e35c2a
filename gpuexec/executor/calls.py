"""The driver's call table: the calls in flight, their slots, and how each one ends.

A call enters the table with its slot before it is encoded (:meth:`CallTable.enter`, one
take of the lock; :meth:`CallTable.withdraw` if it is then not sent), collects one reply
per rank (:meth:`CallTable.deliver`) and leaves it once (:meth:`CallTable.finish`, or
inside the same take of the lock as its last reply's delivery): with
its results, the first failing rank's error, a timeout, a death or shutdown. Its
``Future`` (``non_block``) is *settled* (its result set, so its done callbacks run) only
by a thread that holds none of the channel's locks: a thread that finishes calls while
it holds the pump lock queues them (``settle=False``) for :meth:`CallTable.settle`.

Bounded: at most ``max_inflight_calls`` calls are in flight (a count of slots under
``lock``, taken before anything is encoded, given back when the call ends); a caller
that finds none free waits on ``room`` up to its own deadline and then gets
:class:`~gpuexec.errors.InflightLimitError`. Not a ``threading.BoundedSemaphore``:
that is Python code around a condition, over a microsecond per call taken and given
back, while the count costs nothing where ``lock`` is taken anyway (``finish``).

``lock`` is a leaf (nothing is taken under it but ``room``'s own waiter locks); it
guards ``pending``, ``n_async``, ``draining``, ``closing``, the slot count ``inflight``
and each call's outcome, and is held for a few statements
only. The monitor also takes it to record a death atomically with the pending calls it
fails (see :mod:`.monitor`). Fields and the threads that touch them:

* ``pending``, ``n_async``, ``draining``, ``closing``: any thread, under ``lock`` (read
  without it where a stale value is harmless: the loops re-check).
* ``unsettled``: futures finished under the pump lock, waiting to be settled; any thread
  appends or pops (a deque: both are atomic).
* ``stats``: written by the thread holding the pump lock (``calls`` and
  ``inflight_waits`` by callers, under ``lock``); read through
  :meth:`gpuexec.executor.channel.DriverChannel.snapshot` (best effort).
* ``inflight``, ``slot_waiters``: any thread, under ``lock``; ``room`` (a condition
  on ``lock``) is notified when a slot is given back while someone waits for one.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from ..errors import ExecutorClosedError, InflightLimitError, RpcTimeoutError
from ..ipc.messages import Failure, Pong, Reply
from .failures import call_error

_SLOT_WAIT_S = 0.1  # a caller waiting for a slot re-checks liveness this often


@dataclass
class ChannelStats:
    """What the channel counted. Drops are never raised: they are counted here (and
    logged once), so a stream of garbage costs a counter, not a crash."""

    calls: int = 0
    late_replies: int = 0        # replies to calls that timed out or were abandoned
    malformed: int = 0           # frames the driver dropped, every reason together
    # ... by reason: MalformedMessage.reason, "empty", "packet" (a bad ring packet) or
    # "overflow_lost" (a reply announced in a ring that never came by ZeroMQ)
    malformed_by_reason: dict[str, int] = field(default_factory=dict)
    # rank -> reason -> requests that worker dropped, as of its last Pong (check_health)
    worker_malformed: dict[int, dict[str, int]] = field(default_factory=dict)
    refused_connections: int = 0  # peers the ZAP handler turned away (no/wrong key, pid)
    inflight_waits: int = 0      # calls that had to wait for a free slot (backpressure)

    def count(self, reason: str) -> int:
        """Record one dropped frame; returns the new total."""
        self.malformed_by_reason[reason] = self.malformed_by_reason.get(reason, 0) + 1
        self.malformed += 1
        return self.malformed


class PendingCall:
    """One call in flight: which ranks still owe a reply, and what came back."""

    __slots__ = (
        "call_id",
        "deadline",
        "done",
        "error",
        "event",
        "failures",
        "future",
        "method",
        "owed",
        "ranks",
        "segments",
        "slot",
        "timeout",
        "unique_reply_rank",
        "value",
        "values",
    )

    def __init__(self, call_id: int, method: str, ranks: Sequence[int],
                 unique_reply_rank: int | None, timeout: float | None,
                 future: Future[Any] | None) -> None:
        self.call_id = call_id
        self.method = method
        self.ranks = ranks
        self.unique_reply_rank = unique_reply_rank
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.future = future
        self.event: threading.Event | None = None  # made by a waiter that is not pumping
        self.owed = set(ranks)
        self.values: dict[int, Any] = {}
        self.failures: dict[int, Failure] | None = None  # made at the first failure
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.segments: list[int] = []  # shared-memory payloads to close once complete
        self.slot = False  # holds one of the table's in-flight slots until finished

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class CallTable:
    """The calls in flight; see the module docstring."""

    def __init__(self, max_inflight_calls: int,
                 on_deferred: Callable[[], None] = lambda: None) -> None:
        self.lock = threading.Lock()
        self.max_inflight = max_inflight_calls
        self.inflight = 0       # slots taken
        self.slot_waiters = 0   # callers waiting on ``room`` for a slot
        self.room = threading.Condition(self.lock)
        self.ids = itertools.count(1)
        self.pending: dict[int, PendingCall] = {}
        self.n_async = 0      # futures in the table: the monitor pumps while any
        self.draining = 0     # requests waiting for room to send: the monitor drains
        self.closing = False  # set once by the channel's begin_close
        # Set with ``closing`` and by a worker's death (cleared when the dead ranks are
        # replaced): a call that registers now is refused with refusal()'s error. One
        # check in register covers both, so a call racing with a death is either failed
        # by the monitor or refused here, never sent to a rank that is being replaced.
        self.refusal: Callable[[], BaseException] | None = None
        self.unsettled: deque[PendingCall] = deque()
        self.stats = ChannelStats()
        # Called (holding no lock of this table) when deliver finished a future: the
        # channel pokes the monitor, which settles it outside the pump lock.
        self._on_deferred = on_deferred
        # Raises when the channel is closed or failed (set once by the channel).
        self.check_usable: Callable[[], None] = lambda: None

    def take_slot(self, call: PendingCall) -> None:
        """Take one of the ``max_inflight_calls`` slots, waiting for one until the call's
        deadline (``InflightLimitError``) or until :attr:`check_usable` raises (death,
        shutdown). The caller has just checked that the channel is usable: a slot taken
        without waiting needs no second check."""
        with self.lock:
            if self.inflight < self.max_inflight:
                self.inflight += 1
                call.slot = True
                return
            self.stats.inflight_waits += 1
            self.slot_waiters += 1
        try:
            while True:
                with self.lock:
                    if self.inflight < self.max_inflight:
                        self.inflight += 1
                        call.slot = True
                        break
                    wait = _SLOT_WAIT_S
                    if call.deadline is not None:
                        wait = min(wait, call.deadline - time.monotonic())
                        if wait <= 0:
                            raise InflightLimitError(call.method, call.timeout or 0.0,
                                                     self.max_inflight)
                    self.room.wait(wait)
                self.check_usable()
        finally:
            with self.lock:
                self.slot_waiters -= 1
        try:
            self.check_usable()
        except BaseException:
            self.release_slot(call)
            raise

    def release_slot(self, call: PendingCall) -> None:
        with self.lock:
            self._give_back(call)

    def _give_back(self, call: PendingCall) -> None:
        """Return the slot ``call`` holds, if it holds one (caller holds ``lock``)."""
        if call.slot:
            call.slot = False
            self.inflight -= 1
            if self.slot_waiters:
                self.room.notify()

    def enter(self, call: PendingCall, refused: Callable[[], BaseException],
              counted: bool = True) -> None:
        """Take a slot (see :meth:`take_slot`) and :meth:`register` ``call``: one take of
        the lock when a slot is free (the common case), before anything is encoded; a
        call that is then not sent leaves by :meth:`withdraw`."""
        with self.lock:
            if self.refusal is not None:
                raise refused() if self.closing else self.refusal()
            if self.inflight < self.max_inflight:
                self.inflight += 1
                call.slot = True
                self._add(call, counted)
                return
        self.take_slot(call)
        try:
            self.register(call, refused, counted)
        except BaseException:
            self.release_slot(call)
            raise

    def withdraw(self, call: PendingCall, counted: bool = True) -> None:
        """Take back a call :meth:`enter` made that was never sent (its encoding failed)."""
        with self.lock:
            if self.pending.pop(call.call_id, None) is not None:
                if call.future is not None:
                    self.n_async -= 1
                if counted:
                    self.stats.calls -= 1
            self._give_back(call)

    def register(self, call: PendingCall, refused: Callable[[], BaseException],
                 counted: bool = True) -> None:
        """Enter ``call`` in the table, unless the channel is closing (then raise
        ``refused()``): under the lock ``begin_close`` takes, so that every call is
        either failed by it or refused here, never left waiting for workers that were
        told to exit. ``counted``: a user's call (``stats.calls``), not a health ping."""
        with self.lock:
            if self.refusal is not None:
                raise refused() if self.closing else self.refusal()
            self._add(call, counted)

    def _add(self, call: PendingCall, counted: bool) -> None:
        """Enter ``call`` in ``pending`` (caller holds ``lock``)."""
        self.pending[call.call_id] = call
        if call.future is not None:
            self.n_async += 1
        if counted:
            self.stats.calls += 1

    def close_pending(self) -> list[PendingCall] | None:
        """Mark the table closing; the calls to fail (None: it was already closing)."""
        with self.lock:
            if self.closing:
                return None
            self.closing = True
            self.refusal = _shut_down
            return list(self.pending.values())

    def deliver(self, replies: Sequence[Reply | Pong]) -> None:
        """Record ``replies`` in their calls and complete the calls they complete, all in
        one take of the lock. The caller holds the pump lock: futures are queued, not
        settled."""
        complete: list[PendingCall] | None = None
        stats = self.stats
        with self.lock:
            pending = self.pending
            for reply in replies:
                call = pending.get(reply.call_id)
                if call is None or reply.rank not in call.owed:
                    stats.late_replies += 1
                    continue
                call.owed.discard(reply.rank)
                if isinstance(reply, Pong):
                    stats.worker_malformed[reply.rank] = dict(reply.dropped)
                    call.values[reply.rank] = None
                elif reply.error is not None:
                    if call.failures is None:
                        call.failures = {}
                    call.failures[reply.rank] = reply.error
                else:
                    call.values[reply.rank] = reply.value
                if not call.owed and self._end(call, None):
                    if complete is None:
                        complete = []
                    complete.append(call)
        if complete is None:
            return
        deferred = False
        for call in complete:  # the caller holds the pump lock: no user code here
            self._ended(call, settle=False)
            deferred = deferred or call.future is not None
        if deferred:
            self._on_deferred()

    def finish(self, call: PendingCall, error: BaseException | None = None,
               settle: bool = True) -> None:
        """Complete ``call`` once, with its results or ``error``. Its future is settled
        now, or with ``settle=False`` (the caller holds the pump lock) queued for
        :meth:`settle`, so that its done callbacks never run under a channel lock."""
        with self.lock:
            if not self._end(call, error):
                return
        self._ended(call, settle)

    def _end(self, call: PendingCall, error: BaseException | None) -> bool:
        """The outcome of ``call`` and its leaving the table (caller holds ``lock``);
        False when it had already ended."""
        if call.done:
            return False
        if error is None and call.failures:
            rank = min(call.failures)
            error = call_error(rank, call.failures[rank], call.method,
                               len(call.failures) - 1)
        if error is not None:
            call.error = error
        elif call.unique_reply_rank is not None:
            call.value = call.values[call.unique_reply_rank]
        else:
            call.value = [call.values[r] for r in call.ranks]
        # Last: a waiter that reads ``done`` without the lock then reads the outcome.
        call.done = True
        self.pending.pop(call.call_id, None)
        if call.future is not None:
            self.n_async -= 1
        self._give_back(call)
        return True

    def _ended(self, call: PendingCall, settle: bool) -> None:
        """What follows :meth:`_end`, outside the lock: payloads closed, waiters woken."""
        for fd in call.segments:  # every target has mapped its payloads (or never will)
            os.close(fd)
        call.segments = []
        if call.event is not None:
            call.event.set()
        if call.future is not None:
            if settle:
                _settle_one(call)
            else:
                self.unsettled.append(call)

    def expire(self, call: PendingCall) -> None:
        self.finish(call, RpcTimeoutError(call.method, call.timeout or 0.0, sorted(call.owed)))

    def expire_futures(self, now: float) -> None:
        """Time out the futures whose deadline has passed (the monitor, each round)."""
        with self.lock:
            expired = [c for c in self.pending.values() if c.future is not None
                       and c.deadline is not None and c.deadline <= now]
        for call in expired:
            self.expire(call)

    def settle(self) -> None:
        """Settle the futures queued by pumping threads; any thread holding no lock."""
        unsettled = self.unsettled
        while unsettled:
            try:
                call = unsettled.popleft()
            except IndexError:  # another thread took the last one
                return
            _settle_one(call)

    def add_draining(self, n: int) -> None:
        with self.lock:
            self.draining += n


def _settle_one(call: PendingCall) -> None:
    future = call.future
    if future is None:
        return
    try:
        if call.error is not None:
            future.set_exception(call.error)
        else:
            future.set_result(call.value)
    except InvalidStateError:  # the caller cancelled the Future: nobody waits for it
        pass


def _shut_down() -> ExecutorClosedError:
    return ExecutorClosedError("the executor is shut down")

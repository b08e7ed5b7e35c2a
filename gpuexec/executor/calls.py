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

The hot path's two steps, a user's call made and entered (:attr:`CallTable.new_call`)
and its end when every rank answered it at once (:attr:`CallTable.answered_all`), run in
compiled code (``_calltable.c``) when this process runs the compiled ring core: the same
writes to the same fields, a call made as one C struct with the same attributes, and the
lock taken in the one way the GIL allows without calling it (found free, with nothing run
in between; see the C file). What they do not handle (a held lock, a refusal, no free
slot, a call that is not simply waiting for all of its ranks, a fold due) they hand to
the general methods here, unchanged, which are also their pure-Python twin.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from ..errors import ExecutorClosedError, InflightLimitError, RpcTimeoutError
from ..ipc import ringcore
from ..ipc.messages import Failure, Pong, Reply
from .failures import call_error
from .metrics import CallMetrics

_SLOT_WAIT_S = 0.1  # a caller waiting for a slot re-checks liveness this often

log = logging.getLogger("gpuexec")


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
    # How calls ended other than with their results (each also logged, one line apiece):
    timeouts: int = 0            # RpcTimeoutError (InflightLimitError included)
    cancelled: int = 0           # Future.cancel(), a cancelled task, Ctrl-C, check_health
    cancel_kills: int = 0        # workers killed: a cancelled call did not stop in time
    cancelled_replies: int = 0   # answers of ranks that stopped a cancelled call

    def count(self, reason: str) -> int:
        """Record one dropped frame; returns the new total."""
        self.malformed_by_reason[reason] = self.malformed_by_reason.get(reason, 0) + 1
        self.malformed += 1
        return self.malformed


class FutureCancelled(Exception):
    """A call ended by ``Future.cancel()`` (its future is cancelled, not failed)."""


@dataclass
class CancelWatch:
    """A cancelled call some ranks have not answered yet: each must stop it within
    ``cancel_grace`` of starting to be watched (when it is the oldest call it owes,
    i.e. the one it runs), else the monitor kills it (see :mod:`.monitor`)."""

    call_id: int
    method: str
    reason: str
    owed: set[int]
    deadlines: dict[int, float] = field(default_factory=dict)  # rank -> kill time
    signalled: dict[int, float] = field(default_factory=dict)  # rank -> last signal


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
        "nbytes",
        "owed",
        "ping",
        "ranks",
        "segments",
        "slot",
        "started",
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
        self.started = time.monotonic()  # when it was sent (latency, status' running_s)
        self.deadline = None if timeout is None else self.started + timeout
        self.nbytes = 0  # request bytes sent (metrics)
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
        self.ping = False  # a check_health ping, not a user's call

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


STEPS_API = 9  # _calltable.c's CALLTABLE_API must be the same


def _built() -> tuple[Any, str]:
    """The compiled steps' module where it is built from this source (its API), whichever
    steps run (see :func:`compiled_steps`), else None and why: the types below are its
    where it is, so that the steps can read their state with no lookup or call."""
    try:
        module = importlib.import_module("gpuexec.executor._calltable")
    except ImportError as e:
        return None, str(e) or type(e).__name__
    if getattr(module, "API", None) != STEPS_API:
        return None, "the build found is stale; rebuild it with make or pip install -e ."
    return module, ""


_module, _why_not_built = _built()
_Lock: Callable[[], threading.Lock] = threading.Lock if _module is None else _module.Lock


def make_lock() -> threading.Lock:
    """The call table's lock and the channel's pump and send locks: the compiled steps'
    ``Lock`` where they are built (threading.Lock's interface and behaviour, a blocking
    acquire interrupted by a signal's handler as its is; its state read and changed by
    the steps with no call), else a ``threading.Lock``."""
    return _Lock()


if TYPE_CHECKING:
    _TableFields = object
else:  # ``inflight``, ``max_inflight``, ``slot_waiters``, ``n_async`` and ``refusal`` in
    # a C struct where the steps are built (they read and write them with no lookup;
    # Python reads and writes them as attributes), else plain attributes
    _TableFields = object if _module is None else _module.TableFields


class CallTable(_TableFields):
    """The calls in flight; see the module docstring."""

    def __init__(self, max_inflight_calls: int,
                 on_deferred: Callable[[], None] = lambda: None, world_size: int = 0) -> None:
        self.lock = make_lock()
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
        # call id -> a cancelled call whose ranks must still stop (under ``lock``)
        self.cancelling: dict[int, CancelWatch] = {}
        # call id -> (call, when its first failure came) while other ranks still owe an
        # answer: the monitor interrupts them after FAIL_FAST_S (under ``lock``)
        self.failing: dict[int, tuple[PendingCall, float]] = {}
        # Called (holding no lock of this table) when a call got its first failure and
        # other ranks still run it: the channel pokes the monitor.
        self.on_failure: Callable[[], None] = lambda: None
        self.stats = ChannelStats()
        self.metrics = CallMetrics(world_size)  # under ``lock`` (see .metrics)
        # Called (holding no lock) when a call times out: rank -> the stacks of the ranks
        # that did not answer (set once by the executor; see .forensics).
        self.explain: Callable[[PendingCall, list[int]], dict[int, str]] = lambda c, r: {}
        # Called (holding no lock of this table) when deliver finished a future: the
        # channel pokes the monitor, which settles it outside the pump lock.
        self._on_deferred = on_deferred
        # Raises when the channel is closed or failed (set once by the channel).
        self.check_usable: Callable[[], None] = lambda: None
        # The hot path's two steps (a user's call made and entered; its end when every
        # rank answered at once): compiled when this process runs the compiled ring
        # core, else the general methods below (see :func:`compiled_steps`).
        self.steps = steps = compiled_steps()
        # The objects they use, made above and never replaced (in the order they take).
        self.fixed = (self.lock, self.ids, self.pending, self.stats, self.metrics,
                      self.metrics.methods, self.metrics.replies, self.metrics.last_reply,
                      self.failing, self.metrics.answered_by_all)
        self.new_call: Callable[[str, Sequence[int], int | None, float | None,
                                 Future[Any] | None], PendingCall] = \
            self._new_call if steps is None else \
            functools.partial(steps.enter_new, self, self.fixed)
        self.answered_all: Callable[[PendingCall, dict[int, Any] | None], None] = \
            self.answered if steps is None else \
            functools.partial(steps.answered, self, self.fixed)

    def _new_call(self, method: str, ranks: Sequence[int], unique_reply_rank: int | None,
                  timeout: float | None, future: Future[Any] | None) -> PendingCall:
        """A user's call, made and entered (:meth:`enter`: refused once the channel is
        closed or failed)."""
        call = PendingCall(next(self.ids), method, ranks, unique_reply_rank, timeout, future)
        self.enter(call)
        return call

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

    def enter(self, call: PendingCall, refused: Callable[[], BaseException] | None = None,
              counted: bool = True) -> None:
        """Take a slot (see :meth:`take_slot`) and :meth:`register` ``call``: one take of
        the lock when a slot is free (the common case), before anything is encoded; a
        call that is then not sent leaves by :meth:`withdraw`."""
        with self.lock:
            if self.refusal is None and self.inflight < self.max_inflight:
                self.inflight += 1
                call.slot = True
                self._add(call, counted)
                return
        self.take_slot(call)  # refused there or in register (see its docstring)
        try:
            self.register(call, refused or _shut_down, counted)
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
        told to exit. ``counted``: a user's call (``stats.calls``), not a health ping.
        A refusal is raised through :attr:`check_usable` when it applies (a death is told
        only once the failure callbacks returned), outside the lock."""
        with self.lock:
            refusal = None if self.refusal is None else \
                refused if self.closing else self.refusal
            if refusal is None:
                self._add(call, counted)
        if refusal is not None:
            self.check_usable()
            raise refusal()

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
        failed = False
        metrics = self.metrics
        now = time.monotonic()
        with self.lock:
            pending = self.pending
            counts, last = metrics.replies, metrics.last_reply  # (folded once, here)
            for reply in replies:
                call = pending.get(reply.call_id)
                if call is None or reply.rank not in call.owed:
                    watch = self.cancelling.get(reply.call_id) if self.cancelling else None
                    if watch is not None and reply.rank in watch.owed:
                        stats.cancelled_replies += 1  # this rank stopped it
                        watch.owed.discard(reply.rank)
                        if not watch.owed:
                            del self.cancelling[reply.call_id]
                    else:
                        stats.late_replies += 1
                    metrics.late(reply.rank, reply.call_id, now)
                    continue
                call.owed.discard(reply.rank)
                last[reply.rank] = now
                if isinstance(reply, Pong):
                    stats.worker_malformed[reply.rank] = dict(reply.dropped)
                    call.values[reply.rank] = None
                elif reply.error is not None:
                    counts[reply.rank] += 1
                    if call.failures is None:
                        call.failures = {}
                        if call.owed and call.slot:  # a user's call (not a respawn's)
                            self.failing[call.call_id] = (call, now)
                            failed = True
                    call.failures[reply.rank] = reply.error
                    metrics.failed(reply.rank, reply.error.type_name)
                else:
                    counts[reply.rank] += 1
                    call.values[reply.rank] = reply.value
                if not call.owed and self._end(call, None, None, now):
                    if complete is None:
                        complete = []
                    complete.append(call)
        if complete is not None:
            deferred = False
            for call in complete:  # the caller holds the pump lock: no user code here
                self._ended(call, settle=False)
                deferred = deferred or call.future is not None
            if deferred:
                self._on_deferred()
        if failed:
            self.on_failure()

    def deliver_values(self, call: PendingCall, ranks: Sequence[int],
                       value: Any = None) -> None:
        """:meth:`deliver` of the result ``value`` of each of ``ranks`` to ``call``, which
        the caller (holding the pump lock) awaits: the hot path's replies (None results
        taken from the rings by their bytes, without a Reply made for each; or one
        decoded reply without an error), recorded under one take of the lock without the
        general walk. An answer the call no longer awaits (it ended meanwhile, or the
        rank answered already) goes through :meth:`deliver`, which counts it."""
        metrics = self.metrics
        now = time.monotonic()
        late: list[int] | None = None
        with self.lock:
            owed, values = call.owed, call.values
            counts, last = metrics.replies, metrics.last_reply  # (folded once, here)
            for rank in ranks:
                if rank in owed and not call.done:
                    owed.discard(rank)
                    last[rank] = now
                    counts[rank] += 1
                    values[rank] = value
                elif late is None:
                    late = [rank]
                else:
                    late.append(rank)
            ended = not owed and self._end(call, None, None, now)
        if late is not None:
            self.deliver([Reply(call.call_id, rank, value) for rank in late])
        if ended:
            self._ended(call, settle=False)
            if call.future is not None:
                self._on_deferred()

    def answered(self, call: PendingCall, values: dict[int, Any] | None = None) -> None:
        """Every rank ``call`` was sent to answered it at once, without an error: None each
        (``values`` None: collect's common case) or ``values[rank]`` (decoded replies).
        What :meth:`deliver_values` and :meth:`_end` do for such a call, without their
        general tests, under one take of the lock; the caller holds the pump lock. A call
        that is not simply waiting for all of them (one ended, or some answered already,
        or failed, or a future's) takes :meth:`deliver_values`, one rank at a time."""
        metrics = self.metrics
        now = time.monotonic()
        ranks = call.ranks
        with self.lock:
            owed = call.owed
            if call.done or call.failures is not None or call.future is not None or \
                    call.unique_reply_rank is not None or len(owed) != len(ranks) or \
                    (values is not None and owed != values.keys()):
                simple = False
            else:
                simple = True
                replies, last = metrics.replies, metrics.last_reply
                for rank in ranks:
                    replies[rank] += 1
                    last[rank] = now
                owed.clear()
                metrics.finished(call.method, now - call.started, call.nbytes, None)
                call.value = [None] * len(ranks) if values is None else \
                    list(map(values.__getitem__, ranks))
                call.done = True  # last but the table's own: see _end
                del self.pending[call.call_id]
                if self.failing:
                    self.failing.pop(call.call_id, None)
                self._give_back(call)
        if simple:
            if call.segments or call.event is not None:
                self._ended(call, settle=False)
        elif values is None:
            self.deliver_values(call, ranks)
        else:
            for rank, value in values.items():
                self.deliver_values(call, (rank,), value)

    def finish(self, call: PendingCall, error: BaseException | None = None,
               settle: bool | None = True, watch: str | None = None,
               now: float | None = None) -> bool:
        """Complete ``call`` once, with its results or ``error``; False when it was
        already complete. Its future is settled now, or with ``settle=False`` (the
        caller holds the pump lock) queued for :meth:`settle`, so that its done
        callbacks never run under a channel lock; with ``settle=None`` left for the
        caller to settle (:func:`settle_one`). ``watch``: the call is cancelled for
        that reason, and the ranks that still owe an answer must stop it (see
        :class:`CancelWatch`); recorded in the same take of the lock, so no answer
        can slip between the call and its watch. ``now``: ``time.monotonic()`` when the
        last reply was received (its latency)."""
        with self.lock:
            if not self._end(call, error, watch, now):
                return False
        self._ended(call, settle)
        return True

    def _end(self, call: PendingCall, error: BaseException | None, watch: str | None,
             now: float | None) -> bool:
        """The outcome of ``call`` and its leaving the table (caller holds ``lock``);
        False when it had already ended. See :meth:`finish`."""
        if call.done:
            return False
        if isinstance(error, RpcTimeoutError):
            self.stats.timeouts += 1
        if watch is not None and call.owed:
            self.cancelling[call.call_id] = CancelWatch(call.call_id, call.method, watch,
                                                        set(call.owed))
        if error is None and call.failures:
            error = call_error(call.failures, call.method)
        if call.owed and error is not None:  # ranks still run it (not a death's)
            if isinstance(error, RpcTimeoutError):
                self.metrics.silent(call.call_id, call.method, call.started, call.owed,
                                    cancelled=False)
            elif watch is not None or isinstance(error, (FutureCancelled, CancelledError)):
                self.metrics.silent(call.call_id, call.method, call.started, call.owed,
                                    cancelled=True)
        self.metrics.finished(call.method, (time.monotonic() if now is None else now)
                              - call.started, call.nbytes,
                              None if error is None else _kind(error))
        if error is not None:
            call.error = error
        elif call.unique_reply_rank is not None:
            call.value = call.values[call.unique_reply_rank]
        else:
            call.value = list(map(call.values.__getitem__, call.ranks))
        # Last: a waiter that reads ``done`` without the lock then reads the outcome.
        call.done = True
        self.pending.pop(call.call_id, None)
        if self.failing:
            self.failing.pop(call.call_id, None)
        if call.future is not None:
            self.n_async -= 1
        self._give_back(call)
        return True

    def _ended(self, call: PendingCall, settle: bool | None) -> None:
        """What follows :meth:`_end`, outside the lock: payloads closed, waiters woken,
        the future settled (see :meth:`finish`)."""
        for fd in call.segments:  # every target has mapped its payloads (or never will)
            os.close(fd)
        call.segments = []
        if call.event is not None:
            call.event.set()
        if call.future is not None:
            if settle:
                settle_one(call)
            elif settle is not None:
                self.unsettled.append(call)

    def expire(self, call: PendingCall) -> None:
        """End ``call`` with ``RpcTimeoutError`` (see :meth:`timed_out`), nothing
        interrupted (a respawn's own call; a user's call expires through
        :class:`~gpuexec.executor.cancel.Canceller`)."""
        error = self.timed_out(call)
        if error is not None:
            self.finish(call, error)

    def timed_out(self, call: PendingCall) -> RpcTimeoutError | None:
        """The error of ``call``, whose deadline passed: the stacks of the ranks that did
        not answer are collected first (bounded; see :mod:`.forensics`); None when the
        call is complete or its last replies are being delivered right now (it is done
        soon). Holding no lock."""
        with self.lock:
            if call.done:
                return None
            silent = sorted(call.owed)
        stacks = self.explain(call, silent) if silent else {}
        with self.lock:
            if call.done or not call.owed:
                return None
            silent = sorted(call.owed)
        return RpcTimeoutError(call.method, call.timeout or 0.0, silent,
                               {r: stacks[r] for r in silent if r in stacks})

    def failed_error(self, call: PendingCall) -> BaseException | None:
        """The error of ``call`` from the failures so far (see :func:`.failures.call_error`)."""
        with self.lock:
            if not call.failures:
                return None
            return call_error(call.failures, call.method)

    def fail_fast_due(self, now: float, after: float) -> list[PendingCall]:
        """Calls whose first failure came ``after`` seconds ago or more while other ranks
        still run them (each returned once; the monitor cancels them there)."""
        with self.lock:
            due = [c for c, t in self.failing.values() if t + after <= now]
            for call in due:
                del self.failing[call.call_id]
            return due

    def expired_futures(self, now: float) -> list[PendingCall]:
        """The futures whose deadline has passed (the monitor, each round)."""
        with self.lock:
            return [c for c in self.pending.values() if c.future is not None
                    and c.deadline is not None and c.deadline <= now]

    def running_call(self, rank: int) -> PendingCall | None:
        """The oldest pending user call ``rank`` owes an answer (the one it runs)."""
        with self.lock:
            owing = [c for c in self.pending.values() if not c.ping and rank in c.owed]
        return min(owing, key=lambda c: c.call_id, default=None)

    def overdue(self, now: float, grace: float | None, every: float
                ) -> tuple[list[tuple[int, CancelWatch]], list[tuple[int, CancelWatch]]]:
        """``(overdue, again)``: ``(rank, watch)`` for each rank that has not stopped a
        cancelled call within ``grace`` of running it (None: never overdue), and for each
        running it that was last signalled ``every`` seconds ago or more (signalled
        again: the cancel must not hang on one signal). Starts the clock of ranks that
        have just reached one (no older call owed). The monitor, while
        :attr:`cancelling` is not empty."""
        overdue, again = [], []
        with self.lock:
            watches = sorted(self.cancelling.values(), key=lambda w: w.call_id)
            for watch in watches:
                for rank in watch.owed:
                    deadline = watch.deadlines.get(rank)
                    if deadline is None:
                        if not self._owes_older(rank, watch.call_id, watches):
                            watch.deadlines[rank] = now + grace if grace is not None \
                                else float("inf")
                            watch.signalled.setdefault(rank, now)
                        continue
                    if deadline <= now:
                        overdue.append((rank, watch))
                    elif watch.signalled.get(rank, now) + every <= now:
                        watch.signalled[rank] = now
                        again.append((rank, watch))
        return overdue, again

    def _owes_older(self, rank: int, call_id: int, watches: list[CancelWatch]) -> bool:
        return any(c.call_id < call_id and rank in c.owed for c in self.pending.values()) \
            or any(w.call_id < call_id and rank in w.owed for w in watches)

    def settle(self) -> None:
        """Settle the futures queued by pumping threads; any thread holding no lock."""
        unsettled = self.unsettled
        while unsettled:
            try:
                call = unsettled.popleft()
            except IndexError:  # another thread took the last one
                return
            settle_one(call)

    def add_draining(self, n: int) -> None:
        with self.lock:
            self.draining += n


_Pending = PendingCall  # (the protocol's attribute of that name hides the class)


class TableSteps(Protocol):
    """The compiled call table steps (``_calltable.c``): a user's call made and entered
    (:meth:`CallTable._new_call`, stepping aside to :meth:`CallTable.enter`),
    :meth:`CallTable.answered`'s common case (stepping aside to it), and a blocking call's
    whole round trip over shared memory, without arguments or with plain ones (see
    :attr:`.channel.DriverChannel.call_bare` and ``call_plain``).
    The calls it makes are its own ``PendingCall``: the same attributes, in a C struct."""

    API: int
    PendingCall: type

    def enter_new(self, table: CallTable, fixed: tuple[Any, ...], method: str,
                  ranks: Sequence[int], unique_reply_rank: int | None,
                  timeout: float | None, future: Future[Any] | None) -> _Pending: ...
    def answered(self, table: CallTable, fixed: tuple[Any, ...], call: _Pending,
                 values: dict[int, Any] | None) -> None: ...
    def Lane(self, items: tuple[Any, ...]) -> Lane: ...  # (a type)


class Lane(Protocol):
    """What a channel's round trips read over shared memory, fixed for its life (made
    once by :class:`.channel.DriverChannel`; the order of ``items``: ``_calltable.c``)."""

    def round_trip(self, method: str, ranks: list[int], timeout: float | None) -> Any: ...
    def call_plain(self, method: str, args: Sequence[Any], kwargs: Mapping[str, Any] | None,
                   ranks: list[int], timeout: float | None) -> Any: ...
    def release(self) -> None: ...  # the channel released its transport (close)


NOT_SENT = 0  # where round_trip() hands a call back: entered, not sent (its NOT_SENT)
_steps_why_not: list[str] = []  # said once per process


def compiled_steps() -> TableSteps | None:
    """The compiled call table steps when this process runs the compiled ring core
    (:func:`gpuexec.ipc.ringcore.current`; ``GPUEXEC_CORE=python`` runs neither), built
    with it by the same install; None, said once in a log line, when they are missing or
    stale while the ring core is not."""
    if ringcore.current().NAME != "compiled":
        return None
    if _module is not None:
        return cast(TableSteps, _module)
    if not _steps_why_not:
        _steps_why_not.append(_why_not_built)
        log.warning("gpuexec: the compiled call table steps are not built (%s); the call "
                    "table runs in Python (same behaviour, slower)", _why_not_built)
    return None


def describe_steps() -> str:
    """Which call table steps run in this process (``gpuexec doctor``)."""
    if compiled_steps() is not None:
        return "compiled (C, abi3)"
    if _steps_why_not:
        return f"Python (the compiled steps are not built: {_steps_why_not[0]})"
    return "Python (with the pure-Python ring core)"


def settle_one(call: PendingCall) -> None:
    future = call.future
    if future is None:
        return
    try:
        if isinstance(call.error, FutureCancelled):  # Future.cancel(): the future's own state
            Future.cancel(future)
        elif call.error is not None:
            future.set_exception(call.error)
        else:
            future.set_result(call.value)
    except InvalidStateError:  # the caller cancelled the Future: nobody waits for it
        pass


def _kind(error: BaseException) -> str:
    """The name a call's error is counted under in the metrics."""
    return "CancelledError" if isinstance(error, FutureCancelled) else type(error).__name__


def _shut_down() -> ExecutorClosedError:
    return ExecutorClosedError("the executor is shut down")

"""The monitor thread: where the driver notices a worker's death (style: one place).

It sleeps in ``poll`` on the workers' process sentinels and a *poke pipe*, so a death is
seen at once with no periodic polling. On a death it records a :class:`WorkerDeath`,
fails every pending call (a shutdown then interrupts it in the surviving ranks, so that
they exit at once), wakes any caller blocked on the transport, and runs the
failure callbacks. While ``non_block`` futures are outstanding, or a request waits for
room to be sent, and nobody else pumps, it pumps replies itself (the transport's
``pump`` watches the sentinels too). Each round it also times out futures past their
deadline and settles the futures that pumping threads finished. While a cancelled
call has ranks that have not stopped it (:mod:`.cancel`), it pumps too, and kills a
rank that has not stopped within ``cancel_grace`` of reaching the call: the death it
then records carries that reason.

User code never runs under a channel lock: futures are settled and failure callbacks
run here between pumps, with no lock held, so a callback may call anything,
``shutdown()`` included.

A rank replaced in place (``Executor.respawn``): the respawning thread calls
:meth:`Monitor.exited` for a worker it killed (or one whose death this thread has not
seen yet; recording a handle twice is a no-op), :meth:`Monitor.forget` for the dead
handle, :meth:`Monitor.adopt` for the new one, and :meth:`Monitor.replaced` once its
ranks are ready, which ends the failure if no other rank is dead. A sentinel of a
handle no longer current for its rank is ignored. Old handles are never closed before
shutdown, so their descriptors are never reused while a poll may still hold them.

Order on a failure (the first death while no other rank is dead): the death is recorded
and every pending call failed at once (under the call table's lock), but no caller is
*told* until the failure callbacks queued for it have returned: a waiting caller, a new
call and ``check_usable`` wait for ``callbacks_returned`` (a fresh event per failure)
before raising :class:`~gpuexec.errors.WorkerDiedError`, and the failed futures are
settled only after it is set. A callback itself (on this thread) is told at once, so a
call it makes fails fast instead of waiting for itself; a callback still running after
``CALLBACK_WAIT_S`` no longer holds the callers back.

Fields and threads: ``death``: the first death not yet replaced (None: healthy), written
under the call table's ``lock`` by this thread (a death) or the respawning thread (a
kill, or the end of a respawn), read by anyone; ``deaths``: every rank dead and not yet
replaced, under that lock; ``_callbacks``: any thread, under that lock (kept: they run
again at each new failure); ``_pump_errors``: this thread only; ``_killed``: this
thread writes (a kill for ``cancel_grace``), the thread that records that death pops it
(under the table's lock); ``_due``: filled by any thread, run by this one; ``_idle``,
``sentinels``: this thread, and the respawning thread (it pokes this one afterwards);
``callbacks_returned``: replaced under that lock at each failure, set by this thread,
waited on by any; ``_held``: appended by any thread, settled by this one; ``poke_w``:
any thread, under the channel's wake lock (see :mod:`.channel`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import zmq

from ..errors import WorkerDiedError
from .calls import CallTable, PendingCall, settle_one
from .cancel import Canceller
from .launcher import WorkerHandle
from .processes import UNKNOWN_EXIT
from .transport import Transport

log = logging.getLogger("gpuexec")

_PUMP_MS = 5  # the monitor releases the pump lock at least this often
CALLBACK_WAIT_S = 60.0  # the longest a caller waits for the failure callbacks to return
# A rank failed a call that other ranks still run: they are interrupted this long after
# (nothing they answer can change the call's outcome, and in a collective they would
# wait for the failed rank forever); a rank failing within it is still reported.
FAIL_FAST_S = 0.05
# A rank that runs a cancelled call and has not answered is signalled again this often.
RESIGNAL_S = 0.2


@dataclass(frozen=True)
class WorkerDeath:
    """The first worker death the driver saw: what every later call is told."""

    rank: int
    pid: int | None
    exitcode: int | None  # None: unknown (not our child, or not reaped in time)
    stderr_tail: str      # the dead worker's last stderr lines
    reason: str = ""      # why gpuexec killed it ("": it died on its own)

    def error(self) -> WorkerDiedError:
        """A fresh error (raising one instance twice would chain its tracebacks)."""
        return WorkerDiedError(self.rank, self.pid, self.exitcode, self.stderr_tail,
                               self.reason)


class Monitor:
    """The monitor thread; see the module docstring."""

    def __init__(self, table: CallTable, transport: Transport, pump_lock: threading.Lock,
                 handles: Sequence[WorkerHandle], stderr_tail: Callable[[int], str],
                 wake: Callable[[], None], cancels: Canceller,
                 cancel_grace: float | None) -> None:
        self._table = table
        self._transport = transport
        self._pump_lock = pump_lock
        self._handles = handles
        self._stderr_tail = stderr_tail
        self._wake = wake  # the channel's: interrupts a caller blocked on the transport
        self._cancels = cancels  # the channel's: deadlines, taking calls back (.cancel)
        self._interrupter = cancels.interrupter
        self._grace = cancel_grace  # None: a cancelled call is waited for, never killed
        self._killed: dict[int, str] = {}  # rank -> why this thread killed it
        # (call id, ranks): calls a death failed that survivors may still run; a respawn
        # releases them through its abort, a shutdown interrupts them (any thread appends)
        self.orphaned: list[tuple[int, list[int]]] = []
        self.death: WorkerDeath | None = None
        self.deaths: dict[int, WorkerDeath] = {}
        self._seen: set[int] = set()  # id() of the handles whose exit was recorded (kept
        # alive until shutdown, so an id is never reused meanwhile)
        self._callbacks: list[Callable[[], None]] = []
        self._due: deque[Callable[[], None]] = deque()  # failure callbacks to run
        # Set once the callbacks of the latest failure returned (set: none is running).
        self.callbacks_returned = threading.Event()
        self.callbacks_returned.set()
        self._held: deque[PendingCall] = deque()  # futures a death failed, settled after
        self._late_logged = False  # any thread: logged once that callbacks ran too long
        self._pump_errors = 0  # this thread only
        # The monitor sleeps on the sentinels and this pipe ("a future was submitted").
        self.poke_r, self.poke_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sentinels = {h.sentinel: h for h in handles}
        self._idle = zmq.Poller()
        self._idle.register(self.poke_r, zmq.POLLIN)
        for fd in self.sentinels:
            self._idle.register(fd, zmq.POLLIN)
        self.thread = threading.Thread(target=self._loop, name="gpuexec-monitor",
                                       daemon=True)

    def add_failure_callback(self, fn: Callable[[], None]) -> None:
        with self._table.lock:
            self._callbacks.append(fn)
            if self.death is None:
                return
        fn()

    def on_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def await_callbacks(self) -> None:
        """Before telling a caller of a death: wait until the failure callbacks have
        returned (at once on this thread, where they run). Bounded: a callback that has
        not returned after ``CALLBACK_WAIT_S`` no longer holds the callers back (logged)."""
        if not self.on_thread() and not self.callbacks_returned.wait(CALLBACK_WAIT_S):
            if not self._late_logged:
                self._late_logged = True
                log.warning("gpuexec: a failure callback has not returned after %g s; "
                            "callers are told of the worker's death without waiting for it",
                            CALLBACK_WAIT_S)

    def close_fds(self) -> None:
        """The poke pipe (the channel's close, under its wake lock)."""
        for fd in (self.poke_r, self.poke_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- deaths ----------------------------------------------------------------------

    def exited(self, handle: WorkerHandle) -> None:
        """``handle``'s process exited: record the death and fail every pending call;
        on the first death queue the failure callbacks (this thread runs them, outside
        every lock: another caller pokes it). Any thread; a handle recorded before, or no
        longer its rank's, changes nothing."""
        exitcode = handle.reap(timeout=0.5)
        if exitcode == UNKNOWN_EXIT:
            exitcode = None
        table = self._table
        rank = handle.rank
        if table.closing or id(handle) in self._seen or self._handles[rank] is not handle:
            return
        tail = self._stderr_tail(rank)
        with table.lock:
            if table.closing or id(handle) in self._seen:
                return
            self._seen.add(id(handle))
            death = self.deaths[rank] = WorkerDeath(rank, handle.pid, exitcode, tail,
                                                    self._killed.pop(rank, ""))
            table.cancelling.clear()  # every call in flight ends here: nothing to watch
            table.metrics.deaths[rank] += 1
            table.metrics.abandoned[rank].clear()  # it runs none of them any more
            first = self.death is None
            if first:
                self.callbacks_returned = threading.Event()  # before death: see await
                self.death = death
                table.refusal = death.error
            # After the first death only a respawn's own calls can be pending: fail them.
            pending = list(table.pending.values())
            callbacks = list(self._callbacks) if first else []
        for call in pending:  # futures settled once the callbacks returned
            table.finish(call, error=death.error(), settle=None)
            survivors = sorted(call.owed - {rank})
            if survivors and not call.ping:  # shutdown interrupts them (see orphaned)
                self.orphaned.append((call.call_id, survivors))
        self._held.extend(c for c in pending if c.future is not None)
        self._wake()
        self._due.extend(callbacks)

    def interrupt_orphaned(self) -> None:
        """Interrupt what survivors of a death still run of the calls it failed (the
        shutdown, before its Shutdown message: they exit at once)."""
        orphaned, self.orphaned = self.orphaned, []
        if self._interrupter is not None:
            for call_id, ranks in orphaned:
                self._interrupter.interrupt(call_id, ranks)

    def forget(self, handle: WorkerHandle) -> None:
        """Stop watching a dead (or killed) worker's sentinel (the respawning thread)."""
        self.sentinels.pop(handle.sentinel, None)
        try:
            self._idle.unregister(handle.sentinel)
        except KeyError:
            pass

    def adopt(self, handle: WorkerHandle) -> None:
        """Watch a new worker (the respawning thread; its handle is already current)."""
        self.sentinels[handle.sentinel] = handle
        self._idle.register(handle.sentinel, zmq.POLLIN)

    def replaced(self, ranks: Sequence[int]) -> bool:
        """``ranks`` run again: forget their deaths; the failure ends when no other rank
        is dead (the next death fails calls again). True when it ended."""
        table = self._table
        with table.lock:
            for rank in ranks:
                self.deaths.pop(rank, None)
            if self.deaths:
                self.death = next(iter(self.deaths.values()))
                table.refusal = self.death.error
                return False
            self.death = None
            if not table.closing:
                table.refusal = None
            return True

    def _fail_fast(self) -> None:
        """End the calls a rank failed :data:`FAIL_FAST_S` ago with that failure, and
        interrupt them in the ranks still running them (a caller blocked on the
        transport is woken: no answer it waits for will come)."""
        for call in self._table.fail_fast_due(time.monotonic(), FAIL_FAST_S):
            if self._cancels.fail_fast and self._cancels.cancel(
                    call, "another rank failed it", self._table.failed_error(call)):
                self._wake()

    def _chase_cancels(self) -> None:
        """Signal again every :data:`RESIGNAL_S` a rank that runs a cancelled call and has
        not answered (one signal that went astray must not leave the method running);
        SIGKILL every rank that has not stopped it
        within the grace (its guardian takes its process group along); the sentinel then
        reports the death."""
        if self._interrupter is None:
            return
        overdue, again = self._table.overdue(time.monotonic(), self._grace, RESIGNAL_S)
        for rank, watch in again:
            self._interrupter.interrupt(watch.call_id, [rank])
        for rank, watch in overdue:
            if rank in self._killed:
                continue
            reason = (f"the cancelled call {watch.method!r} ({watch.reason}) did not stop "
                      f"within cancel_grace={self._grace:g} s")
            self._killed[rank] = reason
            with self._table.lock:
                self._table.stats.cancel_kills += 1
            log.warning("gpuexec: killing worker rank %d: %s", rank, reason)
            self._interrupter.kill(rank)

    def _sentinel_fired(self, fd: int) -> None:
        try:
            self._idle.unregister(fd)
        except KeyError:
            pass
        handle = self.sentinels.get(fd)
        if handle is not None:
            self.exited(handle)

    def _run_due_callbacks(self) -> None:
        """Failure callbacks, with no lock held (they may call anything, shutdown
        included); then the callers are told of the death."""
        returned = self.callbacks_returned  # the failure whose callbacks these are
        due = self._due
        while due:
            fn = due.popleft()
            try:
                fn()
            except Exception:
                log.exception("gpuexec: a failure callback raised")
        self._release_callers(returned)

    def _release_callers(self, returned: threading.Event) -> None:
        returned.set()
        held = self._held
        while held:
            settle_one(held.popleft())

    # -- the loop --------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._table.closing:
                self._round()
        finally:
            self._release_callers(self.callbacks_returned)  # nobody waits on a dead monitor
            self._table.settle()

    def _round(self) -> None:
        """One round: pump (futures outstanding or a request waiting for room) or sleep
        on the sentinels and the poke pipe; expire futures; then, holding no lock,
        settle futures and run failure callbacks. Those may shut the channel down:
        nothing after them touches the transport."""
        table = self._table
        busy = table.n_async or table.draining or table.cancelling or table.failing
        if busy and self._pump_lock.acquire(blocking=False):
            fired = None
            try:
                fired = self._transport.pump(_PUMP_MS)
            except Exception:  # a bug, never expected: the watch must go on regardless
                self._pump_errors += 1
                if self._pump_errors == 1:
                    log.exception("gpuexec: the monitor's pump raised; it goes on watching "
                                  "for deaths and deadlines (further errors not logged)")
            finally:
                self._pump_lock.release()
            if fired is None:
                time.sleep(_PUMP_MS / 1000)  # not a busy loop should it raise again
                fired = []
            for fd in fired:
                self._sentinel_fired(fd)
        else:
            for fd, _ in self._idle.poll(_PUMP_MS if busy else None):
                if fd == self.poke_r:
                    try:
                        os.read(self.poke_r, 4096)
                    except BlockingIOError:
                        pass
                elif fd in self.sentinels:
                    self._sentinel_fired(fd)
        if table.n_async:
            for call in table.expired_futures(time.monotonic()):
                self._cancels.expire(call)
        if table.failing:
            self._fail_fast()
        if table.cancelling:
            self._chase_cancels()
        table.settle()
        if self._due or self._held or not self.callbacks_returned.is_set():
            self._run_due_callbacks()

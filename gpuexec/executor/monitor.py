"""The monitor thread: where the driver notices a worker's death (style: one place).

It sleeps in ``poll`` on the workers' process sentinels and a *poke pipe*, so a death is
seen at once with no periodic polling. On a death it records a :class:`WorkerDeath`,
fails every pending call, wakes any caller blocked on the transport, and runs the
failure callbacks. While ``non_block`` futures are outstanding, or a request waits for
room to be sent, and nobody else pumps, it pumps replies itself (the transport's
``pump`` watches the sentinels too). Each round it also times out futures past their
deadline and settles the futures that pumping threads finished.

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

Fields and threads: ``death``: the first death not yet replaced (None: healthy), written
under the call table's ``lock`` by this thread (a death) or the respawning thread (a
kill, or the end of a respawn), read by anyone; ``deaths``: every rank dead and not yet
replaced, under that lock; ``_callbacks``: any thread, under that lock (kept: they run
again at each new failure); ``_pump_errors``: this thread only; ``_due``: filled by
any thread, run by this one; ``_idle``, ``sentinels``: this thread, and the respawning
thread (it pokes this one afterwards);
``poke_w``: any thread, under the channel's wake lock (see :mod:`.channel`).
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
from .calls import CallTable
from .launcher import WorkerHandle
from .processes import UNKNOWN_EXIT
from .transport import Transport

log = logging.getLogger("gpuexec")

_PUMP_MS = 5  # the monitor releases the pump lock at least this often


@dataclass(frozen=True)
class WorkerDeath:
    """The first worker death the driver saw: what every later call is told."""

    rank: int
    pid: int | None
    exitcode: int | None  # None: unknown (not our child, or not reaped in time)
    stderr_tail: str      # the dead worker's last stderr lines

    def error(self) -> WorkerDiedError:
        """A fresh error (raising one instance twice would chain its tracebacks)."""
        return WorkerDiedError(self.rank, self.pid, self.exitcode, self.stderr_tail)


class Monitor:
    """The monitor thread; see the module docstring."""

    def __init__(self, table: CallTable, transport: Transport, pump_lock: threading.Lock,
                 handles: Sequence[WorkerHandle], stderr_tail: Callable[[int], str],
                 wake: Callable[[], None]) -> None:
        self._table = table
        self._transport = transport
        self._pump_lock = pump_lock
        self._handles = handles
        self._stderr_tail = stderr_tail
        self._wake = wake  # the channel's: interrupts a caller blocked on the transport
        self.death: WorkerDeath | None = None
        self.deaths: dict[int, WorkerDeath] = {}
        self._seen: set[int] = set()  # id() of the handles whose exit was recorded (kept
        # alive until shutdown, so an id is never reused meanwhile)
        self._callbacks: list[Callable[[], None]] = []
        self._due: deque[Callable[[], None]] = deque()  # failure callbacks to run
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
            death = self.deaths[rank] = WorkerDeath(rank, handle.pid, exitcode, tail)
            table.metrics.deaths[rank] += 1
            table.metrics.abandoned[rank].clear()  # it runs none of them any more
            first = self.death is None
            if first:
                self.death = death
                table.refusal = death.error
            # After the first death only a respawn's own calls can be pending: fail them.
            pending = list(table.pending.values())
            callbacks = list(self._callbacks) if first else []
        for call in pending:  # this thread may hold the pump lock: settled below
            table.finish(call, error=death.error(), settle=False)
        self._wake()
        self._due.extend(callbacks)

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
        included)."""
        due = self._due
        while due:
            fn = due.popleft()
            try:
                fn()
            except Exception:
                log.exception("gpuexec: a failure callback raised")

    # -- the loop --------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._table.closing:
                self._round()
        finally:
            self._table.settle()

    def _round(self) -> None:
        """One round: pump (futures outstanding or a request waiting for room) or sleep
        on the sentinels and the poke pipe; expire futures; then, holding no lock,
        settle futures and run failure callbacks. Those may shut the channel down:
        nothing after them touches the transport."""
        table = self._table
        busy = table.n_async or table.draining
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
            table.expire_futures(time.monotonic())
        table.settle()
        if self._due:
            self._run_due_callbacks()

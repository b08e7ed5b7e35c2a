"""Driver side of the wire: the channel that composes a transport, the call table and
the monitor.

::

    caller threads ──encode once──▶ [send lock] transport.send ──▶ workers
                                                                     │
    call table  ◀──deliver by call id── [pump lock] transport.recv_for ◀┘
      │  (call id → PendingCall: ranks still owed, results, Future)     ▲
      └─▶ blocking caller returns / Future completes                    │ transport.wake
                                                                        │
    monitor thread: poll(sentinels, poke pipe) ── a death or close ─────┘

The anatomy of a blocking call over shared memory (``transport="shm"``, the default),
the hot path: ``collective_rpc("noop")`` to N ranks, no arguments, a None result, once
each worker has served a call of that name (the first one takes its request loop), on
the compiled core::

    driver thread                                          worker main thread (each rank)
    ─────────────                                          ──────────────────────────────
    rpc.collective_rpc (the bare form: no argument checks)  in the ring core, GIL held only
      ─▶ channel.call_bare: Lane.round_trip (one C call,    around the method (core.serve,
         executor/_calltable.c; GIL held but while waiting)  entered once per run of calls):
        the call made and entered   [table lock found free]
        cached header around the id
        [pump lock] [send lock] the packet written into the
          request slot, release store, 1 fence, futex wake
          only if a reader sleeps ────────────────────────▶ the wait (spins, then
        [send lock given back]                                 futex; GIL released)
        the ring core's wait (ipc/_collect.h, compiled        the header known by its
          in) on the awaited rings (spins, then sleeps         bytes: id, method name
          on the doorbell; GIL released), each None     ┌    the method looked up and run,
          reply to the call known by its bytes and      │      armed for cancellation
          released as it comes (no view, no decoding,   │
          no Reply) ◀───────────────────────────────────┤    its None reply: the cached
        the call ended: results, metrics, slot back     │      bytes around the id,
          [table lock found free]                       └──    published: 1 fence,
        [pump lock given back]                                 doorbell woken if asleep
      the list of results                                    and the wait again

Counted on this design (the compiled core, 2-core host, traced with ``sys.setprofile``
and a counting allocator hook on the object and memory domains, per call; "blocks":
every memory block Python allocates, ints above 256 and floats included;
``benchmarks/results/`` holds the timings):

    ==============  ============  ================  =============  =====================
    N = 1 / 2       Python calls  module crossings  memory blocks  locks; fences
    ==============  ============  ================  =============  =====================
    driver          1 / 1         1 / 1             8 / 8          pump, send (table:
                                                                   found free); 1
    worker (each)   1 / 1         0 / 0             2 / 8          none;
                    (the method)                                   1 (the publish)
    ==============  ============  ================  =============  =====================

(At 2 ranks a rank that answers after the other's spin costs one more collect, still
in the round trip. "Found free": the
compiled steps hold the GIL and run no Python code between their first read of the
table and their last write, having found its lock free: under the GIL that is the lock
taken and given back without the two calls; see ``_calltable.c``. A second rank costs
the driver one more rank in the mask the wait answers, whose replies are recorded
together; a worker's blocks are the call id's int, the bound method and, spread over a
run, what the arrival forecast is given when the core hands back.)
What is not on this path: no Python frame in the driver below ``collective_rpc``; no Call
struct is built or encoded for a call without arguments (its header is cached per method
name, the same bytes msgspec writes) and none is decoded by the worker (the core knows
the header by its bytes); no Reply is built or encoded for a None result (its bytes are
cached per rank) nor read or decoded by the driver (known by its bytes in the ring); no
Python runs in the worker between two such calls but the method (the request loop, its
decode, the reply gate and the arrival forecast are not entered; the forecast learns the
calls afterwards, in order); no view of a slot is made on either side; no thread
hand-off (the caller pumps its own replies). Where the round trip cannot go on (the pump
or send lock taken, the ring full, a reply that is not a None result, the deadline or a
poke, Ctrl-C) it hands the call back to the Python steps below at the point it reached
(:meth:`_go_on`).
A call with plain arguments (``collective_rpc("small", (1, "x"), {"c": [1.0, 2.0]})``,
an int result; plain: what msgpack carries as it is, see :mod:`gpuexec.ipc.values`)
takes the same round trip (``channel.call_plain``, one C call): the arguments are
written as msgspec writes them (``ipc/_plain.h``) while they are found plain, into a
buffer first (a value that is not plain costs nothing else: the call takes the
executor's checks and the codec), then after the cached header and the id into the
request slot; the worker's ring core reads them from the slot into the method's tuple
and dict, runs it, armed, and writes a plain result into the reply slot the same way;
the driver reads each reply where it lies, in its slot, as the call's own result
(``Reply(id, rank, value)``, the None reply's bytes around the value), releases the
slots once every rank answered and ends the call with the compiled step (a reply that
is not such a result is left in its ring, with the others, for the transport's steps). No
Call, Reply or codec on either side, and no reply copied out: the driver 1 Python call
(``collective_rpc``), 1 crossing, 9 / 9 blocks at 1 / 2 workers; the worker 1 Python
call (the method), 4 / 10 blocks. Anything else (arguments that are not plain or longer
than 8 KiB, a result that is not plain or longer than a slot, a failure) takes the
Python steps where it is met, with nothing lost: the codec's walk, the transport's
``collect_more``, the request loop.

The pieces, each in its own module: :mod:`.transport` (the interface),
:mod:`.zmq_transport` and :mod:`.shm_transport` (the two wires; the one place a wire is
chosen is :meth:`DriverChannel.__init__`), :mod:`.calls` (the call table, its slots and
how a call ends), :mod:`.monitor` (deaths, failure callbacks, pumping for futures).

Who reads replies: whoever holds the *pump lock*. A blocking ``collective_rpc`` takes it
and receives its replies itself (``transport.recv_for``), so the common path has no
thread hand-off; when it finds the lock free it sends its request under it too (the
send lock taken inside, see :meth:`DriverChannel._round_trip`), one take for the whole
call. A caller that cannot take the lock waits on its call's event, completed
by the pumping thread. Late replies (after a timeout or an abandoned wait) find no
pending call and are dropped and counted.

A request that finds no room (a full shared-memory ring) waits *outside* the send lock,
until its call's deadline, a death or shutdown; the monitor drains the replies meanwhile
(workers blocked on a full reply ring would otherwise never read the requests that free
the ring).

Locks, in the only order they may be nested (a thread holding one may take only those
listed after it)::

    _pump_lock ─▶ _send_lock ─▶ _wake_lock        table.lock: a leaf (nothing under it)

* ``_pump_lock``: who reads replies (the transport's receiving side, the decoders).
  Taken by a blocking caller in :meth:`_round_trip` (around its send too) and
  :meth:`wait`, by the monitor, and by :meth:`close`; by the compiled round trip
  (:attr:`call_bare`) without waiting, with the send lock inside it, both given back
  before it returns or hands the call back.
* ``_send_lock``: who writes requests (the transport's sending side). Held only while a
  request is written, never while waiting for room or for another lock.
* ``_wake_lock``: the transport's wake-up and the monitor's poke pipe, against close.
* ``table.lock`` (:mod:`.calls`): the pending calls, the state flags, the death record.

``_pump_lock``, ``_send_lock`` and ``table.lock`` are made by :func:`.calls.make_lock`:
threading.Lock's interface and behaviour and, where the compiled steps are built, a lock
whose state they read and change with no call (the round trip takes the pump and send
locks without waiting; the steps find the table's free).

Fields and the threads that may touch them:

* ``_transport``: see the locks above; ``_released``: set by :meth:`close` under all
  three, with the compiled round trip's own flag (``_lane.release()``); read under any of
  them (a thread that gets a lock after close must not touch the transport).
* ``_table``, ``_monitor``: see their modules. ``_encoder``, ``_topics``: read-only after
  construction (the encoder keeps no state between calls).
* ``_auth``: the owner's thread (start, close).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import zmq

from ..errors import ExecutorClosedError, InvalidArgumentError, RpcTimeoutError, WorkerDiedError
from ..ipc.codec import Encoder
from ..ipc.messages import Call, Ping, Shutdown, rank_topic
from ..ipc.shm_ring import TAKEN_MAX
from ..ipc.zap import ZapHandler
from .calls import NOT_SENT, CallTable, ChannelStats, PendingCall, make_lock
from .cancel import CallFuture, Canceller, Interrupter
from .launcher import WorkerHandle
from .monitor import Monitor
from .respawn import HeldWire
from .shm_path import ShmDriverPath
from .shm_transport import ShmTransport
from .transport import Transport
from .zmq_transport import ZmqTransport

__all__ = ["ChannelStats", "DriverChannel", "PendingCall"]

log = logging.getLogger("gpuexec")

_WAIT_SLICE_S = 0.002     # a non-pumping waiter re-checks for the pump lock this often
_ROOM_NAP_S = (1e-5, 1e-3)  # a request waiting for room re-checks after this nap,
                            # doubled from the first to the last
_RAW_SEND_S = 60.0        # send_raw (a test hook, no call): how long it waits for room


class DriverChannel:
    """Sends calls to workers and collects replies; see the module docstring."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], req: zmq.Socket[bytes],
                 rep: zmq.Socket[bytes], handles: Sequence[WorkerHandle],
                 stderr_tail: Callable[[int], str] = lambda rank: "",
                 shm: ShmDriverPath | None = None, *, allow_pickle: bool = True,
                 max_inflight_calls: int = 1024, max_message_size: int = -1,
                 auth: ZapHandler | None = None, interrupter: Interrupter | None = None,
                 cancel_grace: float | None = None, cancel_on_timeout: bool = True) -> None:
        self._ctx = ctx
        self._sockets = (req, rep)  # for a respawn's handshake (see replacing())
        self._auth = auth  # the ZAP handler of ctx, stopped before ctx is terminated
        self._max_message_size = max_message_size  # -1: no limit
        self._topics = [rank_topic(h.rank) for h in handles]
        self._table = CallTable(max_inflight_calls, self._on_deferred, len(handles))
        sentinels = [h.sentinel for h in handles]
        # The one place the wire is chosen.
        self._transport: Transport = (
            ZmqTransport(ctx, req, rep, self._topics, self._table, sentinels) if shm is None
            else ShmTransport(ctx, req, rep, self._topics, self._table, sentinels, shm))
        # allow_pickle=False (allow_callables=False): arguments that need pickle are
        # refused at encode time, before anything is sent.
        self._encoder = Encoder(allow_pickle=allow_pickle,
                                shm_payloads=self._transport.carries_shm_payloads)
        self._pump_lock = make_lock()  # (the compiled round trip takes these two itself)
        self._send_lock = make_lock()
        self._wake_lock = threading.Lock()
        self._released = False  # close() released the transport
        # interrupter None: workers are not interrupted (Ray actors); see .cancel
        self._interrupter = interrupter
        self._cancels = Canceller(self._table, interrupter, cancel_on_timeout)
        self._monitor = Monitor(self._table, self._transport, self._pump_lock, handles,
                                stderr_tail, self._wake, self._cancels, cancel_grace)
        self._table.on_failure = self._on_deferred  # the monitor ends it in FAIL_FAST_S
        self._table.check_usable = self.check_usable
        # What the compiled round trip of call_bare reads (shared memory on the compiled
        # core; see _calltable.c's round_trip), or None: the steps in Python.
        steps = self._table.steps
        parts = None if steps is None else self._transport.core_lane()
        lane = None if steps is None or parts is None else steps.Lane((
            self._table, self._pump_lock, self._send_lock, self, *parts,
            self._encoder.bare_headers, max_message_size, (1 << len(handles)) - 1,
            len(handles), self._table.fixed, self._encoder.bare_call,
            None if shm is None else shm.reply_parts,
            None if shm is None else shm.doorbell.base, self._table.unsettled, TAKEN_MAX))
        # A blocking call by name without arguments (``rpc``'s bare form): over shared
        # memory on the compiled core, its whole round trip is one call into it (the call
        # made and entered, its header written into the request ring under the pump and
        # send locks, its replies collected and recorded), which hands back to _go_on
        # where it stopped when anything is not the common case, and to _call_bare a
        # name whose header is not cached yet; elsewhere _call_bare.
        self.call_bare: Callable[[str, list[int], float | None], Any] = \
            self._call_bare if steps is None or lane is None else \
            lane.round_trip
        # A blocking call by name with plain arguments (``rpc``'s small form: a tuple or
        # list of them, a dict of keyword arguments or None): the same round trip with
        # the arguments written by the compiled step, which answers None when it did
        # nothing (a value that is not plain, long arguments, the Python steps): the
        # caller's general path. None where no compiled round trip runs.
        self.call_plain: Callable[[str, Sequence[Any], Mapping[str, Any] | None,
                                   list[int], float | None], Any] | None = \
            None if steps is None or lane is None else \
            lane.call_plain
        self._lane = lane  # told when close() releases the transport (its own flag)

    # -- state ---------------------------------------------------------------------

    def start(self) -> None:
        self._monitor.thread.start()

    @property
    def failed(self) -> bool:
        return self._monitor.death is not None

    def add_failure_callback(self, fn: Callable[[], None]) -> None:
        self._monitor.add_failure_callback(fn)

    def check_usable(self) -> None:
        if self._table.closing:
            raise ExecutorClosedError("the executor is shut down")
        death = self._monitor.death
        if death is not None:
            self._monitor.await_callbacks()
            raise death.error()

    @property
    def table(self) -> CallTable:  # the executor's forensics read it under its lock
        return self._table

    def snapshot(self) -> ChannelStats:
        """A copy of the counters, with the ZAP handler's refusals."""
        with self._table.lock:
            stats = self._table.stats
            return dataclasses.replace(
                stats, malformed_by_reason=dict(stats.malformed_by_reason),
                worker_malformed={r: dict(d) for r, d in stats.worker_malformed.items()},
                refused_connections=self._auth.denied if self._auth is not None else 0)

    # -- sending -------------------------------------------------------------------

    def submit(self, method: str, fn_blob: bytes | None, args: list[Any],
               kwargs: dict[str, Any], ranks: Sequence[int], unique_reply_rank: int | None,
               timeout: float | None, non_block: bool, plain: bool | None = None
               ) -> PendingCall:
        """Send a call (``plain``: whether its arguments were found plain msgpack data,
        None: not looked at; see :meth:`Encoder.encode_with_segments`); the caller waits
        for it. A closed or failed channel refuses it in :meth:`CallTable.enter` (which
        raises what :meth:`check_usable` would)."""
        call, frames = self._enter(method, fn_blob, args, kwargs, ranks, unique_reply_rank,
                                   timeout, non_block, plain)
        self._send(call.ranks, frames, call.deadline, call)
        if non_block:
            self._poke()
        return call

    def call(self, method: str, fn_blob: bytes | None, args: list[Any],
             kwargs: dict[str, Any], ranks: Sequence[int], unique_reply_rank: int | None,
             timeout: float | None, plain: bool | None = None) -> Any:
        """:meth:`submit` and :meth:`wait` of a blocking call: its result (see
        :meth:`_round_trip`)."""
        call, frames = self._enter(method, fn_blob, args, kwargs, ranks, unique_reply_rank,
                                   timeout, False, plain)
        return self._round_trip(call, frames)

    def _enter(self, method: str, fn_blob: bytes | None, args: list[Any],
               kwargs: dict[str, Any], ranks: Sequence[int], unique_reply_rank: int | None,
               timeout: float | None, non_block: bool, plain: bool | None
               ) -> tuple[PendingCall, list[Any]]:
        """A call entered in the table with its frames, not sent yet (see :meth:`submit`)."""
        table = self._table
        future = CallFuture() if non_block else None
        call = table.new_call(method, ranks, unique_reply_rank, timeout, future)  # a slot
        if future is not None:
            future.bind(lambda: self._cancels.cancel(call, "Future.cancel()"))
        try:
            # A call by name without arguments (the hot path's no-op): its cached header.
            header = None if fn_blob is not None or args or kwargs or \
                unique_reply_rank is not None else self._encoder.bare_call(call.call_id, method)
            if header is not None:
                frames: list[Any] = [header]
                call.nbytes = len(header)
            else:
                frames, call.segments = self._encoder.encode_with_segments(
                    Call(call.call_id, method, fn_blob, args, kwargs,
                         -1 if unique_reply_rank is None else unique_reply_rank), plain)
                call.nbytes = len(frames[0]) if len(frames) == 1 else \
                    sum(memoryview(f).nbytes for f in frames)
            if len(frames) > 1 or len(frames[0]) > self._max_message_size >= 0:
                self._check_sizes(frames)  # raises if a frame is over the limit
        except BaseException:
            for fd in call.segments:
                os.close(fd)
            call.segments = []
            table.withdraw(call)
            raise
        return call, frames

    def _call_bare(self, method: str, ranks: list[int], timeout: float | None) -> Any:
        """:meth:`call` of a call by name without arguments to ``ranks`` (the hot path's
        form, checked by the caller; :attr:`call_bare` is this, or the compiled round
        trip): no Call is built or encoded, its header is the encoder's cached bytes (a
        name it does not cache takes :meth:`call`)."""
        table = self._table
        call = table.new_call(method, ranks, None, timeout, None)
        header = self._encoder.bare_call(call.call_id, method)
        if header is None or len(header) > self._max_message_size >= 0:
            table.withdraw(call)  # the general path sends it, or explains why not
            return self.call(method, None, [], {}, ranks, None, timeout, True)
        call.nbytes = len(header)
        return self._round_trip(call, [header])

    def _go_on(self, call: PendingCall, header: bytes, stage: int,
               error: BaseException | None) -> Any:
        """Where the compiled round trip hands a call back (see :attr:`call_bare`): not
        sent (:meth:`_round_trip` goes on as it would have from the start), or sent and
        not complete (:meth:`wait`); an exception raised while it sent or waited, every
        lock given back, is raised once the call is dealt with as :meth:`_round_trip`
        deals with it."""
        if error is not None:
            self._interrupted(call, stage != NOT_SENT, error)
            raise error
        if stage == NOT_SENT:
            return self._round_trip(call, [header])
        return self.wait(call)

    def _round_trip(self, call: PendingCall, frames: list[Any]) -> Any:
        """Send a blocking ``call`` entered in the table and wait for it: its result. The
        request is sent and the replies collected under one take of the pump lock when
        nobody else pumps and the request ring has room (the send lock taken inside it,
        as their order says); anything else (another pumper, no room, a reply still
        owed after the first round) goes on by :meth:`_send` and :meth:`wait`, which
        behave as they would have from the start."""
        table = self._table
        ranks = call.ranks
        sent = False
        if not self._pump_lock.locked():
            try:
                with self._pump_lock:
                    with self._send_lock:
                        sent = not self._released and self._transport.send(ranks, frames)
                    if sent:
                        self._transport.recv_for(call, call.deadline)
            except BaseException as e:
                self._interrupted(call, sent, e)
                raise
            if table.unsettled:
                table.settle()
            if call.done and call.error is None:
                return call.value
        if not sent:
            self._send(ranks, frames, call.deadline, call)
        return self.wait(call)

    def _interrupted(self, call: PendingCall, sent: bool, error: BaseException) -> None:
        """``error`` was raised in the caller's thread while ``call`` was being sent (not
        known to be sent: no rank is watched, as :meth:`_send` does it) or waited for
        (cancelled in the ranks that still run it, as :meth:`wait` does it)."""
        if not sent:
            self._cancels.interrupted(call, "its sending was interrupted", error, watch=False)
        elif not call.done:
            self._cancels.interrupted(call, "the waiting thread was interrupted")

    def check_encodable(self, method: str, fn_blob: bytes | None, args: list[Any],
                        kwargs: dict[str, Any], value_rank: int, plain: bool) -> None:
        """Raise now what :meth:`submit` would, for a call held while suspended."""
        frames, fds = self._encoder.encode_with_segments(
            Call(0, method, fn_blob, args, kwargs, value_rank), plain)
        list(map(os.close, fds))  # the held call is encoded again when it is sent
        self._check_sizes(frames)

    def ping(self, timeout: float | None) -> PendingCall:
        self.check_usable()
        table = self._table
        call = PendingCall(next(table.ids), "check_health", list(range(len(self._topics))),
                           None, timeout, None)
        call.ping = True
        table.register(call, _closed, counted=False)
        self._send(call.ranks, self._encoder.encode(Ping(call.call_id)), call.deadline, call)
        return call

    def send_raw(self, frames: list[bytes]) -> None:
        """Test hook (the fuzz tests): send ``frames`` to every worker as they are,
        bypassing the encoder, by the transport in use (ring packet or ZeroMQ)."""
        self._send(range(len(self._topics)), frames, time.monotonic() + _RAW_SEND_S)

    def _check_sizes(self, frames: list[Any]) -> None:
        """Refuse a frame the workers' sockets would refuse (``MAXMSGSIZE`` drops the
        connection, and every message on it)."""
        limit = self._max_message_size
        if limit < 0 or (len(frames) == 1 and len(frames[0]) <= limit):
            return
        for frame in frames:
            size = memoryview(frame).nbytes
            if size > limit:
                raise InvalidArgumentError(f"a message frame of {size} bytes is over "
                                           f"max_message_size={limit}")

    def _send(self, ranks: Sequence[int], frames: list[Any], deadline: float | None,
              call: PendingCall | None = None) -> None:
        """Send a request to ``ranks``, waiting for room until ``deadline``
        (``time.monotonic()``; None: no limit) and then raising ``RpcTimeoutError`` (for
        ``call``), or ``ExecutorClosedError`` / ``WorkerDiedError`` as soon as the channel
        closes or fails. A registered ``call`` that fails to be sent is finished with the
        error, raised (and cancelled in the workers: a Ctrl-C may land after the request
        left)."""
        transport = self._transport
        waiting = False
        nap = _ROOM_NAP_S[0]
        try:
            while True:
                with self._send_lock:
                    if self._released:
                        raise ExecutorClosedError("the executor is shut down")
                    if transport.send(ranks, frames):
                        return
                # No room: wait for it outside the send lock.
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    what = call.method if call is not None else "send"
                    timeout = call.timeout if call is not None else 0.0
                    stacks = {} if call is None else self._table.explain(call, list(ranks))
                    raise RpcTimeoutError(what, timeout or 0.0, list(ranks), stacks)
                self.check_usable()
                if not waiting:
                    waiting = True
                    self._table.add_draining(1)
                    self._poke()
                self._drain_if_monitor()
                time.sleep(nap if deadline is None else max(0.0, min(nap, deadline - now)))
                nap = min(nap * 2, _ROOM_NAP_S[1])
        except BaseException as e:
            if call is not None:
                # not known to have been sent: no watch (no answer may ever come)
                self._cancels.interrupted(call, "its sending was interrupted", e,
                                          watch=False)
            raise
        finally:
            if waiting:
                self._table.add_draining(-1)

    def _drain_if_monitor(self) -> None:
        """A request waiting for room on the monitor thread itself (a callback made the
        call): nobody else would drain the replies, so drain them here (the monitor
        takes no signals: a non-blocking acquire cannot be torn by a KeyboardInterrupt)."""
        if self._monitor.on_thread() and self._pump_lock.acquire(blocking=False):
            try:
                if not self._released:
                    self._transport.drain()
            finally:
                self._pump_lock.release()
            self._table.settle()

    def _poke(self) -> None:
        """Tell the monitor that a future is outstanding (it may need to pump), that a
        request waits for room, or that futures wait to be settled."""
        with self._wake_lock:  # never a write to a closed (or reused) descriptor
            if self._released:
                return
            try:
                os.write(self._monitor.poke_w, b"!")
            except BlockingIOError:
                pass

    def _on_deferred(self) -> None:
        """A thread that pumps finished a future: a blocking caller pokes the monitor,
        which settles it now (the monitor settles its own after its pump)."""
        if not self._monitor.on_thread():
            self._poke()

    def _wake(self) -> None:
        """Make a caller waiting in ``transport.recv_for`` return now."""
        with self._wake_lock:
            if self._released:
                return
            self._transport.wake()

    # -- waiting -------------------------------------------------------------------

    def wait(self, call: PendingCall) -> Any:
        """Block until ``call`` completes, pumping replies when nobody else does."""
        table = self._table
        try:
            while not call.done:
                if call.deadline is not None:
                    remaining = call.deadline - time.monotonic()
                    if remaining <= 0:
                        self._cancels.expire(call)  # ends it, unless its replies are
                        continue  # being delivered right now (then it is done soon)
                else:
                    remaining = _WAIT_SLICE_S
                if not self._pump_lock.locked():
                    # ``with``, not ``acquire(blocking=False)`` + ``try``: a Ctrl-C arriving
                    # right after acquire() returned would leave the lock taken forever
                    # (every later wait and the shutdown would hang); ``with`` has no such
                    # gap. Losing the race to another pumper costs a wait for its slice.
                    with self._pump_lock:
                        self._transport.recv_for(call, call.deadline)
                    if table.unsettled:
                        table.settle()
                else:
                    with table.lock:
                        if call.event is None:
                            call.event = threading.Event()
                        event = call.event
                    if not call.done:
                        event.wait(min(remaining, _WAIT_SLICE_S))
        finally:
            if not call.done:  # KeyboardInterrupt or another exception while waiting
                self._cancels.interrupted(call, "the waiting thread was interrupted")
        error = call.error
        if error is None:
            return call.value
        if isinstance(error, WorkerDiedError):
            self._monitor.await_callbacks()
        raise error

    # -- a rank replaced (see .respawn) ---------------------------------------------

    def worker_exited(self, handle: WorkerHandle) -> None:
        """Record ``handle``'s exit now (killed by a respawn, or not yet seen)."""
        self._monitor.exited(handle)
        self._poke()

    @contextlib.contextmanager
    def replacing(self) -> Iterator[HeldWire]:
        """Hold the pump and send locks and lend the wire while ranks are replaced
        (nobody else needs it: every call is refused while a rank is dead)."""
        with self._pump_lock, self._send_lock:
            if self._released or self._table.closing:
                raise ExecutorClosedError("the executor is shut down")
            yield HeldWire(*self._sockets, self._transport, self._table, self._encoder,
                           self._monitor)

    def replaced(self, ranks: Sequence[int]) -> bool:
        """``ranks`` run again; True when no rank is dead any more (calls flow again)."""
        self._poke()  # the monitor re-reads its sentinels
        return self._monitor.replaced(ranks)

    # -- shutdown ------------------------------------------------------------------

    def begin_close(self) -> None:
        """Refuse new calls, fail pending ones, tell the workers to exit."""
        table = self._table
        pending = table.close_pending()
        if pending is None:
            return
        self._poke()
        for call in pending:  # interrupted in the workers: they read Shutdown next
            self._cancels.cancel(call, "shutdown",
                                 ExecutorClosedError("the executor was shut down during the call"))
        self._monitor.interrupt_orphaned()  # and what survivors of a death still run
        table.settle()
        self._wake()
        try:  # only if there is room now: a full ring or a dead worker gets SIGTERM
            self._send(range(len(self._topics)), self._encoder.encode(Shutdown()),
                       time.monotonic())
        except Exception as e:
            log.debug("gpuexec: could not send Shutdown (%s)", e)

    def close(self) -> None:
        """Stop the monitor and release the transport (after the workers are gone).

        Any thread, a callback's included (none runs under a channel lock). Threads still
        inside a call leave it at once (their calls were failed by :meth:`begin_close`);
        one that takes a lock after this finds ``_released`` and touches nothing.
        """
        monitor = self._monitor.thread
        if monitor.is_alive() and monitor is not threading.current_thread():
            monitor.join(timeout=5.0)
        with self._pump_lock, self._send_lock, self._wake_lock:
            if self._released:
                return
            self._released = True
            if self._lane is not None:
                self._lane.release()
            self._transport.close()
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            self._monitor.close_fds()
            if self._interrupter is not None:
                self._interrupter.close()
        self._table.settle()


def _closed() -> ExecutorClosedError:
    return ExecutorClosedError("the executor is shut down")

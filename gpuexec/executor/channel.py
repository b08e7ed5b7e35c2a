"""Driver side of the wire: sending calls, pumping replies, noticing dead workers.

::

    caller threads ──encode once──▶ [send lock] XPUB "req" ──▶ worker SUBs (one send)
                                                                    │
    pending table  ◀──dispatch by call id── [pump lock] PULL "rep" ◀─┘
      │  (call id → PendingCall: ranks still owed, results, Future)     ▲
      └─▶ blocking caller returns / Future completes                    │ wake-up frame
                                                                        │ (inproc)
    monitor thread: poll(sentinels, wake pipe) ── a death or close ─────┘

With ``transport="shm"`` (:mod:`.shm_path`) the same flow runs through shared memory:
the request is one packet in a broadcast ring instead of an XPUB send, replies come from
per-worker rings, and the caller spins, then sleeps on the doorbell futex instead of
``recv``; deaths and shutdown ring the doorbell instead of sending the wake-up frame.
ZeroMQ still carries what does not fit a slot (a marker in the ring keeps the order).

Bounded: at most ``max_inflight_calls`` calls are in flight (a semaphore of slots,
taken in ``submit`` before anything is encoded, given back when the call completes,
fails or times out); a caller that finds none free waits up to its own timeout and then
gets :class:`~gpuexec.errors.InflightLimitError`, so queued requests and replies (and
the pending table) stay bounded by the limit instead of by the callers' patience.
Health pings take no slot: ``check_health`` works on a saturated executor.

Who reads the reply socket: whoever holds the *pump lock*. A blocking
``collective_rpc`` takes it and receives replies itself with a plain blocking
``recv`` (``RCVTIMEO`` = its deadline), so the common path has no thread hand-off
and no poll set to rebuild: both cost tens of microseconds per call on a busy host.
A caller that cannot take the lock waits on its call's event, completed by the
pumping thread.

The monitor thread is where a worker's death is noticed (style: one place). It
sleeps in ``poll`` on the process sentinels, so a death is seen at once with no
periodic polling, fails every pending call, and pushes an empty *wake-up frame*
into the reply socket through an inproc endpoint, so that a caller blocked in
``recv`` returns at once. While ``non_block`` futures are outstanding and nobody
else pumps, the monitor pumps too (polling sentinels and the reply socket
together). Late replies (after a timeout or an abandoned wait) find no pending
call and are dropped and counted.

User code never runs under the channel's locks: a ``Future`` completed by a pumping
thread is *settled* (its result set, so its done callbacks run) only after that thread
let go of the pump lock (the monitor: right after its pump; a blocking caller: it pokes
the monitor, which settles it), and failure callbacks run on the monitor between pumps.
So a callback may call anything, ``shutdown()`` included.

A request that finds the shared-memory ring full waits *outside* the send lock, until
its call's deadline (the same deadline as the rest of the call), a death or shutdown;
the monitor drains the reply rings meanwhile (workers blocked on a full reply ring would
otherwise never read the requests that free the ring).

Locks, in the only order they may be nested (a thread holding one may take only those
listed after it)::

    _pump_lock ─▶ _send_lock ─▶ _wake_lock        _lock: a leaf (nothing taken under it)

* ``_pump_lock``: who reads replies (the reply socket, the reply rings, the decoders).
  Taken by a blocking caller in :meth:`wait`, by the monitor, and by :meth:`close`.
* ``_send_lock``: who writes requests (the XPUB socket, the request ring). Held only
  while a request is written, never while waiting for room or for another lock.
* ``_wake_lock``: the inproc wake-up socket and the doorbell, against close.
* ``_lock``: the pending table and the state flags; held for a few statements only.

Fields and the threads that may touch them:

* ``_req``: any thread, under ``_send_lock``.
* ``_rep``, ``_rcvtimeo``, ``_pump_poller``, ``_decoder``: the thread holding ``_pump_lock``.
* ``_waker``: any thread, under ``_wake_lock``.
* ``_released``: set by :meth:`close` under all three; read under either of them (a
  thread that gets a lock after close must not touch a socket or a ring).
* ``_pending``, ``_n_async``, ``_failure``, ``_closing``, ``_draining``: any thread, under
  ``_lock`` (read without it where a stale value is harmless: the loops re-check).
* ``_unsettled``: futures completed under the pump lock, waiting to be settled; any
  thread appends or pops (a deque: both are atomic).
* ``_idle_poller``, ``_poke_r``, ``_due_callbacks``: the monitor thread only.
* ``stats``: written by the pumping thread (``calls`` and ``inflight_waits`` by callers),
  read by anyone through :meth:`DriverChannel.snapshot` (best effort).
* ``_slots``: any thread (a semaphore); ``_auth``: the owner's thread (start, close).
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import zmq

from ..errors import (
    ExecutorClosedError,
    InflightLimitError,
    InvalidArgumentError,
    RpcTimeoutError,
    WorkerDiedError,
)
from ..ipc import packets, shm_payload
from ..ipc.codec import (
    Decoder,
    Encoder,
    MalformedMessage,
    UndecodableValue,
    recv_frames,
    recv_rest,
    send_frames,
)
from ..ipc.messages import (
    ALL_TOPIC,
    Call,
    Failure,
    Ping,
    Pong,
    Reply,
    Shutdown,
    ToDriver,
    rank_topic,
)
from ..ipc.shm_ring import RingReader, RingTimeout
from ..ipc.zap import ZapHandler
from .failures import call_error, undecodable_reply
from .launcher import WorkerHandle
from .processes import UNKNOWN_EXIT
from .shm_path import ShmDriverPath

log = logging.getLogger("gpuexec")

_WAIT_SLICE_S = 0.002     # a non-pumping waiter re-checks for the pump lock this often
_MONITOR_PUMP_MS = 5      # the monitor releases the pump lock at least this often
_RING_NAP_S = (1e-5, 1e-3)  # a request waiting for room in the ring re-checks after
                            # this nap, doubled from the first to the last
_RAW_SEND_S = 60.0        # send_raw (a test hook, no call): how long it waits for room
_OVERFLOW_RECV_MS = 10_000  # a reply announced in its ring is already on its way
_SLOT_WAIT_S = 0.1          # a caller waiting for a slot re-checks liveness this often


@dataclass
class ChannelStats:
    """What the channel counted. Drops are never raised: they are counted here (and
    logged once), so a stream of garbage costs a counter, not a crash."""

    calls: int = 0
    late_replies: int = 0        # replies to calls that timed out or were abandoned
    malformed: int = 0           # frames the driver dropped, every reason together
    # ... by reason: MalformedMessage.reason, "empty" or "packet" (a bad ring packet)
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
        self.slot = False  # holds one of the channel's in-flight slots until finished

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class DriverChannel:
    """Sends calls to workers and collects replies; see the module docstring."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], req: zmq.Socket[bytes],
                 rep: zmq.Socket[bytes], handles: Sequence[WorkerHandle],
                 stderr_tail: Callable[[int], str] = lambda rank: "",
                 shm: ShmDriverPath | None = None, *, allow_pickle: bool = True,
                 max_inflight_calls: int = 1024, max_message_size: int = -1,
                 auth: ZapHandler | None = None) -> None:
        self._ctx = ctx
        self._auth = auth  # the ZAP handler of ctx, stopped before ctx is terminated
        self._max_inflight = max_inflight_calls
        self._slots = threading.BoundedSemaphore(max_inflight_calls)
        self._max_message_size = max_message_size  # -1: no limit
        self._shm = shm  # the shared-memory path; None: ZeroMQ only
        self._shm_decoder: Decoder[ToDriver] = Decoder(ToDriver, allow_pickle=True,
                                                       copy_buffers=True, where="the driver")
        self._req = req
        self._rep = rep
        self._handles = handles
        self._stderr_tail = stderr_tail  # rank -> the dead worker's last stderr lines
        self._topics = [rank_topic(h.rank) for h in handles]
        # allow_pickle=False (allow_callables=False): arguments that need pickle are
        # refused at encode time, before anything is sent.
        self._encoder = Encoder(allow_pickle=allow_pickle,
                                shm_payloads=shm is not None and shm_payload.available())
        self._decoder: Decoder[ToDriver] = Decoder(ToDriver, allow_pickle=True,
                                                   where="the driver")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pump_lock = threading.Lock()
        self._pending: dict[int, PendingCall] = {}
        self._n_async = 0
        self._failure: tuple[int, int | None, int | None, str] | None = None
        self._closing = False
        self._released = False  # close() closed the sockets and rings
        self._draining = 0  # requests waiting for room in the ring: the monitor drains
        self._unsettled: deque[PendingCall] = deque()  # futures to settle outside locks
        self._failure_callbacks: list[Callable[[], None]] = []
        self._due_callbacks: list[Callable[[], None]] = []  # the monitor runs them
        self.stats = ChannelStats()
        self._rcvtimeo = -1
        # A wake-up frame is this random token: an empty (or any other) frame from a
        # peer is counted as malformed, never taken for a wake-up.
        self._wake_token = os.urandom(16)
        wake_endpoint = f"inproc://gpuexec-wake-{id(self):x}"
        rep.bind(wake_endpoint)
        self._wake_lock = threading.Lock()
        self._waker = ctx.socket(zmq.PUSH)
        self._waker.setsockopt(zmq.LINGER, 0)
        self._waker.connect(wake_endpoint)
        # The monitor sleeps on the sentinels and this pipe ("a future was submitted").
        self._poke_r, self._poke_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sentinels = {h.sentinel: h.rank for h in handles}
        self._pump_poller = zmq.Poller()
        self._pump_poller.register(rep, zmq.POLLIN)
        self._idle_poller = zmq.Poller()
        self._idle_poller.register(self._poke_r, zmq.POLLIN)
        for poller in (self._pump_poller, self._idle_poller):
            for fd in self._sentinels:
                poller.register(fd, zmq.POLLIN)
        self._monitor = threading.Thread(target=self._monitor_loop, name="gpuexec-monitor",
                                         daemon=True)

    # -- state ---------------------------------------------------------------------

    def start(self) -> None:
        self._monitor.start()

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def add_failure_callback(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._failure is None:
                self._failure_callbacks.append(fn)
                return
        fn()

    def _died_error(self) -> WorkerDiedError:
        """A fresh error for the recorded death (raising one instance twice would chain
        its tracebacks)."""
        rank, pid, exitcode, stderr_tail = self._failure or (-1, None, None, "")
        return WorkerDiedError(rank, pid, exitcode, stderr_tail)

    def check_usable(self) -> None:
        if self._closing:
            raise ExecutorClosedError("the executor is shut down")
        if self._failure is not None:
            raise self._died_error()

    def _worker_exited(self, rank: int) -> None:
        """A sentinel fired: record the death and fail every pending call."""
        handle = self._handles[rank]
        exitcode = handle.reap(timeout=0.5)
        if exitcode == UNKNOWN_EXIT:
            exitcode = None
        if self._closing or self._failure is not None:
            return
        tail = self._stderr_tail(rank)
        with self._lock:
            if self._closing or self._failure is not None:
                return
            self._failure = (rank, handle.pid, exitcode, tail)
            pending = list(self._pending.values())
            callbacks, self._failure_callbacks = self._failure_callbacks, []
        for call in pending:  # the monitor may hold the pump lock: settled by the monitor
            self._finish(call, error=self._died_error(), settle=False)
        self._wake()
        self._due_callbacks.extend(callbacks)  # run by the monitor, outside every lock

    def _run_due_callbacks(self) -> None:
        """Failure callbacks, on the monitor thread with no lock held (they may call
        anything, shutdown included)."""
        callbacks, self._due_callbacks = self._due_callbacks, []
        for fn in callbacks:
            try:
                fn()
            except Exception:
                log.exception("gpuexec: a failure callback raised")

    # -- sending -------------------------------------------------------------------

    def submit(self, method: str, fn_blob: bytes | None, args: list[Any],
               kwargs: dict[str, Any], ranks: Sequence[int], unique_reply_rank: int | None,
               timeout: float | None, non_block: bool) -> PendingCall:
        self.check_usable()
        call_id = next(self._ids)
        future: Future[Any] | None = Future() if non_block else None
        call = PendingCall(call_id, method, ranks, unique_reply_rank, timeout, future)
        self._take_slot(call)
        value_rank = -1 if unique_reply_rank is None else unique_reply_rank
        try:
            frames, call.segments = self._encoder.encode_with_segments(
                Call(call_id, method, fn_blob, args, kwargs, value_rank))
            self._check_sizes(frames)
            self._register(call)
        except BaseException:
            for fd in call.segments:
                os.close(fd)
            call.segments = []
            self._release_slot(call)
            raise
        self.stats.calls += 1
        self._send_call(call, frames)
        if non_block:
            self._poke()
        return call

    def _register(self, call: PendingCall) -> None:
        """Enter ``call`` in the pending table, unless the channel is closing: under the
        lock :meth:`begin_close` takes, so that every call is either failed by it or
        refused here, never left waiting for workers that were told to exit."""
        with self._lock:
            if self._closing:
                raise ExecutorClosedError("the executor is shut down")
            self._pending[call.call_id] = call
            if call.future is not None:
                self._n_async += 1

    def _send_call(self, call: PendingCall, frames: list[Any]) -> None:
        """Send a registered call; on failure it is finished with the error, raised."""
        try:
            self._send(call.ranks, frames, call.deadline, call)
        except BaseException as e:
            self._finish(call, e)
            raise

    def _take_slot(self, call: PendingCall) -> None:
        """Wait for one of the ``max_inflight_calls`` slots, until the call's deadline
        (``InflightLimitError``), a death or shutdown (their errors)."""
        slots = self._slots
        if not slots.acquire(blocking=False):
            self.stats.inflight_waits += 1
            while True:
                wait = _SLOT_WAIT_S
                if call.deadline is not None:
                    wait = min(wait, call.deadline - time.monotonic())
                    if wait <= 0:
                        raise InflightLimitError(call.method, call.timeout or 0.0,
                                                 self._max_inflight)
                if slots.acquire(timeout=wait):
                    break
                self.check_usable()
        call.slot = True
        try:
            self.check_usable()
        except BaseException:
            call.slot = False
            slots.release()
            raise

    def _release_slot(self, call: PendingCall) -> None:
        with self._lock:
            held, call.slot = call.slot, False
        if held:
            self._slots.release()

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

    def snapshot(self) -> ChannelStats:
        """A copy of the counters, with the ZAP handler's refusals."""
        stats = self.stats
        return ChannelStats(
            calls=stats.calls, late_replies=stats.late_replies, malformed=stats.malformed,
            malformed_by_reason=dict(stats.malformed_by_reason),
            worker_malformed={r: dict(d) for r, d in stats.worker_malformed.items()},
            refused_connections=self._auth.denied if self._auth is not None else 0,
            inflight_waits=stats.inflight_waits)

    def send_raw(self, frames: list[bytes]) -> None:
        """Test hook (the fuzz tests): send ``frames`` to every worker as they are,
        bypassing the encoder, by the transport in use (ring packet or ZeroMQ)."""
        self._send(range(len(self._topics)), frames, time.monotonic() + _RAW_SEND_S)

    def _send(self, ranks: Sequence[int], frames: list[Any], deadline: float | None,
              call: PendingCall | None = None) -> None:
        """Send a request to ``ranks`` over the shared-memory ring or ZeroMQ, waiting for
        room in the ring until ``deadline`` (``time.monotonic()``; None: no limit) and
        then raising ``RpcTimeoutError`` (for ``call``), or ``ExecutorClosedError`` /
        ``WorkerDiedError`` as soon as the channel closes or fails."""
        shm = self._shm
        targets = None if shm is None or len(ranks) == len(self._topics) else ranks
        waiting = False
        nap = _RING_NAP_S[0]
        try:
            while True:
                with self._send_lock:
                    if self._released:
                        raise ExecutorClosedError("the executor is shut down")
                    if shm is None:
                        self._publish(ranks, frames)
                        return
                    if self._put(shm, ranks, targets, frames):
                        return
                # The ring is full: wait for room outside the send lock.
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    what = call.method if call is not None else "send"
                    timeout = call.timeout if call is not None else 0.0
                    raise RpcTimeoutError(what, timeout or 0.0, list(ranks))
                self.check_usable()
                if not waiting:
                    waiting = True
                    with self._lock:
                        self._draining += 1
                    self._poke()
                self._drain_if_monitor()
                time.sleep(nap if deadline is None else max(0.0, min(nap, deadline - now)))
                nap = min(nap * 2, _RING_NAP_S[1])
        finally:
            if waiting:
                with self._lock:
                    self._draining -= 1

    def _put(self, shm: ShmDriverPath, ranks: Sequence[int], targets: Sequence[int] | None,
             frames: list[Any]) -> bool:
        """One packet in the request ring; too big for a slot: ZeroMQ, and a marker that
        keeps the order. False when the ring has no room now (caller holds the send
        lock, and waits without it)."""
        ring = shm.request
        try:
            if packets.put(ring, frames, targets, 0):
                return True
            marker = packets.pack_marker(targets)
            slot = ring.claim(len(marker), 0)  # room for the marker before the message
        except RingTimeout:
            return False
        if slot is None:  # pragma: no cover - a marker always fits a slot
            raise RuntimeError("the ring's slots cannot hold a marker")
        self._publish(ranks, frames)
        slot[:] = marker
        ring.publish()
        return True

    def _drain_if_monitor(self) -> None:
        """A request waiting for room on the monitor thread itself (a callback made the
        call): nobody else would drain the reply rings, so drain them here (the monitor
        takes no signals: a non-blocking acquire cannot be torn by a KeyboardInterrupt)."""
        if threading.current_thread() is self._monitor and \
                self._pump_lock.acquire(blocking=False):
            try:
                if not self._released:
                    self._recv_shm(None, 0)
            finally:
                self._pump_lock.release()
            self._settle()

    def _publish(self, ranks: Sequence[int], frames: list[Any]) -> None:
        """Publish on ZeroMQ once for all ranks, or once per targeted rank (caller holds
        the send lock)."""
        every = len(ranks) == len(self._topics)
        if len(frames) == 1 and every:  # the common case
            self._req.send(ALL_TOPIC + frames[0])
            return
        header, buffers = frames[0], frames[1:]
        for topic in [ALL_TOPIC] if every else [self._topics[r] for r in ranks]:
            send_frames(self._req, [topic + header, *buffers])

    def ping(self, timeout: float | None) -> PendingCall:
        self.check_usable()
        call = PendingCall(next(self._ids), "check_health", list(range(len(self._handles))),
                           None, timeout, None)
        self._register(call)
        self._send_call(call, self._encoder.encode(Ping(call.call_id)))
        return call

    def _poke(self) -> None:
        """Tell the monitor that a future is outstanding (it may need to pump), that a
        request waits for room in the ring, or that futures wait to be settled."""
        with self._wake_lock:  # never a write to a closed (or reused) descriptor
            if self._released:
                return
            try:
                os.write(self._poke_w, b"!")
            except BlockingIOError:
                pass

    def _wake(self) -> None:
        """Make a caller blocked in ``recv`` on the reply socket (or asleep on the
        doorbell) return now."""
        with self._wake_lock:
            if self._released:
                return
            self._waker.send(self._wake_token, zmq.NOBLOCK)
            if self._shm is not None:
                self._shm.doorbell.ring()

    # -- receiving -----------------------------------------------------------------

    def _recv_for(self, call: PendingCall, timeout_ms: int) -> None:
        """Receive and dispatch replies until ``call`` is done (``timeout_ms`` -1), or
        one message within ``timeout_ms`` (the caller then re-checks its deadline).

        The caller holds the pump lock. A blocking ``recv`` is the cheapest way to wait
        for one socket; deaths and shutdown interrupt it with a wake-up frame. This is
        the hot path: one loop per reply, nothing re-computed inside it.
        """
        if self._shm is not None:
            self._recv_shm(call, None if timeout_ms < 0 else timeout_ms / 1000)
            return
        rep = self._rep
        dispatch = self._dispatch
        if timeout_ms != self._rcvtimeo:
            rep.setsockopt(zmq.RCVTIMEO, timeout_ms)
            self._rcvtimeo = timeout_ms
        while not call.done:
            try:
                first = rep.recv(copy=False)
            except zmq.Again:
                return
            dispatch(recv_rest(rep, first.bytes) if first.more else [first.bytes])
            if timeout_ms >= 0:
                return

    def _recv_shm(self, call: PendingCall | None, timeout: float | None) -> None:
        """Replies from the reply rings until ``call`` is done (or one round when ``call``
        is None), spinning ``spin`` seconds after the last reply, then asleep on the
        doorbell; returns after ``timeout`` seconds at most (None: no limit)."""
        shm = self._shm
        if shm is None:  # pragma: no cover - callers check
            return
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin_until = now + shm.spin
        readers = shm.replies
        while call is None or not call.done:
            got = False
            replies: list[Reply | Pong] = []
            for reader in readers:
                view = reader.try_read()
                if view is not None:
                    got = True
                    reply = self._decode_packet(reader, view)
                    if reply is not None:
                        replies.append(reply)
            if replies:  # every ring's reply of this pass under one take of the lock
                self._deliver(replies)
            now = time.monotonic()
            if got:
                if call is None:
                    return
                spin_until = now + shm.spin
                continue
            if deadline is not None and now >= deadline:
                return
            if now < spin_until:
                continue
            nap = 0.05 if deadline is None else min(0.05, deadline - now)
            shm.doorbell.wait(lambda: shm.ready_reply() or (call is not None and call.done)
                              or self._closing, nap)
            if self._closing or (call is None and not shm.ready_reply()):
                return

    def _decode_packet(self, reader: RingReader, view: memoryview) -> Reply | Pong | None:
        """The reply in a ring packet, released from the ring; None when it was dropped,
        or when it came by ZeroMQ (then already delivered)."""
        try:
            frame = packets.single_frame(view)
            if frame is not None:  # the common case: one frame, nothing to walk
                return self._decode([frame], self._shm_decoder)
            kind, frames = packets.unpack(view)
            if kind == packets.BY_ZMQ:
                reader.release()
                if self._rcvtimeo != _OVERFLOW_RECV_MS:
                    self._rep.setsockopt(zmq.RCVTIMEO, _OVERFLOW_RECV_MS)
                    self._rcvtimeo = _OVERFLOW_RECV_MS
                self._dispatch(recv_frames(self._rep))
                return None
            return self._decode(frames, self._shm_decoder)
        except (ValueError, struct.error) as e:
            if self.stats.count(getattr(e, "reason", "packet")) == 1:
                log.warning("gpuexec: dropped a malformed reply packet (%s)", e)
            return None
        finally:
            view.release()
            reader.release()

    def _pump(self, timeout_ms: int) -> None:
        """The monitor's pump: replies and sentinels together; caller holds the pump lock."""
        if self._shm is not None:
            self._recv_shm(None, timeout_ms / 1000)
            for fd, _ in self._idle_poller.poll(0):
                if fd in self._sentinels:
                    self._idle_poller.unregister(fd)
                    self._worker_exited(self._sentinels[fd])
            return
        for sock, _ in self._pump_poller.poll(timeout_ms):
            if sock is self._rep:
                # Drain what is queued; EVENTS avoids raising zmq.Again per wake-up.
                while self._rep.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._dispatch(recv_frames(self._rep, zmq.NOBLOCK))
            elif sock in self._sentinels:
                self._pump_poller.unregister(sock)
                self._worker_exited(self._sentinels[sock])

    def _dispatch(self, frames: list[Any]) -> None:
        """A message from the reply socket: decode and deliver it."""
        reply = self._decode(frames, self._decoder)
        if reply is not None:
            self._deliver([reply])

    def _decode(self, frames: list[Any], decoder: Decoder[ToDriver]) -> Reply | Pong | None:
        """The reply in ``frames``; None for a wake-up frame or a malformed message
        (counted, logged once)."""
        header = frames[0]
        if header == self._wake_token and len(frames) == 1:
            return None  # a wake-up frame: the waiting loop re-checks its call
        try:
            if not header:
                raise MalformedMessage("empty frame", "empty")
            return decoder.decode(frames) if len(frames) > 1 else \
                decoder.decode_header(header)
        except UndecodableValue as e:  # its call ends with the error (see .failures)
            reply = undecodable_reply(e)
            if reply is not None:
                return reply
            self.stats.count(e.reason)
            return None
        except MalformedMessage as e:
            if self.stats.count(e.reason) == 1:
                log.warning("gpuexec: dropped a malformed reply (%s); counting further ones", e)
            return None

    def _deliver(self, replies: list[Reply | Pong]) -> None:
        """Record ``replies`` in their calls (one take of the lock) and finish the calls
        they complete."""
        complete: list[PendingCall] = []
        with self._lock:
            for reply in replies:
                call = self._pending.get(reply.call_id)
                if call is None or reply.rank not in call.owed:
                    self.stats.late_replies += 1
                    continue
                call.owed.discard(reply.rank)
                if isinstance(reply, Pong):
                    self.stats.worker_malformed[reply.rank] = dict(reply.dropped)
                    call.values[reply.rank] = None
                elif reply.error is not None:
                    if call.failures is None:
                        call.failures = {}
                    call.failures[reply.rank] = reply.error
                else:
                    call.values[reply.rank] = reply.value
                if not call.owed:
                    complete.append(call)
        deferred = False
        for call in complete:  # the caller holds the pump lock: no user code here
            self._finish(call, settle=False)
            deferred = deferred or call.future is not None
        if deferred and threading.current_thread() is not self._monitor:
            self._poke()  # a blocking caller pumps: the monitor settles the futures now

    def _finish(self, call: PendingCall, error: BaseException | None = None,
                settle: bool = True) -> None:
        """Complete ``call`` once, with its results or ``error``. Its future is settled
        now, or with ``settle=False`` (the caller holds the pump lock) queued for
        :meth:`_settle`, so that its done callbacks never run under a channel lock."""
        with self._lock:
            if call.done:
                return
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
            self._pending.pop(call.call_id, None)
            if call.future is not None:
                self._n_async -= 1
            held, call.slot = call.slot, False
        if held:
            self._slots.release()
        for fd in call.segments:  # every target has mapped its payloads (or never will)
            os.close(fd)
        call.segments = []
        if call.event is not None:
            call.event.set()
        if call.future is not None:
            if settle:
                self._settle_one(call)
            else:
                self._unsettled.append(call)

    def _settle(self) -> None:
        """Settle the futures queued by pumping threads; any thread holding no lock."""
        unsettled = self._unsettled
        while unsettled:
            try:
                call = unsettled.popleft()
            except IndexError:  # another thread took the last one
                return
            self._settle_one(call)

    @staticmethod
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

    def abandon(self, call: PendingCall) -> None:
        """Give up on ``call`` (its awaiting task was cancelled): it leaves the pending
        table now, so its replies are dropped and counted as late, as after a timeout."""
        self._finish(call, CancelledError(f"the call to {call.method!r} was abandoned"))

    def _expire(self, call: PendingCall) -> None:
        missing = sorted(call.owed)
        self._finish(call, RpcTimeoutError(call.method, call.timeout or 0.0, missing))

    def wait(self, call: PendingCall) -> Any:
        """Block until ``call`` completes, pumping replies when nobody else does."""
        try:
            while not call.done:
                if call.deadline is not None:
                    remaining = call.deadline - time.monotonic()
                    if remaining <= 0:
                        self._expire(call)
                        break
                else:
                    remaining = _WAIT_SLICE_S
                if not self._pump_lock.locked():
                    # ``with``, not ``acquire(blocking=False)`` + ``try``: a Ctrl-C arriving
                    # right after acquire() returned would leave the lock taken forever
                    # (every later wait and the shutdown would hang); ``with`` has no such
                    # gap. Losing the race to another pumper costs a wait for its slice.
                    with self._pump_lock:
                        self._recv_for(call, -1 if call.deadline is None else
                                       max(1, int(remaining * 1000 + 0.999)))
                    if self._unsettled:
                        self._settle()
                else:
                    with self._lock:
                        if call.event is None:
                            call.event = threading.Event()
                        event = call.event
                    if not call.done:
                        event.wait(min(remaining, _WAIT_SLICE_S))
        finally:
            if not call.done:  # KeyboardInterrupt or another exception while waiting
                self._finish(call, ExecutorClosedError("the wait for this call was interrupted"))
        return call.outcome()

    # -- monitor thread ------------------------------------------------------------

    def _monitor_loop(self) -> None:
        try:
            while not self._closing:
                self._monitor_round()
        finally:
            self._settle()

    def _monitor_round(self) -> None:
        """One round of the monitor: pump (futures outstanding or a request waiting for
        room) or sleep on the sentinels and the poke pipe; expire futures; then, holding
        no lock, settle futures and run failure callbacks. Those may shut the channel
        down: nothing after them touches a socket."""
        busy = self._n_async or self._draining
        if busy and self._pump_lock.acquire(blocking=False):
            try:
                self._pump(_MONITOR_PUMP_MS)
            finally:
                self._pump_lock.release()
        else:
            events = self._idle_poller.poll(_MONITOR_PUMP_MS if busy else None)
            for fd, _ in events:
                if fd == self._poke_r:
                    try:
                        os.read(self._poke_r, 4096)
                    except BlockingIOError:
                        pass
                elif fd in self._sentinels:
                    self._idle_poller.unregister(fd)
                    self._worker_exited(self._sentinels[fd])
        if self._n_async:
            now = time.monotonic()
            with self._lock:
                expired = [c for c in self._pending.values() if c.future is not None
                           and c.deadline is not None and c.deadline <= now]
            for call in expired:
                self._expire(call)
        self._settle()
        if self._due_callbacks:
            self._run_due_callbacks()

    # -- shutdown ------------------------------------------------------------------

    def begin_close(self) -> None:
        """Refuse new calls, fail pending ones, tell the workers to exit."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            pending = list(self._pending.values())
        self._poke()
        for call in pending:
            self._finish(call, ExecutorClosedError("the executor was shut down during the call"))
        self._settle()
        self._wake()
        try:  # only if the ring has room now: a full ring or a dead worker gets SIGTERM
            self._send(range(len(self._topics)), self._encoder.encode(Shutdown()),
                       time.monotonic())
        except Exception as e:
            log.debug("gpuexec: could not send Shutdown (%s)", e)

    def close(self) -> None:
        """Stop the monitor and close the sockets and rings (after the workers are gone).

        Any thread, a callback's included (none runs under a channel lock). Threads still
        inside a call leave it at once (their calls were failed by :meth:`begin_close`);
        one that takes a lock after this finds ``_released`` and touches nothing.
        """
        if self._monitor.is_alive() and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=5.0)
        with self._pump_lock, self._send_lock, self._wake_lock:
            if self._released:
                return
            self._released = True
            self._waker.close(linger=0)
            self._req.close(linger=0)
            self._rep.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            if self._shm is not None:
                self._shm.close()
            for fd in (self._poke_r, self._poke_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._settle()

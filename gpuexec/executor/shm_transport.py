"""The shared-memory transport (``transport="shm"``): rings, with ZeroMQ for overflow.

::

    channel ──▶ request ring (one packet, every worker reads it) ──▶ workers
    call table ◀── decode ◀── reply rings (one per worker) ◀── workers
                   ▲  caller spins, then sleeps on the doorbell futex
                   └── a ``BY_ZMQ`` marker: the message itself is on the reply socket

A message too big for a slot goes by ZeroMQ (this transport extends
:class:`.zmq_transport.ZmqTransport`, which carries it) and a marker takes its place in
the ring, which keeps the order: this module is the only place that writes or reads
that protocol on the driver side. Deaths and shutdown ring the doorbell as well as
sending the wake-up frame. The rings themselves are :class:`.shm_path.ShmDriverPath`.

Fields and threads: ``_shm.request``: the holder of the send lock; ``_shm.replies``,
``_decoder``, ``_overflow_poller``: the holder of the pump lock; the doorbell: any thread (a futex).
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import zmq

from ..ipc import packets, shm_payload
from ..ipc.codec import Decoder, MalformedMessage, recv_frames
from ..ipc.messages import Pong, Reply, ShmSpec, ToDriver
from ..ipc.shm_ring import RingReader, RingTimeout
from .calls import CallTable, PendingCall
from .shm_path import ShmDriverPath
from .zmq_transport import ZmqTransport, unwatch

log = logging.getLogger("gpuexec")

_OVERFLOW_WAIT_S = 10.0  # a reply announced in its ring is on its way: it comes at once,
#                         unless its worker died while ZeroMQ was still sending it
_OVERFLOW_GRACE_S = 0.05  # after a death, for what ZeroMQ may still be reading
_OVERFLOW_SLICE_MS = 100  # the wait re-checks that the channel is not closing this often


class ShmTransport(ZmqTransport):
    """Requests and replies through shared-memory rings; see the module docstring."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], req: zmq.Socket[bytes],
                 rep: zmq.Socket[bytes], topics: Sequence[bytes], table: CallTable,
                 sentinels: Sequence[int], shm: ShmDriverPath) -> None:
        super().__init__(ctx, req, rep, topics, table, sentinels)
        self._shm = shm
        self._n_ranks = len(topics)
        self._shm_decoder: Decoder[ToDriver] = Decoder(ToDriver, allow_pickle=True,
                                                       copy_buffers=True, where="the driver")
        self._sentinel_poller = zmq.Poller()
        for fd in sentinels:
            self._sentinel_poller.register(fd, zmq.POLLIN)
        self._overflow_poller = zmq.Poller()  # the reply socket and every sentinel
        self._overflow_poller.register(rep, zmq.POLLIN)
        for fd in sentinels:
            self._overflow_poller.register(fd, zmq.POLLIN)
        self.carries_shm_payloads = shm_payload.available()
        # Messages a respawn's handshake read from the reply socket: each is what some
        # ring's BY_ZMQ marker announces, and the next marker takes it (pump lock).
        self._stash: deque[list[Any]] = deque()

    # -- sending -------------------------------------------------------------------

    def send(self, ranks: Sequence[int], frames: list[Any]) -> bool:
        """One packet in the request ring; too big for a slot: ZeroMQ, and a marker that
        keeps the order. False when the ring has no room now."""
        targets = None if len(ranks) == self._n_ranks else ranks
        ring = self._shm.request
        try:
            if packets.put(ring, frames, targets, 0):
                return True
            marker = packets.pack_marker(targets)
            slot = ring.claim(len(marker), 0)  # room for the marker before the message
        except RingTimeout:
            return False
        if slot is None:  # pragma: no cover - a marker always fits a slot
            raise RuntimeError("the ring's slots cannot hold a marker")
        self.publish(ranks, frames)
        slot[:] = marker
        ring.publish()
        return True

    # -- receiving -----------------------------------------------------------------

    def recv_for(self, call: PendingCall, timeout_ms: int) -> None:
        self._recv(call, None if timeout_ms < 0 else timeout_ms / 1000)

    def pump(self, timeout_ms: int) -> list[int]:
        self._recv(None, timeout_ms / 1000)
        fired = [fd for fd, _ in self._sentinel_poller.poll(0)]
        for fd in fired:
            self._sentinel_poller.unregister(fd)
        return fired

    def drain(self) -> None:
        self._recv(None, 0)

    def _recv(self, call: PendingCall | None, timeout: float | None) -> None:
        """Replies from the reply rings until ``call`` is done (or one round when ``call``
        is None), spinning ``spin`` seconds after the last reply, then asleep on the
        doorbell; returns after ``timeout`` seconds at most (None: no limit)."""
        shm = self._shm
        table = self._table
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
                table.deliver(replies)
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
                              or table.closing, nap)
            if table.closing or (call is None and not shm.ready_reply()):
                return

    def _decode_packet(self, reader: RingReader, view: memoryview) -> Reply | Pong | None:
        """The reply in a ring packet, released from the ring; None when it was dropped,
        or when it came by ZeroMQ (then already delivered)."""
        try:
            frame = packets.single_frame(view)
            if frame:  # the common case: one frame, nothing to walk (and no wake-up
                try:   # token: those come by ZeroMQ only)
                    return self._shm_decoder.decode_header(frame)
                except MalformedMessage as e:
                    return self.not_decoded(e)
            kind, frames = packets.unpack(view)
            if kind == packets.BY_ZMQ:
                reader.release()
                self._overflow()
                return None
            return self.decode(frames, self._shm_decoder)
        except (ValueError, struct.error) as e:
            if self._stats.count(getattr(e, "reason", "packet")) == 1:
                log.warning("gpuexec: dropped a malformed reply packet (%s)", e)
            return None
        finally:
            view.release()
            reader.release()

    def _overflow(self) -> None:
        """Receive and deliver the message a ``BY_ZMQ`` marker announced (caller holds
        the pump lock). The worker sent it before it wrote the marker, so it is on its
        way, unless the worker died while ZeroMQ was still sending it (a large message):
        the wait ends when it arrives, shortly after any worker's death (the monitor
        then fails the calls with ``WorkerDiedError``), when the channel closes, or after
        ``_OVERFLOW_WAIT_S`` (dropped and counted as ``overflow_lost``). It never raises:
        the caller may be the monitor thread, which must go on watching."""
        rep, token = self._rep, self._wake_token
        if self._stash:
            super().dispatch(self._stash.popleft())
            return
        deadline = time.monotonic() + _OVERFLOW_WAIT_S
        while not self._table.closing:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            events = dict(self._overflow_poller.poll(
                max(1, min(_OVERFLOW_SLICE_MS, int(left * 1000 + 0.999)))))
            if events.pop(rep, 0):
                try:
                    frames = recv_frames(rep, zmq.NOBLOCK)
                except zmq.Again:  # pragma: no cover - POLLIN means a whole message
                    continue
                if len(frames) == 1 and frames[0] == token:
                    continue  # a wake-up frame: the loop re-checks the channel
                super().dispatch(frames)
                return
            if events:  # a worker died: what ZeroMQ still holds comes within the grace
                deadline = min(deadline, time.monotonic() + _OVERFLOW_GRACE_S)
        if self._table.closing:  # shutting down: nobody waits for it any more
            return
        if self._stats.count("overflow_lost") == 1:
            log.warning("gpuexec: a reply announced in a reply ring never came by ZeroMQ "
                        "(its worker died while sending it?); counting further ones")

    # -- a rank replaced -------------------------------------------------------------

    def dispatch(self, frames: list[Any]) -> None:
        """A message the respawn's handshake read from the reply socket: over this
        transport every one is announced by a marker in a ring, which will take it."""
        if len(frames) == 1 and frames[0] == self._wake_token:
            return
        self._stash.append(frames)

    def forget(self, rank: int, sentinel: int) -> ShmSpec | None:
        """Stop watching the dead worker and give its rank a place on the rings (the
        protocol in :mod:`.shm_path`). What its ring still holds is taken first (late
        replies, dropped and counted), each marker with its message, so that no
        message it sent by ZeroMQ is left for another ring's marker."""
        reader = self._shm.replies[rank]
        while (view := reader.try_read()) is not None:
            reply = self._decode_packet(reader, view)
            if reply is not None:
                self._table.deliver([reply])
        super().forget(rank, sentinel)
        for poller in (self._sentinel_poller, self._overflow_poller):
            unwatch(poller, sentinel)
        return self._shm.replace_rank(rank)

    def adopt(self, sentinel: int) -> None:
        super().adopt(sentinel)
        self._sentinel_poller.register(sentinel, zmq.POLLIN)
        self._overflow_poller.register(sentinel, zmq.POLLIN)
        self._shm.unlink()  # it has attached its reply ring: give up the path

    # -- wake-up and close ---------------------------------------------------------

    def wake(self) -> None:
        super().wake()
        self._shm.doorbell.ring()

    def close(self) -> None:
        super().close()
        self._shm.close()

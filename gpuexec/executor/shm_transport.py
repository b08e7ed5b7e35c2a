"""The shared-memory transport (``transport="shm"``): rings, with ZeroMQ for overflow.

::

    channel ──▶ request ring (one packet, every worker reads it) ──▶ workers
    call table ◀── decode ◀── reply rings (one per worker) ◀── workers
                   ▲  caller spins, then sleeps on the doorbell futex
                   └── a ``BY_ZMQ`` marker: the message itself is on the reply socket

A message too big for a slot goes by ZeroMQ (this transport holds a
:class:`.zmq_transport.ZmqTransport`, which carries it) and a marker takes its place in
the ring, which keeps the order: this module is the only place that writes or reads
that protocol on the driver side. Deaths and shutdown ring the doorbell as well as
sending the wake-up frame. The rings themselves are :class:`.shm_path.ShmDriverPath`.

Fields and threads: ``_shm.request``: the holder of the send lock; ``_shm.replies``,
``_decoder``, ``_overflow_poller``: the holder of the pump lock; the doorbell: any thread (a futex).
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import msgspec
import zmq

from ..ipc import packets, shm_payload
from ..ipc.codec import Decoder, MalformedMessage
from ..ipc.messages import Pong, Reply, ShmSpec, ToDriver
from ..ipc.shm_ring import RingReader, RingTimeout
from .calls import CallTable, PendingCall
from .shm_path import ShmDriverPath
from .transport import Transport
from .zmq_transport import ZmqTransport, unwatch

log = logging.getLogger("gpuexec")

_INF = math.inf
_encode_id = msgspec.msgpack.encode  # a call id as the replies' headers hold it


class ShmTransport(Transport):
    """Requests and replies through shared-memory rings; see the module docstring."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], req: zmq.Socket[bytes],
                 rep: zmq.Socket[bytes], topics: Sequence[bytes], table: CallTable,
                 sentinels: Sequence[int], shm: ShmDriverPath) -> None:
        self._zmq = ZmqTransport(ctx, req, rep, topics, table, sentinels)  # the overflow
        self._table = table
        self._answered = table.answered_all
        self._stats = table.stats
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
        self._batch: list[Reply | Pong] = []  # the replies of one pass (see _recv)
        self._every = (1 << self._n_ranks) - 1  # every rank, as a mask and in order
        # Reply rings the core released messages of (collect) since their readers last
        # looked: each reader re-reads its position before it is next used (_catch_up).
        self._moved = 0

    # -- sending -------------------------------------------------------------------

    def send(self, ranks: Sequence[int], frames: list[Any]) -> bool:
        """One packet in the request ring; too big for a slot: ZeroMQ, and a marker that
        keeps the order. False when the ring has no room now."""
        targets = None if len(ranks) == self._n_ranks else ranks
        ring = self._shm.request
        try:
            if targets is None and len(frames) == 1 and type(frames[0]) is bytes:
                if ring.put_one(frames[0], 0):  # almost every request (packets.put's
                    return True                 # first case, without its frame)
            elif packets.put(ring, frames, targets, 0):
                return True
            marker = packets.pack_marker(targets)
            slot = ring.claim(len(marker), 0)  # room for the marker before the message
        except RingTimeout:
            return False
        if slot is None:  # pragma: no cover - a marker always fits a slot
            raise RuntimeError("the ring's slots cannot hold a marker")
        self._zmq.publish(ranks, frames)
        slot[:] = marker
        ring.publish()
        return True

    # -- receiving -----------------------------------------------------------------

    def recv_for(self, call: PendingCall, deadline: float | None) -> None:
        self.collect_more(call, _INF if deadline is None else deadline)

    def core_lane(self) -> tuple[Any, ...] | None:
        """What the compiled round trip reads of this transport (``_moved``,
        :meth:`collect_more`), of the request ring's writer and of the rings
        (``replies``, ``spin``); None on the pure-Python ring core."""
        ring = self._shm.request
        put = ring.put_params()
        return None if put is None else (self, ring, put, self._shm)

    def pump(self, timeout_ms: int) -> list[int]:
        self._recv(None, time.monotonic() + timeout_ms / 1000)
        fired = [fd for fd, _ in self._sentinel_poller.poll(0)]
        for fd in fired:
            self._sentinel_poller.unregister(fd)
        return fired

    def drain(self) -> None:
        self._recv(None, time.monotonic())

    def collect_more(self, call: PendingCall, deadline: float,
                     collected: tuple[int, int, int, list[bytes] | tuple[()]] | None = None
                     ) -> None:
        """The replies to ``call`` until it is done, spinning ``spin`` seconds after the
        last one, then asleep on the doorbell, until ``deadline`` (``time.monotonic()``;
        inf: none). The wait across the awaited rings is one call into the ring core
        (:meth:`ShmDriverPath.collect`, GIL released), which takes each None result by
        its bytes (no view, no decoding, no Reply) and copies out every other reply of one
        short frame; the None results are recorded together, the frames decoded and
        delivered together (:meth:`_deliver_frames`). A ring holding anything else (a
        long reply, a ``BY_ZMQ`` marker) is read here, and the wait goes on in
        :meth:`_recv`, across every ring: a marker takes the next message from the shared
        socket, which may be another rank's, whose own marker sits in a ring this call
        does not await. ``collected``: what a first collect gave (the compiled round
        trip's), taken up first. Over 64 ranks: :meth:`_recv` does it all."""
        shm = self._shm
        table = self._table
        collect = shm.collect
        if collect is None:
            self._recv(call, deadline)
            return
        epoch = shm.epoch
        spin_until = time.monotonic() + shm.spin
        if call.done and collected is None:
            return
        call_id = _encode_id(call.call_id)
        every, n_ranks = self._every, self._n_ranks
        while True:
            if collected is None:
                owed = call.owed  # the ranks still owed (a frame may be another's reply)
                if len(owed) == n_ranks:
                    want = every
                else:
                    want = 0
                    for rank in owed:
                        want |= 1 << rank
                seen = epoch()  # before the checks: a poke after them ends the wait
                if table.closing:
                    return
                taken, framed, other, frames = collect(seen, spin_until, deadline, call_id,
                                                       want)
            else:
                (taken, framed, other, frames), collected = collected, None
            if taken | framed:  # released by the core: the readers catch up when next used
                self._moved |= taken | framed
                if taken == every:  # every rank answered None (the common case)
                    self._answered(call, None)
                elif taken:
                    ranks = []
                    while taken:
                        low = taken & -taken
                        ranks.append(low.bit_length() - 1)
                        taken ^= low
                    table.deliver_values(call, ranks)
            if frames:
                self._deliver_frames(call, frames)
            if other:  # read with every ring in view from here on (see above)
                self._read_rings(other, call)
                if not call.done:
                    self._recv(call, deadline)
                return
            if call.done:
                return
            if not (taken or framed):  # the deadline passed, or the doorbell was poked
                if time.monotonic() >= deadline:  # (a death, a close: the table says)
                    return
                continue
            spin_until = time.monotonic() + shm.spin

    def _deliver_frames(self, call: PendingCall, frames: list[bytes] | tuple[()]) -> None:
        """Decode the replies in ``frames`` (one frame each, copied out by the core) and
        deliver them together (``call``'s own without an error: without the general
        walk). A frame that does not decode is dropped and counted."""
        if len(frames) == 1:  # one reply (a call to one rank: the common case)
            reply = self._decode_frame(frames[0])
            if reply is not None:
                self._deliver_one(call, reply)
            return
        if all(frames):  # (an empty frame is counted as such by _decode_frame)
            replies: list[Reply | Pong] = []
            it = iter(frames)
            decode = self._shm_decoder.decode_header
            while True:
                try:
                    replies.extend(map(decode, it))  # keeps what it decoded on an error
                    break
                except MalformedMessage as e:
                    reply = self._zmq.not_decoded(e)
                    if reply is not None:
                        replies.append(reply)
        else:
            replies = [r for f in frames if (r := self._decode_frame(f)) is not None]
        if len(replies) == 1:
            self._deliver_one(call, replies[0])
        elif replies:
            call_id = call.call_id
            values = {r.rank: r.value for r in cast(list[Reply], replies)  # in one pass
                      if r.__class__ is Reply and r.call_id == call_id and r.error is None}
            if len(values) == len(replies):  # every one call's own result, each rank once
                self._answered(call, values)  # (a rank twice: the walk counts it)
            else:
                self._table.deliver(replies)

    def _deliver_one(self, call: PendingCall | None, reply: Reply | Pong) -> None:
        """Deliver one reply (``call``'s own without an error: without the general walk,
        by ``answered_all`` when the call awaited it alone, else ``deliver_values``)."""
        if call is not None and reply.__class__ is Reply and \
                reply.call_id == call.call_id and reply.error is None:
            if len(call.owed) == 1:
                self._answered(call, {reply.rank: reply.value})
            else:
                self._table.deliver_values(call, (reply.rank,), reply.value)
        else:
            self._table.deliver((reply,))

    def _recv(self, call: PendingCall | None, deadline: float) -> None:
        """Replies from the reply rings until ``call`` is done (or one round when ``call``
        is None), spinning ``spin`` seconds after the last reply, then asleep on the
        doorbell; returns at ``deadline`` (``time.monotonic()``; inf: none). The wait
        across every ring is one call into the ring core (:meth:`ShmDriverPath.gather`,
        GIL released); it answers with the rings that hold a reply, as a bit mask, which
        :meth:`_read_rings` reads."""
        shm = self._shm
        table = self._table
        gather = shm.gather
        epoch = shm.epoch
        spin_until = time.monotonic() + shm.spin
        if call is not None and call.done:
            return
        while True:
            seen = epoch()  # before the checks: a poke after them ends the gather
            if table.closing:
                return
            mask = gather(seen, spin_until, deadline)
            if not mask:  # the deadline passed, or the doorbell was poked (a death, a
                if call is None or call.done or time.monotonic() >= deadline:  # close)
                    return
                continue
            self._read_rings(mask, call)
            if call is None or call.done:
                return
            spin_until = time.monotonic() + shm.spin

    def _read_rings(self, mask: int, call: PendingCall | None) -> None:
        """Read the next message of each reply ring in ``mask`` and deliver the replies
        under one take of the table's lock (a list kept for it, none made per pass). A
        frame of up to 16 KiB is taken out in one core call; a longer one is decoded in
        place. ``call``'s own reply without an error skips the general walk."""
        if self._moved:
            self._catch_up()
        readers = self._shm.replies
        table = self._table
        if mask & (mask - 1):  # several rings
            batch = self._batch
            while mask:
                low = mask & -mask
                reply = self._read_ring(readers[low.bit_length() - 1])
                if reply is not None:
                    batch.append(reply)
                mask ^= low
            if batch:
                try:
                    table.deliver(batch)
                finally:
                    batch.clear()
            return
        reply = self._read_ring(readers[mask.bit_length() - 1])
        if reply is not None:
            self._deliver_one(call, reply)

    def _catch_up(self) -> None:
        """Each reader of a ring the core released messages of re-reads its position."""
        readers, moved = self._shm.replies, self._moved
        self._moved = 0
        while moved:
            low = moved & -moved
            readers[low.bit_length() - 1].catch_up()
            moved ^= low

    def _read_ring(self, reader: RingReader) -> Reply | Pong | None:
        """The reply in ``reader``'s next message, released; None when there is none, it
        was dropped, or it came by ZeroMQ (then already delivered)."""
        frame = reader.take_frame()
        if frame is not None:
            return self._decode_frame(frame)
        view = reader.try_read()
        return None if view is None else self._decode_packet(reader, view)

    def _decode_frame(self, frame: bytes | memoryview) -> Reply | Pong | None:
        """The reply in a packet's only frame; None when it was dropped (counted)."""
        try:
            if not frame:
                raise MalformedMessage("empty frame", "empty")
            return self._shm_decoder.decode_header(frame)
        except MalformedMessage as e:
            return self._zmq.not_decoded(e)

    def _decode_packet(self, reader: RingReader, view: memoryview) -> Reply | Pong | None:
        """The reply in a ring packet, released from the ring; None when it was dropped,
        or when it came by ZeroMQ (then already delivered)."""
        try:
            frame = packets.single_frame(view)
            if frame is not None:
                return self._decode_frame(frame)
            kind, frames = packets.unpack(view)
            if kind == packets.BY_ZMQ:
                reader.release()
                self._overflow()
                return None
            return self._zmq.decode(frames, self._shm_decoder)
        except (ValueError, struct.error) as e:
            if self._stats.count(getattr(e, "reason", "packet")) == 1:
                log.warning("gpuexec: dropped a malformed reply packet (%s)", e)
            return None
        finally:
            view.release()
            reader.release()

    def _overflow(self) -> None:
        """Deliver the message a ``BY_ZMQ`` marker announced (pump lock held): one a
        respawn's handshake read (:meth:`dispatch`), else the next from the reply socket;
        until it comes, a death (the monitor fails the calls), a close, or a while
        (dropped, counted as ``overflow_lost``)."""
        if self._stash:
            self._zmq.dispatch(self._stash.popleft())
            return
        table = self._table
        if self._zmq.receive_announced(lambda: table.closing, self._overflow_poller) or \
                table.closing:  # shutting down: nobody waits for it any more
            return
        if self._stats.count("overflow_lost") == 1:
            log.warning("gpuexec: a reply announced in a reply ring never came by ZeroMQ "
                        "(its worker died while sending it?); counting further ones")

    # -- a rank replaced -------------------------------------------------------------

    def dispatch(self, frames: list[Any]) -> None:
        """A message the respawn's handshake read from the reply socket: over this
        transport every one is announced by a marker in a ring, which will take it."""
        if not self._zmq.is_wake_up(frames):
            self._stash.append(frames)

    def forget(self, rank: int, sentinel: int) -> ShmSpec | None:
        """Stop watching the dead worker and give its rank a place on the rings (the
        protocol in :mod:`.shm_path`). What its ring still holds is taken first (late
        replies, dropped and counted), each marker with its message, so that no
        message it sent by ZeroMQ is left for another ring's marker."""
        if self._moved:
            self._catch_up()
        reader = self._shm.replies[rank]
        while (view := reader.try_read()) is not None:
            reply = self._decode_packet(reader, view)
            if reply is not None:
                self._table.deliver([reply])
        self._zmq.forget(rank, sentinel)
        for poller in (self._sentinel_poller, self._overflow_poller):
            unwatch(poller, sentinel)
        return self._shm.replace_rank(rank)

    def adopt(self, sentinel: int) -> None:
        self._zmq.adopt(sentinel)
        self._sentinel_poller.register(sentinel, zmq.POLLIN)
        self._overflow_poller.register(sentinel, zmq.POLLIN)
        self._shm.unlink()  # it has attached its reply ring: give up the path

    # -- wake-up and close ---------------------------------------------------------

    def wake(self) -> None:
        self._zmq.wake()
        self._shm.doorbell.poke()

    def close(self) -> None:
        self._zmq.close()
        self._shm.close()

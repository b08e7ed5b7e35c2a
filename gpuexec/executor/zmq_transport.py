"""The ZeroMQ transport: requests on one XPUB socket, replies on one PULL socket.

::

    channel ──encode once──▶ XPUB "req" (topic: every rank, or one per rank) ──▶ worker SUBs
    call table ◀──deliver── decode ◀── PULL "rep" ◀── worker PUSHes
                                          ▲
              wake(): a wake-up frame ────┘ (inproc PUSH, a random token)

A blocking caller receives with a plain blocking ``recv`` (``RCVTIMEO`` = its deadline):
no thread hand-off and no poll set to rebuild, which both cost tens of microseconds per
call on a busy host. Deaths and shutdown interrupt that ``recv`` with a wake-up frame:
a random token, so an empty (or any other) frame from a peer is counted as malformed,
never taken for a wake-up.

Fields and the threads that touch them (the locks are the channel's, see
:mod:`.channel`): ``_req``: the holder of the send lock; ``_rep``, ``_rcvtimeo``,
``_poller``, ``_decoder``: the holder of the pump lock; ``_waker``: the holder of the
wake lock; everything, by :meth:`close`, under all three.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from ..ipc.codec import (
    Decoder,
    MalformedMessage,
    UndecodableValue,
    recv_frames,
    recv_rest,
    send_frames,
)
from ..ipc.messages import ALL_TOPIC, Pong, Reply, ShmSpec, ToDriver
from .calls import CallTable, PendingCall
from .failures import undecodable_reply
from .transport import Transport

log = logging.getLogger("gpuexec")

ANNOUNCED_WAIT_S = 10.0   # an announced message is on its way: it comes at once, unless
#                          its sender died while ZeroMQ was still sending it
_ANNOUNCED_GRACE_S = 0.05  # after a death, for what ZeroMQ may still be reading
_ANNOUNCED_SLICE_MS = 100  # the wait re-checks that the channel is not closing this often


class ZmqTransport(Transport):
    """Requests and replies over ZeroMQ; see the module docstring."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], req: zmq.Socket[bytes],
                 rep: zmq.Socket[bytes], topics: Sequence[bytes], table: CallTable,
                 sentinels: Sequence[int]) -> None:
        self._req = req
        self._rep = rep
        self._topics = topics
        self._table = table
        self._stats = table.stats
        self._decoder: Decoder[ToDriver] = Decoder(ToDriver, allow_pickle=True,
                                                   where="the driver")
        self._rcvtimeo = -1
        self._wake_token = os.urandom(16)
        wake_endpoint = f"inproc://gpuexec-wake-{id(self):x}"
        rep.bind(wake_endpoint)
        self._waker = ctx.socket(zmq.PUSH)
        self._waker.setsockopt(zmq.LINGER, 0)
        self._waker.connect(wake_endpoint)
        self._poller = zmq.Poller()
        self._poller.register(rep, zmq.POLLIN)
        for fd in sentinels:
            self._poller.register(fd, zmq.POLLIN)

    # -- sending -------------------------------------------------------------------

    def send(self, ranks: Sequence[int], frames: list[Any]) -> bool:
        self.publish(ranks, frames)
        return True

    def publish(self, ranks: Sequence[int], frames: list[Any]) -> None:
        """Publish once for all ranks, or once per targeted rank (send lock held)."""
        every = len(ranks) == len(self._topics)
        if len(frames) == 1 and every:  # the common case
            self._req.send(ALL_TOPIC + frames[0])
            return
        header, buffers = frames[0], frames[1:]
        for topic in [ALL_TOPIC] if every else [self._topics[r] for r in ranks]:
            send_frames(self._req, [topic + header, *buffers])

    # -- receiving -----------------------------------------------------------------

    def recv_for(self, call: PendingCall, deadline: float | None) -> None:
        """Receive and dispatch replies until ``call`` is done (``deadline`` None), or
        one message before ``deadline`` (the caller then re-checks it).

        The hot path: one loop per reply, nothing re-computed inside it.
        """
        rep = self._rep
        dispatch = self.dispatch
        timeout_ms = -1 if deadline is None else \
            max(1, int((deadline - time.monotonic()) * 1000 + 0.999))
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

    def pump(self, timeout_ms: int) -> list[int]:
        fired: list[int] = []
        for sock, _ in self._poller.poll(timeout_ms):
            if sock is self._rep:
                # Drain what is queued; EVENTS avoids raising zmq.Again per wake-up.
                while self._rep.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self.dispatch(recv_frames(self._rep, zmq.NOBLOCK))
            else:
                self._poller.unregister(sock)
                fired.append(sock)
        return fired

    def drain(self) -> None:
        """Nothing to do: a ZeroMQ send never waits for room, so no sender needs it."""

    def dispatch(self, frames: list[Any]) -> None:
        """A message from the reply socket: decode and deliver it."""
        reply = self.decode(frames, self._decoder)
        if reply is not None:
            self._table.deliver([reply])

    def decode(self, frames: list[Any], decoder: Decoder[ToDriver]) -> Reply | Pong | None:
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
        except MalformedMessage as e:
            return self.not_decoded(e)

    def not_decoded(self, e: MalformedMessage) -> Reply | None:
        """What a reply that did not decode becomes: a value that could not be rebuilt
        ends its call with the error (see .failures); anything else is dropped and
        counted (logged once)."""
        if isinstance(e, UndecodableValue):
            reply = undecodable_reply(e)
            if reply is not None:
                return reply
            self._stats.count(e.reason)
            return None
        if self._stats.count(e.reason) == 1:
            log.warning("gpuexec: dropped a malformed reply (%s); counting further ones", e)
        return None

    def receive_announced(self, closing: Callable[[], bool], watch: zmq.Poller) -> bool:
        """Receive and deliver the next message of the reply socket, one another wire
        announced (the shared-memory transport's ``BY_ZMQ`` marker: its sender sent it
        first, so it is on its way). Waits until it comes, ``closing()``, or
        ``ANNOUNCED_WAIT_S``; shortly after any descriptor of ``watch`` (which also
        watches the reply socket) fires (a worker's death). False when it never came.
        Never raises: the caller may be the monitor thread."""
        rep, token = self._rep, self._wake_token
        deadline = time.monotonic() + ANNOUNCED_WAIT_S
        while not closing():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            events = dict(watch.poll(
                max(1, min(_ANNOUNCED_SLICE_MS, int(left * 1000 + 0.999)))))
            if events.pop(rep, 0):
                try:
                    frames = recv_frames(rep, zmq.NOBLOCK)
                except zmq.Again:  # pragma: no cover - POLLIN means a whole message
                    continue
                if len(frames) == 1 and frames[0] == token:
                    continue  # a wake-up frame: the loop re-checks the channel
                self.dispatch(frames)
                return True
            if events:  # a worker died: what ZeroMQ still holds comes within the grace
                deadline = min(deadline, time.monotonic() + _ANNOUNCED_GRACE_S)
        return False

    def is_wake_up(self, frames: list[Any]) -> bool:
        """Whether ``frames`` is this transport's own wake-up frame."""
        return len(frames) == 1 and frames[0] == self._wake_token

    # -- a rank replaced -------------------------------------------------------------

    def forget(self, rank: int, sentinel: int) -> ShmSpec | None:
        """The new worker subscribes and connects like the first one: nothing to hand it."""
        unwatch(self._poller, sentinel)
        return None

    def adopt(self, sentinel: int) -> None:
        self._poller.register(sentinel, zmq.POLLIN)

    # -- wake-up and close ---------------------------------------------------------

    def wake(self) -> None:
        self._waker.send(self._wake_token, zmq.NOBLOCK)

    def close(self) -> None:
        self._waker.close(linger=0)
        self._req.close(linger=0)
        self._rep.close(linger=0)


def unwatch(poller: zmq.Poller, fd: int) -> None:
    """Stop polling ``fd`` (a sentinel that already fired was unregistered then)."""
    try:
        poller.unregister(fd)
    except KeyError:
        pass

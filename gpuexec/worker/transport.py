"""The worker's side of the wire, as one of two transports chosen once at start-up.

Mirrors the driver's transports (:mod:`gpuexec.executor.transport`): a request loop asks
its transport for the next request and gives it each reply's frames; it never asks which
transport it has.

==================  ===============================  ====================================
transport           next request                     a reply
==================  ===============================  ====================================
ZeroMQ              SUB socket: the topic stripped,  PUSH socket
                    decoded without copying
shared memory       the broadcast ring: a packet     a packet in this worker's reply ring,
                    for this rank, decoded with its  the doorbell rung; too big for a
                    buffers copied (the slot is      slot: ZeroMQ, and a marker in the
                    reused); a marker: the request   ring that keeps the order
                    waits on ZeroMQ
==================  ===============================  ====================================

Both hand back a decoded :data:`~gpuexec.ipc.messages.ToWorker`, an
:class:`~gpuexec.ipc.codec.UndecodableValue` for a call whose arguments this worker cannot
rebuild (the loop answers it with the error), or None for a frame set dropped (counted by
the ``drop`` callback the loop passes in).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..ipc import futex, packets
from ..ipc.codec import Decoder, MalformedMessage, UndecodableValue, recv_rest, send_frames
from ..ipc.doorbell import Doorbell
from ..ipc.forecast import ArrivalForecast
from ..ipc.messages import ALL_TOPIC, ShmSpec, ToWorker, rank_topic
from ..ipc.shm_ring import RingReader, RingWriter

_ALL = ALL_TOPIC[0]

Next = ToWorker | UndecodableValue | None
Drop = Callable[[Exception], None]


class ZmqWorkerTransport:
    """Requests from the SUB socket, replies on the PUSH socket (single-threaded: the
    request loop reads, the reply gate sends)."""

    def __init__(self, sub: zmq.Socket[bytes], push: zmq.Socket[bytes], rank: int,
                 decoder: Decoder[ToWorker], drop: Drop) -> None:
        self.sub = sub
        self.push = push
        self.topic = rank_topic(rank)
        self.decoder = decoder
        self.drop = drop

    def next(self) -> Next:
        """The next request (blocks until one comes)."""
        sub = self.sub
        first = sub.recv(copy=False)
        header = first.bytes or b"\x00"  # an empty frame is nothing a driver sends
        body = memoryview(header)[1 if header[0] == _ALL else len(self.topic):]
        try:
            if first.more:
                frames = recv_rest(sub, header)
                frames[0] = body
                return self.decoder.decode(frames)
            return self.decoder.decode_header(body)
        except UndecodableValue as e:
            return e
        except MalformedMessage as e:
            self.drop(e)
            return None

    def send(self, frames: list[Any]) -> None:
        send_frames(self.push, frames)

    def served(self) -> None:
        """The serving thread's reply to the request it took last is out (nothing to
        learn here: see :meth:`ShmWorkerTransport.served`)."""


class ShmWorkerTransport:
    """Requests from the broadcast ring, replies into this worker's ring; ZeroMQ (a
    :class:`ZmqWorkerTransport` it holds) for what does not fit a slot (see the module
    docstring)."""

    def __init__(self, sub: zmq.Socket[bytes], push: zmq.Socket[bytes], rank: int,
                 decoder: Decoder[ToWorker], drop: Drop, spec: ShmSpec,
                 ring_decoder: Decoder[ToWorker]) -> None:
        self.zmq = ZmqWorkerTransport(sub, push, rank, decoder, drop)  # the overflow
        self.drop = drop
        self.rank = rank
        self.ring_decoder = ring_decoder  # copies buffers: the ring slot is reused
        # Forecasting arrivals means spinning around them: only where spinning is allowed
        # (the driver sets spin 0 on a host without a core for every spinner).
        forecast = None
        if spec.spin > 0:
            forecast = ArrivalForecast()
            futex.set_timer_slack(1000)  # this (the serving) thread's timed sleeps on time
        self.forecast = forecast
        self.request = RingReader(spec.request, rank, spin=spec.spin, forecast=forecast)
        self.reply = RingWriter.attach(spec.reply)
        self.doorbell = Doorbell(spec.doorbell)
        # Every reply (a marker too) rings the doorbell, after the publish's own fence.
        self.reply.ring_on_publish(self.doorbell.view, self.doorbell.base)

    def next(self) -> Next:
        view = self.request.read_frame()
        if type(view) is bytes:  # one frame for every rank: almost every request,
            try:                 # taken from the ring in one call (slot released)
                return self.ring_decoder.decode_header(view)
            except UndecodableValue as e:
                return e
            except MalformedMessage as e:
                self.drop(e)
                return None
        if not isinstance(view, memoryview):  # pragma: no cover - no timeout was given
            return None
        try:
            if not packets.for_rank(view, self.rank):
                return None
            kind, frames = packets.unpack(view)
            if kind == packets.BY_ZMQ:
                return self.zmq.next()
            if len(frames) > 1:
                return self.ring_decoder.decode(frames)
            return self.ring_decoder.decode_header(frames[0])
        except UndecodableValue as e:
            return e
        except (MalformedMessage, ValueError, struct.error) as e:
            self.drop(e)
            return None
        finally:
            view.release()
            self.request.release()

    def send(self, frames: list[Any]) -> None:
        # The doorbell is rung by the publish (see __init__). Almost every reply is one
        # frame (packets.put's first case, taken here without the call).
        if not (self.reply.put_one(frames[0]) if len(frames) == 1 and
                type(frames[0]) is bytes else packets.put(self.reply, frames, None)):
            self.zmq.send(frames)  # too big for a slot: ZeroMQ, and a marker
            self.reply.write(packets.pack_marker(None))

    def served(self) -> None:
        """The serving thread's reply to the request it took last is out: the arrival
        forecast learns when that request came and when it was answered (the next one may
        be timed from either), now that the driver has the reply. Only the serving
        thread: a deferred reply, sent from another thread, teaches it nothing."""
        if self.forecast is not None:
            self.request.answered(time.monotonic())


WorkerTransport = ZmqWorkerTransport | ShmWorkerTransport  # the request loop's wire

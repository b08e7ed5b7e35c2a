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
                    waits on ZeroMQ; a call by name  (a reply of one frame the core
                    answered in the ring core (see   could make: written by it)
                    below)
==================  ===============================  ====================================

Both hand back a decoded :data:`~gpuexec.ipc.messages.ToWorker`, an
:class:`~gpuexec.ipc.codec.UndecodableValue` for a call whose arguments this worker cannot
rebuild (the loop answers it with the error), or None for a frame set dropped (counted by
the ``drop`` callback the loop passes in).

Over shared memory, a call by name is answered by the ring core: one without arguments
(the hot path's no-op, a serving engine's step by name) once the loop has served a call of
that name (the core then recognises its header by its bytes, without decoding it), one
with arguments decoded by the core calling this transport's decoder. The core runs the
method armed for cancellation as the loop would and writes its reply itself (a None
result's cached bytes; another value's frame, made by the encoder when the value is plain
msgpack data), with no Python between two such calls but the method and those two
codec calls; whatever it cannot finish (an exception, a value it did not send, a Future,
a closed reply gate, a full reply ring) comes back to the loop as a
:class:`~gpuexec.ipc.shm_ring.Ran`, answered as the loop answers its own calls, and any
other request (a callable, a call for one rank's value, a ping, shutdown) as the decoded
message. Only while no reply can come from another thread: once a method returned a
Future (a deferred reply), the loop serves every request itself; and after a
cancellation the loop serves the next ``max_inflight_calls`` requests (it looks each up
on the cancel board first).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import zmq

from ..ipc import futex, packets
from ..ipc.codec import (
    Decoder,
    Encoder,
    MalformedMessage,
    UndecodableValue,
    around_id,
    none_reply_parts,
    recv_rest,
    send_frames,
)
from ..ipc.doorbell import Doorbell
from ..ipc.forecast import ArrivalForecast
from ..ipc.messages import ALL_TOPIC, Call, ShmSpec, ToWorker, rank_topic
from ..ipc.shm_ring import Ran, RingReader, RingWriter
from .deferred import ReplyGate

_ALL = ALL_TOPIC[0]

Next = ToWorker | UndecodableValue | None
Drop = Callable[[Exception], None]
_NAMES_ANSWERED = 1024  # method names the ring core answers calls of, at most


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

    def next(self) -> Next | Ran:
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

    def answer_in_core(self, target: object, cancel: object, gate: ReplyGate,
                       max_reply: int, encoder: Encoder) -> None:
        """Nothing here: every request is decoded and answered by the loop (see
        :meth:`ShmWorkerTransport.answer_in_core`)."""

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
        # Calls the core answers (see answer_in_core): the reply gate (None: none answered
        # there), and a bare call header's method part -> the method's name.
        self._gate: ReplyGate | None = None
        self._call_before = b""
        self._bare_calls: dict[bytes, str] = {}
        self._learned: set[str] = set()

    def answer_in_core(self, target: object, cancel: object, gate: ReplyGate,
                       max_reply: int, encoder: Encoder) -> None:
        """From now on, let the ring core answer calls by name back to back without
        Python between them (:meth:`RingReader.serve`): a bare call (no arguments) of a
        name this worker has served once, known by its bytes, and any call by name with
        arguments (plain ones read by the core itself, others decoded by this transport's
        decoder); ``getattr(target, name)(...)`` run with ``cancel`` armed, and its reply
        published (a None result's cached bytes, a plain value written by the core,
        another value's frame when ``encoder`` makes one without its walk), unless the
        gate is closed or a reply of ``max_reply`` bytes (>= 0) would be too long. A call
        the core cannot finish comes back from :meth:`next` as a :class:`Ran` for the
        loop to answer; any other request as the decoded message. Only while ``gate`` is
        not shared (no reply from another thread can be under way): a worker whose method
        returned a Future keeps the Python loop."""
        self._call_before = around_id(lambda i: Call(i, "m", None, [], {}))[0]
        self.request.answer_in_core(self.reply, self._call_before, self._bare_calls,
                                    none_reply_parts(self.rank), max_reply, target, cancel,
                                    gate, self.ring_decoder.decode_header, Call,
                                    partial(encoder.value_reply, self.rank))
        self._gate = gate

    def next(self) -> Next | Ran:
        gate = self._gate
        got = self.request.serve() if gate is not None and not gate.shared else \
            self.request.read_frame()
        if type(got) is bytes:  # one frame for every rank, taken from the ring in one
            try:                # call (slot released), not decoded by the core
                msg = self.ring_decoder.decode_header(got)
            except UndecodableValue as e:
                return e
            except MalformedMessage as e:
                self.drop(e)
                return None
        elif isinstance(got, memoryview):
            return self._packet(got)
        elif got is None:
            return None
        elif got.__class__ is Ran:
            if got.frame is None:
                return got
            # Its reply, made by the core, found no room in the ring or is longer than a
            # slot: sent from here as the loop would send it (the core saw the gate open).
            self.send([got.frame])
            self.served()
            return None
        else:
            msg = cast(ToWorker, got)  # decoded by the core
        if gate is not None and msg.__class__ is Call and msg.fn is None and \
                not msg.args and not msg.kwargs and msg.value_rank < 0:
            self._learn(msg.method)  # the core answers the next calls of that name
        return msg

    def _packet(self, view: memoryview) -> Next | Ran:
        """The request in a packet read in place (several frames, a long frame, a marker
        for a request that went by ZeroMQ, or one for other ranks)."""
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

    def _learn(self, name: str) -> None:
        """Let the core answer calls of ``name`` by their header's method part (not a
        dunder: the loop refuses those; at most a bounded number of names)."""
        if name in self._learned or name.startswith("__"):
            return
        if len(self._learned) >= _NAMES_ANSWERED:
            self._learned.clear()  # names made up at run time: never grow without bound
            self._bare_calls.clear()
        self._learned.add(name)
        try:
            before, after = around_id(lambda i: Call(i, name, None, [], {}))
        except (OverflowError, UnicodeEncodeError):  # a lone surrogate in the name
            return
        if before == self._call_before:
            self._bare_calls[after] = name

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

"""A bounded shared-memory ring: one writer, ``n_readers`` readers, every message read by
every reader (a broadcast), with an adaptive spin and then a futex sleep.

Layout of the segment (little-endian; hot words of different writers on different
64-byte cache lines)::

    offset 0      magic "GPXRING1", version, n_slots, slot_size, n_readers
    offset 64     write_seq  u64   messages published so far (the writer's only word)
    offset 72     futex      u32   low 32 bits of write_seq: what readers sleep on
    offset 128    sleeping   u8 x n_readers (lines of 64): reader i sleeps on the futex
    readers_off + 64*i   reader i: read_seq u64 (messages it has released)
    data_offset   n_slots slots of slot_size bytes:
                  [length u32][pad u32][published u64: CLOCK_MONOTONIC ns][payload]

The sleeping flags share lines (a reader writes its flag only on its way to and from
sleep), so the writer checks every reader with one cache-line read per publish instead of
one per reader; the writer also remembers the slowest reader's position and reads the
readers' lines again only when that says the ring may be full. Both matter with many
readers: each read of a line another core wrote costs a cache miss.

Message ``seq`` lives in slot ``seq % n_slots``. Slot states, as the writer and reader i
see them (who moves each transition):

    ===========  ==============================================  ====================
    state        condition                                       next
    ===========  ==============================================  ====================
    free         every read_seq_i > seq - n_slots                writer fills it
    written      payload stored, write_seq == seq (not yet       writer publishes
                 published)
    readable     write_seq > seq, read_seq_i == seq              reader i reads it in
                                                                 place, then releases
    released     read_seq_i > seq for every i                    free again
    ===========  ==============================================  ====================

The writer never overwrites a slot some reader has not released (backpressure: it waits,
with a deadline). A reader reads in place (zero copy) until it calls :meth:`release`.

Waiting, reader side: spin on ``write_seq`` for ``spin`` seconds (a back-to-back call
keeps spin latency), then set its ``sleeping`` flag, re-check, and ``FUTEX_WAIT`` on the
futex word (an idle reader costs no CPU). The writer, after publishing, wakes the futex
only if some reader sleeps (a worker's reply ring also rings the driver's doorbell, see
:meth:`RingWriter.ring_on_publish`, after the same fence). Dekker-style, each side
stores its own word, fences, then reads the other's: either the writer sees the flag or
the reader sees the new sequence.
Every futex wait also has a timeout, so even a lost wake-up is bounded. A reader given an
:class:`~gpuexec.ipc.forecast.ArrivalForecast` learns the gap between publish times and,
when requests come regularly, sleeps only until just before the next one is due and
spins across its expected arrival (see that module).

Memory ordering and the waits are the ring core's (:mod:`.ringcore`): the compiled one
publishes with a release store and reads with an acquire load, spins and sleeps with the
GIL released; its pure-Python twin does the same on the same bytes with a lock as its
fence. This module keeps the bookkeeping (sequences, slot offsets, the forecast) and asks
the core for every load and store another process may race with.

Version 4 is the first layout both cores share (the offsets above are also named in
``_ringcore.c`` and ``ringcore_py.py``); a reader refuses a ring of another version.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from . import ringcore
from .forecast import ArrivalForecast
from .memfile import MemFile

MAGIC = b"GPXRING1"
VERSION = 4
_HEADER = struct.Struct("<8sIIII")   # magic, version, n_slots, slot_size, n_readers
_WRITE_SEQ_OFF = 64
_SLEEPING_OFF = 128
_LINE = 64
_SLOT_HEADER = 16
_PUBLISHED_OFF = 8      # in a slot: the publish time, CLOCK_MONOTONIC ns
_ONE_HEAD = 9           # the head of a packet of one frame for every rank (.packets)
# A frame up to this long is copied out of its slot (one core call, the slot free at
# once); a longer one is read in place (see RingReader.take_frame).
TAKEN_MAX = 16 << 10
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_INF = math.inf


class RingSpec(msgspec.Struct, frozen=True):
    """How a reader finds a ring: sent to workers in their start-up spec."""

    path: str
    n_slots: int
    slot_size: int
    n_readers: int


class Ran(NamedTuple):
    """A call whose method the ring core ran and that Python answers (see
    :meth:`RingReader.serve`): what the method returned, or the exception it raised;
    ``frame``: the reply the core made of the value but found no room for, or no slot it
    fits (to send as it is; None: none made)."""

    call_id: int
    method: str
    value: Any
    error: BaseException | None
    frame: bytes | None = None


# What the core's serve() answers: (what next_frame would, or a message it decoded and
# its publish time; a Ran's fields and publish time; (published_ns, replied) of each call
# the core answered).
_Served = tuple[tuple[Any, int] | bool | None,
                tuple[int, str, Any, BaseException | None, int, bytes | None] | None,
                list[tuple[int, float]] | None]


class RingTimeout(TimeoutError):
    """A ring operation's deadline passed."""


def _readers_offset(n_readers: int) -> int:
    return _SLEEPING_OFF + _LINE * ((n_readers + _LINE - 1) // _LINE)


def _data_offset(n_readers: int) -> int:
    end = _readers_offset(n_readers) + _LINE * n_readers
    return (end + 4095) // 4096 * 4096


def segment_size(n_slots: int, slot_size: int, n_readers: int) -> int:
    return _data_offset(n_readers) + n_slots * slot_size


if TYPE_CHECKING:
    _WriterFields = object
else:  # its position in a C struct when the compiled core is built (see ringcore.fields)
    _WriterFields = ringcore.fields("WriterFields")


class RingWriter(_WriterFields):
    """The single writer of a ring. Not thread-safe: one thread writes (the caller's lock).

    Its position (``_seq``, ``_min_read``, ``_claimed``) lives in its base class's C
    struct when the compiled core is built, where the driver's compiled round trip
    reads and advances it as :meth:`put_one` does (:func:`.ringcore.fields`)."""

    def __init__(self, n_readers: int, *, n_slots: int = 8, slot_size: int = 1 << 20) -> None:
        if n_readers < 1 or n_slots < 2 or slot_size < 64:
            raise ValueError("a ring needs a reader, two slots and slots of 64 bytes or more")
        mapped = MemFile(None, segment_size(n_slots, slot_size, n_readers), "gpuexec-ring")
        _HEADER.pack_into(mapped.view, 0, MAGIC, VERSION, n_slots, slot_size, n_readers)
        self._bind(RingSpec(mapped.path, n_slots, slot_size, n_readers), mapped)

    def _bind(self, spec: RingSpec, mapped: MemFile) -> None:
        self._m = mapped
        self._core = ringcore.current()
        self._view = mapped.view
        self._base = mapped.base
        self.spec = spec
        self._n_slots = spec.n_slots
        self._slot_size = spec.slot_size
        self._n_readers = spec.n_readers
        self._seq = int(_U64.unpack_from(mapped.view, _WRITE_SEQ_OFF)[0])
        self._data = _data_offset(spec.n_readers)
        self._first_reader = _readers_offset(spec.n_readers)
        self._min_read = 0  # the slowest reader's read_seq when last looked at
        self.max_message = spec.slot_size - _SLOT_HEADER
        self._claimed: memoryview | None = None  # the slot claim() handed out
        self._claimed_off = -1                    # the claimed slot's offset (-1: none)
        self._bell_view: memoryview | None = None  # a doorbell publish rings (see
        self._bell_base = 0                        # ring_on_publish; 0: none)

    @classmethod
    def attach(cls, spec: RingSpec) -> RingWriter:
        """Become the writer of a ring another process created (and may already have
        unlinked: attach before that)."""
        mapped = MemFile(spec.path, None, "a ring", _SLEEPING_OFF)
        if len(mapped.mm) != segment_size(spec.n_slots, spec.slot_size, spec.n_readers):
            mapped.close()
            raise ValueError(f"{spec.path} is not the ring described by {spec}")
        self = cls.__new__(cls)
        self._bind(spec, mapped)
        return self

    def detach(self) -> None:
        """Unmap, keeping the path open until :meth:`unlink` (the creator hands the ring
        to a writer in another process)."""
        self._m.unmap()

    def unlink(self) -> None:
        """Give up the path (see :class:`~gpuexec.ipc.memfile.MemFile`); mappings stay
        valid until unmapped.
        Called once every reader and the writer have opened the ring."""
        self._m.unlink()

    def _min_read_seq(self) -> int:
        self._min_read = self._core.min_read(self._view, self._base, self._first_reader,
                                             self._n_readers)
        return self._min_read

    def write(self, payload: bytes | bytearray | memoryview, timeout: float | None = None,
              alive: Callable[[], bool] | None = None) -> bool:
        """Publish ``payload`` to every reader. False when it does not fit in a slot (send
        it another way). Waits while the ring is full; raises :class:`RingTimeout` after
        ``timeout`` or as soon as ``alive()`` is false."""
        slot = self.claim(len(payload), timeout, alive)
        if slot is None:
            return False
        slot[:] = payload
        self.publish()
        return True

    def claim(self, n: int, timeout: float | None = None,
              alive: Callable[[], bool] | None = None) -> memoryview | None:
        """The next slot's ``n`` payload bytes, to fill in place and then :meth:`publish`
        (the two halves of :meth:`write`, for a writer that can build its message
        straight into shared memory); None when ``n`` does not fit in a slot. Waits for
        room like :meth:`write`. A claim never published (an exception while filling
        it) is dropped by the next claim: the sequence had not moved."""
        off = self._next_slot(n, timeout, alive)
        if off < 0:
            return None
        _U32.pack_into(self._view, off, n)
        self._claimed_off = off
        self._claimed = self._view[off + _SLOT_HEADER:off + _SLOT_HEADER + n]
        return self._claimed

    def put_one(self, frame: bytes, timeout: float | None = None,
                alive: Callable[[], bool] | None = None) -> bool:
        """Publish a packet of one frame for every reader (``frame``: its only frame; see
        :mod:`.packets`), claimed here, written and published by one call into the core:
        the hot path's send. False when it does not fit in a slot. Waits for room as
        :meth:`write` does."""
        seq = self._seq
        if self._min_read > seq - self._n_slots and self._claimed is None and \
                len(frame) + _ONE_HEAD <= self.max_message:  # room, as last seen: no wait
            off = self._data + (seq % self._n_slots) * self._slot_size
        else:
            off = self._next_slot(len(frame) + _ONE_HEAD, timeout, alive)
            if off < 0:
                return False
        self._seq += 1
        self._core.put_one(self._view, self._base, off, frame, self._seq, self._n_readers,
                           self._bell_view, self._bell_base)
        return True

    def _next_slot(self, n: int, timeout: float | None,
                   alive: Callable[[], bool] | None) -> int:
        """The offset of the next slot once it is free (waiting for room), for a message
        of ``n`` bytes; -1 when that does not fit in a slot. Drops an unpublished claim."""
        if self._claimed is not None:
            self._claimed.release()
            self._claimed = None
        self._claimed_off = -1
        if n > self.max_message:
            return -1
        seq = self._seq
        oldest = seq - self._n_slots  # the message whose slot this one takes
        if self._min_read <= oldest and self._min_read_seq() <= oldest:
            self._wait_for_space(seq, timeout, alive)
        return self._data + (seq % self._n_slots) * self._slot_size

    def put_params(self) -> tuple[int, ...] | None:
        """What a compiled sender needs to write this ring's next one-frame packet itself,
        as :meth:`put_one` does when there is room: the base address, the data offset,
        ``n_slots``, ``slot_size``, ``max_message``, ``n_readers`` and the doorbell's base
        (fixed for the writer's life); None when this writer runs on the pure-Python core.
        It reads ``_seq``, ``_min_read`` and ``_claimed``, calls ``_min_read_seq`` and
        advances ``_seq`` as :meth:`put_one` does (the driver's round trip,
        ``executor/_calltable.c``)."""
        if self._core.NAME != "compiled":
            return None
        return (self._base, self._data, self._n_slots, self._slot_size, self.max_message,
                self._n_readers, self._bell_base)

    def catch_up(self) -> None:
        """The core published messages of this writer itself (a reader's serve()): take
        up its position from the ring (the writer's own word)."""
        self._seq = int(_U64.unpack_from(self._view, _WRITE_SEQ_OFF)[0])

    def ring_on_publish(self, view: memoryview, base: int) -> None:
        """Ring the doorbell at ``(view, base)`` (:class:`~gpuexec.ipc.doorbell.Doorbell`)
        with every publish, after the same fence (a worker's reply ring)."""
        self._bell_view, self._bell_base = view, base

    def publish(self) -> None:
        """Make the claimed slot readable and wake sleeping readers (one call into the
        core: the time stamp, the release store of the sequence, one fence, the wake of
        the ring's readers and of the doorbell's waiter, each only if it sleeps)."""
        off = self._claimed_off
        if off < 0:
            raise RuntimeError("nothing claimed")
        self._claimed_off = -1
        if self._claimed is not None:
            self._claimed.release()
            self._claimed = None
        self._seq += 1
        self._core.publish(self._view, self._base, off, self._seq, self._n_readers,
                           self._bell_view, self._bell_base)

    def _wait_for_space(self, seq: int, timeout: float | None,
                        alive: Callable[[], bool] | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        nap = 1e-5
        while self._min_read_seq() <= seq - self._n_slots:
            if alive is not None and not alive():
                raise RingTimeout("a reader is gone")
            if deadline is not None and time.monotonic() >= deadline:
                raise RingTimeout(f"the ring stayed full for {timeout:g} s (a slow reader)")
            time.sleep(nap)
            nap = min(nap * 2, 1e-3)

    def skip_reader(self, index: int) -> None:
        """Move reader ``index`` to the writer's position and mark it awake: a reader that
        joins in place of a dead one (same index) starts with the next message published
        and never sees what was addressed to its predecessor. Call it with the writer's
        lock held and before the new reader opens the ring (it reads its position once,
        when it opens)."""
        self._view[_SLEEPING_OFF + index] = 0
        self._core.release(self._view, self._base, self._first_reader + _LINE * index,
                           self._seq)
        self._min_read = 0  # look again at every reader before the next claim

    def close(self) -> None:
        if self._claimed is not None:
            self._claimed.release()
            self._claimed = None
        self._claimed_off = -1
        self._m.close()


class RingReader:
    """Reader ``index`` of a ring. Not thread-safe: one thread reads."""

    def __init__(self, spec: RingSpec, index: int, *, spin: float = 100e-6,
                 forecast: ArrivalForecast | None = None) -> None:
        if not 0 <= index < spec.n_readers:
            raise ValueError(f"reader index {index} out of range")
        self._m = MemFile(spec.path, None, "a ring", _SLEEPING_OFF)
        magic, version, n_slots, slot_size, n_readers = _HEADER.unpack_from(self._m.view, 0)
        if (magic, version, n_slots, slot_size, n_readers) != \
                (MAGIC, VERSION, spec.n_slots, spec.slot_size, spec.n_readers) or \
                len(self._m.mm) != segment_size(n_slots, slot_size, n_readers):
            self._m.close()
            raise ValueError(f"{spec.path} is not the ring described by {spec}")
        self.spec = spec
        self.spin = spin
        self.forecast = forecast
        self._core = ringcore.current()
        self._view = self._m.view
        self._base = self._m.base
        self._n_slots = n_slots
        self._slot_size = slot_size
        self._off = _readers_offset(n_readers) + _LINE * index
        self._flag = _SLEEPING_OFF + index
        self._seq = int(_U64.unpack_from(self._m.view, self._off)[0])
        self._holding = False
        self._arrived = 0  # publish time (ns) of a message read_frame took, not yet learned
        self._spun = False  # serve() spun after its last answer: the next wait sleeps first
        self._answer: Callable[[float], _Served] | None = None  # see answer_in_core
        self._answer_writer: RingWriter | None = None
        # Per slot: the offset of its length word and a view of its payload bytes, made
        # once (a message is then one slice of a view, no offset computed per read);
        # released by close(), before the segment is unmapped.
        first = _data_offset(n_readers)
        self._lengths = [first + i * slot_size for i in range(n_slots)]
        self._payloads: list[memoryview[int]] = [
            self._view[at + _SLOT_HEADER:at + slot_size] for at in self._lengths]

    @property
    def address(self) -> tuple[memoryview, int]:
        """``(view, base)`` of the segment, for the core's gather over reply rings."""
        return self._view, self._base

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(first slot's offset, n_slots, slot_size)``, for the core's collect."""
        return self._lengths[0], self._n_slots, self._slot_size

    def catch_up(self) -> None:
        """The core released messages of this reader itself (collect): take up its
        position from the ring (the reader's own word; nothing is held meanwhile)."""
        self._seq = int(_U64.unpack_from(self._view, self._off)[0])

    def poll(self) -> bool:
        """Whether a message is waiting (no wait)."""
        return self._core.published(self._view, self._base) > self._seq

    def read(self, timeout: float | None = None) -> memoryview | None:
        """The next message, read in place (valid until :meth:`release`); None when
        ``timeout`` passes first."""
        if self._core.published(self._view, self._base) <= self._seq and \
                not self._wait(self._seq, timeout):
            return None
        return self.try_read()

    def try_read(self) -> memoryview | None:
        """The next message if one is waiting, else None at once (:meth:`poll` and
        :meth:`read` in one look at the sequence)."""
        if self._holding:
            raise RuntimeError("release() the previous message first")
        if self._arrived:
            self.answered(None)
        view = self._view
        if self._core.published(view, self._base) <= self._seq:
            return None
        slot = self._seq % self._n_slots
        n = _U32.unpack_from(view, self._lengths[slot])[0]
        if self.forecast is not None:
            self.forecast.observe(_U64.unpack_from(
                view, self._lengths[slot] + _PUBLISHED_OFF)[0] * 1e-9)
        self._holding = True
        message: memoryview = self._payloads[slot][:n]
        return message

    def take_frame(self) -> bytes | None:
        """The next message's frame when it is a packet of one frame of at most
        :data:`TAKEN_MAX` bytes for every reader (almost every message; see
        :mod:`.packets`): copied out, its slot released, in one call into the core. None,
        leaving it to :meth:`try_read`, for any other message or none."""
        if self._holding:
            raise RuntimeError("release() the previous message first")
        if self._arrived:
            self.answered(None)
        taken = self._core.take_frame(self._view, self._base, self._off, self._lengths[0],
                                      self._n_slots, self._slot_size, TAKEN_MAX)
        if taken is None:
            return None
        self._seq += 1
        if self.forecast is not None:
            self.forecast.observe(taken[1] * 1e-9)
        return taken[0]

    def read_frame(self, timeout: float | None = None) -> bytes | memoryview | None:
        """The next message as :meth:`take_frame` gives it, or else as :meth:`read` does
        (a held view: :meth:`release` it); None when ``timeout`` passes first. Unless the
        forecast has a window to sleep through, the wait and the take are one call into
        the core (a worker's wait for its next request: the hot path), and what the
        forecast learns from the arrival waits for :meth:`answered` (after the reply is
        out, off the request's path) or the next read."""
        if self._holding:
            raise RuntimeError("release() the previous message first")
        if self._arrived:
            self.answered(None)
        forecast = self.forecast
        window = forecast.window() if forecast is not None and forecast.regular else None
        if window is not None:
            if self._core.published(self._view, self._base) <= self._seq and \
                    not self._wait_phases(self._seq, timeout, window):
                return None
            frame = self.take_frame()
            return self.try_read() if frame is None else frame
        got = self._core.next_frame(self._view, self._base, self._off, self._flag,
                                    self._lengths[0], self._n_slots, self._slot_size,
                                    TAKEN_MAX, self.spin, _INF if timeout is None else timeout)
        if got is True:  # another kind of message: read in place
            return self.try_read()
        if got is False:
            return None
        self._seq += 1
        if forecast is not None:
            self._arrived = got[1]
        return got[0]

    def answer_in_core(self, writer: RingWriter, call_before: bytes, calls: dict[bytes, str],
                       reply_parts: tuple[bytes, bytes], max_reply: int, target: object,
                       cancel: object, gate: object, decode: Callable[[bytes], Any] | None,
                       call_type: type, reply_frame: Callable[[int, Any], bytes | None]
                       ) -> None:
        """Let :meth:`serve` answer requests in the core, without Python between them:

        * a bare call the core knows by its bytes (``call_before`` + an id + a method part
          ``calls`` maps to a name; the dict is read at every request: the caller may
          add names) is taken without decoding and ``getattr(target, name)()`` run;
        * a call by name whose arguments are plain msgpack data is read by the core
          itself (the objects ``decode`` would give) and run the same way;
        * any other request of one frame for every rank is taken and given to
          ``decode`` (None: left to the caller undecoded); a ``call_type`` message by
          name with arguments (no callable, every rank's value wanted, no dunder name)
          has ``getattr(target, method)(*args, **kwargs)`` run; any other message is
          handed to the caller decoded;

        each with ``cancel`` armed (its ``running``, ``method`` and ``armed``, as the
        request loop sets them; never while ``cancel.recheck``). Unless ``gate.closed``,
        a None result's reply ``reply_parts[0]`` + id + ``reply_parts[1]`` (what the
        encoder's ``none_reply`` gives), a plain value's reply as the encoder writes it
        (written by the core), or any other value's frame as ``reply_frame(id, value)``
        makes it (None: left to Python), is published into
        ``writer``'s ring (a ring of one reader; the caller makes sure nobody else writes
        it while :meth:`serve` runs). Bound once: the rings' shapes, this reader's spin
        and the objects above."""
        self._answer = partial(
            self._core.serve, self._view, self._base, self._off, self._flag,
            self._lengths[0], self._n_slots, self._slot_size, TAKEN_MAX, self.spin, _INF,
            writer._view, writer._base, writer._data, writer._n_slots, writer._slot_size,
            writer._bell_view, writer._bell_base, call_before, calls, reply_parts[0],
            reply_parts[1], max_reply, target, cancel, gate, decode, call_type, reply_frame)
        self._answer_writer = writer

    def serve(self) -> Any:
        """:meth:`read_frame` (no timeout) that lets the core answer calls as
        :meth:`answer_in_core` said. Returns the first request left to Python: as
        :meth:`read_frame` gives it (bytes: a frame the decoder refused, or one read
        without it), or the message the decoder made of it; a :class:`Ran` for a call
        whose method ran in the core and that Python answers (it raised, returned a value
        the core did not send, the gate was closed, the reply ring was full or the reply
        over ``max_reply`` (>= 0) bytes or longer than a slot; with the reply's frame when
        the core made one); None after a pass that answered calls and saw no further one
        within ``spin`` (the next wait then starts with its sleep, or with the
        forecast's window: what the core answered is learned first, the last
        :data:`~gpuexec.ipc.forecast.HISTORY` calls of it in order). With a forecast
        window open, the wait is :meth:`read_frame`'s and nothing is answered."""
        if self._holding:
            raise RuntimeError("release() the previous message first")
        if self._arrived:
            self.answered(None)
        forecast = self.forecast
        if forecast is not None and forecast.regular and forecast.window() is not None:
            self._spun = False  # (the window's phases have their own spin)
            return self.read_frame()
        answer, writer = self._answer, self._answer_writer
        if answer is None or writer is None:
            raise RuntimeError("answer_in_core() first")
        first_spin, self._spun = (0.0 if self._spun else self.spin), False
        try:
            got, ran, records = answer(first_spin)
        except BaseException:  # (a signal handler's): what the core did is in the rings
            self.catch_up()
            writer.catch_up()
            raise
        if records is not None or ran is not None:  # the core answered: positions moved
            self.catch_up()
            writer.catch_up()
        elif got.__class__ is tuple:
            self._seq += 1  # taken as next_frame takes it
        if records is not None and forecast is not None:
            for published, replied in records:
                forecast.observe(published * 1e-9)
                forecast.replied(replied)
        if ran is not None:
            if forecast is not None:
                self._arrived = ran[4]
            return Ran(*ran[:4], ran[5])
        if got is True:
            return self.try_read()
        if not got:  # False: after answering, nothing came (None comes with a Ran only)
            self._spun = True
            return None
        if forecast is not None:
            self._arrived = got[1]
        return got[0]

    def answered(self, when: float | None) -> None:
        """The forecast learns the arrival of the message :meth:`read_frame` took last
        (if it has not yet) and, given ``when`` (time.monotonic), that the reader
        answered it then. The reading thread calls it; without a forecast it does
        nothing."""
        forecast = self.forecast
        if forecast is None:
            return
        if self._arrived:
            forecast.observe(self._arrived * 1e-9)
            self._arrived = 0
        if when is not None:
            forecast.replied(when)

    def release(self) -> None:
        """Done with the message: its slot may be overwritten."""
        if not self._holding:
            return
        self._holding = False
        self._seq += 1
        self._core.release(self._view, self._base, self._off, self._seq)

    def _wait(self, seq: int, timeout: float | None) -> bool:
        """Wait for message ``seq``: the phases of :mod:`.forecast` (see
        :meth:`_wait_phases`), or a spin and then a sleep when it offers no window."""
        forecast = self.forecast
        window = forecast.window() if forecast is not None and forecast.regular else None
        if window is not None:
            return self._wait_phases(seq, timeout, window)
        start = time.monotonic()
        deadline = _INF if timeout is None else start + timeout
        return self._core.wait(self._view, self._base, seq, self._flag,
                               min(start + self.spin, deadline), deadline)

    def _wait_phases(self, seq: int, timeout: float | None,
                     window: tuple[float, float]) -> bool:
        """Wait for message ``seq`` through the forecast's ``window``: each phase of
        :mod:`.forecast` one call into the core (which spins and sleeps with the GIL
        released)."""
        wait, view, base, flag = self._core.wait, self._view, self._base, self._flag
        start = time.monotonic()
        deadline = _INF if timeout is None else start + timeout
        # Spin after a message unless the forecast says the next one is far off.
        if window[0] < start + self.spin:
            if wait(view, base, seq, flag, min(start + self.spin, deadline), 0.0):
                return True
        assert self.forecast is not None
        wake_at, spin_until = min(window[0], deadline), min(window[1], deadline)
        if wake_at > start:
            if wait(view, base, seq, flag, 0.0, wake_at):
                return True
            self.forecast.woke(wake_at, time.monotonic())
        if wait(view, base, seq, flag, spin_until, 0.0):
            return True
        return wait(view, base, seq, flag, 0.0, deadline)

    def close(self) -> None:
        for payload in self._payloads:
            payload.release()
        self._m.close()

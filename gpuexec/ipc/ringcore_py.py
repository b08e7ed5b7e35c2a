"""The ring core in pure Python: the twin of the compiled ``_ringcore`` (same names, same
arguments, same bytes; see :mod:`.ringcore`), used where that is not built.

Each function takes the segment's memoryview (used here) and its base address (used for
futex calls, and by the compiled twin for everything). Pure Python has no fence
instruction: :func:`fence` takes and releases a lock, a full barrier; acquire and release
orderings need it only where stores and loads may be reordered (:data:`WEAK_ORDER`, not
x86: there every interpreted operation is already the compiler barrier TSO needs).
"""

from __future__ import annotations

import math
import platform
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import msgspec

from . import futex

NAME = "python"

# The layout (drawn in shm_ring.py); the compiled twin names the same numbers.
WRITE_SEQ_OFF = 64
FUTEX_OFF = 72
SLEEPING_OFF = 128
PUBLISHED_OFF = 8
ONE_READER_SEQ_OFF = 192   # read_seq of a ring with one reader (a reply ring)
SLOT_HEADER = 16           # a slot: length u32, pad u32, publish time u64, payload
BELL_COUNTER = 0
BELL_SLEEPING = 64
_SLICE_S = 0.05             # the longest one futex wait lasts

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_u64 = _U64.unpack_from
_u32 = _U32.unpack_from

# Whether acquire/release orderings need a fence here (everywhere but x86).
WEAK_ORDER = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686")

_fence_lock = threading.Lock()


# The base classes of the objects whose few hot attributes the compiled core keeps in a
# C struct (see ringcore.fields), where it is not built: ordinary attributes.


class WriterFields:
    """The base of :class:`~gpuexec.ipc.shm_ring.RingWriter` (``_seq``, ``_min_read``,
    ``_claimed``)."""


class CancelFields:
    """The base of :class:`~gpuexec.worker.cancel.CancelPoint` (``running``, ``method``,
    ``armed``, ``recheck``)."""


class GateFields:
    """The base of :class:`~gpuexec.worker.deferred.ReplyGate` (``closed``)."""


def fence() -> None:
    """A full memory barrier: taking and releasing a lock is an atomic read-modify-write
    (``lock``-prefixed on x86; an acquire/release pair on ARM, CPython's mutexes)."""
    with _fence_lock:  # not acquire()/release(): a signal between them would keep it
        pass


def published(view: memoryview, base: int) -> int:
    seq: int = _u64(view, WRITE_SEQ_OFF)[0]
    if WEAK_ORDER:
        fence()  # the sequence before the payload (acquire)
    return seq


def publish(view: memoryview, base: int, slot_off: int, seq: int, n_readers: int,
            bell_view: memoryview | None, bell_base: int) -> None:
    _U64.pack_into(view, slot_off + PUBLISHED_OFF, time.monotonic_ns())
    if WEAK_ORDER:
        fence()  # the payload before the sequence (release)
    _U64.pack_into(view, WRITE_SEQ_OFF, seq)
    _U32.pack_into(view, FUTEX_OFF, seq & 0xFFFFFFFF)
    fence()  # the sequence before reading the sleeping flags (Dekker), the bell's too
    if any(view[SLEEPING_OFF:SLEEPING_OFF + n_readers]) and futex.available():
        futex.wake(base + FUTEX_OFF)
    if bell_view is not None and _u32(bell_view, BELL_SLEEPING)[0]:
        poke(bell_view, bell_base)


# A packet of one frame for every rank (packets.py): kind 0, mask_len 0, one frame, its
# length; then the frame.
_ONE = struct.Struct("<IIQBHHI")  # the slot's length, pad and time, then that head
_ONE_HEAD = 9


def put_one(view: memoryview, base: int, slot_off: int, frame: bytes, seq: int,
            n_readers: int, bell_view: memoryview | None, bell_base: int) -> None:
    n = len(frame)
    at = slot_off + SLOT_HEADER + _ONE_HEAD
    _ONE.pack_into(view, slot_off, n + _ONE_HEAD, 0, 0, 0, 0, 1, n)
    view[at:at + n] = frame
    publish(view, base, slot_off, seq, n_readers, bell_view, bell_base)


def _take_expected(view: memoryview, base: int, data_off: int, n_slots: int,
                   slot_size: int, before: bytes, middle: bytes, after: bytes) -> bool:
    """Release the next message of a ring of one reader when it is the one-frame packet
    ``before + middle + after`` (collect's test of each ring)."""
    seq = _u64(view, ONE_READER_SEQ_OFF)[0]
    if published(view, base) <= seq:
        return False
    slot = data_off + (seq % n_slots) * slot_size
    n = len(before) + len(middle) + len(after)
    if n + _ONE_HEAD + SLOT_HEADER > slot_size:
        return False
    total, _, _, kind, mask_len, frames, length = _ONE.unpack_from(view, slot)
    if (total, kind, mask_len, frames, length) != (n + _ONE_HEAD, 0, 0, 1, n):
        return False
    at = slot + SLOT_HEADER + _ONE_HEAD
    if view[at:at + n] != before + middle + after:
        return False
    release(view, base, ONE_READER_SEQ_OFF, seq + 1)
    return True


def _one_frame(view: memoryview, slot: int, slot_size: int, max_len: int
               ) -> tuple[bytes, int] | None:
    """``(frame, publish time)`` of the message in the slot at ``slot`` when it is a packet
    of one frame of at most ``max_len`` bytes for every rank, None for any other."""
    total, _, stamp, kind, mask_len, frames, length = _ONE.unpack_from(view, slot)
    if not _ONE_HEAD <= total <= min(slot_size - SLOT_HEADER, max_len + _ONE_HEAD) or \
            (kind, mask_len, frames, length) != (0, 0, 1, total - _ONE_HEAD):
        return None
    at = slot + SLOT_HEADER + _ONE_HEAD
    return bytes(view[at:at + length]), int(stamp)


def take_frame(view: memoryview, base: int, reader_off: int, data_off: int, n_slots: int,
               slot_size: int, max_len: int) -> tuple[bytes, int] | None:
    seq = _u64(view, reader_off)[0]
    if published(view, base) <= seq:
        return None
    got = _one_frame(view, data_off + (seq % n_slots) * slot_size, slot_size, max_len)
    if got is not None:
        release(view, base, reader_off, seq + 1)
    return got


def release(view: memoryview, base: int, off: int, seq: int) -> None:
    if WEAK_ORDER:
        fence()  # finish reading the slot before the writer may reuse it
    _U64.pack_into(view, off, seq)


def min_read(view: memoryview, base: int, first_off: int, n_readers: int) -> int:
    lo = min(_u64(view, first_off + 64 * i)[0] for i in range(n_readers))
    if WEAK_ORDER:
        fence()
    return int(lo)


def wait(view: memoryview, base: int, seq: int, flag_off: int, spin_until: float,
         sleep_until: float) -> bool:
    """True once ``write_seq > seq``: spin until ``spin_until``, then futex sleeps with
    the Dekker handshake on the flag at ``flag_off`` until ``sleep_until`` (inf: no
    limit); False when that passes first."""
    monotonic = time.monotonic
    while True:
        if _u64(view, WRITE_SEQ_OFF)[0] > seq:
            return True
        if monotonic() >= spin_until:
            break
    while True:
        left = sleep_until - monotonic()
        if left <= 0:
            return False
        view[flag_off] = 1
        fence()  # the flag before re-reading the sequence (Dekker)
        expected = _u32(view, FUTEX_OFF)[0]
        if _u64(view, WRITE_SEQ_OFF)[0] <= seq:
            nap = _SLICE_S if math.isinf(left) else min(left, _SLICE_S)
            if futex.available():
                futex.wait(base + FUTEX_OFF, expected, nap)
            else:
                time.sleep(min(nap, 1e-3))
        view[flag_off] = 0
        if _u64(view, WRITE_SEQ_OFF)[0] > seq:
            if WEAK_ORDER:
                fence()
            return True


def next_frame(view: memoryview, base: int, reader_off: int, flag_off: int, data_off: int,
               n_slots: int, slot_size: int, max_len: int, spin: float,
               timeout: float) -> tuple[bytes, int] | bool:
    """:func:`wait` for the reader's next message (spinning ``spin`` seconds, then asleep
    until ``timeout`` seconds have passed; inf: no limit), then :func:`take_frame` it:
    the frame and its time, True for a message of another kind (left in place), False
    when the timeout passes first."""
    seq: int = _u64(view, reader_off)[0]
    start = time.monotonic()
    if not wait(view, base, seq, flag_off, start + min(spin, timeout), start + timeout):
        return False
    return take_frame(view, base, reader_off, data_off, n_slots, slot_size, max_len) or True


def ring(view: memoryview, base: int) -> None:
    fence()  # what was published before reading the flag (Dekker)
    if _u32(view, BELL_SLEEPING)[0]:
        poke(view, base)


def poke(view: memoryview, base: int) -> None:
    _U32.pack_into(view, BELL_COUNTER, (_u32(view, BELL_COUNTER)[0] + 1) & 0xFFFFFFFF)
    if futex.available():
        futex.wake(base + BELL_COUNTER)


def epoch(view: memoryview, base: int) -> int:
    return int(_u32(view, BELL_COUNTER)[0])


def _ready(views: tuple[memoryview, ...]) -> int:
    mask = 0
    for i, v in enumerate(views):
        if _u64(v, WRITE_SEQ_OFF)[0] > _u64(v, ONE_READER_SEQ_OFF)[0]:
            mask |= 1 << i
    return mask


def _wait_bell(bell_view: memoryview, bell_base: int, epoch: int, spin_until: float,
               sleep_until: float, ready: Callable[[bool], bool]) -> bool:
    """Until ``ready(settled)``: spin until ``spin_until``, then sleep on the doorbell
    until ``sleep_until`` (``settled``: False while spinning, True from then on); False
    when that passes or at once when the doorbell's counter is no longer ``epoch``."""
    monotonic = time.monotonic
    while True:
        if ready(False):
            return True
        if _u32(bell_view, BELL_COUNTER)[0] != epoch or monotonic() >= spin_until:
            break
    while True:
        if _u32(bell_view, BELL_COUNTER)[0] != epoch:
            return False
        left = sleep_until - monotonic()
        if left <= 0:
            return False
        _U32.pack_into(bell_view, BELL_SLEEPING, 1)
        fence()
        expected = _u32(bell_view, BELL_COUNTER)[0]
        try:
            if expected == epoch and not ready(True):
                nap = _SLICE_S if math.isinf(left) else min(left, _SLICE_S)
                if futex.available():
                    futex.wait(bell_base + BELL_COUNTER, expected, nap)
                else:
                    time.sleep(min(nap, 1e-3))
        finally:
            _U32.pack_into(bell_view, BELL_SLEEPING, 0)
        if ready(True):
            return True


def gather(views: tuple[memoryview, ...], bases: tuple[int, ...], bell_view: memoryview,
           bell_base: int, epoch: int, spin_until: float, sleep_until: float) -> int:
    """Bit i set when reply ring i holds a message: spin over the rings until
    ``spin_until``, then sleep on the doorbell until ``sleep_until``; 0 when that passes
    or at once when the doorbell's counter is no longer ``epoch``."""
    mask = 0

    def ready(settled: bool) -> bool:
        nonlocal mask
        mask = _ready(views)
        return mask != 0

    _wait_bell(bell_view, bell_base, epoch, spin_until, sleep_until, ready)
    if WEAK_ORDER:
        fence()
    return mask


def collect(views: tuple[memoryview, ...], bases: tuple[int, ...], bell_view: memoryview,
            bell_base: int, data_off: int, n_slots: int, slot_size: int, max_len: int,
            befores: tuple[bytes, ...], afters: tuple[bytes, ...], epoch: int,
            spin_until: float, sleep_until: float, middle: bytes,
            want: int) -> tuple[int, int, int, list[bytes] | tuple[()]]:
    """``(taken, framed, other, frames)``: wait as :func:`gather` does for the rings in
    ``want``, taking from each the reply ``befores[i] + middle + afters[i]`` as it comes
    (bit set in ``taken``), until every wanted ring gave it or holds another message
    (once the spin is over: until any holds another message, which may be a failure the
    other ranks are cancelled on); then each such message that :func:`take_frame` would
    take is taken (bit set in ``framed``, its frame in ``frames``, in ring order), any
    other left in place (bit set in ``other``)."""
    if len(views) > 64 or len(befores) != len(views) or len(afters) != len(views) or \
            want >> len(views) or not n_slots:
        raise ValueError("collect(): up to 64 rings, a part for each")
    taken = other = 0

    def ready(settled: bool) -> bool:
        nonlocal taken, other
        open_ = want & ~(taken | other)
        while open_:
            low = open_ & -open_
            i = low.bit_length() - 1
            open_ ^= low
            if _take_expected(views[i], bases[i], data_off, n_slots, slot_size, befores[i],
                              middle, afters[i]):
                taken |= low
            elif published(views[i], bases[i]) > _u64(views[i], ONE_READER_SEQ_OFF)[0]:
                other |= low
        return taken | other == want or (settled and other != 0)

    _wait_bell(bell_view, bell_base, epoch, spin_until, sleep_until, ready)
    framed = 0
    frames: list[bytes] = []
    open_ = other
    while open_:
        low = open_ & -open_
        i = low.bit_length() - 1
        open_ ^= low
        got = take_frame(views[i], bases[i], ONE_READER_SEQ_OFF, data_off, n_slots,
                         slot_size, max_len)
        if got is not None:
            frames.append(got[0])
            framed |= low
    return taken, framed, other & ~framed, frames or ()


_RECORDS = 33  # the compiled twin's RECORDS: the forecast's history (32 gaps) and one


def _unpack_uint(frame: bytes, at: int) -> tuple[int, int] | None:
    """The non-negative msgpack int at ``frame[at]``: ``(value, length)``, None if none."""
    if at >= len(frame):
        return None
    first = frame[at]
    if first <= 0x7F:
        return first, 1
    n = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}.get(first)
    if n is None or at + 1 + n > len(frame):
        return None
    return int.from_bytes(frame[at + 1:at + 1 + n], "big"), 1 + n


def _pack_uint(value: int) -> bytes:
    """msgpack's shortest form of a non-negative int (msgspec's)."""
    if value <= 0x7F:
        return bytes((value,))
    for code, n in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if value < 1 << (8 * n):
            return bytes((code,)) + value.to_bytes(n, "big")
    raise OverflowError("a call id beyond 64 bits")  # pragma: no cover - ids are counted


def _bare_call(view: memoryview, slot: int, slot_size: int, call_before: bytes
               ) -> tuple[int, bytes, int] | None:
    """``(call id, method part, publish time)`` of a bare call in the slot at ``slot``
    (see serve), None for any other message."""
    one = _one_frame(view, slot, slot_size, slot_size)
    if one is None:
        return None
    frame, stamp = one
    if len(frame) <= len(call_before) or not frame.startswith(call_before):
        return None
    got = _unpack_uint(frame, len(call_before))
    if got is None:
        return None
    return got[0], frame[len(call_before) + got[1]:], stamp


def serve(view: memoryview, base: int, reader_off: int, flag_off: int, data_off: int,
          n_slots: int, slot_size: int, max_len: int, spin: float, timeout: float,
          reply_view: memoryview, reply_base: int, reply_data_off: int, reply_n_slots: int,
          reply_slot_size: int, bell_view: memoryview | None, bell_base: int,
          call_before: bytes, calls: dict[bytes, str], reply_before: bytes,
          reply_after: bytes, max_reply: int, target: object, cancel: Any, gate: Any,
          decode: Callable[[bytes], Any] | None, call_type: type[Any],
          reply_frame: Callable[[int, Any], bytes | None] | None, first_spin: float
          ) -> tuple[tuple[Any, int] | bool | None,
                     tuple[int, str, Any, BaseException | None, int, bytes | None] | None,
                     list[tuple[int, float]] | None]:
    """The request loop's wait that answers the calls it can (see ``_ringcore.c`` and
    :meth:`~gpuexec.ipc.shm_ring.RingReader.serve`)."""
    records: deque[tuple[int, float]] = deque(maxlen=_RECORDS)
    seq: int = _u64(view, reader_off)[0]
    reply_seq: int = _u64(reply_view, WRITE_SEQ_OFF)[0]  # the caller's own word
    reply_min_read = 0  # not looked at yet
    start = time.monotonic()
    spin_until, sleep_until = start + min(first_spin, timeout), start + timeout
    while True:
        if not wait(view, base, seq, flag_off, spin_until, sleep_until):
            return False, None, list(records) or None
        slot = data_off + (seq % n_slots) * slot_size
        bare = _bare_call(view, slot, slot_size, call_before)
        name = None if bare is None else calls.get(bare[1])
        method = _runnable(target, name, cancel) if name is not None else None
        call_args: tuple[Any, ...] = ()
        call_kwargs: dict[str, Any] = {}
        if method is not None:  # a bare call: taken
            assert bare is not None and name is not None
            call_id, _, stamp = bare
            seq += 1
            release(view, base, reader_off, seq)
        else:  # Python's, or decoded here: taken as next_frame takes it
            taken = take_frame(view, base, reader_off, data_off, n_slots, slot_size, max_len)
            if taken is None:
                return True, None, list(records) or None
            seq += 1
            if decode is None:
                return taken, None, list(records) or None
            frame, stamp = taken
            try:
                msg = decode(frame)
            except Exception:  # the loop decodes it again and deals with what it is
                return taken, None, list(records) or None
            servable = _servable_call(msg, call_type, target, cancel)
            if servable is None:
                return (msg, stamp), None, list(records) or None
            call_id, name, method, call_args, call_kwargs = servable
        cancel.running, cancel.method, cancel.armed = call_id, name, True
        value: Any = None
        error: BaseException | None = None
        try:
            value = method(*call_args, **call_kwargs)
        except BaseException as e:  # the caller answers it, as the request loop does
            error = e
        cancel.armed = False
        reply: bytes | None = None
        if error is None and not gate.closed:
            if value is None:
                reply = reply_before + _pack_uint(call_id) + reply_after
            elif reply_frame is not None:
                try:
                    reply = reply_frame(call_id, value)
                except Exception:  # Python's encoder takes the value
                    reply = None
        if reply is not None and 0 <= max_reply < len(reply):
            reply = None  # Python refuses it, saying why
        made = reply if value is not None else None
        if reply is not None:
            room = reply_min_read + reply_n_slots > reply_seq
            if not room:
                reply_min_read = min_read(reply_view, reply_base, ONE_READER_SEQ_OFF, 1)
                room = reply_min_read + reply_n_slots > reply_seq
            if not room or len(reply) + _ONE_HEAD + SLOT_HEADER > reply_slot_size:
                reply = None  # Python sends what was made as it is
        if reply is None:
            return None, (call_id, name, value, error, stamp, made), list(records) or None
        reply_seq += 1
        put_one(reply_view, reply_base,
                reply_data_off + ((reply_seq - 1) % reply_n_slots) * reply_slot_size,
                reply, reply_seq, 1, bell_view, bell_base)
        now = time.monotonic()
        records.append((stamp, now))
        spin_until = sleep_until = now + spin


def _runnable(target: object, name: str, cancel: Any) -> Callable[..., Any] | None:
    """The bound method ``name`` of ``target`` when a call may run it now (no cancelled
    call possibly queued, a callable attribute); None: the request loop answers it."""
    if cancel.recheck:
        return None
    try:
        method = getattr(target, name)
    except Exception:  # (a property that raises): the loop answers it
        return None
    return method if callable(method) else None


def _servable_call(msg: Any, call_type: type[Any], target: object, cancel: Any
                   ) -> tuple[int, str, Callable[..., Any], tuple[Any, ...],
                              dict[str, Any]] | None:
    """``(call_id, name, method, args, kwargs)`` of a decoded request serve() may run now:
    a call by name with arguments (see ``servable_call`` in ``_ringcore.c``); None to give
    it to the request loop."""
    if msg.__class__ is not call_type or msg.fn is not None or msg.value_rank >= 0 or \
            not (msg.args or msg.kwargs) or msg.method.startswith("__"):
        return None
    method = _runnable(target, msg.method, cancel)
    if method is None:
        return None
    return msg.call_id, msg.method, method, tuple(msg.args), msg.kwargs


# -- plain msgpack data (the compiled twin: _plain.h) ---------------------------------

_PLAIN_DEPTH = 32  # containers nested deeper are left to the codec's walk
_PLAIN_SCALARS = frozenset({type(None), bool, int, float, str, bytes})
_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode


def _plain_at(v: object, depth: int) -> bool:
    """Whether ``v`` is plain msgpack data (``values.plain``) nested at most
    :data:`_PLAIN_DEPTH` levels; ints out of range and lone surrogates are left to the
    encoder, which refuses them."""
    t = type(v)
    if t in _PLAIN_SCALARS:
        return True
    if depth >= _PLAIN_DEPTH:
        return False
    if t is list:
        return all(_plain_at(x, depth + 1) for x in cast(list[Any], v))
    if t is dict:
        return all(type(k) is str and _plain_at(x, depth + 1)
                   for k, x in cast(dict[Any, Any], v).items())
    return False


def pack_plain(value: object) -> bytes | None:
    """msgspec's bytes for a plain value; None for any other (the codec's walk takes it)."""
    if not _plain_at(value, 0):
        return None
    try:
        return _pack(value)
    except (OverflowError, UnicodeEncodeError):  # an int beyond 64 bits, a lone surrogate
        return None


def unpack_plain(frame: bytes) -> tuple[Any] | None:
    """``(value,)``, the plain value that is the whole of ``frame`` as msgspec reads it;
    None when it is not one (an extension type, a key that is not a str, not msgpack)."""
    try:
        value = _unpack(frame)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    return (value,) if _plain_at(value, 0) else None

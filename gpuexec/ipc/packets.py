"""One ring slot per message: the codec's frames, and who the message is for.

Packet layout (little-endian)::

    kind u8        0: the frames are here; 1: the message went by ZeroMQ (too big for a slot)
    mask_len u16   bytes of the target mask; 0 = every rank
    mask           bit r set: rank r is a target
    n u16          number of frames
    lengths        n x u32
    frames         the frames, back to back

A message of more than ``MAX_FRAMES`` frames (the count is a u16) does not fit a packet
whatever its size: like a message too big for a slot, it goes by ZeroMQ, which has no
such limit, with a marker in the ring.

A packet is read in place from the ring slot; the frames are memoryviews of it (the
decoder copies what it keeps, so the slot can be released right after decoding). It is
also written in place: :func:`measure` sizes it, the ring hands out the slot, and
:func:`write_into` fills it, so a message is copied once, from the encoder's buffer into
shared memory, with no packet assembled on the way. A single frame to every rank (almost
every request and reply) takes a precompiled header.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .shm_ring import RingWriter

INLINE = 0
BY_ZMQ = 1
_HEAD = struct.Struct("<BH")
_N = struct.Struct("<H")
_ONE = struct.Struct("<BHHI")  # kind, mask_len 0, one frame, its length
_LEN = struct.Struct("<I")
MAX_FRAMES = 0xFFFF  # frames one packet can count


def _mask(targets: Sequence[int] | None) -> bytes:
    if targets is None:
        return b""
    out = bytearray((max(targets) // 8 + 1) if targets else 0)
    for r in targets:
        out[r // 8] |= 1 << (r % 8)
    return bytes(out)


def measure(frames: Sequence[Any], targets: Sequence[int] | None
            ) -> tuple[bytes, list[memoryview], int]:
    """``(head, frame views, packet size)`` for :func:`write_into`."""
    views = [memoryview(f).cast("B") for f in frames]
    if targets is None and len(views) == 1:
        n = views[0].nbytes
        return _ONE.pack(INLINE, 0, 1, n), views, _ONE.size + n
    mask = _mask(targets)
    head = _HEAD.pack(INLINE, len(mask)) + mask + _N.pack(len(views)) + \
        struct.pack(f"<{len(views)}I", *(v.nbytes for v in views))
    return head, views, len(head) + sum(v.nbytes for v in views)


def write_into(buf: memoryview, head: bytes, views: Sequence[memoryview]) -> None:
    """Fill ``buf`` (exactly the size :func:`measure` gave) with the packet."""
    pos = len(head)
    buf[:pos] = head
    for v in views:
        end = pos + v.nbytes
        buf[pos:end] = v
        pos = end


def put(ring: RingWriter, frames: Sequence[Any], targets: Sequence[int] | None,
        timeout: float | None = None, alive: Callable[[], bool] | None = None) -> bool:
    """Write the packet for ``frames`` straight into ``ring``'s next slot and publish it;
    False when it does not fit in a slot (see :meth:`RingWriter.write`) or has more than
    ``MAX_FRAMES`` frames."""
    if targets is None and len(frames) == 1 and type(frames[0]) is bytes:
        # almost every message (an encoded header): claimed, written and published by
        # one call into the ring core (no view, no list)
        return ring.put_one(frames[0], timeout, alive)
    if len(frames) > MAX_FRAMES:
        return False
    head, views, size = measure(frames, targets)
    slot = ring.claim(size, timeout, alive)
    if slot is None:
        return False
    write_into(slot, head, views)
    ring.publish()
    return True


def pack_marker(targets: Sequence[int] | None) -> bytes:
    """A packet saying "this message comes by ZeroMQ" (for the same targets)."""
    mask = _mask(targets)
    return _HEAD.pack(BY_ZMQ, len(mask)) + mask


def for_rank(packet: memoryview, rank: int) -> bool:
    _, mask_len = _HEAD.unpack_from(packet, 0)
    if mask_len == 0:
        return True
    byte = rank // 8
    return byte < mask_len and bool(packet[_HEAD.size + byte] & (1 << (rank % 8)))


def single_frame(packet: memoryview) -> memoryview | None:
    """The frame of a packet that holds one frame for every rank (almost every reply),
    read without :func:`unpack`'s general walk; None for any other packet. The ring slot
    is exactly the packet's size, so the frame is the rest of it."""
    if packet.nbytes < _ONE.size:
        return None
    kind, mask_len, n, length = _ONE.unpack_from(packet)
    if kind != INLINE or mask_len or n != 1:
        return None
    frame = packet[_ONE.size:]
    if length != frame.nbytes:
        raise ValueError("truncated packet")
    return frame


def unpack(packet: memoryview) -> tuple[int, list[memoryview]]:
    """``(kind, frames)``; frames are views into ``packet`` (empty for BY_ZMQ)."""
    kind, mask_len = _HEAD.unpack_from(packet, 0)
    if kind == BY_ZMQ:
        return kind, []
    pos = _HEAD.size + mask_len
    (n,) = _N.unpack_from(packet, pos)
    pos += _N.size
    if n == 1:  # the common case, without building a format
        (length,) = _LEN.unpack_from(packet, pos)
        pos += 4
        if pos + length > len(packet):
            raise ValueError("truncated packet")
        return kind, [packet[pos:pos + length]]
    if n == 0:  # no message is zero frames (a hostile or broken peer's packet)
        raise ValueError("packet without frames")
    lengths = struct.unpack_from(f"<{n}I", packet, pos)
    pos += 4 * n
    frames = []
    for length in lengths:
        frames.append(packet[pos:pos + length])
        pos += length
    if pos > len(packet):
        raise ValueError("truncated packet")
    return kind, frames

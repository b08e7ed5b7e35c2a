"""One ring slot per message: the codec's frames, and who the message is for.

Packet layout (little-endian)::

    kind u8        0: the frames are here; 1: the message went by ZeroMQ (too big for a slot)
    mask_len u16   bytes of the target mask; 0 = every rank
    mask           bit r set: rank r is a target
    n u16          number of frames
    lengths        n x u32
    frames         the frames, back to back

A packet is read in place from the ring slot; the frames are memoryviews of it (the
decoder copies what it keeps, so the slot can be released right after decoding).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

INLINE = 0
BY_ZMQ = 1
_HEAD = struct.Struct("<BH")
_N = struct.Struct("<H")


def _mask(targets: Sequence[int] | None) -> bytes:
    if targets is None:
        return b""
    out = bytearray((max(targets) // 8 + 1) if targets else 0)
    for r in targets:
        out[r // 8] |= 1 << (r % 8)
    return bytes(out)


def pack(frames: Sequence[Any], targets: Sequence[int] | None) -> bytearray:
    """The packet for ``frames`` (``targets`` None: every rank)."""
    mask = _mask(targets)
    views = [memoryview(f).cast("B") for f in frames]
    lengths = struct.pack(f"<{len(views)}I", *(v.nbytes for v in views))
    out = bytearray(_HEAD.pack(INLINE, len(mask)) + mask + _N.pack(len(views)) + lengths)
    for v in views:
        out += v
    return out


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


def unpack(packet: memoryview) -> tuple[int, list[memoryview]]:
    """``(kind, frames)``; frames are views into ``packet`` (empty for BY_ZMQ)."""
    kind, mask_len = _HEAD.unpack_from(packet, 0)
    if kind == BY_ZMQ:
        return kind, []
    pos = _HEAD.size + mask_len
    (n,) = _N.unpack_from(packet, pos)
    pos += _N.size
    lengths = struct.unpack_from(f"<{n}I", packet, pos)
    pos += 4 * n
    frames = []
    for length in lengths:
        frames.append(packet[pos:pos + length])
        pos += length
    if pos > len(packet):
        raise ValueError("truncated packet")
    return kind, frames

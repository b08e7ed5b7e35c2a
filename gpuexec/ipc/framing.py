"""Length-prefixed messages with file descriptors over a Unix stream socket.

Used for the zygote's control channel: a socket pair between two processes of the same
user, created by the driver (never a path anyone else can connect to). Each message is a
4-byte big-endian length and that many bytes; file descriptors ride along with a
message through ``SCM_RIGHTS``.
"""

from __future__ import annotations

import socket
import struct

MAX_MESSAGE = 1 << 30
_LEN = struct.Struct(">I")


def send_message(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    packet = _LEN.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [packet], fds)
        packet = packet[sent:]
    if packet:
        sock.sendall(packet)


def recv_message(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the descriptors that came with it; ``EOFError`` when closed."""
    fds: list[int] = []
    header = _recv_exact(sock, _LEN.size, fds)
    (size,) = _LEN.unpack(header)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is over the limit")
    return _recv_exact(sock, size, fds), fds


def _recv_exact(sock: socket.socket, size: int, fds: list[int]) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left:
        data, got, _, _ = socket.recv_fds(sock, left, 8)
        if not data:
            raise EOFError("the peer closed the channel")
        fds.extend(got)
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)

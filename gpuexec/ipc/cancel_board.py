"""The cancel board: which calls the driver has taken back, readable by a busy worker.

A worker running a method reads no message until the method returns, so a cancellation
travels in two parts: the driver *posts* the call id on this board, then sends
:data:`~gpuexec.ipc.signals.CANCEL_SIGNAL` to the worker's main thread. The worker's
handler (:mod:`gpuexec.worker.cancel`) raises into the method only when the board names
the call that is running; before each call starts, the worker also looks up the call on
the board (a call cancelled while it was still queued is skipped). So a signal that
arrives late, or twice, never interrupts another call: the board, not the signal, says
which call to stop.

Layout: one file in the executor's private 0700 directory, mapped by the driver
(writes) and by every worker (reads)::

    rank 0: [slot 0][slot 1] ... [slot SLOTS-1]   rank 1: [...]   ...   (int64 each)

A call id goes to slot ``call_id % SLOTS`` of every rank it is cancelled on. Slots are
compared for equality with the id the worker runs, so a slot reused by a later id
(``SLOTS`` calls further on) can make an older cancellation of a call still *queued*
be missed (it then runs, and its reply is dropped as late); it can never cancel a call
that was not cancelled. Aligned 8-byte stores and loads are single instructions on
the platforms gpuexec runs on (x86-64, aarch64): no torn ids.
"""

from __future__ import annotations

import mmap
import os

SLOTS = 64  # per rank: calls of one rank that may be cancelled while queued at once
_SLOT = ctypes_SLOT = 8  # bytes: one int64


def board_path(directory: str) -> str:
    return os.path.join(directory, "cancel")


def _map(fd: int, world_size: int, writable: bool) -> mmap.mmap:
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return mmap.mmap(fd, world_size * SLOTS * _SLOT, mmap.MAP_SHARED, prot)


class BoardWriter:
    """The driver's side: creates the board file and posts cancellations."""

    def __init__(self, directory: str, world_size: int) -> None:
        self.path = board_path(directory)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, world_size * SLOTS * _SLOT)
            self._map = _map(fd, world_size, True)
        finally:
            os.close(fd)
        self._slots: memoryview | None = memoryview(self._map).cast("q")

    def post(self, rank: int, call_id: int) -> None:
        slots = self._slots
        if slots is not None:
            slots[rank * SLOTS + call_id % SLOTS] = call_id

    def close(self) -> None:
        """Unmap (the file goes with the private directory)."""
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.release()
            self._map.close()


class BoardReader:
    """A worker's side: reads the slots of its own rank (a read-only mapping)."""

    def __init__(self, path: str, rank: int, world_size: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._map = _map(fd, world_size, False)
        finally:
            os.close(fd)
        self._view = memoryview(self._map).cast("q")[rank * SLOTS:(rank + 1) * SLOTS]

    def cancelled(self, call_id: int) -> bool:
        """Whether the driver cancelled ``call_id`` on this rank."""
        return bool(self._view[call_id % SLOTS] == call_id)

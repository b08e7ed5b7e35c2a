"""The driver's doorbell: a futex word that many workers' reply rings ring and one waiter
sleeps on (see :class:`Doorbell`)."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from . import futex
from .memfile import MemFile, fence

_U32 = struct.Struct("<I")


class Doorbell:
    """A futex word many writers ring and one waiter sleeps on (the driver waiting for
    replies from several rings). A ring touches the shared counter only while the waiter
    sleeps: a writer publishes its message, fences, and reads the sleeping flag; the
    waiter sets the flag, fences, and checks for messages before it sleeps (Dekker), so
    either the waiter sees the message or the writer sees the flag and wakes it. When the
    driver spins, replies from many workers therefore do not fight over one cache line.
    Ringing is then ``counter += 1`` (a lost increment between two writers is harmless:
    only "it changed" matters, and every ring that sees the flag wakes)."""

    SIZE = 128
    _COUNTER = 0
    _SLEEPING = 64

    def __init__(self, path: str | None) -> None:
        """Open the doorbell at ``path``, or create one (``path`` None)."""
        self._m = MemFile(path, self.SIZE if path is None else None, "gpuexec-bell",
                          self.SIZE)
        self.path = self._m.path

    @classmethod
    def create(cls) -> Doorbell:
        return cls(None)

    def ring(self) -> None:
        """Wake the waiter if it sleeps; call after publishing what it waits for."""
        view = self._m.view
        fence()  # what was published before reading the flag (Dekker)
        if not _U32.unpack_from(view, self._SLEEPING)[0]:
            return
        _U32.pack_into(view, self._COUNTER, (_U32.unpack_from(view, self._COUNTER)[0] + 1)
                       & 0xFFFFFFFF)
        if futex.available():
            futex.wake(self._m.base + self._COUNTER)

    def wait(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Sleep until ``ready()`` (checked after announcing the sleep) or ``timeout``."""
        view = self._m.view
        _U32.pack_into(view, self._SLEEPING, 1)
        fence()
        expected = _U32.unpack_from(view, self._COUNTER)[0]
        try:
            if ready():
                return True
            if futex.available():
                futex.wait(self._m.base + self._COUNTER, expected, timeout)
            else:
                time.sleep(min(timeout, 1e-3))
        finally:
            _U32.pack_into(view, self._SLEEPING, 0)
        return ready()

    def unlink(self) -> None:
        self._m.unlink()

    def close(self) -> None:
        self._m.close()

"""The driver's doorbell: a futex word that many workers' reply rings ring and one waiter
sleeps on (see :class:`Doorbell`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from . import ringcore
from .memfile import MemFile

LOOK_S = 0.05  # Doorbell.wait looks at its condition at least this often


class Doorbell:
    """A futex word many writers ring and one waiter sleeps on (the driver waiting for
    replies from several rings). A ring touches the shared counter only while the waiter
    sleeps: a writer publishes its message, fences, and reads the sleeping flag; the
    waiter sets the flag, fences, and checks for messages before it sleeps (Dekker), so
    either the waiter sees the message or the writer sees the flag and wakes it. When the
    driver spins, replies from many workers therefore do not fight over one cache line.
    Ringing is then ``counter += 1`` (a lost increment between two writers is harmless:
    only "it changed" matters, and every ring that sees the flag wakes).

    :meth:`poke` moves the counter whether or not the waiter sleeps: the driver's own
    threads (a death, shutdown) use it, and a waiter that took :meth:`epoch` before
    checking its call returns at once (no wake-up is lost between the check and the
    sleep). The handshakes themselves are the ring core's (:mod:`.ringcore`)."""

    SIZE = 128
    _COUNTER = 0
    _SLEEPING = 64

    def __init__(self, path: str | None) -> None:
        """Open the doorbell at ``path``, or create one (``path`` None)."""
        self._m = MemFile(path, self.SIZE if path is None else None, "gpuexec-bell",
                          self.SIZE)
        self.path = self._m.path
        self._core = ringcore.current()
        self.view = self._m.view   # (view, base): the segment, for the core's gather
        self.base = self._m.base

    @classmethod
    def create(cls) -> Doorbell:
        return cls(None)

    def ring(self) -> None:
        """Wake the waiter if it sleeps; call after publishing what it waits for."""
        self._core.ring(self.view, self.base)

    def poke(self) -> None:
        """Move the counter and wake the waiter (see the class docstring)."""
        self._core.poke(self.view, self.base)

    def epoch(self) -> int:
        """The counter now: a gather given it returns once it moves."""
        return self._core.epoch(self.view, self.base)

    def wait(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Sleep until ``ready()`` (checked after announcing the sleep), a :meth:`poke`,
        or ``timeout``. ``ready`` is Python, which the core cannot look at while it
        sleeps: a ring that lands while the waiter is between two of its sleeps (its
        flag down) is seen at the next look, at most :data:`LOOK_S` later. (The driver
        does not wait this way: its gathers look at the rings themselves.)"""
        deadline = time.monotonic() + timeout
        while True:
            epoch = self.epoch()
            if ready():
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            if self._core.gather((), (), self.view, self.base, epoch, 0.0,
                                 min(deadline, now + LOOK_S)) == 0 and \
                    self.epoch() != epoch:
                return ready()  # poked or rung

    def unlink(self) -> None:
        self._m.unlink()

    def close(self) -> None:
        self._m.close()

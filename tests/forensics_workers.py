"""Workers the forensics tests start: a rank blocked in a wait, one spinning in Python, one
holding the GIL inside a C call. Each writes a marker file as it enters, so a test waits
for the event, not for time."""

from __future__ import annotations

import ctypes
import os
import threading

from gpuexec import Worker


def _entered(marker: str) -> None:
    with open(marker, "w"):
        pass


def _set_once_exists(path: str) -> threading.Event:
    """An event a helper thread sets once ``path`` exists: a method waiting on it is in
    ``Event.wait`` whenever its stack is taken (not between two waits, polling)."""
    done = threading.Event()

    def watch() -> None:
        while not os.path.exists(path):
            done.wait(0.05)
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    return done


class StuckWorker(Worker):
    def __init__(self) -> None:
        self.event = threading.Event()

    def ok(self) -> int:
        return self.rank

    def fail(self) -> None:
        raise KeyError("missing")

    def blocked_in_wait(self, marker: str, seconds: float) -> int:
        _entered(marker)
        self.event.wait(seconds)
        return self.rank

    def spinning_in_python(self, marker: str, stop: str) -> int:
        _entered(marker)
        n = 0
        while not os.path.exists(stop):
            n += 1
        return n

    def holding_the_gil(self, marker: str, stop: str) -> int:
        libc = ctypes.PyDLL(None)  # PyDLL: the GIL stays held during the C call
        _entered(marker)
        while not os.path.exists(stop):
            libc.usleep(200_000)  # 0.2 s with the GIL held (a signal ends it early)
        return self.rank

    def by_rank(self, marker: str, stop: str) -> int:
        """Rank 0 blocks in a wait, rank 1 spins in Python, rank 2 holds the GIL in C;
        each until ``stop`` exists."""
        mine = f"{marker}.{self.rank}"
        if self.rank == 0:
            stopped = _set_once_exists(stop)  # its thread started before the marker
            _entered(mine)
            stopped.wait()
            return self.rank
        if self.rank == 1:
            return self.spinning_in_python(mine, stop)
        return self.holding_the_gil(mine, stop)

    def stuck_on(self, rank: int, marker: str) -> int:
        """``rank`` waits (in Event.wait) until the file ``marker + ".stop"`` exists."""
        if self.rank == rank:
            stopped = _set_once_exists(marker + ".stop")
            _entered(marker)
            stopped.wait()
        return self.rank

"""Waiting for descriptors to become readable, at any descriptor number.

``select.select`` refuses descriptors of 1024 and above (``FD_SETSIZE``): a driver that
holds many files, sockets or connections (a serving engine does) gets numbers that high
for every new pipe, pidfd or socket, and ``select`` then raises "filedescriptor out of
range". ``poll`` has no such limit; every wait on a raw descriptor in gpuexec goes
through here (ZeroMQ's own poller and ``multiprocessing.connection.wait`` use ``poll``
already).
"""

from __future__ import annotations

import select
from collections.abc import Sequence

_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


def readable(fds: Sequence[int], timeout: float | None) -> list[int]:
    """The descriptors of ``fds`` that are readable (or closed, or in error) within
    ``timeout`` seconds (None: no limit; 0: now), in the order given."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    ready = {fd for fd, events in poller.poll(ms) if events & _READABLE}
    return [fd for fd in fds if fd in ready]

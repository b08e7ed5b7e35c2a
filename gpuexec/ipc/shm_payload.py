"""Large arrays of a broadcast, written once into shared memory for every worker.

The driver copies an array of ``PAYLOAD_THRESHOLD`` bytes or more into an anonymous
memory file (``memfd_create``: no name in /dev/shm, so no crash of any process can leave
it behind) and sends its ``(pid, fd, size)`` in the message instead of the bytes. Each
worker maps it through ``/proc/<driver pid>/fd/<fd>`` (possible for processes of the same
user only) copy-on-write (``MAP_PRIVATE``): the array is read without a copy, and a
worker that writes to it changes only its own pages. The driver closes its descriptor
when the call is complete (every target has mapped it by then); the memory is freed when
the last worker drops its arrays.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

PAYLOAD_THRESHOLD = 1 << 20


def write_segment(raw: Any) -> int:
    """A memory file holding the bytes of ``raw`` (a buffer); returns its descriptor."""
    data = memoryview(raw).cast("B")
    fd = os.memfd_create("gpuexec-payload", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, data.nbytes)
        try:
            os.posix_fallocate(fd, 0, data.nbytes)  # allocate at once, not page by page
        except OSError:
            pass  # the copy below faults the pages in instead
        with mmap.mmap(fd, data.nbytes) as mm:
            mm[:] = data
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_segment(pid: int, fd: int, size: int) -> mmap.mmap:
    """Map another process's memory file, copy-on-write."""
    local = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
    try:
        return mmap.mmap(local, size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(local)


def available() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")

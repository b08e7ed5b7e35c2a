"""Large arrays of a broadcast, written once into shared memory for every worker.

The driver copies an array of ``PAYLOAD_THRESHOLD`` bytes or more into an anonymous
memory file (``memfd_create``: no name in /dev/shm, so no crash of any process can leave
it behind) and sends its ``(pid, fd, size)`` in the message instead of the bytes. Each
worker maps it through ``/proc/<driver pid>/fd/<fd>`` (possible for processes of the same
user only) copy-on-write (``MAP_PRIVATE``): the array is read without a copy, and a
worker that writes to it changes only its own pages. The driver closes its descriptor
when the call is complete (every target has mapped it by then); the memory is freed when
the last worker drops its arrays.

A payload is named by its descriptor number *and* its inode: the driver may close the
descriptor of a call that timed out while its request still waits unread in the ring,
and the number may then belong to another file (another call's payload) by the time a
worker opens it. The worker maps the file only if its inode is the one sent, so a reused
number is refused (the call, already over, gets an error nobody waits for) instead of
being read as the wrong data.
"""

from __future__ import annotations

import mmap
import os
import stat
from typing import Any

PAYLOAD_THRESHOLD = 1 << 20


PARALLEL_COPY = 64 << 20   # above this, the one copy is split across threads
_COPY_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))


def write_segment(raw: Any) -> tuple[int, int]:
    """A memory file holding the bytes of ``raw`` (a buffer): ``(descriptor, inode)``.

    This copy is the broadcast's only one. Large payloads are copied by several threads
    (numpy releases the GIL while copying), which also spreads the page faults of the
    fresh file over several cores: one thread alone tops out near 2 GB/s.
    """
    data = memoryview(raw).cast("B")
    fd = os.memfd_create("gpuexec-payload", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, data.nbytes)
        with mmap.mmap(fd, data.nbytes) as mm:
            if data.nbytes < PARALLEL_COPY or _COPY_THREADS == 1:
                mm[:] = data
            else:
                _parallel_copy(mm, data)
        ino = os.fstat(fd).st_ino
    except BaseException:
        os.close(fd)
        raise
    return fd, ino


def _parallel_copy(mm: mmap.mmap, data: memoryview) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    dst = np.frombuffer(mm, dtype=np.uint8)
    src = np.frombuffer(data, dtype=np.uint8)
    step = -(-data.nbytes // _COPY_THREADS)
    step += -step % 4096

    def copy(start: int) -> None:
        dst[start:start + step] = src[start:start + step]

    with ThreadPoolExecutor(_COPY_THREADS) as pool:
        list(pool.map(copy, range(0, data.nbytes, step)))
    # dst and src go with this frame, before the caller closes the mapping


def map_segment(pid: int, fd: int, ino: int, size: int) -> mmap.mmap:
    """Map another process's memory file ``(fd, ino)``, copy-on-write."""
    # O_NONBLOCK: a descriptor that is a FIFO must not block the open; only a regular
    # file (a memfd) large enough is mapped.
    local = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(local)
        if not stat.S_ISREG(st.st_mode) or st.st_size < size or st.st_ino != ino:
            raise ValueError(f"fd {fd} of pid {pid} is not the payload of {size} bytes "
                             f"sent (inode {ino})")
        return mmap.mmap(local, size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(local)


def available() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")

"""Memory shared between processes: anonymous memory files.

A segment is a ``memfd_create`` file, never a name in /dev/shm: see :class:`MemFile`.
What orders stores and loads in them is the ring core's (:mod:`.ringcore`).
"""

from __future__ import annotations

import ctypes
import mmap
import os


class MemFile:
    """A memory file mapped by the processes that share it (a ring, a doorbell).

    Segments are anonymous memory files (``memfd_create``), never names in /dev/shm: the
    creator keeps the file descriptor open and other processes of the user open the file
    through ``/proc/<creator pid>/fd/<fd>`` (the segment's "path") until the creator calls
    :meth:`unlink`, which closes that descriptor. From then on the memory lives exactly as
    long as some process maps it, so no crash of any process, even before every worker
    attached, can leave a segment behind.
    """

    def __init__(self, path: str | None, size: int | None, name: str = "gpuexec",
                 min_size: int = 0) -> None:
        """Create a segment of ``size`` bytes (``path`` None), or open ``path`` (refused
        when smaller than ``min_size``: not what the caller expects there)."""
        self.fd = -1  # the creator's descriptor, which keeps the path valid
        if path is None:
            if size is None:
                raise ValueError("a new segment needs a size")
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            self.fd = os.dup(fd)
            path = f"/proc/{os.getpid()}/fd/{self.fd}"
        else:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.path = path
        try:
            if size is not None:
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
            if size < min_size:
                raise ValueError(f"{path} is too small ({size} bytes) for {name}")
            self.mm = mmap.mmap(fd, size)
        except BaseException:
            self.unlink()
            raise
        finally:
            os.close(fd)
        self.view = memoryview(self.mm)
        buf = (ctypes.c_char * size).from_buffer(self.mm)
        self.base = ctypes.addressof(buf)  # for futex calls on words of the segment
        del buf

    def unlink(self) -> None:
        """The creator gives up the path: nobody can open the segment any more."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.unlink()
        self.unmap()

    def unmap(self) -> None:
        """Unmap, keeping the creator's descriptor (and so the path) open."""
        self.view.release()
        try:
            self.mm.close()
        except BufferError:  # a reader still holds a zero-copy view; the OS unmaps at exit
            pass

"""Rank-prefixed stdout/stderr in workers, and a stderr record the driver can read.

Every line a worker prints through Python reaches the driver's stdout/stderr whole,
once, and starting with ``(rank N pid P)``, whatever the stream is (a terminal, a file, a
pipe) and however many workers print at once::

    print() / logging ──▶ PrefixedStream ──(whole lines)──▶ one os.write per chunk ──▶ fd 1/2
                           └ the unfinished line waits here   └ under the executor's stdio lock
                                                                 when the fd is a pipe/socket

* A line is written only once it is finished: ``\\n``, ``\\r\\n`` or a lone ``\\r`` (a
  progress bar redrawing its line; it reaches the stream as a prefixed segment ending in
  ``\\r``). Text without a line end yet waits in the stream, so ``print(x, end="")``
  followed later by the rest of the line gives one line. ``flush()`` does not cut a line
  either; what is still unfinished when the worker exits is written with a ``\\n``. A line
  that grows past ``PENDING_LIMIT`` characters without ending is written in pieces of that
  size, each a prefixed line of its own.
* Whole lines go out with ``os.write`` on the stream's file descriptor, bypassing its
  buffer (a block-buffered file or pipe would otherwise cut lines at 8 KiB boundaries), in
  chunks of whole lines of at most ``PIPE_BUF`` bytes: the kernel keeps such a write
  whole on a pipe, and keeps any single write whole on a regular file or a terminal. A
  longer line to a pipe or socket could still be split by another writer, so while writing
  to one a worker holds an ``flock`` on a lock file in the executor's private directory,
  shared by all its workers.
* Logging handlers the worker inherited (fork) that point at the old streams are moved to
  the new ones. Native code writing to fd 1/2 directly (C libraries) bypasses all this:
  its output is neither prefixed nor kept whole.

What a worker wrote to stderr is also appended to a *stderr record*: a file in the
executor's private 0700 directory. When a worker dies, the driver reads its last lines
from there for :class:`~gpuexec.errors.WorkerDiedError` — a file rather than a pipe
because it survives the worker's death and needs no reader. ``faulthandler`` writes
there too, so a segfault's Python traceback reaches the error message even though the
process is gone. faulthandler writes raw to a file descriptor, without the prefix, so the
record starts with a header line that carries it, and :func:`read_tail` puts it in front
of every dump line. The record is kept under ``RECORD_LIMIT`` bytes by starting over when
it grows past it (the tail is what matters; the header is written again).
"""

from __future__ import annotations

import faulthandler
import fcntl
import logging
import os
import re
import select
import stat
import sys
import threading
from typing import Any, BinaryIO, TextIO

from ..ipc.stderr_record import RECORD_HEADER, read_tail, stderr_record_path

__all__ = ["RECORD_HEADER", "read_tail", "stderr_record_path"]

RECORD_LIMIT = 1 << 20
PENDING_LIMIT = 1 << 16
STDIO_LOCK_NAME = "stdio.lock"
# A finished segment: its text and its end (\r\n, \n, or a \r not at the very end, where
# a \n may still follow in the next write).
_SEGMENT = re.compile(r"[^\r\n]*(?:\r\n|\n|\r(?!\Z))")
_streams: list[PrefixedStream] = []  # installed in this process, drained at exit


class PrefixedStream:
    """A text stream that writes whole prefixed lines to another stream's descriptor (and
    copies them to the stderr record). Any thread may write; ``_lock`` orders them and
    guards ``_pending``; the stdio lock file (another process's) is taken inside it."""

    def __init__(self, stream: TextIO, prefix: str, record: BinaryIO | None = None,
                 lock_fd: int | None = None) -> None:
        self._stream = stream                    # what we stand in front of
        self._prefix = prefix                    # "(rank N pid P) "
        self._record = record                    # the stderr record, or None
        self._encoding: str = getattr(stream, "encoding", None) or "utf-8"
        self._fd: int | None = _descriptor(stream)  # None: write through the stream itself
        # The executor's stdio lock, needed only where the kernel may split a long write.
        self._lock_fd = lock_fd if self._fd is not None and _splits(self._fd) else None
        self._pending = ""                       # the unfinished line, without its prefix
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if not s:
            return 0
        with self._lock:
            data = self._pending + s
            end = 0
            lines = []
            for m in _SEGMENT.finditer(data):
                end = m.end()
                if m.group() != "\r":  # a lone \r at a line's start redraws nothing
                    lines.append(m.group())
            rest = data[end:]
            while len(rest) > PENDING_LIMIT:
                lines.append(rest[:PENDING_LIMIT] + "\n")
                rest = rest[PENDING_LIMIT:]
            self._pending = rest
            if lines:
                self._emit(lines)
        return len(s)

    def flush(self) -> None:
        """Finished lines are already written; the unfinished one waits for its end."""
        if self._fd is None:
            self._stream.flush()

    def drain(self) -> None:
        """Write the unfinished line, ended with ``\\n`` (the worker is exiting)."""
        with self._lock:
            rest, self._pending = self._pending, ""
            if rest:
                self._emit([rest.rstrip("\r") + "\n"])

    def _emit(self, lines: list[str]) -> None:
        if self._fd is None:
            text = "".join(self._prefix + line for line in lines)
            self._stream.write(text)
            self._stream.flush()
            data = text.encode(self._encoding, "backslashreplace")
        else:
            pieces = [(self._prefix + line).encode(self._encoding, "backslashreplace")
                      for line in lines]
            data = b"".join(pieces)
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                for chunk in _chunks(pieces):
                    _write_all(self._fd, chunk)
            except OSError:
                pass  # the reader went away (a closed pipe): printing must not fail a call
            finally:
                if self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        if self._record is not None:
            self._append(data)

    def _append(self, data: bytes) -> None:
        rec = self._record
        if rec is None:
            return
        try:
            if rec.tell() > RECORD_LIMIT:
                rec.seek(0)
                rec.truncate()
                rec.write(f"{self._prefix}{RECORD_HEADER}\n".encode())
            rec.write(data)
            rec.flush()
        except (OSError, ValueError):
            self._record = None  # the directory is gone (shutdown): stop recording

    def isatty(self) -> bool:
        return self._stream.isatty()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, errors, buffer...
        return getattr(self._stream, name)


def _descriptor(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


def _splits(fd: int) -> bool:
    """Whether the kernel may split one long write to ``fd`` among other writers' (a pipe
    or a socket; a regular file and a terminal keep a write whole)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _chunks(pieces: list[bytes]) -> list[bytes]:
    """Whole lines (``pieces``) joined into writes of at most ``PIPE_BUF`` bytes where
    they fit (a longer line is a write of its own)."""
    out: list[bytes] = []
    size = select.PIPE_BUF + 1  # no chunk open yet
    for piece in pieces:
        if size + len(piece) > select.PIPE_BUF:
            out.append(piece)
            size = len(piece)
        else:
            out[-1] += piece
            size += len(piece)
    return out


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data``; on a descriptor someone made non-blocking, waiting for room as a
    blocking write would."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])


def install_prefix(rank: int, pid: int, record_path: str | None = None,
                   lock_dir: str | None = None) -> None:
    """Prefix this worker's stdout/stderr; record stderr and faulthandler output.
    ``lock_dir``: the executor's private directory, where its workers share the stdio
    lock file."""
    prefix = f"(rank {rank} pid {pid}) "
    record: BinaryIO | None = None
    if record_path:
        try:
            record = open(record_path, "ab", buffering=0)
        except OSError:
            record = None
    if record is not None:
        try:
            record.write(f"{prefix}{RECORD_HEADER}\n".encode())
        except OSError:
            pass
        faulthandler.enable(file=record, all_threads=True)
    else:
        faulthandler.enable()
    lock_fd: int | None = None
    if lock_dir:
        try:
            lock_fd = os.open(os.path.join(lock_dir, STDIO_LOCK_NAME),
                              os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            lock_fd = None  # lines up to PIPE_BUF bytes stay whole all the same
    old = {id(sys.stdout): "stdout", id(sys.stderr): "stderr"}
    new: dict[str, Any] = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, PrefixedStream):
            continue
        new[name] = PrefixedStream(stream, prefix, record if name == "stderr" else None,
                                   lock_fd)
        _streams.append(new[name])
        setattr(sys, name, new[name])
    for handler in logging.root.handlers:
        if isinstance(handler, logging.StreamHandler):
            which = old.get(id(handler.stream))
            if which in new:
                handler.setStream(new[which])


def drain_streams() -> None:
    """Write what this worker printed without ending the line (it is exiting)."""
    for stream in _streams:
        stream.drain()

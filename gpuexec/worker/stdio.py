"""Rank-prefixed stdout/stderr in workers, and a stderr record the driver can read.

Every line a worker prints through Python starts with ``(rank N pid P)``. Logging
handlers the worker inherited (fork) that point at the old streams are moved to the
new ones.

What a worker wrote to stderr is also appended to a *stderr record*: a file in the
executor's private 0700 directory. When a worker dies, the driver reads its last lines
from there for :class:`~gpuexec.errors.WorkerDiedError` — a file rather than a pipe
because it survives the worker's death and needs no reader. ``faulthandler`` writes
there too, so a segfault's Python traceback reaches the error message even though the
process is gone. faulthandler writes raw to a file descriptor, without the prefix, so the
record starts with a header line that carries it, and :func:`read_tail` puts it in front
of every dump line. The record is kept under ``RECORD_LIMIT`` bytes by starting over when
it grows past it (the tail is what matters; the header is written again). Native code
writing to fd 2 directly (C libraries) reaches the terminal but not the record.
"""

from __future__ import annotations

import faulthandler
import logging
import sys
import threading
from typing import Any, BinaryIO, TextIO

from ..ipc.stderr_record import RECORD_HEADER, read_tail, stderr_record_path

__all__ = ["RECORD_HEADER", "read_tail", "stderr_record_path"]

RECORD_LIMIT = 1 << 20


class PrefixedStream:
    """A text stream that prefixes every line written through it (and copies stderr
    lines to the record)."""

    def __init__(self, stream: TextIO, prefix: str, record: BinaryIO | None = None) -> None:
        self._stream = stream
        self._prefix = prefix
        self._record = record
        self._at_line_start = True
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        if not s:
            return 0
        with self._lock:
            out = []
            for line in s.splitlines(keepends=True):
                if self._at_line_start:
                    out.append(self._prefix)
                out.append(line)
                self._at_line_start = line.endswith("\n")
            text = "".join(out)
            self._stream.write(text)
            if self._record is not None:
                self._append(text)
        return len(s)

    def _append(self, text: str) -> None:
        rec = self._record
        if rec is None:
            return
        try:
            if rec.tell() > RECORD_LIMIT:
                rec.seek(0)
                rec.truncate()
                rec.write(f"{self._prefix}{RECORD_HEADER}\n".encode())
            rec.write(text.encode("utf-8", "replace"))
            rec.flush()
        except (OSError, ValueError):
            self._record = None  # the directory is gone (shutdown): stop recording

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding...
        return getattr(self._stream, name)


def install_prefix(rank: int, pid: int, record_path: str | None = None) -> None:
    """Prefix this worker's stdout/stderr; record stderr and faulthandler output."""
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
    old = {id(sys.stdout): "stdout", id(sys.stderr): "stderr"}
    new: dict[str, Any] = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, PrefixedStream):
            continue
        new[name] = PrefixedStream(stream, prefix, record if name == "stderr" else None)
        setattr(sys, name, new[name])
    for handler in logging.root.handlers:
        if isinstance(handler, logging.StreamHandler):
            which = old.get(id(handler.stream))
            if which in new:
                handler.setStream(new[which])

"""Rank-prefixed stdout/stderr in workers, so interleaved logs stay readable.

Every line a worker prints starts with ``(rank N pid P)``. Logging handlers that the
worker inherited (fork) and that point at the old streams are moved to the new ones.
Native code writing to fd 1/2 directly (faulthandler, C libraries) is not prefixed.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO


class PrefixedStream:
    """A text stream that prefixes every line written through it."""

    def __init__(self, stream: TextIO, prefix: str) -> None:
        self._stream = stream
        self._prefix = prefix
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
            self._stream.write("".join(out))
        return len(s)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding...
        return getattr(self._stream, name)


def install_prefix(rank: int, pid: int) -> None:
    prefix = f"(rank {rank} pid {pid}) "
    old = {id(sys.stdout): "stdout", id(sys.stderr): "stderr"}
    new: dict[str, Any] = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, PrefixedStream):
            continue
        new[name] = PrefixedStream(stream, prefix)
        setattr(sys, name, new[name])
    for handler in logging.root.handlers:
        if isinstance(handler, logging.StreamHandler):
            which = old.get(id(handler.stream))
            if which in new:
                handler.setStream(new[which])

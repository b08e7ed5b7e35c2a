"""The worker's end of the stacks channel (see :mod:`gpuexec.ipc.stacks`).

faulthandler's handler is C code: it dumps every thread's Python stack straight to the
channel's descriptor from the signal handler, so it answers while the serving thread runs
bytecode, sleeps in a blocking wait, or holds the GIL inside a long C call. The handler is
registered *before* the header is written: the driver signals only a worker whose channel
has its header, so the signal never meets the default action (which would end the
process).
"""

from __future__ import annotations

import faulthandler
import os
import threading
from typing import BinaryIO

from ..ipc.signals import STACKS_SIGNAL
from ..ipc.stacks import header_line, stacks_path

_channel: BinaryIO | None = None  # kept open for the life of the process (faulthandler's fd)


def open_stacks_channel(ipc_dir: str, rank: int) -> None:
    """Answer STACKS_SIGNAL with a dump of every thread into ``stacks.<rank>``, naming the
    calling thread as the one that serves requests. A worker whose ``ipc_dir`` is not on
    this host (a Ray actor on another node) has no channel: the driver reports that."""
    global _channel
    if not ipc_dir or not os.path.isdir(ipc_dir):
        return
    path = stacks_path(ipc_dir, rank)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
    except OSError:
        return
    channel = os.fdopen(fd, "ab", buffering=0)
    faulthandler.register(STACKS_SIGNAL, file=channel, all_threads=True, chain=False)
    channel.write(header_line(threading.get_ident()))
    _channel = channel

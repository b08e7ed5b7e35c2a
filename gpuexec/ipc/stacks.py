"""A worker's *stacks channel*: the file both sides share for on-demand stack dumps.

::

    driver (executor.stacks)                          worker rank r
    ────────────────────────                          ─────────────
                                                      at start: open stacks.<r> (0600,
                                                      O_APPEND), write the header line,
                                                      faulthandler.register(STACKS_SIGNAL)
    truncate stacks.<r> to its header line
    kill(pid, STACKS_SIGNAL) ───────────────────────▶ faulthandler's C handler, on any
                                                      thread, GIL held elsewhere or not:
                                                      every thread's stack ─▶ the file
    wait: data written, the signal no longer
    pending, no thread inside the handler
    read the dump after the header ◀──────────────────┘

A file in the executor's private 0700 directory rather than a pipe because a worker started
by any launcher (fork, spawn, forkserver, subprocess, zygote, a Ray actor on this node)
can open it by name, and because faulthandler writes from C, with no reader needed: a
pipe that nobody drains would block the handler. The header names the thread that runs
the worker's request loop, so the driver can show the frames of the call in progress.
"""

from __future__ import annotations

import os
import re

HEADER = "gpuexec stacks channel: serving thread "
_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-f]+) \(most recent call first\):$",
                     re.MULTILINE)


def stacks_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"stacks.{rank}")


def header_line(thread_ident: int) -> bytes:
    """The channel's first line: the serving thread as faulthandler prints its id."""
    return f"{HEADER}0x{thread_ident:016x}\n".encode()


def serving_thread(header: bytes) -> str:
    """The serving thread's id (``0x...``) from a header line, "" if it is not one."""
    text = header.decode("ascii", "replace").strip()
    return text[len(HEADER):] if text.startswith(HEADER) else ""


def thread_frames(dump: str, thread: str, limit: int = 4) -> list[str]:
    """The innermost ``limit`` frame lines of ``thread`` in a faulthandler dump (most
    recent first; empty when the thread is not in it)."""
    for found in _THREAD.finditer(dump):
        if found.group(1) != thread:
            continue
        frames: list[str] = []
        for line in dump[found.end() + 1:].splitlines():
            if not line.startswith("  "):
                break
            frames.append(line.strip())
            if len(frames) == limit:
                break
        return frames
    return []

"""A worker's *stderr record*: the file both sides share (the worker writes it, see
:mod:`gpuexec.worker.stdio`; the driver reads its last lines for
:class:`~gpuexec.errors.WorkerDiedError`).

A file rather than a pipe because it survives the worker's death and needs no reader.
faulthandler writes raw to it, without the ``(rank N pid P)`` prefix, so the record
starts with a header line that carries the prefix, and :func:`read_tail` puts it in
front of every dump line.
"""

from __future__ import annotations

import os
import re

RECORD_HEADER = "gpuexec: stderr record of this worker"
_PREFIX = re.compile(r"\(rank \d+ pid \d+\) ")


def stderr_record_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"stderr.{rank}")


def read_tail(path: str, max_lines: int = 20, max_bytes: int = 16384) -> str:
    """The last lines of a stderr record ("" when there is none), each with the worker's
    ``(rank N pid P)`` prefix.

    A faulthandler dump ("Fatal Python error: ...", most recent call first) is kept from
    its first line, where the fault is, rather than cut to its last lines."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    found = _PREFIX.search(text)
    prefix = found.group(0) if found else ""
    fatal = text.rfind("Fatal Python error")
    if fatal >= 0:
        lines = text[fatal:].splitlines()[:2 * max_lines]
    else:
        lines = [ln for ln in text.splitlines()
                 if ln != prefix + RECORD_HEADER][-max_lines:]
    # Lines without the prefix are faulthandler's (everything else went through Python).
    return "\n".join(ln if not prefix or _PREFIX.match(ln) else (prefix + ln).rstrip(" ")
                     for ln in lines)

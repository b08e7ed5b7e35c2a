"""The driver's end of the stacks channel (see :mod:`gpuexec.ipc.stacks`): ask workers
for every thread's stack and read the answers, within a bound.

No ptrace and no external tool: each worker answers STACKS_SIGNAL from faulthandler's C
handler into its own file in the private directory. The driver knows an answer is whole
from the kernel's own account in ``/proc``: the dump has started (bytes after the header),
the signal is no longer pending, and no thread of the worker is inside the handler (the
handler runs with the signal blocked, so a thread that blocks it now and did not before
the request is still writing). A worker that does not answer within the bound (stopped,
or in the kernel) is reported with what it wrote and its process state, never waited for.

One collection at a time per executor (the caller holds the executor's stacks lock): two
would truncate each other's answers.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ..ipc.signals import STACKS_SIGNAL
from ..ipc.stacks import stacks_path

_BIT = 1 << (STACKS_SIGNAL - 1)
_NAP_S = (0.0005, 0.01)  # the first and the longest wait between two looks at /proc


def _mask(status: str, field: str) -> int:
    for line in status.splitlines():
        if line.startswith(field):
            return int(line.split()[1], 16)
    return 0


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _tasks(pid: int) -> list[str]:
    try:
        return [_read(f"/proc/{pid}/task/{tid}/status") for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _blocking(pid: int) -> int:
    """How many of the process's threads block STACKS_SIGNAL now."""
    return sum(1 for s in _tasks(pid) if _mask(s, "SigBlk:") & _BIT)


def _pending(pid: int) -> bool:
    if _mask(_read(f"/proc/{pid}/status"), "ShdPnd:") & _BIT:
        return True
    return any(_mask(s, "SigPnd:") & _BIT for s in _tasks(pid))


def process_state(pid: int) -> str:
    """The kernel's one-word state of ``pid`` (``"S (sleeping)"``, ``"T (stopped)"``), or
    ``"gone"``."""
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("State:"):
            return line.split(":", 1)[1].strip()
    return "gone"


@dataclass
class _Asked:
    pid: int
    path: str
    header: int       # bytes of the channel's header line
    blocking: int     # threads that blocked the signal before it was sent


def _ask(directory: str, rank: int, pid: int) -> _Asked | str:
    """Send one worker the signal; the probe to watch, or why it was not asked."""
    path = stacks_path(directory, rank)
    try:
        with open(path, "rb") as f:
            header = f.readline()
    except OSError:
        header = b""
    if not header.endswith(b"\n"):
        # No channel: the worker runs on another host (a Ray actor on another node), or
        # has not opened it. Never signal it then: the default action would end it.
        return "no stacks channel on this host (a worker on another node answers no signal)"
    asked = _Asked(pid, path, len(header), _blocking(pid))
    try:
        os.truncate(path, len(header))
        os.kill(pid, STACKS_SIGNAL)
    except ProcessLookupError:
        return "the worker process is gone"
    except OSError as e:
        return f"could not ask the worker ({e})"
    return asked


def _answer(asked: _Asked) -> str:
    with open(asked.path, "rb") as f:
        f.seek(asked.header)
        return f.read().decode("utf-8", "replace")


def _whole(asked: _Asked) -> bool:
    try:
        if os.path.getsize(asked.path) <= asked.header:
            return False
    except OSError:
        return False
    return not _pending(asked.pid) and _blocking(asked.pid) <= asked.blocking


def collect(directory: str, pids: Mapping[int, int | None], timeout: float,
            given: float | None = None) -> dict[int, str]:
    """Every thread's stack of each rank in ``pids`` (rank -> pid, None: exited), as
    faulthandler prints it, or a sentence saying why there is none; within ``timeout``
    seconds for all ranks together. A partial answer ends with a line that says so,
    naming ``given`` (the caller's own timeout, of which ``timeout`` is what is left;
    default: ``timeout``)."""
    out: dict[int, str] = {}
    waiting: dict[int, _Asked] = {}
    for rank, pid in pids.items():
        got = "the worker has exited" if pid is None else _ask(directory, rank, pid)
        if isinstance(got, str):
            out[rank] = got
        else:
            waiting[rank] = got
    deadline = time.monotonic() + timeout
    nap = _NAP_S[0]
    while waiting:
        for rank, asked in list(waiting.items()):
            if _whole(asked):
                out[rank] = _answer(asked)
                del waiting[rank]
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            break
        time.sleep(min(nap, left))
        nap = min(2 * nap, _NAP_S[1])
    for rank, asked in waiting.items():
        text = _answer(asked)
        state = process_state(asked.pid)
        why = f"no answer within {timeout if given is None else given:.3g} s; the " \
              f"process is {state}"
        out[rank] = f"{text.rstrip()}\n(incomplete: {why})" if text else why
    return {rank: out[rank] for rank in sorted(out)}


# -- from outside the driver (``gpuexec stacks PID``) ---------------------------------

_CHANNEL = re.compile(r"^(?P<dir>.*/(?:gpuexec-|gpx-)[^/]+)/stacks\.(?P<rank>\d+)$")


def _open_files(pid: int) -> list[str]:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for fd in fds:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def _socket_dirs(pid: int) -> set[str]:
    """The private directories of the ipc sockets ``pid`` has bound (a driver's)."""
    inodes = {link[8:-1] for link in _open_files(pid) if link.startswith("socket:[")}
    dirs = set()
    for line in _read("/proc/net/unix").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes:
            dirs.add(os.path.dirname(fields[7]))
    return dirs


def holds(pid: int, path: str) -> bool:
    """Whether process ``pid`` (of this host) has ``path`` open."""
    return path in _open_files(pid)


def find_workers(pid: int) -> dict[str, dict[int, int]]:
    """The workers of the executors of driver ``pid`` (or worker ``pid`` alone), found
    in ``/proc``: private directory -> rank -> worker pid. A driver is found through the
    ipc sockets it bound in its private directory (not over ``transport="tcp"``)."""
    found: dict[str, dict[int, int]] = {}
    dirs = _socket_dirs(pid)
    candidates = [pid]
    if dirs:
        candidates = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    for other in candidates:
        for link in _open_files(other):
            match = _CHANNEL.match(link)
            if match and (other == pid or match.group("dir") in dirs):
                found.setdefault(match.group("dir"), {})[int(match.group("rank"))] = other
    return found

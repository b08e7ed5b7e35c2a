"""The checkpoint controller's wire, and the per-rank report of a suspend or resume.

The driver process never initialises CUDA, so the driver API's checkpoint calls
(``cuCheckpointProcess*``, which act on a process by pid) run in a small controller
process (:mod:`gpuexec.worker.checkpoint_controller`) that the executor starts on first
use. They talk over the controller's stdin/stdout: each message is a 4-byte big-endian
length and a msgpack-encoded Struct of the tagged unions below::

    driver (executor/suspension.py)              controller (worker/checkpoint_controller.py)
    ───────────────────────────────              ────────────────────────────────────────────
                                   ◀── Hello (driver loaded? cuInit? entry points?)
    Step("lock", pids, timeout_ms) ──▶ one thread per pid: call, time it, read the state
                                   ◀── StepReply([PidResult per pid])
    ... checkpoint / restore / unlock / state likewise; EOF on stdin: the controller exits

Only processes of the same user hold the two pipe ends; nothing here is ever pickled.
:class:`SuspendReport` is public: ``Executor.suspend()`` and ``resume()`` return one per rank.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Literal

import msgspec

from .fdwait import readable

__all__ = [
    "FromController",
    "Hello",
    "PidResult",
    "RankState",
    "Step",
    "StepName",
    "StepReply",
    "SuspendReport",
    "ToController",
    "encode_frame",
    "read_frame",
]

StepName = Literal["lock", "checkpoint", "restore", "unlock", "state"]
RankState = Literal["running", "locked", "checkpointed", "failed", "unknown"]
"""A worker's checkpoint state as the driver API reports it (``unknown``: it could not say)."""

_LEN = struct.Struct(">I")
MAX_FRAME = 1 << 24  # the messages are small; anything bigger is a broken peer


class Hello(msgspec.Struct, frozen=True, tag=True):
    """The controller's first message: can it checkpoint at all?"""

    ok: bool  # libcuda loaded, cuInit succeeded and every checkpoint entry point is there
    driver: str  # "CUDA 12.8 (libcuda.so.1)", or "" when no driver could be loaded
    detail: str  # why not, when ok is False


class Step(msgspec.Struct, frozen=True, tag=True):
    """Apply one driver call to every pid, concurrently."""

    op: StepName
    pids: list[int]
    timeout_ms: int = 0  # lock only: the driver's own lock timeout, 0 = none


class PidResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one call did to one pid."""

    pid: int
    function: str  # the cu* symbol called
    code: int  # CUresult; 0 is success
    name: str  # CUresult name ("CUDA_SUCCESS", "CUDA_ERROR_ILLEGAL_STATE", ...)
    text: str  # the driver's description of code
    state: RankState  # the pid's state after the call (cuCheckpointProcessGetState)
    seconds: float  # wall time of the call
    gpu_mib: float | None = None  # NVML: MiB the pid holds on all GPUs after the call
    rss_bytes: int | None = None  # the pid's resident host memory after the call


class StepReply(msgspec.Struct, frozen=True, tag=True):
    results: list[PidResult]  # in the order of Step.pids


ToController = Step
FromController = Hello | StepReply


class SuspendReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one ``suspend()`` or ``resume()`` did to one rank.

    ``gpu_mib`` is what NVML saw change on the worker's GPUs: MiB freed by a suspend,
    MiB taken back by a resume (``None`` where NVML is not installed or cannot see the
    worker's pid, e.g. in another pid namespace). ``host_bytes`` is the change of the
    worker's resident host memory across the operation, read from ``/proc``: the driver
    parks device memory in the worker's own host memory, so after a suspend it is about
    the bytes moved (positive), after a resume about the bytes released (negative).
    ``changed`` is False when the rank already was in the asked-for state (suspend twice,
    resume a running executor): then nothing was called and the figures are zero.
    """

    rank: int
    pid: int
    operation: Literal["suspend", "resume"]
    state: RankState  # the rank's state afterwards
    changed: bool  # False: already in the asked-for state, no driver call was made
    seconds: float  # driver time for this rank: lock + checkpoint, or restore + unlock
    steps: dict[str, float] = msgspec.field(default_factory=dict)  # seconds per driver call
    gpu_mib: float | None = None
    host_bytes: int | None = None


_encoder = msgspec.msgpack.Encoder()


def encode_frame(message: msgspec.Struct) -> bytes:
    """One frame: the 4-byte big-endian length, then the msgpack body."""
    body = _encoder.encode(message)
    return _LEN.pack(len(body)) + body


def read_frame(fd: int, deadline: float | None = None) -> bytes:
    """The body of the next frame on ``fd``. ``EOFError`` when the peer closed its end,
    ``TimeoutError`` when ``deadline`` (``time.monotonic()``) passes first, ``ValueError``
    for a frame over :data:`MAX_FRAME`."""
    header = _read_exact(fd, _LEN.size, deadline)
    (size,) = _LEN.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"a checkpoint controller frame of {size} bytes is over the limit")
    return _read_exact(fd, size, deadline)


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    chunks: list[bytes] = []
    while size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not readable([fd], left):
                raise TimeoutError("no answer from the checkpoint controller in time")
        data = os.read(fd, size)
        if not data:
            raise EOFError("the checkpoint controller's pipe was closed")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)

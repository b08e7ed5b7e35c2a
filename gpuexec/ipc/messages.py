"""The wire: every message between the driver and its workers, as tagged msgspec Structs.

The three rooms (``executor``, ``worker``, ``ipc``) meet only through these types.
Each socket decodes into a closed union, so an unknown or malformed message is a
``msgspec.ValidationError`` that the receiver drops and counts, never an unpickle.

Sockets and who speaks on them (``ipc://`` endpoints in a private 0700 directory)::

    driver ROUTER "req"  ── Call / Ping / Shutdown ──▶  worker DEALER (identity b"r<rank>")
    driver ROUTER "req"  ◀── Ready / StartupFailed ──  worker DEALER   (start-up only)
    driver PULL   "rep"  ◀────────── Reply ──────────  worker PUSH

Handshake: the worker's first message on its DEALER is ``Ready`` (or ``StartupFailed``)
and carries ``PROTOCOL_VERSION``; the driver refuses a worker that speaks another one.
Sending start-up messages on the DEALER also guarantees that the ROUTER knows the
worker's identity before the first ``Call`` is routed to it.

Worker lifecycle (who moves it):

    =========  =========================  ===============================
    state      entered when               leaves to
    =========  =========================  ===============================
    starting   process started (driver)   ready (worker sends Ready),
                                          dead (StartupFailed / exit)
    ready      driver got Ready           busy (Call), dead
    busy       worker took a Call         ready (Reply sent), dead
    dead       sentinel fired (driver)    -- final
    =========  =========================  ===============================

Hot messages (``Call``, ``Reply``) are ``array_like`` to keep the msgpack small.
``args``, ``kwargs`` and ``value`` hold arbitrary data: numpy arrays and CPU tensors
travel as out-of-band frames (see :mod:`gpuexec.ipc.codec`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from .reports import DeviceReport

PROTOCOL_VERSION = 1


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a worker process needs to start; encoded by the driver, decoded first
    thing in the worker, before any user code is imported or unpickled."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: str                      # "cpu" or "cuda"
    gpu: int | None                  # physical CUDA ordinal (driver's numbering), None on CPU
    isolate_devices: bool
    release_stale_contexts: bool
    driver_pid: int
    driver_is_parent: bool           # False under forkserver (the server is the parent)
    req_endpoint: str
    rep_endpoint: str
    worker_cls: str                  # "module:QualName" ("" when worker_cls_pickle is set)
    worker_cls_pickle: bytes = b""   # cloudpickle of the class when it is not importable
    init_args_pickle: bytes = b""    # cloudpickle of (worker_args, worker_kwargs)
    env: dict[str, str] = {}


class Failure(msgspec.Struct, frozen=True, array_like=True):
    """An exception raised in a worker, reduced to what crosses a process boundary."""

    type_name: str
    message: str
    traceback: str


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    protocol: int
    rank: int
    pid: int
    device: str                      # the device string valid inside the worker
    report: DeviceReport | None = None


class StartupFailed(msgspec.Struct, frozen=True, tag="startup_failed"):
    protocol: int
    rank: int
    pid: int
    stage: str                       # "init_device", "import", "__init__", ...
    error: Failure


class Call(msgspec.Struct, frozen=True, tag="call", array_like=True):
    call_id: int
    method: str                      # method name, or the callable's name for messages
    fn: bytes | None                 # cloudpickled callable, run as fn(worker, *args, **kwargs)
    args: list[Any]
    kwargs: dict[str, Any]
    want_value: bool = True          # False: reply with no value (unique_reply_rank elsewhere)


class Ping(msgspec.Struct, frozen=True, tag="ping", array_like=True):
    call_id: int


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown", array_like=True):
    pass


class Reply(msgspec.Struct, frozen=True, tag="reply", array_like=True):
    call_id: int
    rank: int
    value: Any = None
    error: Failure | None = None


# What each receiver accepts: a decoder is built once per socket for its union.
ToWorker = Call | Ping | Shutdown
Handshake = Ready | StartupFailed
ToDriver = Reply

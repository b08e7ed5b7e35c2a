"""The wire: every message between the driver and its workers, as tagged msgspec Structs.

The three rooms (``executor``, ``worker``, ``ipc``) meet only through these types.
Each socket decodes into a closed union, so an unknown or malformed message is a
``msgspec.ValidationError`` that the receiver drops and counts, never an unpickle.

Sockets and who speaks on them (``ipc://`` endpoints in a private 0700 directory, or
``tcp://`` with CURVE: see :mod:`gpuexec.ipc.curve` and :mod:`gpuexec.ipc.zap`)::

    driver XPUB "req"  ── Call / Ping / Shutdown ─────────▶  worker SUB (b"*", b"r<rank>.")
    driver PULL "rep"  ◀── Ready / StartupFailed, Reply / Pong ──  worker PUSH

A request is published once for all ranks (topic ``ALL_TOPIC``) or once per targeted
rank (``rank_topic(rank)``); the topic is a prefix of the header frame, so a broadcast
is a single send whatever the world size. The XPUB socket reports each worker's
subscription to the driver, which waits for it at start-up: no request is published
before every worker can receive it (the "slow joiner" problem of PUB/SUB).

Handshake: the worker's first message is ``Ready`` (or ``StartupFailed``) and carries
``PROTOCOL_VERSION``; the driver refuses a worker that speaks another one.

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
``args``, ``kwargs`` and ``value`` hold arbitrary data that keeps its type (see
:mod:`gpuexec.ipc.values`): numpy arrays and CPU tensors travel as out-of-band frames
(see :mod:`gpuexec.ipc.codec`).
"""

from __future__ import annotations

import traceback
from typing import Any

import msgspec

from .curve import CurveClient
from .reports import DeviceReport
from .shm_ring import RingSpec

PROTOCOL_VERSION = 1


class ShmSpec(msgspec.Struct, frozen=True):
    """A worker's shared-memory path: the request ring (it is reader ``rank``), its own
    reply ring (it is the writer) and the driver's doorbell."""

    request: RingSpec
    reply: RingSpec
    doorbell: str
    spin: float = 100e-6             # seconds to spin for the next request before sleeping


class DistributedSpec(msgspec.Struct, frozen=True):
    """The torch.distributed default process group every worker joins right after
    ``init_device`` (``MASTER_ADDR`` / ``MASTER_PORT`` rendezvous, ``env://``)."""

    backend: str                     # "nccl" or "gloo"
    master_addr: str
    master_port: int
    timeout: float                   # seconds: the rendezvous and every collective


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
    stale_context_policy: str        # "release", "reset" or "off"
    driver_pid: int                  # 0: none to watch (Ray ties an actor to its driver)
    driver_is_parent: bool           # False under forkserver (the server is the parent)
    req_endpoint: str
    rep_endpoint: str
    worker_cls: str                  # "module:QualName" ("" when worker_cls_pickle is set)
    worker_cls_pickle: bytes = b""   # cloudpickle of the class when it is not importable
    init_args_pickle: bytes = b""    # cloudpickle of (worker_args, worker_kwargs)
    env: dict[str, str] = {}
    stderr_record: str = ""          # file the worker copies its stderr to ("" = none)
    ipc_dir: str = ""                # the private directory; removed if the driver dies
    sys_path: list[str] = []         # the driver's sys.path, for workers in a fresh interpreter
    shm: ShmSpec | None = None       # the shared-memory path, None: ZeroMQ only
    worker_extension_cls: str = ""   # "module:QualName" of a mixin composed over worker_cls
    worker_extension_pickle: bytes = b""  # cloudpickle of the mixin when it is not importable
    distributed: DistributedSpec | None = None  # None: no torch.distributed process group
    curve: CurveClient | None = None  # tcp: CURVE keys to connect with; None on ipc
    allow_callables: bool = True     # False: refuse callables and pickled arguments
    max_message_size: int = -1       # bytes per frame, received and sent; -1: no limit
    shutdown_timeout: float = 5.0    # seconds on_shutdown() may take after a SIGTERM
    cancel_board: str = ""           # the cancel board's file ("": calls are not interrupted)
    max_inflight_calls: int = 1024   # calls the driver may have queued at this worker


class ValueFault(msgspec.Struct, frozen=True, array_like=True):
    """A value that could not travel faithfully (see :mod:`gpuexec.ipc.values`): where it
    sat (``args[0]['k']``, ``result``), its type and why."""

    path: str
    type_name: str
    reason: str


class Failure(msgspec.Struct, frozen=True, array_like=True):
    """An exception raised in a worker, reduced to what crosses a process boundary.

    ``value`` is set when it was not the method that failed but a value of the call: the
    worker could not rebuild the arguments or send the result (the driver raises
    :class:`~gpuexec.errors.ValueNotCarriedError` instead of ``RemoteError``). Build one
    with :meth:`make` and read it with :meth:`texts`: ``str()`` of an exception may hold
    lone surrogates, which msgpack strings cannot; such texts travel as their UTF-8
    (``surrogatepass``) bytes read as latin-1, flagged by ``surrogates``, and come back
    as the very same strings.
    """

    type_name: str
    message: str
    traceback: str
    value: ValueFault | None = None
    surrogates: bool = False

    @classmethod
    def make(cls, type_name: str, message: str, traceback: str,
             value: ValueFault | None = None) -> Failure:
        try:
            (type_name + message + traceback).encode()
            return cls(type_name, message, traceback, value)
        except UnicodeEncodeError:
            return cls(_to_latin1(type_name), _to_latin1(message), _to_latin1(traceback),
                       value, True)

    @classmethod
    def of(cls, exc: BaseException, value: ValueFault | None = None) -> Failure:
        """``exc`` as it crosses to the driver (the worker's side). Never raises: an
        exception whose ``__str__`` raises is reported as such (the worker lives on), and
        texts with lone surrogates arrive unchanged (see :meth:`make`)."""
        t = type(exc)
        name = t.__qualname__ if t.__module__ == "builtins" else \
            f"{t.__module__}.{t.__qualname__}"
        try:
            message = str(exc)
            if type(message) is not str:  # a __str__ returning a str subclass
                message = str.__str__(message)
        except BaseException as e:
            message = f"<str() of the {name} raised {type(e).__qualname__}>"
        try:
            tb = "".join(traceback.format_exception(exc))
        except BaseException as e:
            tb = f"<the traceback could not be formatted: {type(e).__qualname__}>"
        return cls.make(name, message, tb, value)

    def texts(self) -> tuple[str, str, str]:
        """``(type_name, message, traceback)`` exactly as the worker had them."""
        if not self.surrogates:
            return self.type_name, self.message, self.traceback
        return (_from_latin1(self.type_name), _from_latin1(self.message),
                _from_latin1(self.traceback))


def _to_latin1(s: str) -> str:
    return s.encode("utf-8", "surrogatepass").decode("latin-1")


def _from_latin1(s: str) -> str:
    try:
        return s.encode("latin-1").decode("utf-8", "surrogatepass")
    except UnicodeError:  # not what make() wrote: show it as it came
        return s


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
    value_rank: int = -1             # >= 0: only that rank sends its value (unique_reply_rank)


class Ping(msgspec.Struct, frozen=True, tag="ping", array_like=True):
    call_id: int


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown", array_like=True):
    pass


class Regroup(msgspec.Struct, frozen=True, tag="regroup", array_like=True):
    """To the survivors of a respawn: with ``distributed`` (``distributed_backend``),
    abort the process group and join a new one there (a fresh rendezvous, same world
    size); then run ``Worker.on_peers_replaced(replaced)``; answered with a Reply to
    ``call_id``."""

    call_id: int
    distributed: DistributedSpec | None
    replaced: list[int]


class Reply(msgspec.Struct, frozen=True, tag="reply", array_like=True):
    call_id: int
    rank: int
    value: Any = None
    error: Failure | None = None


class Pong(msgspec.Struct, frozen=True, tag="pong", array_like=True):
    """The answer to a Ping: the worker is alive, and what it dropped so far."""

    call_id: int
    rank: int
    dropped: dict[str, int]          # malformed or refused requests, by reason


# -- the zygote's control channel (a Unix socket pair with the driver) -----------------
#
#   driver                                  zygote
#   start zygote (python -m gpuexec.worker.zygote_server) ──▶ preload, check, ZygoteHello
#   SpawnWorker(spec, environment, cwd) ──────────▶ fork ──▶ the child runs the worker
#              ◀── WorkerForked(pid) + its pidfd (SCM_RIGHTS)
#              ◀── WorkerExited(pid, exit code)    (whenever a child is reaped)
#   StopZygote ───────────────────────────────────▶ exit (also when the driver dies)


class ZygoteHello(msgspec.Struct, frozen=True, tag="zygote_hello"):
    protocol: int
    pid: int
    preloaded: list[str]             # modules imported
    failed: dict[str, str]           # module -> why it could not be imported
    threads: int                     # Python threads of the zygote: must be 1 to fork
    native_threads: int              # all threads (idle BLAS pools and the like)
    cuda: str                        # its CUDA state, in words
    cuda_initialized: bool           # must be False: forked children need a clean CUDA


class SpawnWorker(msgspec.Struct, frozen=True, tag="spawn_worker"):
    """Fork a worker; the driver's stdout and stderr travel with it as descriptors."""

    request_id: int
    spec: bytes                      # an encoded WorkerSpec
    environ: dict[str, str]          # the driver's environment now
    cwd: str


class WorkerForked(msgspec.Struct, frozen=True, tag="worker_forked"):
    request_id: int
    pid: int                         # a pidfd of it travels with this message


class WorkerExited(msgspec.Struct, frozen=True, tag="worker_exited"):
    pid: int
    exitcode: int                    # negative: killed by that signal


class StopZygote(msgspec.Struct, frozen=True, tag="stop_zygote"):
    pass


ToZygote = SpawnWorker | StopZygote
FromZygote = ZygoteHello | WorkerForked | WorkerExited


ALL_TOPIC = b"*"


def rank_topic(rank: int) -> bytes:
    """The topic of requests for one rank; the trailing dot keeps r1 from matching r12."""
    return b"r%d." % rank


# What each receiver accepts: a decoder is built once per socket for its union.
ToWorker = Call | Ping | Shutdown | Regroup
Handshake = Ready | StartupFailed
ToDriver = Reply | Pong

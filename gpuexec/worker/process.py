"""A worker process from start to exit: the entry point the executor launches.

    spec bytes ──▶ own process group + guardian ──▶ environment, stdio ──▶ transport
    ──▶ cancel handler ──▶ init_device ──▶ torch.distributed group (when asked; its
    aborter thread, see .group_abort) ──▶ import/unpickle worker
    class (+ extension mixin) ──▶ __init__ ──▶ Ready ──▶ loop { Call ─▶ run ─▶ Reply }
    ──▶ Shutdown ──▶ group destroyed

The device is selected before the user's worker class is imported or unpickled, so
import-time CUDA work lands on this worker's GPU. Requests come and replies go through
the transport chosen once at start (:mod:`.transport`: ZeroMQ or shared memory). The
loop is single-threaded and blocks in ``recv`` (an idle worker uses no CPU; over shared
memory it spins a moment after each request, only on a host with a core for every
process, then sleeps on the ring's futex); the guardian process (:mod:`.guardian`) ends
the worker and everything it started if the driver dies, and what it started if the
worker dies. SIGINT is ignored: it is the driver that decides to shut down (a worker
leads its own process group, so a terminal's Ctrl-C, which goes to the foreground
group, does not reach it anyway; a Ray actor's group is Ray's). A call the driver
cancels is interrupted by CANCEL_SIGNAL on the loop's thread (:mod:`.cancel`); with a
process group, a cancelled call waiting in a collective aborts it (:mod:`.group_abort`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import cloudpickle
import msgspec
import zmq

from ..errors import CallCancelled, ValueNotCarriedError
from ..ipc import exit_hooks
from ..ipc.cancel_board import BoardReader
from ..ipc.codec import Decoder, Encoder, UndecodableValue
from ..ipc.curve import secure_client
from ..ipc.messages import (
    ALL_TOPIC,
    PROTOCOL_VERSION,
    Call,
    Failure,
    Ping,
    Pong,
    Ready,
    Regroup,
    Reply,
    Shutdown,
    StartupFailed,
    ToWorker,
    ValueFault,
    WorkerSpec,
    rank_topic,
)
from ..ipc.shm_ring import Ran
from .base import Worker
from .cancel import CancelPoint, set_point
from .deferred import ReplyGate
from .device import init_device, isolate_environment, merge_reports
from .distributed import (
    destroy_process_group,
    distributed_environment,
    init_process_group,
    regroup,
    start_abort_thread,
)
from .group_abort import GroupAborter
from .guardian import kill_children, start_guardian, stop_guardian
from .loading import build_worker, extend_class, resolve_class
from .shutdown_hook import ShutdownHook
from .stacks import open_stacks_channel
from .stdio import drain_streams, install_prefix
from .transport import ShmWorkerTransport, WorkerTransport, ZmqWorkerTransport
from .watchdog import start_watchdog

log = logging.getLogger("gpuexec.worker")

WORKER_ENV_FLAG = "GPUEXEC_WORKER"
_FN_CACHE_SIZE = 64
_NESTED_EXIT_S = 3.0  # how long an exiting worker waits for executors it built to stop
_ALL = ALL_TOPIC[0]
_hook: ShutdownHook | None = None  # set once the worker is built; read by _terminated
_replies: ReplyGate | None = None  # the reply gate, closed by _terminated before the hook


def _setup_process(spec: WorkerSpec) -> None:
    for entry in reversed(spec.sys_path):  # the driver's import path, ahead of ours
        if entry not in sys.path:
            sys.path.insert(0, entry)
    os.environ.update(spec.env)
    os.environ.update({
        "RANK": str(spec.rank),
        "LOCAL_RANK": str(spec.local_rank),
        "WORLD_SIZE": str(spec.world_size),
        "LOCAL_WORLD_SIZE": str(spec.local_world_size),
        WORKER_ENV_FLAG: "1",
        **distributed_environment(spec),
    })
    isolate_environment(spec)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminated)
    install_prefix(spec.rank, os.getpid(), spec.stderr_record, spec.ipc_dir)
    open_stacks_channel(spec.ipc_dir, spec.rank)  # this thread serves requests (see .stacks)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (the driver's shutdown escalation, or anyone's): run the worker's shutdown
    hook (bounded), take our own children along, exit. Replies stop first: nobody reads
    them any more, and a hook resolving deferred futures must not block on a full ring."""
    if _replies is not None:
        _replies.close_now()
    if _hook is not None:
        _hook.run_bounded()
    exit_hooks.run(0.0, _NESTED_EXIT_S)  # executors this worker built: their dirs too
    drain_streams()
    kill_children()
    stop_guardian()
    os._exit(128 + signum)


class _Server:
    """The request loop. Owns the two sockets; single-threaded."""

    def __init__(self, spec: WorkerSpec, sub: zmq.Socket[bytes],
                 push: zmq.Socket[bytes]) -> None:
        self.rank = spec.rank
        self.spec = spec  # its rendezvous changes when peers are replaced (Regroup)
        self.worker: Worker | None = None
        self.target: Any = None  # what calls by name and callables go to (see host())
        self.encoder = Encoder(allow_pickle=True)
        # allow_callables=False: nothing that arrives is unpickled (a pickled argument
        # runs code as surely as a callable does); arrays in shared memory still map.
        self.allow_callables = spec.allow_callables
        self.max_message_size = spec.max_message_size

        def decoder(copy_buffers: bool) -> Decoder[ToWorker]:
            return Decoder(ToWorker, allow_pickle=spec.allow_callables,
                           copy_buffers=copy_buffers, allow_shm=True,
                           shm_pid=spec.driver_pid, where="the worker")

        # The transport, chosen once (see .transport): the loop never asks which it has.
        self.transport: WorkerTransport = ZmqWorkerTransport(
            sub, push, spec.rank, decoder(False), self._drop) if spec.shm is None else \
            ShmWorkerTransport(sub, push, spec.rank, decoder(False), self._drop, spec.shm,
                               decoder(True))
        self.dropped = 0
        self.dropped_by_reason: dict[str, int] = {}  # sent to the driver with each Pong
        self._fns: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()
        self.gate = ReplyGate(self._reply)  # every reply leaves through it (any thread)
        board = None if not spec.cancel_board else \
            BoardReader(spec.cancel_board, spec.rank, spec.world_size)
        self.cancel = CancelPoint(board, spec.max_inflight_calls)
        set_point(self.cancel)

    def host(self, worker: Worker) -> None:
        """Serve ``worker`` (built after the transport: the rings are attached before
        the driver sees this worker ready and gives up their descriptors). Called before
        ``Ready``: an ``rpc_target()`` that raises is a start-up failure."""
        self.worker = worker
        self.target = worker.rpc_target()

    def _drop(self, e: Exception, reason: str = "") -> None:
        self.dropped += 1
        reason = reason or getattr(e, "reason", "") or "packet"
        self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + 1
        if self.dropped == 1:
            log.warning("dropped a malformed request (%s); counting further ones", e)

    def serve(self) -> None:
        cancel = self.cancel  # calls by name: answered by the ring core (see .transport)
        self.transport.answer_in_core(self.target, cancel, self.gate, self.max_message_size,
                                      self.encoder)
        next_request = self.transport.next
        while True:
            msg = next_request()
            if msg is None:
                continue
            match msg:
                case Call():
                    if cancel.recheck and cancel.queued_cancelled(msg.call_id):
                        out: Reply | Future[Any] = self._cancelled(msg)
                    else:
                        # Armed from the method's start to just after it returned; the
                        # handler raises at most once in between (see .cancel), caught
                        # here if it lands outside _run's own handler.
                        cancel.running = msg.call_id
                        cancel.method = msg.method
                        try:
                            cancel.armed = True
                            out = self._run(msg)
                            cancel.armed = False
                        except CallCancelled:
                            out = self._cancelled(msg)
                    self._answer(out, msg.method, msg)
                case Ran():  # a call whose method the ring core ran (see .transport)
                    call = Call(msg.call_id, msg.method, None, [], {})
                    self._answer(self._outcome(call, msg.value, msg.error), msg.method, call)
                case Ping(call_id=call_id):
                    self._answer(Pong(call_id, self.rank, dict(self.dropped_by_reason)), "ping")
                case Shutdown():
                    return
                case Regroup():
                    self._answer(self._regroup(msg), "regroup")
                case UndecodableValue(envelope=Call() as call) as e:
                    self._answer(Reply(call.call_id, self.rank, error=e.failure()), call.method)
                case UndecodableValue() as e:  # pragma: no cover - only calls carry values
                    self._drop(e)

    def _answer(self, out: Reply | Pong | Future[Any], method: str,
                call: Call | None = None) -> None:
        """Send a reply, or ``call``'s once the Future its method returned is done."""
        if isinstance(out, Future):
            assert call is not None  # only a call's method returns one
            self.gate.defer(out, method, self._deferred_reply(call),  # or, refused:
                            lambda e: self._outcome(call, None, e))
        else:
            self.gate.send(out, method)
            self.transport.served()

    def _regroup(self, msg: Regroup) -> Reply:
        """Peers were replaced: a new process group, then the worker's hook."""
        try:
            if msg.distributed is not None:
                self.spec = regroup(self.spec, msg.distributed)
            if self.worker is not None:
                self.worker.on_peers_replaced(list(msg.replaced))
        except BaseException as e:
            return Reply(msg.call_id, self.rank, error=Failure.of(e))
        return Reply(msg.call_id, self.rank, None)

    def _cancelled(self, call: Call) -> Reply:
        """The answer to a call cancelled before it started or as its method returned."""
        return Reply(call.call_id, self.rank,
                     error=Failure.of(CallCancelled(call.call_id, call.method)))

    def _function(self, blob: bytes) -> Callable[..., Any]:
        fn = self._fns.get(blob)
        if fn is None:
            fn = cloudpickle.loads(blob)
            self._fns[blob] = fn
            if len(self._fns) > _FN_CACHE_SIZE:
                self._fns.popitem(last=False)
        return fn

    def _deferred_reply(self, call: Call) -> Callable[[Future[Any]], Reply]:
        """The reply to ``call`` from the future its method returned (see .deferred)."""
        keep = call.value_rank < 0 or call.value_rank == self.rank

        def finish(future: Future[Any]) -> Reply:
            try:
                value = future.result()
            except BaseException as e:  # CancelledError is a BaseException
                return Reply(call.call_id, self.rank, error=Failure.of(e))
            return Reply(call.call_id, self.rank, value if keep else None)

        return finish

    def _run(self, call: Call) -> Reply | Future[Any]:
        """Run ``call``; its reply, or the Future the method returned (reply deferred)."""
        try:
            if call.fn is not None and not self.allow_callables:
                # Defence in depth: the driver refuses these before sending.
                self._drop(PermissionError("a callable arrived"), "callable_refused")
                raise PermissionError("this executor was built with allow_callables=False: "
                                      "the worker does not unpickle callables")
            if call.fn is not None:
                value = self._function(call.fn)(self.target, *call.args, **call.kwargs)
            else:  # a method by name (no dunder: nothing the worker did not declare)
                name = call.method
                method = getattr(self.target, name, None) if not name.startswith("__") else None
                if method is None or not callable(method):
                    raise AttributeError(
                        f"{type(self.target).__qualname__} has no method {name!r}")
                value = method(*call.args, **call.kwargs)
        except BaseException as e:  # SystemExit too: the worker lives on
            return self._outcome(call, None, e)
        return self._outcome(call, value, None)

    def _outcome(self, call: Call, value: Any, error: BaseException | None
                 ) -> Reply | Future[Any]:
        """The reply to ``call`` whose method returned ``value`` (a Future: deferred)
        or raised ``error``."""
        if error is not None:
            return Reply(call.call_id, self.rank, error=Failure.of(error))
        if isinstance(value, Future):
            return value
        keep = call.value_rank < 0 or call.value_rank == self.rank
        return Reply(call.call_id, self.rank, value if keep else None)

    def _reply(self, reply: Reply | Pong, method: str) -> None:
        try:
            if type(reply) is Reply and reply.value is None and reply.error is None:
                frames = [self.encoder.none_reply(reply.call_id, reply.rank)]  # cached
            else:
                frames = self.encoder.encode(reply)
            if len(frames) > 1 or len(frames[0]) > self.max_message_size >= 0:
                _check_sizes(frames, self.max_message_size)  # raises if one is over it
        except BaseException as e:
            if isinstance(e, ValueNotCarriedError):
                failure = Failure.of(e, ValueFault(e.path, e.type_name,
                                                     f"{e.reason} (in the worker)"))
            else:
                failure = Failure.of(TypeError(
                    f"the result of {method!r} cannot be sent back: {e!r}"))
            frames = self.encoder.encode(Reply(reply.call_id, self.rank, error=failure))
        self.transport.send(frames)


def _check_sizes(frames: list[Any], limit: int) -> None:
    """Refuse to send a frame the driver's socket would refuse (``MAXMSGSIZE``: it would
    drop the connection, and the reply with it); ``limit`` -1: none."""
    if limit < 0:
        return
    for frame in frames:
        size = memoryview(frame).nbytes
        if size > limit:
            raise ValueError(f"a frame of {size} bytes is over max_message_size={limit}")


def run_worker(spec_bytes: bytes, own_process: bool = True) -> None:
    """Process entry point (the target the executor's launcher starts). ``own_process``
    False: the process is someone else's (a Ray actor's), so it gets no process group
    of its own nor a guardian, only a watchdog thread."""
    spec = msgspec.msgpack.decode(spec_bytes, type=WorkerSpec)
    start_abort_thread(spec)  # first: every later thread inherits the blocked signal
    if own_process:
        start_guardian(spec.driver_pid, spec.driver_is_parent, spec.ipc_dir)
    _setup_process(spec)
    if not own_process:
        start_watchdog(spec.driver_pid, spec.ipc_dir)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.MAXMSGSIZE, spec.max_message_size)
    sub.setsockopt(zmq.SUBSCRIBE, ALL_TOPIC)
    sub.setsockopt(zmq.SUBSCRIBE, rank_topic(spec.rank))
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.setsockopt(zmq.LINGER, 1000)
    if spec.curve is not None:  # tcp: CURVE, keys from the private start-up channel
        secure_client(sub, spec.curve)
        secure_client(push, spec.curve)
    sub.connect(spec.req_endpoint)
    push.connect(spec.rep_endpoint)
    server = _Server(spec, sub, push)  # attaches the shared-memory rings, if any
    server.cancel.install()
    handshake = Encoder(allow_pickle=False)
    stage = "init_device"
    try:
        report = init_device(spec)
        stage = "init_distributed"
        init_process_group(spec)
        if spec.distributed is not None and server.cancel.board is not None:
            GroupAborter(server.cancel, spec.rank).start()
        stage = "import"
        cls = resolve_class(spec)
        stage = "worker_extension_cls"
        cls = extend_class(spec, cls)
        stage = "__init__"
        worker = build_worker(spec, cls)
        stage = "rpc_target"
        server.host(worker)
        if spec.device == "cuda":
            stage = "init_device"  # again: release what the import or __init__ left behind
            report = merge_reports(report, init_device(spec))
    except BaseException as e:  # SystemExit in __init__ is a start-up failure too
        push.send_multipart(handshake.encode(StartupFailed(
            PROTOCOL_VERSION, spec.rank, os.getpid(), stage, Failure.of(e))))
        push.close(linger=2000)
        sub.close(linger=0)
        ctx.term()
        drain_streams()
        kill_children()
        stop_guardian()
        os._exit(1)
    global _hook, _replies
    _replies = server.gate
    _hook = ShutdownHook(worker.on_shutdown, spec.shutdown_timeout)  # before Ready: a
    # SIGTERM right after the driver saw this worker ready must already run the hook
    push.send_multipart(handshake.encode(
        Ready(PROTOCOL_VERSION, spec.rank, os.getpid(), worker.device, report)))
    try:
        server.serve()
        server.gate.close()  # the driver stopped listening: replies from now on (the
        _hook.run()          # hook's cancelled futures included) are dropped
        exit_hooks.run(0.0, _NESTED_EXIT_S)  # executors this worker built and left
    finally:
        server.gate.close()  # a future resolving from now on has nobody to answer
        destroy_process_group(server.spec)
        kill_children()
        sub.close()
        push.close()
        ctx.term()
        drain_streams()
        stop_guardian()

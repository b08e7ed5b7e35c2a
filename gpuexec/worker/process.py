"""A worker process from start to exit: the entry point the executor launches.

    spec bytes ──▶ own process group + guardian ──▶ environment, stdio ──▶ init_device
    ──▶ torch.distributed
    group (when asked) ──▶ import/unpickle worker class (+ extension mixin) ──▶ __init__
    ──▶ Ready ──▶ loop { Call ─▶ run ─▶ Reply } ──▶ Shutdown ──▶ group destroyed

The device is selected before the user's worker class is imported or unpickled, so
import-time CUDA work lands on this worker's GPU. The loop is single-threaded and
blocks in ``recv`` (an idle worker uses no CPU; over shared memory it spins a moment
after each request, only on a host with a core for every process, then sleeps on the
ring's futex); the guardian process
(:mod:`.guardian`) ends the worker and everything it started if the driver dies, and
what it started if the worker dies. SIGINT is ignored: it is the driver that decides
to shut down (a worker leads its own process group, so a terminal's Ctrl-C, which goes
to the foreground group, does not reach it anyway; a Ray actor's group is Ray's).
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import cloudpickle
import msgspec
import zmq

from ..errors import ValueNotCarriedError
from ..ipc import futex, packets
from ..ipc.codec import (
    Decoder,
    Encoder,
    MalformedMessage,
    UndecodableValue,
    recv_rest,
    send_frames,
)
from ..ipc.curve import secure_client
from ..ipc.forecast import ArrivalForecast
from ..ipc.messages import (
    ALL_TOPIC,
    PROTOCOL_VERSION,
    Call,
    Failure,
    Ping,
    Pong,
    Ready,
    Reply,
    ShmSpec,
    Shutdown,
    StartupFailed,
    ToWorker,
    ValueFault,
    WorkerSpec,
    rank_topic,
)
from ..ipc.shm_ring import Doorbell, RingReader, RingWriter
from .base import Worker
from .deferred import ReplyGate
from .device import init_device, isolate_environment, merge_reports
from .distributed import destroy_process_group, distributed_environment, init_process_group
from .guardian import kill_children, start_guardian, stop_guardian
from .loading import build_worker, extend_class, resolve_class
from .shutdown_hook import ShutdownHook
from .stdio import install_prefix
from .watchdog import start_watchdog

log = logging.getLogger("gpuexec.worker")

WORKER_ENV_FLAG = "GPUEXEC_WORKER"
_FN_CACHE_SIZE = 64
_ALL = ALL_TOPIC[0]
_hook: ShutdownHook | None = None  # set once the worker is built; read by _terminated


def failure_from(exc: BaseException, value: ValueFault | None = None) -> Failure:
    """``exc`` as it crosses to the driver. Never raises: an exception whose ``__str__``
    raises is reported as such (the worker lives on), and texts with lone surrogates
    arrive unchanged (see :meth:`Failure.make`)."""
    t = type(exc)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
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
    return Failure.make(name, message, tb, value)


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
    install_prefix(spec.rank, os.getpid(), spec.stderr_record)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (the driver's shutdown escalation, or anyone's): run the worker's shutdown
    hook (bounded), take our own children along, exit."""
    if _hook is not None:
        _hook.run_bounded()
    kill_children()
    stop_guardian()
    os._exit(128 + signum)


class _Server:
    """The request loop. Owns the two sockets; single-threaded."""

    def __init__(self, spec: WorkerSpec, worker: Worker, sub: zmq.Socket[bytes],
                 push: zmq.Socket[bytes], shm: _ShmWorkerPath | None) -> None:
        self.rank = spec.rank
        self.target = worker.rpc_target()  # what calls by name and callables go to
        self.sub = sub
        self.push = push
        self.shm = shm
        self.topic = rank_topic(spec.rank)
        self.encoder = Encoder(allow_pickle=True)
        # allow_callables=False: nothing that arrives is unpickled (a pickled argument
        # runs code as surely as a callable does); arrays in shared memory still map.
        self.allow_callables = spec.allow_callables
        self.max_message_size = spec.max_message_size
        self.decoder: Decoder[ToWorker] = Decoder(ToWorker, allow_pickle=spec.allow_callables,
                                                  allow_shm=True, shm_pid=spec.driver_pid,
                                                  where="the worker")
        self.shm_decoder: Decoder[ToWorker] = Decoder(ToWorker,
                                                      allow_pickle=spec.allow_callables,
                                                      copy_buffers=True, allow_shm=True,
                                                      shm_pid=spec.driver_pid,
                                                      where="the worker")
        self.dropped = 0
        self.dropped_by_reason: dict[str, int] = {}  # sent to the driver with each Pong
        self._fns: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()
        self.gate = ReplyGate(self._reply)  # every reply leaves through it (any thread)

    def _drop(self, e: Exception, reason: str = "") -> None:
        self.dropped += 1
        reason = reason or getattr(e, "reason", "") or "packet"
        self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + 1
        if self.dropped == 1:
            log.warning("dropped a malformed request (%s); counting further ones", e)

    def _next_zmq(self) -> ToWorker | UndecodableValue | None:
        """The next request; an :class:`UndecodableValue` for a call whose arguments this
        worker cannot rebuild (answered with the error), None for a dropped frame set."""
        sub = self.sub
        first = sub.recv(copy=False)
        header = first.bytes or b"\x00"  # an empty frame is nothing a driver sends
        body = memoryview(header)[1 if header[0] == _ALL else len(self.topic):]
        try:
            if first.more:
                frames = recv_rest(sub, header)
                frames[0] = body
                return self.decoder.decode(frames)
            return self.decoder.decode_header(body)
        except UndecodableValue as e:
            return e
        except MalformedMessage as e:
            self._drop(e)
            return None

    def _next_shm(self, shm: _ShmWorkerPath) -> ToWorker | UndecodableValue | None:
        view = shm.request.read()
        if view is None:  # pragma: no cover - no timeout was given
            return None
        try:
            if not packets.for_rank(view, self.rank):
                return None
            kind, frames = packets.unpack(view)
            if kind == packets.BY_ZMQ:
                return self._next_zmq()
            if len(frames) > 1:
                return self.shm_decoder.decode(frames)
            return self.shm_decoder.decode_header(frames[0])
        except UndecodableValue as e:
            return e
        except (MalformedMessage, ValueError, struct.error) as e:
            self._drop(e)
            return None
        finally:
            view.release()
            shm.request.release()

    def serve(self) -> None:
        shm = self.shm
        while True:
            msg = self._next_zmq() if shm is None else self._next_shm(shm)
            if msg is None:
                continue
            match msg:
                case Call():
                    out = self._run(msg)
                    if isinstance(out, Future):
                        self.gate.defer(out, msg.method, self._deferred_reply(msg))
                    else:
                        self.gate.send(out, msg.method)
                case Ping(call_id=call_id):
                    self.gate.send(Pong(call_id, self.rank, dict(self.dropped_by_reason)),
                                   "ping")
                case Shutdown():
                    return
                case UndecodableValue(envelope=Call() as call) as e:
                    self._reply(Reply(call.call_id, self.rank, error=e.failure()), call.method)
                case UndecodableValue() as e:  # pragma: no cover - only calls carry values
                    self._drop(e)

    def _function(self, blob: bytes) -> Callable[..., Any]:
        fn = self._fns.get(blob)
        if fn is None:
            fn = cloudpickle.loads(blob)
            self._fns[blob] = fn
            if len(self._fns) > _FN_CACHE_SIZE:
                self._fns.popitem(last=False)
        return fn

    def _method(self, name: str) -> Callable[..., Any]:
        method = getattr(self.target, name, None) if not name.startswith("__") else None
        if method is None or not callable(method):
            raise AttributeError(f"{type(self.target).__qualname__} has no method {name!r}")
        return method  # type: ignore[no-any-return]

    def _deferred_reply(self, call: Call) -> Callable[[Future[Any]], Reply]:
        """The reply to ``call`` from the future its method returned (see .deferred)."""
        keep = call.value_rank < 0 or call.value_rank == self.rank

        def finish(future: Future[Any]) -> Reply:
            try:
                value = future.result()
            except BaseException as e:  # CancelledError is a BaseException
                return Reply(call.call_id, self.rank, error=failure_from(e))
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
            else:
                value = self._method(call.method)(*call.args, **call.kwargs)
        except BaseException as e:  # SystemExit too: the worker lives on
            return Reply(call.call_id, self.rank, error=failure_from(e))
        if isinstance(value, Future):
            return value
        keep = call.value_rank < 0 or call.value_rank == self.rank
        return Reply(call.call_id, self.rank, value if keep else None)

    def _reply(self, reply: Reply | Pong, method: str) -> None:
        try:
            frames = self.encoder.encode(reply)
            _check_sizes(frames, self.max_message_size)
        except BaseException as e:
            if isinstance(e, ValueNotCarriedError):
                failure = failure_from(e, ValueFault(e.path, e.type_name,
                                                     f"{e.reason} (in the worker)"))
            else:
                failure = failure_from(TypeError(
                    f"the result of {method!r} cannot be sent back: {e!r}"))
            frames = self.encoder.encode(Reply(reply.call_id, self.rank, error=failure))
        shm = self.shm
        if shm is None:
            send_frames(self.push, frames)
            return
        if not packets.put(shm.reply, frames, None):
            send_frames(self.push, frames)  # too big for a slot: ZeroMQ, and a marker
            shm.reply.write(packets.pack_marker(None))
        shm.doorbell.ring()
        if shm.forecast is not None:  # the next request may be timed from this reply
            shm.forecast.replied(time.monotonic())


def _check_sizes(frames: list[Any], limit: int) -> None:
    """Refuse to send a frame the driver's socket would refuse (``MAXMSGSIZE``: it would
    drop the connection, and the reply with it)."""
    if limit >= 0:
        for frame in frames:
            size = memoryview(frame).nbytes
            if size > limit:
                raise ValueError(f"a frame of {size} bytes is over max_message_size={limit}")


class _ShmWorkerPath:
    """The worker's ends of the shared-memory path (see gpuexec.executor.shm_path)."""

    def __init__(self, spec: ShmSpec, rank: int) -> None:
        # Forecasting arrivals means spinning around them: only where spinning is allowed
        # (the driver sets spin 0 on a host without a core for every spinner).
        forecast = None
        if spec.spin > 0:
            forecast = ArrivalForecast()
            futex.set_timer_slack(1000)  # this (the serving) thread's timed sleeps on time
        self.forecast = forecast
        self.request = RingReader(spec.request, rank, spin=spec.spin, forecast=forecast)
        self.reply = RingWriter.attach(spec.reply)
        self.doorbell = Doorbell(spec.doorbell)


def run_worker(spec_bytes: bytes, own_process: bool = True) -> None:
    """Process entry point (the target the executor's launcher starts). ``own_process``
    False: the process is someone else's (a Ray actor's), so it gets no process group
    of its own nor a guardian, only a watchdog thread."""
    spec = msgspec.msgpack.decode(spec_bytes, type=WorkerSpec)
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
    shm = _ShmWorkerPath(spec.shm, spec.rank) if spec.shm is not None else None
    handshake = Encoder(allow_pickle=False)
    stage = "init_device"
    try:
        report = init_device(spec)
        stage = "init_distributed"
        init_process_group(spec)
        stage = "import"
        cls = resolve_class(spec)
        stage = "worker_extension_cls"
        cls = extend_class(spec, cls)
        stage = "__init__"
        worker = build_worker(spec, cls)
        if spec.device == "cuda":
            stage = "init_device"  # again: release what the import or __init__ left behind
            report = merge_reports(report, init_device(spec))
    except BaseException as e:  # SystemExit in __init__ is a start-up failure too
        push.send_multipart(handshake.encode(StartupFailed(
            PROTOCOL_VERSION, spec.rank, os.getpid(), stage, failure_from(e))))
        push.close(linger=2000)
        sub.close(linger=0)
        ctx.term()
        sys.stderr.flush()
        kill_children()
        stop_guardian()
        os._exit(1)
    global _hook
    _hook = ShutdownHook(worker.on_shutdown, spec.shutdown_timeout)  # before Ready: a
    # SIGTERM right after the driver saw this worker ready must already run the hook
    push.send_multipart(handshake.encode(
        Ready(PROTOCOL_VERSION, spec.rank, os.getpid(), worker.device, report)))
    server = _Server(spec, worker, sub, push, shm)
    try:
        server.serve()
        _hook.run()
    finally:
        server.gate.close()  # a future resolving from now on has nobody to answer
        destroy_process_group(spec)
        kill_children()
        sub.close()
        push.close()
        ctx.term()
        stop_guardian()

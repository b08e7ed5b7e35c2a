"""Starting an executor's workers: backend and start method, sockets, specs, handshakes.

:func:`start` runs the steps of ``Executor.__init__`` between the checked configuration
and the channel, in order, within ``ready_timeout`` (one deadline for the whole start):

1. the backend and start method (``mp``: :mod:`.start_method`; ``ray``: placement),
   and the transport (:func:`pick_transport`);
2. the zygote, when that is the start method (falling back when ``auto`` chose it);
3. who may connect, before any socket binds (tcp or Ray: this executor's CURVE keys;
   ipc: this process and its descendants, :mod:`gpuexec.ipc.zap`), then the sockets
   (:func:`open_sockets`) and the shared-memory rings;
4. one :class:`~gpuexec.ipc.messages.WorkerSpec` per rank (:func:`worker_spec`), the
   workers, and each one's ``Ready``.

On any failure every resource made so far is released and the error raised.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from ..errors import ConfigError, ZygoteError
from ..ipc.cancel_board import BoardWriter
from ..ipc.curve import CurveServer, bind_tcp, check_host
from ..ipc.endpoints import EndpointDir
from ..ipc.messages import ShmSpec, WorkerSpec
from ..ipc.stderr_record import read_tail, stderr_record_path
from ..ipc.zap import ZapHandler, guard, own_process_tree
from .config import ExecutorConfig
from .launcher import WorkerHandle, start_workers, stop_workers, wait_ready
from .ray_backend import RayWorkers, Slot, check_bundle, import_ray
from .shm_path import ShmDriverPath, shm_room
from .start_method import fallback_method, resolve_start_method
from .zygote_client import ZygoteClient, default_preload, get_zygote, release_zygote

log = logging.getLogger("gpuexec")


@dataclass
class Started:
    """What a successful start leaves to the executor (it owns all of it from then)."""

    config: ExecutorConfig
    start_method: str
    start_method_reason: str
    transport: str                     # "shm", "zmq" or "tcp"
    ray_workers: RayWorkers | None
    slots: list[Slot] | None           # Ray placement, rank -> node slot
    endpoints: EndpointDir
    ctx: zmq.Context[zmq.Socket[bytes]]
    req: zmq.Socket[bytes]
    rep: zmq.Socket[bytes]
    endpoint_names: tuple[str, str]
    shm: ShmDriverPath | None
    auth: ZapHandler
    handles: list[WorkerHandle]
    stderr_tail: Callable[[int], str]
    specs: list[WorkerSpec]            # what each rank was started with (a respawn reuses)
    zygote_preload: tuple[str, ...] | None  # the zygote's preload list, when it is used
    board: BoardWriter | None          # the cancel board (None: Ray actors)


def pick_transport(transport: str, world_size: int) -> str:
    """``"zmq"``, ``"tcp"`` (ZeroMQ with CURVE; never shared memory), ``"shm"``
    (shared-memory rings; an error when shared memory is not available), or ``"auto"``
    (shm when it is, else zmq with one log line)."""
    if transport not in ("auto", "shm", "zmq", "tcp"):
        raise ConfigError(f"unknown transport {transport!r}; expected auto, shm, zmq or tcp")
    if transport in ("zmq", "tcp"):
        return transport
    room = shm_room(world_size)
    if room and transport == "shm":
        raise ConfigError(f"transport='shm' is not possible here: {room}")
    if room:
        log.warning("gpuexec: using ZeroMQ instead of shared memory: %s", room)
        return "zmq"
    return "shm"


def stderr_tail(endpoints: EndpointDir, ray_workers: RayWorkers | None
                ) -> Callable[[int], str]:
    """``rank -> `` its last stderr lines (a Ray actor on another node has none here) and
    Ray's account of an actor's death. Not a bound method: the channel's threads hold it,
    and must not keep the executor alive (garbage collection shuts it down)."""

    def tail(rank: int) -> str:
        text = read_tail(stderr_record_path(endpoints.path, rank))
        if ray_workers is not None and ray_workers.processes[rank].reason:
            text = f"{text}\n{ray_workers.processes[rank].reason}".strip()
        return text

    return tail


def open_sockets(ctx: zmq.Context[zmq.Socket[bytes]], curve: CurveServer | None,
                 endpoints: EndpointDir, host: str, max_message_size: int
                 ) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes], str, str]:
    """The request (XPUB) and reply (PULL) sockets, bound: on tcp with CURVE when
    ``curve`` is given, else on ipc in the private directory. Returns them and their
    endpoints."""
    req = ctx.socket(zmq.XPUB)
    # Every subscription is reported, a duplicate's too: a worker that replaces a dead
    # one subscribes to its topic while the dead one's pipe may not be torn down yet.
    req.setsockopt(zmq.XPUB_VERBOSE, 1)
    req.setsockopt(zmq.SNDHWM, 0)
    req.setsockopt(zmq.LINGER, 0)
    rep = ctx.socket(zmq.PULL)
    rep.setsockopt(zmq.RCVHWM, 0)
    rep.setsockopt(zmq.LINGER, 0)
    rep.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    if curve is not None:
        curve.secure(req)
        curve.secure(rep)
        return req, rep, bind_tcp(req, host), bind_tcp(rep, host)
    guard(req)
    guard(rep)
    req_endpoint, rep_endpoint = endpoints.endpoint("req"), endpoints.endpoint("rep")
    req.bind(req_endpoint)
    rep.bind(rep_endpoint)
    return req, rep, req_endpoint, rep_endpoint


def worker_spec(cfg: ExecutorConfig, rank: int, start_method: str, endpoints: EndpointDir,
                shm: ShmSpec | None, req_endpoint: str, rep_endpoint: str,
                curve: CurveServer | None, ray_workers: RayWorkers | None,
                board: BoardWriter | None = None) -> WorkerSpec:
    """Everything worker ``rank`` needs to start, in one message."""
    slot = ray_workers.slots[rank] if ray_workers is not None else None
    # An actor on another node cannot watch this pid (Ray ties it to the driver).
    remote = slot is not None and ray_workers is not None and \
        slot.node_id != ray_workers.driver_node
    return WorkerSpec(
        rank=rank, local_rank=slot.local_rank if slot else rank, world_size=cfg.world_size,
        local_world_size=slot.local_world_size if slot else cfg.world_size,
        device=cfg.device, gpu=cfg.gpus[rank] if cfg.gpus else None,
        isolate_devices=cfg.isolate_devices and slot is None,  # Ray already isolates
        stale_context_policy=cfg.stale_context_policy,
        driver_pid=0 if remote else os.getpid(),
        driver_is_parent=start_method not in ("forkserver", "zygote", "ray"),
        req_endpoint=req_endpoint, rep_endpoint=rep_endpoint,
        worker_cls=cfg.worker.path, worker_cls_pickle=cfg.worker.pickled,
        init_args_pickle=cfg.init_args_pickle, env=cfg.env[rank],
        stderr_record=stderr_record_path(endpoints.path, rank), ipc_dir=endpoints.path,
        sys_path=[p for p in sys.path if p], shm=shm,
        worker_extension_cls=cfg.extension.path if cfg.extension else "",
        worker_extension_pickle=cfg.extension.pickled if cfg.extension else b"",
        distributed=cfg.distributed,
        curve=curve.client(rank) if curve is not None else None,
        allow_callables=cfg.allow_callables, max_message_size=cfg.max_message_size,
        shutdown_timeout=cfg.shutdown_timeout,
        cancel_board=board.path if board is not None else "",
        max_inflight_calls=cfg.max_inflight_calls)


def start(cfg: ExecutorConfig, *, backend: str, start_method: str, transport: str,
          host: str | None, preload: Sequence[str] | None,
          ray_resources: Mapping[str, float] | None, master_addr: str | None) -> Started:
    """Start the workers of ``cfg``; see the module docstring."""
    deadline = time.monotonic() + cfg.ready_timeout
    bundle: dict[str, float] = {}
    ray: Any = None
    if backend == "ray":
        bundle = check_bundle(ray_resources if ray_resources is not None else
                              {"GPU": 1} if cfg.device == "cuda" else {"CPU": 1})
        if transport not in ("auto", "tcp"):
            raise ConfigError(
                f"backend='ray' takes transport 'auto' (shared memory when every actor "
                f"is on the driver's node, else tcp + CURVE) or 'tcp', not {transport!r}")
        ray = import_ray()
        chosen = "tcp"  # "shm" once placed, if every actor is on this node
        method, reason = "ray", f"ray: one actor per rank, bundles of {bundle}"
    elif backend == "mp":
        if ray_resources is not None:
            raise ConfigError("ray_resources is for backend='ray'")
        method, reason = resolve_start_method(start_method)
        chosen = pick_transport(transport, cfg.world_size)
    else:
        raise ConfigError(f"unknown backend {backend!r}; expected 'mp' or 'ray'")
    try:
        host = check_host(host if host is not None else "127.0.0.1")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    zygote: ZygoteClient | None = None
    if method == "zygote":
        zygote, method, reason = _zygote(preload, start_method, deadline, reason)
    endpoints = EndpointDir()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    handles: list[WorkerHandle] = []
    shm: ShmDriverPath | None = None
    auth: ZapHandler | None = None
    ray_workers: RayWorkers | None = None
    board: BoardWriter | None = None
    try:
        if backend == "ray":
            # The first processes of this executor start here: placing the actors.
            ray_workers = RayWorkers(cfg.world_size, bundle,
                                     max(0.0, deadline - time.monotonic()))
            if not ray_workers.all_local:
                if host == "127.0.0.1":
                    host = ray.util.get_node_ip_address()  # actors elsewhere connect
            elif transport == "auto" and not shm_room(cfg.world_size):
                chosen = "shm"  # the rings; ZeroMQ stays tcp + CURVE
            if cfg.distributed is not None and master_addr is None:
                # rank 0 runs on the driver's node
                dist = msgspec.structs.replace(cfg.distributed, master_addr=host)
                cfg = dataclasses.replace(cfg, distributed=dist)
        curve = CurveServer(ctx, cfg.world_size) \
            if chosen == "tcp" or backend == "ray" else None
        auth = curve.handler if curve is not None else \
            ZapHandler(ctx, ipc_peer=own_process_tree)
        auth.start()
        if chosen == "shm":
            shm = ShmDriverPath(cfg.world_size)
        if ray_workers is None:  # only processes started here are signalled
            board = BoardWriter(endpoints.path, cfg.world_size)
        req, rep, req_endpoint, rep_endpoint = open_sockets(ctx, curve, endpoints, host,
                                                            cfg.max_message_size)
        worker_specs = [worker_spec(
            cfg, rank, method, endpoints, shm.spec_for(rank) if shm is not None else None,
            req_endpoint, rep_endpoint, curve, ray_workers, board)
            for rank in range(cfg.world_size)]
        specs = [msgspec.msgpack.encode(spec) for spec in worker_specs]
        if ray_workers is not None:
            handles = ray_workers.serve(specs)
        else:
            handles = start_workers(method, specs, zygote, deadline, cfg.ready_timeout)
        tail = stderr_tail(endpoints, ray_workers)
        wait_ready(handles, rep, req, method, cfg.ready_timeout, tail, deadline)
        if shm is not None:
            shm.unlink()  # every worker has mapped the rings: no crash can leak them
    except BaseException:
        if shm is not None:
            shm.close()
        if board is not None:
            board.close()
        stop_workers(handles, grace=0.0, term_grace=1.0)
        if ray_workers is not None:
            ray_workers.close()
        if auth is not None:
            auth.stop()
        ctx.destroy(linger=0)
        endpoints.close()
        if zygote is not None:
            release_zygote(zygote.preload, cfg.keep_zygote)
        raise
    return Started(cfg, method, reason, chosen, ray_workers,
                   ray_workers.slots if ray_workers is not None else None, endpoints, ctx,
                   req, rep, (req_endpoint, rep_endpoint), shm, auth, handles, tail,
                   worker_specs, zygote.preload if zygote is not None else None, board)


def _zygote(preload: Sequence[str] | None, requested: str, deadline: float,
            reason: str) -> tuple[ZygoteClient | None, str, str]:
    """The zygote to fork from, the start method and its reason; when ``auto`` chose it
    and it cannot start, fall back (and say why in the reason)."""
    modules = tuple(preload) if preload is not None else default_preload()
    try:
        zygote, warm = get_zygote(modules, max(0.0, deadline - time.monotonic()))
    except ZygoteError as e:
        if requested != "auto" or os.environ.get("GPUEXEC_START_METHOD"):
            raise
        method = fallback_method()
        reason = f"{method}: the zygote failed ({e})"
        log.warning("gpuexec: %s", reason)
        return None, method, reason
    reason += (f"; {'warm' if warm else 'new'} zygote pid {zygote.pid}, preloaded "
               f"{', '.join(zygote.hello.preloaded) or 'nothing'}")
    return zygote, "zygote", reason

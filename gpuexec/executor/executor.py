"""The :class:`Executor`: one worker process per GPU (or CPU slot), called all at once.

Data flow::

    user thread(s)                         driver process                 workers
    ─────────────                          ──────────────                 ───────
    collective_rpc(m, args) ─▶ Call ─encode once─▶ XPUB "req" ───────▶ SUB, rank r
          ▲                                                               │ run m
          │ results in rank order         pending table ◀── PULL "rep" ◀─┘ Reply(call id, r)
          └──────────── pumped by the caller itself (or by the monitor for futures)

    (transport="shm": a broadcast ring in shared memory instead of XPUB, per-worker reply
    rings and a doorbell futex instead of PULL; arrays of 1 MiB+ in a memfd every worker maps)
    (transport="tcp": the same sockets on tcp://host:<port>, CURVE-encrypted; the driver is
    the CURVE server and its ZAP handler admits only this executor's workers' keys)

    monitor thread: sleeps in poll() on the process sentinels (+ the reply socket while
    non_block futures are outstanding); a worker's exit fails every pending call at once.

* The **constructor** is four named steps: the checked configuration (:mod:`.config`);
  the start (:mod:`.startup`: start method, sockets and who may connect, the workers and
  each one's ``Ready`` within ``ready_timeout``; on any failure it stops them all and
  raises); the channel (:mod:`.channel`); the process hooks (:mod:`.process_hooks`).
* **Calls** (:mod:`.rpc`, sent by :mod:`.channel`) are encoded once and sent once to the
  target ranks; the replies are matched by call id, so a timed-out call's late replies
  are dropped and the executor stays usable.
* **Shutdown** is idempotent and runs from ``shutdown()``, ``__exit__``, garbage
  collection and interpreter exit: a Shutdown message, a grace period, SIGTERM, then
  SIGKILL; then the sockets and the ipc directory go.
* **Respawn** (:mod:`.respawn`) replaces dead (or stuck) ranks in place while the
  survivors run on: explicitly (:meth:`Executor.respawn`) or after each death
  (``on_worker_death="respawn"``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from ..errors import ConfigError, ExecutorClosedError, RespawnError
from ..ipc.checkpoint import SuspendReport
from ..ipc.reports import DeviceReport
from ..worker.base import Worker
from . import process_hooks, startup
from .aio import AsyncSlots
from .cancel import Interrupter
from .channel import ChannelStats, DriverChannel
from .config import (
    DEFAULT_CANCEL_GRACE,
    DEFAULT_MAX_INFLIGHT_CALLS,
    DEFAULT_MAX_MESSAGE_SIZE,
    ExecutorConfig,
)
from .forensics import Forensics, ForensicsMethods
from .hang_report import HangReporter
from .hold import CallGate
from .launcher import disown_in_fork, stop_workers
from .lifecycle import ExecutorState, Lifecycle
from .ownership import Ownership
from .rank_env import EnvArg
from .rendezvous import DEFAULT_DISTRIBUTED_TIMEOUT
from .respawn import AutoRespawn, Recovery, Respawner, RespawnReport
from .rpc import RpcMethods
from .start_method import check_not_bootstrapping
from .suspension import Suspension, refusal
from .validate import seconds
from .zygote_client import release_zygote

log = logging.getLogger("gpuexec")

DEFAULT_READY_TIMEOUT = 300.0
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
DEFAULT_TERMINATE_TIMEOUT = 2.0


class WorkerInfo(msgspec.Struct, frozen=True):
    """Where one worker runs."""

    rank: int
    local_rank: int
    pid: int
    device: str          # the device string valid inside the worker ("cuda:0", "cpu")
    gpu: int | None      # the driver's CUDA ordinal for this worker, None on CPU


def _no_default(timeout: float | None) -> float | None:
    """A suspend/resume timeout, by a call's rules (None or ``inf``: no deadline; a
    positive number of seconds; else ``InvalidArgumentError``), but None waits as long
    as the driver takes (not ``rpc_timeout``)."""
    return seconds("timeout", timeout)


def _check_recovery(on_worker_death: str, max_respawns: int, window: float,
                    backend: str) -> None:
    """The automatic-recovery arguments, before any process starts."""
    if on_worker_death not in ("fail", "respawn"):
        raise ConfigError(f"on_worker_death must be 'fail' or 'respawn', not "
                          f"{on_worker_death!r}")
    if isinstance(max_respawns, bool) or not isinstance(max_respawns, int) or \
            max_respawns < 1:
        raise ConfigError(f"max_respawns must be a positive integer, not {max_respawns!r}")
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not window > 0:
        raise ConfigError(f"respawn_window must be positive seconds, not {window!r}")
    if on_worker_death == "respawn" and backend == "ray":
        raise ConfigError("on_worker_death='respawn' is not available with backend='ray'")


class Executor(RpcMethods, ForensicsMethods):
    """Runs one worker process per rank and calls methods on all of them at once.

    ``Executor(worker_cls=Worker, world_size=None, *, device="auto",
    start_method="auto", worker_args=(), worker_kwargs=None, env=None,
    isolate_devices=False, release_stale_contexts=True, stale_context_policy="release",
    distributed_backend=None,
    ready_timeout=300.0, rpc_timeout=None, shutdown_timeout=5.0, terminate_timeout=2.0,
    preload=None, transport="auto", host=None, allow_callables=True,
    max_inflight_calls=1024, max_message_size=4 GiB, worker_extension_cls=None,
    master_addr=None, master_port=None, distributed_timeout=300.0,
    max_concurrent_batches=2, backend="mp", ray_resources=None, on_worker_death="fail",
    max_respawns=3, respawn_window=300.0, cancel_grace=5.0, cancel_on_timeout=True,
    hang_report_after=None)``

    * ``worker_cls``: a :class:`~gpuexec.Worker` subclass, or ``"package.module:Class"``
      (imported only in the workers, after their device is set).
    * ``world_size``: number of workers, at most ``MAX_WORLD_SIZE`` (1,024; see
      :mod:`.config`); default: one per visible GPU, else 1.
    * ``device``: ``"auto"`` (CUDA when a GPU is visible), ``"cuda"`` or ``"cpu"``.
    * ``start_method``: ``"auto"``, ``"zygote"``, ``"subprocess"``, ``"fork"``,
      ``"spawn"`` or ``"forkserver"``; ``GPUEXEC_START_METHOD`` overrides ``"auto"``. See
      :mod:`.start_method`. ``preload``: modules the zygote imports before forking
      workers (default: torch, when installed); one zygote per preload list, shared by
      the executors that run at the same time. ``keep_zygote``: False (the default, or
      ``GPUEXEC_KEEP_ZYGOTE=0``) stops the zygote when the last executor using it shuts
      down, so nothing of gpuexec's is left running; True (or ``GPUEXEC_KEEP_ZYGOTE=1``
      when None) keeps it warm after this executor's shutdown for the next executor's
      fast start, until the interpreter exits.
    * ``transport``: ``"auto"`` (shared-memory rings when shared memory is available, else
      ZeroMQ), ``"shm"`` or ``"zmq"`` (``ipc://`` in a private 0700 directory; only
      this process and its descendants may connect), or ``"tcp"`` (ZeroMQ over
      ``tcp://host:<random port>`` with CURVE encryption and authentication; keys are
      made per executor). See :mod:`.shm_path`, :mod:`gpuexec.ipc.curve`, SECURITY.md.
    * ``backend``: ``"mp"`` (default: local worker processes) or ``"ray"`` (one Ray actor
      per rank, placed by a placement group of ``ray_resources`` bundles, default
      ``{"GPU": 1}`` on CUDA and ``{"CPU": 1}`` on CPU; ranks on the driver's node come
      first, ``local_rank`` counts per node; ``world_size`` required). ``transport``
      ``"auto"``: the shared-memory rings when every actor landed on the driver's node
      (ZeroMQ, for start-up and what overflows a slot, stays tcp + CURVE), else tcp +
      CURVE for all; ``"tcp"``: never shared memory. See :mod:`.ray_backend`.
    * ``host``: the address the driver binds with ``transport="tcp"`` (default
      loopback; with ``backend="ray"`` and actors on other nodes, this node's Ray IP);
      wildcards (``0.0.0.0``, ``*``, ``::``) are refused.
    * ``allow_callables``: False refuses callables in :meth:`collective_rpc`
      (``CallRefusedError``) and arguments that need pickle, and the workers refuse to
      unpickle anything that arrives: no code travels after start-up.
    * ``max_inflight_calls``: calls in flight at once; a further call waits for a slot
      up to its timeout (then ``InflightLimitError``). ``max_message_size``: bytes per
      ZeroMQ frame, enforced by both ends (the receiving sockets' ``MAXMSGSIZE``).
    * ``worker_args`` / ``worker_kwargs``: passed to the worker class's ``__init__``.
    * ``env``: extra environment variables: a mapping for every worker, a sequence of
      one mapping per rank, or a callable ``rank -> mapping`` called once per rank when
      the executor is built (see :mod:`.rank_env`); ``RANK``, ``LOCAL_RANK``,
      ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE`` are always set.
    * ``isolate_devices``: give each worker only its own GPU in
      ``CUDA_VISIBLE_DEVICES``; default keeps all visible (CUDA IPC needs peers).
    * ``release_stale_contexts``: release CUDA primary contexts a worker holds on GPUs
      other than its own (see :mod:`gpuexec.worker.device`); ``stale_context_policy``:
      ``"release"`` (default) or ``"reset"``, which also resets a context that stays
      active after the release because another owner in the worker retains it.
    * ``worker_extension_cls``: a mixin class (or ``"module:Class"``) whose methods are
      added to the worker class in each worker: the worker hosts a subclass of
      ``(worker_extension_cls, worker_cls)``, composed after both were imported. It may
      only *add*: a name the worker class already has (or an ``__init__``) is a clash,
      a ``ConfigError`` before any process starts when both are class objects, a
      ``WorkerStartupError`` at start-up when either is a string (strings are imported
      only in the workers). See :mod:`gpuexec.worker.extension`.
    * ``distributed_backend``: ``"nccl"`` (CUDA workers) or ``"gloo"`` (CPU or CUDA):
      every worker joins the torch.distributed default process group right after its
      device is set, before the worker class is imported, through the ``env://``
      rendezvous (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` are set in
      its environment); the group is destroyed when the worker shuts down.
      ``master_addr`` (default ``127.0.0.1``) and ``master_port`` (default: a free port,
      picked by binding port 0 and releasing it; see :mod:`.rendezvous` for that race)
      say where rank 0 hosts the rendezvous. ``distributed_timeout`` (seconds) bounds the
      rendezvous and every collective; a failed rendezvous is a ``WorkerStartupError``
      naming the rank.
    * ``max_concurrent_batches``: how many :meth:`collective_rpc_async` calls one event
      loop may have outstanding (default 2); further ones wait for a slot.
    * ``on_worker_death``: ``"fail"`` (default: every call raises ``WorkerDiedError``
      until :meth:`respawn` or shutdown) or ``"respawn"`` (the executor replaces a dead
      rank by itself, at most ``max_respawns`` times within ``respawn_window`` seconds,
      then fails as in ``"fail"``; see :meth:`respawn` and :attr:`recoveries`).
    * ``cancel_grace``: seconds a worker has to stop a cancelled call (see
      :meth:`collective_rpc`) once it runs it; a worker still in it then (a method stuck
      in C with the GIL held, in a CUDA or NCCL wait) is killed and reported as a death
      (``WorkerDiedError`` whose ``reason`` says why; the failure callbacks run). None:
      wait forever. ``cancel_on_timeout``: a call whose ``timeout`` passes is also
      interrupted in the ranks that did not answer, and a :meth:`check_health` that times
      out interrupts what its silent ranks run (default); False keeps them running (late
      answers dropped).
    * ``ready_timeout``: seconds for the whole start (zygote, placement, launching and
      every worker's handshake); ``rpc_timeout``: default per-call deadline (None or
      ``inf``: no deadline, liveness is still watched);
      ``shutdown_timeout``: grace period after the Shutdown message before SIGTERM;
      ``terminate_timeout``: grace period after SIGTERM before SIGKILL.
    * ``hang_report_after``: seconds (None: never) after which a call that some rank is
      still running is reported once, with those ranks' stacks, as a warning on the
      ``gpuexec`` logger; the call goes on (see :mod:`.hang_report`).

    Forensics (:mod:`.forensics`): :meth:`stacks`, :meth:`status`, metrics through
    :meth:`serve_metrics` / :meth:`metrics_collector`, and ``RpcTimeoutError.stacks``.

    Raises :class:`~gpuexec.errors.ConfigError` for bad arguments before any process
    starts, :class:`~gpuexec.errors.StartMethodError` when the start method cannot
    work here, :class:`~gpuexec.errors.WorkerStartupError` when a worker fails to start.
    """

    def __init__(
        self,
        worker_cls: type[Worker] | str = Worker,
        world_size: int | None = None,
        *,
        device: str = "auto",
        start_method: str = "auto",
        worker_args: Sequence[Any] = (),
        worker_kwargs: Mapping[str, Any] | None = None,
        env: EnvArg | None = None,
        isolate_devices: bool = False,
        release_stale_contexts: bool = True,
        stale_context_policy: str = "release",
        distributed_backend: str | None = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        rpc_timeout: float | None = None,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        terminate_timeout: float = DEFAULT_TERMINATE_TIMEOUT,
        preload: Sequence[str] | None = None,
        transport: str = "auto",
        worker_extension_cls: type | str | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        distributed_timeout: float = DEFAULT_DISTRIBUTED_TIMEOUT,
        max_concurrent_batches: int = 2,
        host: str | None = None,
        allow_callables: bool = True,
        max_inflight_calls: int = DEFAULT_MAX_INFLIGHT_CALLS,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        backend: str = "mp",
        ray_resources: Mapping[str, float] | None = None,
        on_worker_death: str = "fail",
        max_respawns: int = 3,
        respawn_window: float = 300.0,
        keep_zygote: bool | None = None,
        cancel_grace: float | None = DEFAULT_CANCEL_GRACE,
        cancel_on_timeout: bool = True,
        hang_report_after: float | None = None,
    ) -> None:
        self._life = Lifecycle()  # STARTING until fully started: shutdown() is a no-op
        self._owner = Ownership()  # forks of this process may not use or stop it
        self._metrics_servers = []  # serve_metrics' HTTP servers, stopped at shutdown
        self._hang_reporter: HangReporter | None = None
        check_not_bootstrapping()
        _check_recovery(on_worker_death, max_respawns, respawn_window, backend)
        hang_after = seconds("hang_report_after", hang_report_after)
        self._config = config = ExecutorConfig.build(
            worker_cls, world_size, device=device, start_method=start_method,
            worker_args=worker_args, worker_kwargs=worker_kwargs, env=env,
            isolate_devices=isolate_devices, release_stale_contexts=release_stale_contexts,
            stale_context_policy=stale_context_policy,
            distributed_backend=distributed_backend, ready_timeout=ready_timeout,
            rpc_timeout=rpc_timeout, shutdown_timeout=shutdown_timeout,
            terminate_timeout=terminate_timeout, worker_extension_cls=worker_extension_cls,
            master_addr=master_addr, master_port=master_port,
            distributed_timeout=distributed_timeout,
            max_concurrent_batches=max_concurrent_batches, allow_callables=allow_callables,
            max_inflight_calls=max_inflight_calls, max_message_size=max_message_size,
            remote_devices=backend == "ray", keep_zygote=keep_zygote,
            cancel_grace=cancel_grace, cancel_on_timeout=cancel_on_timeout)
        self._backend = backend
        started = startup.start(config, backend=backend, start_method=start_method,
                                transport=transport, host=host, preload=preload,
                                ray_resources=ray_resources, master_addr=master_addr)
        self._adopt(started)
        self._open_channel(started)
        self._respawner = Respawner(
            self._channel, self._handles, started.specs, started.start_method,
            started.zygote_preload, config.ready_timeout, started.stderr_tail,
            self._suspension.replace_pids)
        self._auto: AutoRespawn | None = None
        if on_worker_death == "respawn":
            self._auto = AutoRespawn(lambda: self._respawner.respawn(None, None, False),
                                     self._respawner.dead_ranks, lambda: self.is_closed,
                                     max_respawns, respawn_window)
            self._channel.add_failure_callback(self._auto)
        if hang_after is not None:
            self._hang_reporter = HangReporter(self._forensics, self._channel.table, hang_after)
        self._life.advance(ExecutorState.STARTING, ExecutorState.RUNNING)
        process_hooks.add(self)

    def _adopt(self, started: startup.Started) -> None:
        """Take over what the start made (the executor owns it from here)."""
        self._config = config = started.config
        self._start_method = started.start_method
        self._start_method_reason = started.start_method_reason
        self._transport = started.transport
        self._ray_workers = started.ray_workers
        self._slots = started.slots
        self._endpoints = started.endpoints
        self._endpoint_names = started.endpoint_names
        self._handles = started.handles
        self._zygote_preload = started.zygote_preload  # its zygote: released at shutdown
        self._all_ranks = list(range(config.world_size))
        self._async_slots = AsyncSlots(config.max_concurrent_batches)

    def _open_channel(self, started: startup.Started) -> None:
        """The channel to the workers, and the gate and suspension that sit on it."""
        cfg = self._config
        self._channel = DriverChannel(started.ctx, started.req, started.rep, started.handles,
                                      started.stderr_tail, started.shm,
                                      allow_pickle=cfg.allow_callables,
                                      max_inflight_calls=cfg.max_inflight_calls,
                                      max_message_size=cfg.max_message_size,
                                      auth=started.auth,
                                      interrupter=None if started.board is None else
                                      Interrupter(started.board, started.handles),
                                      cancel_grace=cfg.cancel_grace,
                                      cancel_on_timeout=cfg.cancel_on_timeout)
        self._channel.start()
        # calls made while suspended wait at the gate, unsent (see .hold and .suspension)
        self._gate = CallGate(self._channel.check_usable)
        self._channel.add_failure_callback(self._gate.poke)
        self._suspension = Suspension(self._gate, [(h.rank, h.pid) for h in self._handles],
                                      refusal(cfg.device, self._backend, self.device_reports))
        suspension = self._suspension
        self._forensics = Forensics(
            self._handles, self._channel.table, started.endpoints.path,
            lambda: suspension.suspended, cfg.device == "cuda",
            maybe_remote=self._backend == "ray")

    def _check_open(self) -> None:
        self._owner.check()
        if self.is_closed:
            raise ExecutorClosedError("the executor is shut down")

    def disown_in_fork(self) -> None:
        """In a fork's child: forget the parent's workers (see :mod:`.ownership`)."""
        disown_in_fork(self._handles + self._respawner.retired)

    @property
    def transport(self) -> str:
        """``"shm"`` (shared-memory rings), ``"zmq"`` (ipc) or ``"tcp"`` (CURVE)."""
        return self._transport

    @property
    def endpoints(self) -> tuple[str, str]:
        """The driver's bound request and reply endpoints (``ipc://`` or ``tcp://``)."""
        return self._endpoint_names

    # -- properties ----------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self._config.world_size

    @property
    def start_method(self) -> str:
        """The resolved start method (never ``"auto"``)."""
        return self._start_method

    @property
    def start_method_reason(self) -> str:
        """Why :attr:`start_method` was chosen, in one line."""
        return self._start_method_reason

    @property
    def backend(self) -> str:
        """``"mp"`` (local processes) or ``"ray"`` (Ray actors)."""
        return self._backend

    @property
    def workers(self) -> list[WorkerInfo]:
        slots = self._slots
        return [WorkerInfo(h.rank, slots[h.rank].local_rank if slots else h.rank, h.pid,
                           h.device, self._config.gpus[h.rank] if self._config.gpus else None)
                for h in self._handles]

    @property
    def device_reports(self) -> list[DeviceReport]:
        """What each worker's ``init_device()`` found and did, in rank order."""
        return [h.report or DeviceReport(rank=h.rank, device=h.device, ordinal=None)
                for h in self._handles]

    @property
    def is_failed(self) -> bool:
        """True once a worker died; every call then raises ``WorkerDiedError`` until the
        dead ranks are replaced (:meth:`respawn`)."""
        return self._channel.failed

    @property
    def is_closed(self) -> bool:
        """True until the executor has started, and again once it is shut down."""
        return self._life.state is not ExecutorState.RUNNING

    def stats(self) -> ChannelStats:
        """Counters (a copy): calls made, late replies dropped, malformed frames the driver
        dropped (in total and by reason), connections refused, calls that waited for a
        slot, and what each worker dropped as of the last :meth:`check_health`; calls
        that timed out (``timeouts``), were cancelled (``cancelled``), ranks that stopped
        a cancelled call (``cancelled_replies``) and workers killed because one did not
        (``cancel_kills``)."""
        self._owner.check()
        return self._channel.snapshot()

    def register_failure_callback(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` when a worker dies (at once if one already has): once per
        failure, that is again at the first death after a :meth:`respawn` healed one.

        It runs on the monitor thread, with none of the executor's locks held: keep it
        short; it may call :meth:`shutdown` (or start a thread that calls :meth:`respawn`).
        With ``on_worker_death="respawn"`` it runs only when the executor stays failed
        (the automatic recovery gave up; :attr:`recoveries` says what happened), on the
        recovery's thread.

        Every callback has returned before any caller is told of that death (with
        ``on_worker_death="fail"``): calls waiting for an answer, new calls and
        ``non_block`` futures get their ``WorkerDiedError`` only then (a call the callback
        itself makes fails at once). So a callback must not wait for another thread's
        call to this executor. A callback still running after 60 s stops holding the
        callers back (a warning is logged).
        """
        self._owner.check()
        if self._auto is not None:
            self._auto.add_callback(fn)
        else:
            self._channel.add_failure_callback(fn)

    # -- replacing ranks (see .respawn) ----------------------------------------------

    def respawn(self, ranks: Sequence[int] | None = None, *, timeout: float | None = None,
                kill: bool = False) -> list[RespawnReport]:
        """Start a new worker for each dead rank of ``ranks`` (None: every dead rank),
        with the same rank, local rank, device, worker class and arguments, per-rank
        ``env``, transport and start method (from the zygote when that is the start
        method); the survivors keep running and keep their state.

        Returns one :class:`RespawnReport` per rank replaced (old pid and how it ended,
        new pid, seconds), ``[]`` when no rank is dead. Once it returns and no other rank
        is dead, :attr:`is_failed` is false and calls work on every rank again; calls that
        were in flight when the rank died ended with ``WorkerDiedError`` and stay ended;
        calls made while it runs get ``WorkerDiedError`` at once. With
        ``distributed_backend``, the survivors abort the old process group (a survivor
        blocked in a collective with the dead rank is released), every rank joins a new
        one of the same world size (a fresh rendezvous) before this returns, and then
        ``Worker.on_peers_replaced(ranks)`` runs on every survivor.

        ``kill=True`` kills a live rank of ``ranks`` first (SIGKILL: the way out for a
        stuck rank); without it a live rank is refused (:class:`RespawnError`, nothing
        changed). ``timeout`` (default ``ready_timeout``) bounds the whole respawn; a
        replacement that fails to start raises :class:`RespawnError` (cause: its
        :class:`WorkerStartupError`), the rank stays dead and respawn may be tried again.
        After :meth:`shutdown`: ``ExecutorClosedError``; not with ``backend="ray"`` nor
        while suspended (:class:`RespawnError`).
        """
        self._owner.check()
        if self.is_closed:
            raise ExecutorClosedError("the executor is shut down")
        if self._backend == "ray":
            raise RespawnError("respawn is not available with backend='ray' (Ray restarts "
                               "actors itself); shut down and start again")
        if self._suspension.suspended:
            raise RespawnError("the executor is suspended: resume() before respawn()")
        return self._respawner.respawn(ranks, timeout, kill)

    async def respawn_async(self, ranks: Sequence[int] | None = None, *,
                            timeout: float | None = None,
                            kill: bool = False) -> list[RespawnReport]:
        """:meth:`respawn` without blocking the event loop (it runs in a thread; a
        cancelled await does not stop the respawn under way)."""
        return await asyncio.to_thread(self.respawn, ranks, timeout=timeout, kill=kill)

    @property
    def dead_ranks(self) -> list[int]:
        """The ranks whose process has exited and has not been replaced yet (what
        ``respawn()`` with no ranks replaces)."""
        return self._respawner.dead_ranks()

    @property
    def recoveries(self) -> list[Recovery]:
        """What ``on_worker_death="respawn"`` did after each death, oldest first (a
        copy; empty in the default ``"fail"`` mode)."""
        return list(self._auto.recoveries) if self._auto is not None else []

    # -- suspend / resume (see .suspension) ------------------------------------------

    @property
    def is_suspended(self) -> bool:
        """True from a successful :meth:`suspend` until :meth:`resume` (calls are held)."""
        return self._suspension.suspended

    def suspend(self, timeout: float | None = None) -> list[SuspendReport]:
        """Park every worker's GPU state in host memory and free the GPUs.

        Uses the CUDA driver's checkpoint API (NVIDIA driver 570+) from a controller
        process started on first use, so it works for any memory the worker's code holds.
        Every rank is locked before any is checkpointed. Until :meth:`resume`, calls wait
        in the driver, unsent (each bounded by its own timeout: ``HeldCallTimeoutError``);
        :meth:`check_health` still answers. Returns one :class:`SuspendReport` per rank;
        suspending a suspended executor changes nothing (``changed=False``).

        Raises ``CheckpointUnsupportedError`` before touching any worker (CPU workers,
        no checkpoint API, a worker its device report calls not checkpointable);
        ``CheckpointError`` naming each failing rank's CUresult after rolling the others
        back to running (``CheckpointTimeoutError`` when ``timeout`` ran out);
        ``WorkerDiedError`` / ``ExecutorClosedError`` as any call.
        """
        self._owner.check()
        self._channel.check_usable()
        with self._forensics.timed("suspend"):
            return self._suspension.suspend(_no_default(timeout))

    def resume(self, timeout: float | None = None) -> list[SuspendReport]:
        """Bring every worker's GPU state back (same addresses) and release held calls.

        Every rank is restored before any is unlocked. Resuming a running executor changes
        nothing (``changed=False``). On ``CheckpointError`` the executor stays suspended
        and ``resume()`` may be retried; ``shutdown()`` always works.
        """
        self._owner.check()
        self._channel.check_usable()
        with self._forensics.timed("resume"):
            return self._suspension.resume(_no_default(timeout))

    async def suspend_async(self, timeout: float | None = None) -> list[SuspendReport]:
        """:meth:`suspend` without blocking the event loop (it runs in a thread; a
        cancelled await does not stop the suspend under way)."""
        self._owner.check()
        return await asyncio.to_thread(self.suspend, timeout)

    async def resume_async(self, timeout: float | None = None) -> list[SuspendReport]:
        """:meth:`resume` without blocking the event loop (see :meth:`suspend_async`)."""
        self._owner.check()
        return await asyncio.to_thread(self.resume, timeout)

    # -- shutdown ------------------------------------------------------------------

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop every worker and free every resource; idempotent and thread-safe.

        Interrupts the calls the workers run (as a cancel does), sends a Shutdown message
        and waits ``timeout`` (default ``shutdown_timeout``) seconds, then SIGTERM, then
        SIGKILL. A Ctrl-C while this runs on the main thread ends the process at once
        (exit code 130, one line on stderr, the workers killed). Pending calls fail with
        ``ExecutorClosedError``; so does every later call, and every call racing with
        the shutdown on another thread. Safe from any thread, from a failure callback
        and from a future's done callback. In a fork of the process that built the
        executor it does nothing (the workers are the owner's; see :mod:`.ownership`).
        """
        if not self._owner.here():
            return
        # The second-Ctrl-C handler goes in before the state moves to CLOSED: a Ctrl-C
        # between the two would otherwise leave an executor marked closed whose workers
        # no shutdown stops (``__exit__``'s retry would return at once).
        with process_hooks.second_interrupt_exits(self._kill_workers):
            if self._life.advance(ExecutorState.RUNNING, ExecutorState.CLOSED):
                self._shut_down(timeout)

    def _shut_down(self, timeout: float | None) -> None:
        """The steps of :meth:`shutdown`, once, under its second-Ctrl-C handler."""
        process_hooks.discard(self)
        grace = self._config.shutdown_timeout if timeout is None else timeout
        ray_workers = self._ray_workers
        if self._suspension.suspended:
            grace = 0.0  # a parked worker's exit path would block in CUDA until unlocked
        reporter = self._hang_reporter
        steps: list[Callable[[], object]] = [
            reporter.close if reporter is not None else lambda: None,
            self._stop_metrics,
            self._channel.begin_close,
            self._gate.poke,
            lambda: stop_workers(self._handles + self._respawner.retired, grace=grace,
                                 term_grace=self._config.terminate_timeout),
            lambda: self._auto.join(10.0) if self._auto is not None else None,
            self._suspension.close,
            self._release_zygote,
            ray_workers.close if ray_workers is not None else lambda: None,
            self._channel.close,
            self._endpoints.close,
            process_hooks.uninstall_sigterm_handler,
        ]
        error: BaseException | None = None
        for step in steps:  # each step runs even when an earlier one raised
            try:
                step()
            except BaseException as e:
                log.warning("gpuexec: a shutdown step failed: %r", e)
                error = error or e
        if error is not None:
            raise error

    def _release_zygote(self) -> None:
        """After the workers are gone: stop the zygote if no other executor uses it
        (unless ``keep_zygote``)."""
        preload, self._zygote_preload = self._zygote_preload, None
        if preload is not None:
            release_zygote(preload, self._config.keep_zygote)

    def _kill_workers(self) -> None:
        """SIGKILL every worker still running and remove the private directory (a second
        Ctrl-C during shutdown: the process exits next, and nothing is left for the
        guardians to clean up after it)."""
        for h in self._handles:
            try:
                h.process.kill()
            except (OSError, ValueError):
                pass
        self._endpoints.close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        if not self.is_closed:
            self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "failed" if self.is_failed else "running"
        return (f"<Executor world_size={self.world_size} device={self._config.device} "
                f"start_method={self._start_method} {state}>")


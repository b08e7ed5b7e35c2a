"""The :class:`Worker` base class users subclass: one instance lives in each worker process."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from ..ipc.messages import WorkerSpec
    from ..ipc.reports import DeviceReport


class WorkerContext(msgspec.Struct, frozen=True):
    """Who this worker is; bound to the instance before its ``__init__`` runs."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: str                 # torch device string valid in this process: "cuda:1", "cpu"
    spec: WorkerSpec


class Worker:
    """Base class of the object each worker process hosts.

    Subclass it and add methods; call them with ``Executor.collective_rpc("name")``.
    ``rank``, ``local_rank``, ``world_size``, ``local_world_size`` and ``device`` are
    already set when your ``__init__`` runs, and the device is already selected (and
    stale CUDA contexts on other GPUs released), so ``torch.empty(..., device=self.device)``
    in ``__init__`` lands on this worker's GPU. ``__init__`` takes the executor's
    ``worker_args`` / ``worker_kwargs``; calling ``super().__init__()`` is optional.

    Two hooks for a worker that *hosts* another object (an engine's own worker, whose
    method names may be the same as this class's: ``init_device``, ``shutdown``...):

    * :meth:`rpc_target` returns the object calls go to: ``collective_rpc("name")`` runs
      ``rpc_target().name(...)`` and a callable runs as ``fn(rpc_target(), ...)``. The
      default is the worker itself. It is read once, right after ``__init__``; the
      names of this base class then never shadow the hosted object's.
    * :meth:`on_shutdown` runs in the worker when the executor shuts down gracefully and
      when the worker gets SIGTERM (then for at most the executor's
      ``shutdown_timeout``), before the process group is destroyed: release what the
      hosted object holds there.

    A method may also return a :class:`concurrent.futures.Future`: the worker goes on
    serving further calls and replies when the future resolves (a pipelined engine
    hands out step N's output while step N+1 runs).
    """

    _gpuexec_ctx: WorkerContext

    def __init__(self) -> None:
        pass

    @property
    def rank(self) -> int:
        return self._gpuexec_ctx.rank

    @property
    def local_rank(self) -> int:
        return self._gpuexec_ctx.local_rank

    @property
    def world_size(self) -> int:
        return self._gpuexec_ctx.world_size

    @property
    def local_world_size(self) -> int:
        return self._gpuexec_ctx.local_world_size

    @property
    def device(self) -> str:
        return self._gpuexec_ctx.device

    def rpc_target(self) -> object:
        """The object that receives this worker's calls (default: the worker itself)."""
        return self

    def on_shutdown(self) -> None:
        """Called once when the worker shuts down (graceful or SIGTERM); default: nothing.

        An exception it raises is logged, and the worker exits all the same.
        """

    def on_peers_replaced(self, ranks: list[int]) -> None:
        """Called on every surviving rank after ``Executor.respawn`` replaced ``ranks``
        and (with ``distributed_backend``) every rank joined the new process group, on
        the worker's serving thread, before respawn returns; default: nothing. Rebuild
        here what this worker keeps that involved the old peers: its own communicators
        or subgroups (made on the old group, now aborted), caches of peer state. An
        exception it raises makes the respawn fail with it
        (:class:`~gpuexec.errors.RespawnError`). The new ranks run their ``__init__``
        instead. An engine that makes its own process groups (no
        ``distributed_backend``) gets the call too, and re-forms them here.
        """

    def init_device(self) -> DeviceReport:
        """Select this worker's device and release stale CUDA primary contexts.

        Runs automatically before the worker class is even imported. It is idempotent:
        call it again after your code touched another GPU and it releases whatever
        became stale since (never a context that still holds this process's memory).
        """
        from .device import init_device

        return init_device(self._gpuexec_ctx.spec)

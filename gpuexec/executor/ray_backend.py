"""Workers as Ray actors (``Executor(..., backend="ray")``): placement, rank layout,
liveness. Ray is imported here only, and only when this backend is asked for.

Data flow::

    driver                                          Ray                   node k
    ──────                                          ───                   ──────
    placement_group([bundle] * N, "PACK") ───────▶ bundles on nodes
    plan_ranks(bundle -> node): the driver's node first, local_rank counted per node
    actor r = RayWorkerActor on bundle r ───────────────────────────────▶ actor process
    actor.serve.remote(spec r) ─────────────────────────────────────────▶ run_worker(spec):
        (tcp endpoints + CURVE keys, through Ray's channel)                init_device,
    XPUB/PULL on tcp://host:port (CURVE) ◀──────── connect, Ready ─────── class, loop
    all actors on the driver's node: + request/reply rings (memfds via /proc) ◀──▶ loop
    watcher thread: ray.wait(serve refs) ─▶ rank r's pipe readable (its "sentinel")

Everything after placement is the executor's usual path: the same start-up handshake,
:class:`~gpuexec.executor.channel.DriverChannel`, errors and shutdown escalation, over
ZeroMQ tcp with CURVE (:mod:`gpuexec.ipc.curve`); pickle never arrives on tcp unless the
peer holds this executor's keys. When every bundle is on the driver's node
(:attr:`RayWorkers.all_local`), the executor adds the shared-memory rings of
:mod:`.shm_path` (actors open them through the driver's /proc entry, like local workers:
same host, same user) and keeps tcp + CURVE for the rest. A placement across nodes uses
tcp for every actor: a call waits for all its ranks, so the remote ones bound it anyway.
Each actor runs the same ``init_device``: Ray sets its ``CUDA_VISIBLE_DEVICES`` to the GPU
of its bundle, so its own device is ordinal 0 and stale contexts on any other visible
device are still released.

Lifecycle of one actor, as this module sees it:

    =========  ===========================================  ==========================
    state      meaning                                      next
    =========  ===========================================  ==========================
    placed     actor created on its bundle, pid known       serving (serve.remote)
    serving    ``serve`` running: the worker's main loop    returned / died
    returned   ``serve`` came back (Shutdown): exit 0       killed at close
    died       ``serve`` raised (actor or node died):       killed at close
               exit code unknown, Ray's reason kept
    =========  ===========================================  ==========================

The watcher writes one byte to the rank's pipe on ``returned`` or ``died``: the monitor
thread and the start-up handshake already wait on such file descriptors, so a dead actor
fails pending calls through the same path as a dead process (measured in
``benchmarks/ray_backend.py``). ``close()`` kills every actor (``ray.kill``: Ray has no
gentler signal for an actor busy in ``serve``) and removes the placement group; if the
driver process dies instead, Ray kills the actors it owns and removes its placement
groups itself (within Ray's own detection time); on the driver's node each actor's
watchdog thread (:mod:`gpuexec.worker.watchdog`) ends it at once unless it holds the GIL.
Actors get no guardian process nor a process group of their own: their processes are Ray's.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, WorkerStartupError
from .launcher import WorkerHandle
from .processes import UNKNOWN_EXIT

log = logging.getLogger("gpuexec")

_WATCH_S = 0.2  # the watcher re-checks its stop flag this often


def import_ray() -> Any:
    """The ``ray`` module, or a ConfigError that says how to get it."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError("backend='ray' needs Ray: pip install 'gpuexec[ray]'") from e
    return ray


def check_bundle(bundle: Mapping[str, float]) -> dict[str, float]:
    """A copy of ``bundle`` (Ray resources per worker) or a ConfigError."""
    if not isinstance(bundle, Mapping) or not bundle:
        raise ConfigError(f"ray_resources must be a non-empty mapping, not {bundle!r}")
    out: dict[str, float] = {}
    for name, amount in bundle.items():
        if not isinstance(name, str) or isinstance(amount, bool) or \
                not isinstance(amount, (int, float)) or not amount > 0:
            raise ConfigError(f"ray_resources: {name!r}: {amount!r} is not a positive amount")
        out[name] = float(amount)
    return out


@dataclass(frozen=True)
class Slot:
    """Where one rank runs."""

    bundle: int
    node_id: str
    local_rank: int
    local_world_size: int


def plan_ranks(bundle_nodes: Mapping[int, str], driver_node: str) -> list[Slot]:
    """Rank order for placed bundles: the driver's node first (its ranks can share the
    driver's host), then the other nodes in the order of their first bundle; within a
    node by bundle index. ``local_rank`` counts ranks per node."""
    bundles = sorted(bundle_nodes)
    first: dict[str, int] = {}
    for b in bundles:
        first.setdefault(bundle_nodes[b], b)
    order = sorted(bundles, key=lambda b: (bundle_nodes[b] != driver_node,
                                           first[bundle_nodes[b]], b))
    per_node: dict[str, int] = {}
    for b in order:
        per_node[bundle_nodes[b]] = per_node.get(bundle_nodes[b], 0) + 1
    seen: dict[str, int] = {}
    slots = []
    for b in order:
        node = bundle_nodes[b]
        slots.append(Slot(b, node, seen.get(node, 0), per_node[node]))
        seen[node] = seen.get(node, 0) + 1
    return slots


class RayActorProcess:
    """One actor behind the launcher's process interface (``ProcessLike``)."""

    def __init__(self, ray: Any, actor: Any, pid: int) -> None:
        self._ray = ray
        self.actor = actor
        self._pid = pid
        self._r, self._w = os.pipe()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._exitcode: int | None = None
        self.reason = ""            # Ray's account of a death

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def sentinel(self) -> int:
        return self._r

    @property
    def exitcode(self) -> int | None:
        return self._exitcode

    def finished(self, exitcode: int, reason: str = "") -> None:
        """``serve`` returned (0) or the actor died: make the sentinel readable. Called by
        the watcher and by ``close``; the first call counts."""
        with self._lock:
            if self._done.is_set():
                return
            self.reason = reason
            self._exitcode = exitcode
            self._done.set()
            os.write(self._w, b"x")

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def terminate(self) -> None:
        self.kill()

    def kill(self) -> None:
        if not self._done.is_set():
            try:
                self._ray.kill(self.actor, no_restart=True)
            except Exception as e:  # already gone, Ray shut down...
                log.debug("gpuexec: ray.kill: %s", e)

    def close(self) -> None:
        if not self._done.is_set():
            raise ValueError("cannot close a running actor")
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class RayWorkers:
    """The placement group, the actors and the watcher of one executor."""

    def __init__(self, world_size: int, bundle: Mapping[str, float], timeout: float) -> None:
        from ..worker.ray_actor import RayWorkerActor

        ray = self._ray = import_ray()
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS, or a local cluster; the driver's own to shut down
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.processes: list[RayActorProcess] = []
        self._refs: dict[Any, RayActorProcess] = {}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.pg = placement_group([dict(bundle)] * world_size, strategy="PACK")
        try:
            done, _ = ray.wait([self.pg.ready()], timeout=timeout)
            if not done:
                raise WorkerStartupError(0, (
                    f"Ray could not place {world_size} bundles of {dict(bundle)} within "
                    f"{timeout:g} s; the cluster has {ray.cluster_resources()}"))
            nodes = placement_group_table(self.pg)["bundles_to_node_id"]
            self.driver_node = str(ray.get_runtime_context().get_node_id())
            self.slots = plan_ranks({int(b): str(n) for b, n in nodes.items()},
                                    self.driver_node)
            # Every actor shares the driver's host: the shared-memory rings can serve them.
            self.all_local = all(s.node_id == self.driver_node for s in self.slots)
            cls = ray.remote(RayWorkerActor)
            actors = [cls.options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=slot.bundle),
                name=None, max_restarts=0).remote() for slot in self.slots]
            where = ray.get([a.where.remote() for a in actors], timeout=timeout)
            self.visible_devices = [w[1] for w in where]
            self.processes = [RayActorProcess(ray, a, w[0])
                              for a, w in zip(actors, where, strict=True)]
        except BaseException:
            self.close()
            raise

    def serve(self, specs: Sequence[bytes]) -> list[WorkerHandle]:
        """Start every actor's worker loop and the watcher; the launcher's handles."""
        for proc, spec in zip(self.processes, specs, strict=True):
            self._refs[proc.actor.serve.remote(spec)] = proc
        self._watcher = threading.Thread(target=self._watch, name="gpuexec-ray-watch",
                                         daemon=True)
        self._watcher.start()
        return [WorkerHandle(rank, proc, proc.pid, proc.sentinel)
                for rank, proc in enumerate(self.processes)]

    def _watch(self) -> None:
        ray = self._ray
        pending = list(self._refs)
        while pending and not self._stop.is_set():
            try:
                done, pending = ray.wait(pending, num_returns=1, timeout=_WATCH_S)
            except Exception as e:  # Ray itself went away
                log.warning("gpuexec: lost Ray while watching actors: %s", e)
                done, pending = pending, []
            for ref in done:
                proc = self._refs[ref]
                try:
                    ray.get(ref, timeout=0)
                    proc.finished(0)
                except Exception as e:  # RayActorError and kin
                    proc.finished(UNKNOWN_EXIT, f"{type(e).__name__}: {e}")

    def close(self) -> None:
        """Kill every actor and remove the placement group; idempotent."""
        self._stop.set()
        for proc in self.processes:
            proc.kill()
            proc.finished(UNKNOWN_EXIT)  # no-op for one already finished
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(2 * _WATCH_S + 1)
        from ray.util.placement_group import remove_placement_group

        try:
            remove_placement_group(self.pg)
        except Exception as e:  # already removed, Ray shut down
            log.debug("gpuexec: remove_placement_group: %s", e)

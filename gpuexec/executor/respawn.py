"""Replacing dead or stuck ranks in place (:meth:`gpuexec.Executor.respawn`).

::

    respawn(ranks, timeout, kill)                         (one at a time: ``_lock``)
      1. refuse what cannot be done, before touching anything: a closed or suspended
         executor, Ray actors, a rank out of range, a live rank without ``kill=True``
      2. kill=True: SIGKILL the live ranks asked for, and reap them
      3. record every target's exit (the monitor may not have seen it yet): the executor
         is failed, every call in flight has ended with ``WorkerDiedError`` and stays
         ended, every new call gets ``WorkerDiedError`` at once
      4. holding the channel's pump and send locks (nothing else is sent or received):
         each rank's dead worker is forgotten and its place on the wire prepared (shared
         memory: the ring protocol in :mod:`.shm_path`); with ``distributed_backend`` the
         survivors are told to abort the old group and rendezvous anew (:mod:`.regroup`)
      5. the new processes start with the spec of the first start (rank, local rank,
         device, worker class and arguments, per-rank env, transport, start method; from
         the zygote when that is the start method), a fresh rendezvous port if any
      6. each one's ``Ready`` and subscription (:func:`.launcher.wait_ready`), then the
         survivors' answers to the regroup, all by the deadline
      7. the new workers are watched, their ranks leave the dead set; once no rank is
         dead, :attr:`is_failed` is false and calls flow again

A failure in 5-6 (a new worker that dies or does not get ready in time, a death of
another rank meanwhile, a survivor's ``on_peers_replaced`` that raises) stops the new
workers, leaves the ranks dead and raises :class:`~gpuexec.errors.RespawnError` (its
cause: what went wrong); respawn may be called again. Survivors are never restarted:
they get one message (``Regroup``), which re-forms the group when there is one and runs
``Worker.on_peers_replaced``.

Automatic mode (``on_worker_death="respawn"``): :class:`AutoRespawn` is a failure
callback that starts a thread running ``respawn()``, at most ``max_respawns`` times
within ``respawn_window`` seconds; past that, or when a respawn fails (other than by a
further death, which it retries within the same bound), the executor stays failed as it
would without it, and only then do the user's failure callbacks run. What happened is
kept in :attr:`Executor.recoveries`.

Fields: ``_lock`` serialises respawns; ``_retired``: the dead workers' handles, closed at
shutdown (their descriptors must not be reused while a poll may still hold them);
everything else is read-only after construction.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import zmq

from ..errors import (
    ExecutorClosedError,
    GpuexecError,
    InvalidArgumentError,
    RespawnError,
    WorkerDiedError,
    signal_name,
)
from ..ipc.codec import Encoder
from ..ipc.messages import DistributedSpec, Regroup, WorkerSpec
from ..ipc.signals import ABORT_SIGNAL
from .calls import CallTable, PendingCall
from .launcher import WorkerHandle, start_workers, stop_workers, wait_ready
from .monitor import Monitor
from .processes import UNKNOWN_EXIT
from .rendezvous import free_port
from .transport import Transport
from .zygote_client import get_zygote

if TYPE_CHECKING:
    from .channel import DriverChannel  # it imports this module (HeldWire)

log = logging.getLogger("gpuexec")


@dataclass(frozen=True)
class HeldWire:
    """What a respawn uses while it holds the pump and send locks (see .respawn)."""

    xpub: zmq.Socket[bytes]
    pull: zmq.Socket[bytes]
    transport: Transport
    table: CallTable
    encoder: Encoder
    monitor: Monitor


class RespawnReport(msgspec.Struct, frozen=True):
    """One rank replaced by :meth:`gpuexec.Executor.respawn`."""

    rank: int
    old_pid: int
    old_exitcode: int | None   # negative: killed by that signal; None: unknown
    old_signal: str | None     # "SIGKILL"... when a signal ended it
    killed: bool               # True: respawn killed it (``kill=True`` on a live rank)
    new_pid: int
    seconds: float             # from the start of respawn() to this rank's Ready


class Recovery(msgspec.Struct, frozen=True):
    """What the automatic mode did after a death (:attr:`Executor.recoveries`)."""

    rank: int                  # the rank whose death started it
    outcome: str               # "respawned", "failed" (respawn raised) or "limit"
    detail: str                # the reports, the error, or the limit reached
    reports: list[RespawnReport] = []


class Respawner:
    """Replaces ranks of one executor; see the module docstring."""

    def __init__(self, channel: DriverChannel, handles: list[WorkerHandle],
                 specs: Sequence[WorkerSpec], start_method: str,
                 zygote_preload: tuple[str, ...] | None, ready_timeout: float,
                 stderr_tail: Callable[[int], str],
                 on_pids: Callable[[dict[int, int]], None]) -> None:
        self._channel = channel
        self._handles = handles       # the executor's list, changed in place
        self._specs = list(specs)
        self._method = start_method
        self._preload = zygote_preload
        self._ready_timeout = ready_timeout
        self._stderr_tail = stderr_tail
        self._on_pids = on_pids       # new pids by rank (the suspension's table)
        self._lock = threading.Lock()
        self._retired: list[WorkerHandle] = []

    @property
    def retired(self) -> list[WorkerHandle]:
        return self._retired

    def dead_ranks(self) -> list[int]:
        return [h.rank for h in self._handles if h.exitcode is not None]

    def respawn(self, ranks: Sequence[int] | None, timeout: float | None,
                kill: bool) -> list[RespawnReport]:
        world = len(self._handles)
        if ranks is not None:
            if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
                raise InvalidArgumentError(f"ranks must be a sequence of ints, not {ranks!r}")
            bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool)
                   or not 0 <= r < world]
            if bad:
                raise InvalidArgumentError(f"ranks {bad!r} are not ranks of this executor "
                                           f"(0..{world - 1})")
        if timeout is not None and (isinstance(timeout, bool) or
                                    not isinstance(timeout, (int, float)) or not timeout > 0):
            raise InvalidArgumentError(f"timeout must be positive seconds, not {timeout!r}")
        with self._lock:
            t0 = time.monotonic()
            deadline = t0 + (self._ready_timeout if timeout is None else timeout)
            targets = sorted(set(self.dead_ranks() if ranks is None else ranks))
            old = {r: self._handles[r] for r in targets}
            alive = [r for r in targets if old[r].exitcode is None]
            if alive and not kill:
                raise RespawnError(
                    f"rank(s) {alive} are alive: respawn replaces dead ranks; pass "
                    f"kill=True to kill a stuck rank first", alive)
            if not targets:
                return []
            for r in alive:
                self._kill(old[r])
            for r in targets:
                self._channel.worker_exited(old[r])
            return self._replace(targets, old, set(alive), t0, deadline)

    def _rendezvous(self) -> DistributedSpec | None:
        """With a distributed backend: the first start's rendezvous on a fresh port."""
        d = self._specs[0].distributed
        if d is None:
            return None
        return msgspec.structs.replace(d, master_port=free_port(d.master_addr))

    def _kill(self, handle: WorkerHandle) -> None:
        log.warning("gpuexec: respawn kills rank %d (pid %d)", handle.rank, handle.pid)
        handle.process.kill()
        handle.reap(timeout=5.0)

    def _replace(self, targets: list[int], old: dict[int, WorkerHandle], killed: set[int],
                 t0: float, deadline: float) -> list[RespawnReport]:
        new: list[WorkerHandle] = []
        try:
            with self._channel.replacing() as wire:
                _drain(wire.xpub)  # subscriptions of an earlier, failed respawn
                distributed = self._rendezvous()
                survivors = [r for r, h in enumerate(self._handles)
                             if r not in old and h.exitcode is None]
                if distributed is not None:
                    for r in survivors:  # release a collective blocked on the dead peer
                        _signal(self._handles[r], ABORT_SIGNAL)
                joins = {r: wire.transport.forget(r, old[r].sentinel) for r in targets}
                regroup = _send_regroup(wire, survivors, distributed, targets,
                                        deadline) if survivors else None
                specs: list[bytes] = []
                for r in targets:
                    wire.monitor.forget(old[r])
                    shm = joins[r]
                    spec = self._specs[r]
                    if shm is not None:
                        spec = msgspec.structs.replace(spec, shm=shm)
                    if distributed is not None:
                        spec = msgspec.structs.replace(spec, distributed=distributed)
                    specs.append(msgspec.msgpack.encode(spec))
                zygote = None
                if self._method == "zygote" and self._preload is not None:
                    zygote, _ = get_zygote(self._preload, max(0.0, deadline - time.monotonic()),
                                           hold=False)  # the executor holds it already
                new = start_workers(self._method, specs, zygote, deadline, deadline - t0,
                                    ranks=targets)
                wait_ready(new, wire.pull, wire.xpub, self._method, deadline - t0,
                           self._stderr_tail, deadline, others=lambda: wire.table.closing,
                           other_frames=wire.transport.dispatch)
                if regroup is not None:
                    _wait_regroup(wire, regroup)
                for r in survivors:  # one that died after its answer missed the new peer
                    if self._handles[r].exitcode is not None:
                        wire.monitor.exited(self._handles[r])
                        death = wire.monitor.deaths.get(r)
                        raise death.error() if death is not None else \
                            ExecutorClosedError("the executor is shut down")
                ready = time.monotonic()
                for h in new:
                    self._retired.append(self._handles[h.rank])
                    self._handles[h.rank] = h
                    wire.transport.adopt(h.sentinel)
                    wire.monitor.adopt(h)
        except ExecutorClosedError:
            stop_workers(new, grace=0.0, term_grace=1.0)
            raise
        except BaseException as e:
            stop_workers(new, grace=0.0, term_grace=1.0)
            if isinstance(e, GpuexecError):
                raise RespawnError(f"respawning rank(s) {targets} failed: {e}",
                                   targets) from e
            raise
        self._on_pids({h.rank: h.pid for h in new})
        self._channel.replaced(targets)
        reports = []
        for h in new:
            code = old[h.rank].exitcode
            code = None if code == UNKNOWN_EXIT else code
            reports.append(RespawnReport(h.rank, old[h.rank].pid, code, signal_name(code),
                                         h.rank in killed, h.pid, ready - t0))
        log.info("gpuexec: respawned rank(s) %s in %.3f s", targets, ready - t0)
        return reports


def _send_regroup(wire: HeldWire, ranks: Sequence[int], distributed: DistributedSpec | None,
                  replaced: Sequence[int], deadline: float) -> PendingCall:
    """Tell the survivors ``ranks`` that ``replaced`` were replaced: a call of the
    respawn's own, entered in the table although calls are refused, so that a death
    fails it like any call."""
    table = wire.table
    call = PendingCall(next(table.ids), "on_peers_replaced", list(ranks), None,
                       max(1e-3, deadline - time.monotonic()), None)
    with table.lock:
        table.pending[call.call_id] = call
    frames = wire.encoder.encode(Regroup(call.call_id, distributed, list(replaced)))
    while not wire.transport.send(ranks, frames):  # a full ring: survivors still reading
        if table.closing:
            raise ExecutorClosedError("the executor was shut down while ranks were replaced")
        if time.monotonic() >= deadline:
            table.expire(call)
            break
        time.sleep(1e-3)
    return call


def _wait_regroup(wire: HeldWire, call: PendingCall) -> None:
    """Receive until the survivors answered ``call``; raise its error (``RpcTimeoutError``
    at the deadline, ``WorkerDiedError`` when a survivor died, the remote error of a
    failed rendezvous or ``on_peers_replaced``)."""
    table = wire.table
    while not call.done:
        if table.closing:
            raise ExecutorClosedError("the executor was shut down while ranks were replaced")
        remaining = (call.deadline or 0.0) - time.monotonic()
        if remaining <= 0:
            table.expire(call)
            break
        wire.transport.recv_for(call, call.deadline)
    call.outcome()


def _signal(handle: WorkerHandle, signum: int) -> None:
    try:
        os.kill(handle.pid, signum)
    except ProcessLookupError:  # died meanwhile: the monitor fails the regroup
        pass


def _drain(xpub: zmq.Socket[bytes]) -> None:
    """Drop the subscription messages queued on the request socket."""
    while xpub.poll(0, zmq.POLLIN):
        xpub.recv()


class AutoRespawn:
    """``on_worker_death="respawn"``: a failure callback that replaces the dead ranks on
    a thread of its own, at most ``max_respawns`` times within ``window`` seconds."""

    def __init__(self, respawn: Callable[[], list[RespawnReport]],
                 dead_ranks: Callable[[], list[int]], closed: Callable[[], bool],
                 max_respawns: int, window: float) -> None:
        self._respawn = respawn
        self._dead_ranks = dead_ranks
        self._closed = closed
        self._max = max_respawns
        self._window = window
        self._times: deque[float] = deque()  # when each automatic respawn started
        self._lock = threading.Lock()        # guards _times, _thread, recoveries
        self._thread: threading.Thread | None = None
        self.recoveries: list[Recovery] = []
        self.gave_up = False  # the limit was reached, or a respawn failed: stays failed
        self._callbacks: list[Callable[[], None]] = []  # the user's: run on giving up

    def add_callback(self, fn: Callable[[], None]) -> None:
        """A user's failure callback: in this mode it runs when the executor stays
        failed (the recovery gave up; :attr:`recoveries` says why), not at a death that
        is being repaired. At once when it already gave up."""
        with self._lock:
            self._callbacks.append(fn)
            if not self.gave_up:
                return
        fn()

    def _give_up(self, recovery: Recovery) -> None:
        with self._lock:
            self.gave_up = True
            self._note(recovery)
            callbacks = list(self._callbacks)
        for fn in callbacks:  # this thread holds no lock of the executor's
            try:
                fn()
            except Exception:
                log.exception("gpuexec: a failure callback raised")

    def __call__(self) -> None:
        """The failure callback (the monitor's thread): never blocks."""
        with self._lock:
            if self.gave_up or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._run, name="gpuexec-respawn",
                                            daemon=True)
            self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while not self._closed():
            dead = self._dead_ranks()
            if not dead:
                return
            with self._lock:
                now = time.monotonic()
                while self._times and self._times[0] <= now - self._window:
                    self._times.popleft()
                limited = len(self._times) >= self._max
                if not limited:
                    self._times.append(now)
            if limited:
                self._give_up(Recovery(dead[0], "limit",
                                       f"{len(self._times)} automatic respawn(s) within "
                                       f"{self._window:g} s (max_respawns={self._max}): "
                                       f"the executor stays failed"))
                return
            try:
                reports = self._respawn()
            except ExecutorClosedError:
                return
            except Exception as e:
                failed = Recovery(dead[0], "failed", f"{type(e).__name__}: {e}")
                if isinstance(e.__cause__, WorkerDiedError):  # another death: try again,
                    with self._lock:                          # within the same bound
                        self._note(failed)
                    continue
                self._give_up(failed)
                return
            with self._lock:
                self._note(Recovery(dead[0], "respawned", ", ".join(
                    f"rank {r.rank}: pid {r.old_pid} -> {r.new_pid} in {r.seconds:.3f} s"
                    for r in reports), reports))

    def _note(self, recovery: Recovery) -> None:
        self.recoveries.append(recovery)
        log.warning("gpuexec: automatic respawn after rank %d died: %s (%s)",
                    recovery.rank, recovery.outcome, recovery.detail)

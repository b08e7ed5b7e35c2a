"""Where every rank is and what it is doing: stacks, status and metrics, from the driver.

::

    Executor.stacks() / RpcTimeoutError / hang report ──▶ Forensics.stacks
        call table (under its lock): which call each rank owes first, since when
        .stacks.collect: STACKS_SIGNAL to each pid, answers read from the private directory
    Executor.status() ──▶ Forensics.status: the call table + /proc/<pid> (+ NVML on CUDA)
    Executor.serve_metrics() / metrics_collector() ──▶ Forensics.collect (at scrape time)

What a rank runs is read from the call table, not asked of the worker: a worker runs its
calls in the order they were sent, so the oldest pending call a rank has not answered is
the one it runs, since the later of that call's send and the rank's previous reply.

A rank's *state* in :meth:`Forensics.status`:

==========  ==============================================================
state       meaning
==========  ==============================================================
starting    its process has not said it is ready (never seen after start)
idle        ready, owes no reply
busy        ready, running ``method`` for ``running_s`` seconds
suspended   the executor is suspended (GPU state parked; the process runs)
stopping    the executor is stopping it
exited      stopped by the executor
dead        its process ended on its own, until respawn() replaces it
==========  ==============================================================

Holds no reference to the executor (only its handles, call table and directory), so the
call table may keep it for timeouts without keeping the executor alive.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import msgspec

from ..errors import InvalidArgumentError, MissingDependencyError
from ..ipc.stacks import serving_thread, stacks_path, thread_frames
from . import stacks as channel
from .calls import CallTable
from .launcher import WorkerHandle
from .metrics import CallMetrics, families
from .validate import seconds, target_ranks
from .worker_state import WorkerState

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class RankStatus(msgspec.Struct, frozen=True):
    """One rank as the driver sees it now (see :meth:`gpuexec.Executor.status`)."""

    rank: int
    pid: int
    state: str                       # see the table in gpuexec.executor.forensics
    method: str | None               # the call it runs, None when idle
    running_s: float | None          # for how long, None when idle
    calls_completed: int             # calls it answered (results and errors)
    since_last_reply_s: float | None  # None: it never answered a call yet
    rss_bytes: int | None            # resident memory; None: gone, or a Ray actor on
                                     # another host (also for the two below and GPU memory)
    cpu_s: float | None              # CPU time used so far (user + system)
    cpu_percent: float | None        # over the time since the previous status(), None first
    gpu_memory_mib: dict[int, float] | None  # NVML index -> MiB it holds; None: no NVML


def _proc_usage(pid: int) -> tuple[int | None, float | None]:
    """``(rss bytes, cpu seconds)`` of ``pid`` from ``/proc`` (None, None when gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None, None
    return rss, (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


class Forensics:
    """Stacks, status and metrics of one executor's ranks; see the module docstring."""

    def __init__(self, handles: Sequence[WorkerHandle], table: CallTable, directory: str,
                 suspended: Callable[[], bool], cuda: bool,
                 maybe_remote: bool = False) -> None:
        self.handles = handles
        self._table = table
        self._directory = directory
        self._suspended = suspended      # the executor's suspension state
        self._cuda = cuda                # NVML is asked only for CUDA workers
        # Ray: a rank's pid may be another host's; /proc here is read only for a process
        # that holds the rank's stacks channel (it is then this executor's worker).
        self._maybe_remote = maybe_remote
        self._lock = threading.Lock()    # one stacks collection at a time; a leaf
        self._cpu_lock = threading.Lock()  # guards _cpu; a leaf
        self._cpu: dict[int, tuple[float, float]] = {}  # pid -> (when, cpu_s)
        table.explain = lambda call, ranks: self.stacks(ranks, 1.0)

    # -- what each rank runs -------------------------------------------------------

    def running(self) -> dict[int, tuple[str, float]]:
        """rank -> (method, seconds it has run) for every rank that owes a reply: the
        oldest call it has not answered, pending or ended without its reply (timed out,
        abandoned), since the later of its send and the rank's previous answer."""
        table = self._table
        now = time.monotonic()
        oldest: dict[int, tuple[int, str, float]] = {}
        with table.lock:
            metrics = table.metrics
            for rank, ended in enumerate(metrics.abandoned):
                if ended:
                    call_id = min(ended)
                    oldest[rank] = (call_id, *ended[call_id])
            for call_id, call in table.pending.items():
                for rank in call.owed:
                    if rank not in oldest or call_id < oldest[rank][0]:
                        oldest[rank] = (call_id, call.method, call.started)
            last = list(metrics.last_reply)
        return {rank: (method, now - max(started, last[rank]))
                for rank, (_, method, started) in oldest.items()}

    def _pid(self, h: WorkerHandle) -> int | None:
        if h.life.state is not WorkerState.READY or h.exitcode is not None:
            return None
        return h.pid

    # -- stacks --------------------------------------------------------------------

    def stacks(self, ranks: Sequence[int], timeout: float) -> dict[int, str]:
        """Each rank's first paragraph (what it runs, the innermost frames of the thread
        that runs calls) and every thread's stack; within ``timeout`` for all."""
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            return {r: f"rank {r}: no stacks (another collection held the channel for "
                       f"{timeout:g} s)" for r in ranks}
        try:
            pids = {r: self._pid(self.handles[r]) for r in ranks}
            dumps = channel.collect(self._directory, pids,
                                    max(0.0, deadline - time.monotonic()), timeout)
        finally:
            self._lock.release()
        running = self.running()
        suspended = " (the executor is suspended: GPU state parked)" if self._suspended() \
            else ""
        out = {}
        for rank, dump in dumps.items():
            h = self.handles[rank]
            doing = running.get(rank)
            what = f"running {doing[0]!r} for {doing[1]:.1f} s" if doing else "idle"
            head = f"rank {rank} (pid {h.pid}): {what}{suspended}"
            thread = _serving_thread(self._directory, rank)
            frames = thread_frames(dump, thread) if thread else []
            if frames:
                head += "; innermost frames of the thread that runs calls:\n  " + \
                    "\n  ".join(frames)
            elif not dump.startswith(("Thread ", "Current thread ")):
                head += f"; no stacks: {dump.splitlines()[-1] if dump else 'no answer'}"
            out[rank] = f"{head}\n\n{dump}"
        return out

    # -- status --------------------------------------------------------------------

    def status(self) -> list[RankStatus]:
        running = self.running()
        table = self._table
        with table.lock:
            replies = list(table.metrics.replies)
            last = list(table.metrics.last_reply)
        suspended = self._suspended()
        gpu = _gpu_memory([h.pid for h in self.handles]) if self._cuda else None
        now = time.monotonic()
        out = []
        for h in self.handles:
            life = h.life.state
            doing = running.get(h.rank)
            if life is WorkerState.READY and h.exitcode is not None:
                state = "dead"  # until respawn() replaces it
            elif life is not WorkerState.READY:
                state = life.value
            else:
                state = "suspended" if suspended else "busy" if doing else "idle"
            here = state not in ("dead", "exited") and self._here(h)
            rss, cpu = _proc_usage(h.pid) if here else (None, None)
            out.append(RankStatus(
                rank=h.rank, pid=h.pid, state=state,
                method=doing[0] if doing else None, running_s=doing[1] if doing else None,
                calls_completed=replies[h.rank],
                since_last_reply_s=now - last[h.rank] if last[h.rank] else None,
                rss_bytes=rss, cpu_s=cpu, cpu_percent=self._cpu_percent(h.pid, now, cpu),
                gpu_memory_mib=None if gpu is None or not here else gpu.get(h.pid, {})))
        return out

    def _here(self, h: WorkerHandle) -> bool:
        """Whether ``h.pid`` on this host is that worker (always, but for Ray actors)."""
        return not self._maybe_remote or \
            channel.holds(h.pid, stacks_path(self._directory, h.rank))

    def _cpu_percent(self, pid: int, now: float, cpu: float | None) -> float | None:
        with self._cpu_lock:
            before = self._cpu.pop(pid, None)
            if cpu is None:
                return None
            self._cpu[pid] = (now, cpu)
        if before is None or now <= before[0]:
            return None
        return 100.0 * (cpu - before[1]) / (now - before[0])

    # -- metrics -------------------------------------------------------------------

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Count the time of a ``"suspend"`` or ``"resume"`` (also when it fails)."""
        start = time.monotonic()
        try:
            yield
        finally:
            table = self._table
            with table.lock:
                record = table.metrics.suspend if what == "suspend" else table.metrics.resume
                record[0] += 1
                record[1] += time.monotonic() - start

    def collect(self) -> Iterator[Any]:
        """The Prometheus families now (a ``prometheus_client`` collector's ``collect``)."""
        table = self._table
        with table.lock:
            m, src = CallMetrics(0), table.metrics
            m.replies, m.timeouts = list(src.replies), list(src.timeouts)
            m.cancellations, m.deaths = list(src.cancellations), list(src.deaths)
            m.errors = [dict(e) for e in src.errors]
            m.suspend, m.resume = list(src.suspend), list(src.resume)
            for name, stats in src.methods.items():
                stats.fold()
                copy = m.methods[name] = type(stats)()
                copy.calls, copy.seconds, copy.request_bytes = \
                    stats.calls, stats.seconds, stats.request_bytes
                copy.buckets, copy.errors = list(stats.buckets), dict(stats.errors)
            late, inflight = table.stats.late_replies, len(table.pending)

        def processes() -> list[tuple[int, int | None, float | None]]:
            return [(h.rank, *_proc_usage(h.pid)) for h in self.handles
                    if h.life.state is WorkerState.READY and self._here(h)]

        return families(m, late, inflight, processes)


def _serving_thread(directory: str, rank: int) -> str:
    try:
        with open(stacks_path(directory, rank), "rb") as f:
            return serving_thread(f.readline())
    except OSError:
        return ""


def _gpu_memory(pids: list[int]) -> dict[int, dict[int, float]] | None:
    """pid -> {NVML index: MiB} for ``pids``, None when NVML is not available. NVML loads
    the driver library but never initialises CUDA here (see .start_method)."""
    from .. import nvml

    if not nvml.available():
        return None
    return {pid: nvml.process_mib(pid) for pid in pids}


class _Collector:
    """A ``prometheus_client`` collector over one executor's :class:`Forensics`."""

    def __init__(self, forensics: Forensics) -> None:
        self._forensics = forensics

    def collect(self) -> Iterator[Any]:
        return self._forensics.collect()


class ForensicsMethods:
    """The forensics methods of :class:`~gpuexec.Executor` (set up by its constructor)."""

    _forensics: Forensics
    _metrics_servers: list[Any]

    def _check_open(self) -> None:
        raise NotImplementedError  # the executor's

    def stacks(self, timeout: float = 1.0, ranks: Sequence[int] | None = None
               ) -> dict[int, str]:
        """Every thread's Python stack in each worker (or in ``ranks``), now: rank -> text.

        Each text starts with a paragraph naming the rank, its pid, the method it is
        running and for how long (or ``idle``), and the innermost frames of the thread
        that runs calls; after a blank line comes every thread's stack as ``faulthandler``
        prints it (most recent call first). It works while a rank runs a method, waits in
        a blocking call, or holds the GIL inside a long C call: the worker answers from a
        C signal handler (no ptrace, no tool). While the executor is suspended the
        workers still answer (their CPU side runs; the paragraph says suspended). A rank
        that cannot answer within ``timeout`` seconds (all ranks together; its process is
        stopped, or stuck in the kernel) gets what it wrote and a last line naming its
        process state; a dead rank, or a Ray actor on another node (no channel reaches
        it), gets one line saying so. Raises ``ExecutorClosedError`` after shutdown,
        ``InvalidArgumentError`` for a bad ``timeout`` or rank.
        """
        wait = seconds("timeout", timeout)
        if wait is None:
            raise InvalidArgumentError("stacks() needs a finite timeout")
        self._check_open()
        return self._forensics.stacks(
            list(range(len(self._forensics.handles))) if ranks is None
            else target_ranks(ranks, len(self._forensics.handles)), wait)

    def status(self) -> list[RankStatus]:
        """One :class:`RankStatus` per rank, in rank order: pid, state (idle, busy,
        suspended, dead...; see :mod:`gpuexec.executor.forensics`), the method it runs and
        for how long, calls completed, time since its last reply, RSS and CPU use (from
        ``/proc``; ``cpu_percent`` over the time since the previous ``status()``), and the
        GPU memory NVML sees it hold (``None`` without NVML or on CPU). Read in the
        driver: it never waits for a worker, also while one is stuck."""
        return self._forensics.status()

    def metrics_collector(self) -> Any:
        """A ``prometheus_client`` collector of this executor's metrics (families start
        with ``gpuexec_``; see :mod:`gpuexec.executor.metrics`), to register in an
        engine's own registry (``registry.register(ex.metrics_collector())``). Register
        one executor per registry: two would report the same series. Needs the
        ``gpuexec[metrics]`` extra (``MissingDependencyError`` otherwise)."""
        _require_prometheus()
        return _Collector(self._forensics)

    def serve_metrics(self, port: int = 0, host: str = "127.0.0.1") -> tuple[str, int]:
        """Serve this executor's metrics in Prometheus' text format over HTTP (any path)
        on ``host`` (default loopback) and ``port`` (0: a free one); returns the bound
        ``(host, port)``. The server stops at :meth:`shutdown`. Needs ``gpuexec[metrics]``."""
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise InvalidArgumentError(f"port must be an int in 0..65535, not {port!r}")
        if not isinstance(host, str) or not host:
            raise InvalidArgumentError(f"host must be a non-empty str, not {host!r}")
        self._check_open()
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.metrics_collector())
        server, _ = start_http_server(port, addr=host, registry=registry)
        self._metrics_servers.append(server)
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def _stop_metrics(self) -> None:
        """Stop every metrics server (a shutdown step)."""
        servers, self._metrics_servers = self._metrics_servers, []
        for server in servers:
            server.shutdown()
            server.server_close()


def _require_prometheus() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "prometheus_client":
            raise
        raise MissingDependencyError("Executor metrics", "prometheus_client",
                                     "metrics") from None

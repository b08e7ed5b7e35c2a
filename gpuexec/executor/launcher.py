"""Starting worker processes, waiting for their handshake, and stopping them.

Start-up handshake (the constructor's thread, before the monitor thread exists)::

    driver                                   worker (one per rank)
    bind XPUB "req", PULL "rep"
    start process(spec) ───────────────────▶ own group + guardian, env, connect, subscribe
    XPUB  ◀── subscription b"\x01r<rank>." ─┘
                                             init_device, import class, __init__
    PULL  ◀── Ready ──────────────────────── (or StartupFailed + exit 1)
    poll PULL + XPUB + sentinels until every rank is ready *and* subscribed

Shutdown escalation (one log line per step that is needed): the Shutdown message
and ``grace`` seconds, then SIGTERM and ``term_grace`` seconds, then SIGKILL.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_sentinels
from typing import Any

import zmq

from ..errors import (
    ExecutorClosedError,
    ProtocolError,
    StartMethodError,
    WorkerStartupError,
)
from ..ipc.codec import Decoder, MalformedMessage
from ..ipc.messages import PROTOCOL_VERSION, Handshake, Ready, StartupFailed, rank_topic
from ..ipc.reports import DeviceReport
from ..worker.process import run_worker
from .processes import ProcessLike, start_subprocess
from .start_method import GUARD_HINT, main_lacks_guard, reimports_main
from .worker_state import WorkerLifecycle, WorkerState
from .zygote_client import ZygoteClient

log = logging.getLogger("gpuexec")


@dataclass
class WorkerHandle:
    """The driver's view of one worker process."""

    rank: int
    process: ProcessLike
    pid: int
    sentinel: int
    device: str = ""                      # filled from Ready
    report: DeviceReport | None = None    # filled from Ready
    # see .worker_state: STARTING -> READY -> STOPPING -> EXITED (process object closed)
    life: WorkerLifecycle = field(default_factory=WorkerLifecycle)
    closed_exitcode: int | None = None    # kept once EXITED
    # Two threads reaping at once would lose the exit status (the loser's waitpid fails
    # and multiprocessing then reports None): every join/poll goes through this lock.
    reap_lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def exitcode(self) -> int | None:
        """The exit code (negative: killed by that signal), None while it runs."""
        with self.reap_lock:  # reading Process.exitcode reaps (waitpid)
            if self.life.state is WorkerState.EXITED:
                return self.closed_exitcode
            return self.process.exitcode

    def reap(self, timeout: float = 0.0) -> int | None:
        with self.reap_lock:
            if self.life.state is not WorkerState.EXITED:
                self.process.join(timeout)
            return self.exitcode


def start_workers(method: str, specs: Sequence[bytes],
                  zygote: ZygoteClient | None = None, deadline: float | None = None,
                  ready_timeout: float = 0.0, ranks: Sequence[int] | None = None
                  ) -> list[WorkerHandle]:
    """Start one process per encoded spec (of ``ranks``, default 0, 1, ...), by
    ``deadline`` (``time.monotonic()``; the executor's ``ready_timeout`` bounds the whole
    start). On error, stops what started and raises."""
    handles: list[WorkerHandle] = []
    ctx: Any = None if method in ("subprocess", "zygote") else \
        multiprocessing.get_context(method)  # typeshed's BaseContext lacks .Process
    try:
        for rank, spec in zip(ranks if ranks is not None else range(len(specs)), specs,
                              strict=True):
            if deadline is not None and time.monotonic() >= deadline:
                raise WorkerStartupError(
                    rank, f"not started within ready_timeout={ready_timeout:g} s "
                    f"({rank} of {len(specs)} workers were started)")
            proc: ProcessLike
            if method == "subprocess":
                proc = start_subprocess(spec)
            elif method == "zygote":
                if zygote is None:
                    raise ValueError("start method 'zygote' needs a zygote")
                proc = zygote.spawn(spec)  # its own bound: a fork asked for is waited for
            else:
                proc = ctx.Process(target=run_worker, args=(spec,),
                                   name=f"gpuexec-worker-{rank}")
                proc.start()  # type: ignore[attr-defined]
            if proc.pid is None:  # pragma: no cover - started processes have one
                raise RuntimeError("process did not start")
            handles.append(WorkerHandle(rank, proc, proc.pid, proc.sentinel))
    except BaseException as e:
        stop_workers(handles, grace=0.0)
        if reimports_main(method) and main_lacks_guard() and isinstance(e, Exception):
            raise StartMethodError(
                f"starting workers with {method!r} failed ({type(e).__name__}: {e}). "
                + GUARD_HINT.format(method=repr(method))) from e
        raise
    return handles


def disown_in_fork(handles: Sequence[WorkerHandle]) -> None:
    """In a fork of the driver: the workers started by ``multiprocessing`` are listed as
    this process's children too, and multiprocessing's exit handler would try to join
    them (an error at exit) or terminate them (daemons). They are the driver's: unlist."""
    children = getattr(multiprocessing.process, "_children", None)
    if isinstance(children, set):
        for h in handles:
            children.discard(h.process)


def wait_ready(handles: Sequence[WorkerHandle], pull: zmq.Socket[bytes],
               xpub: zmq.Socket[bytes], method: str, timeout: float,
               stderr_tail: Callable[[int], str] = lambda rank: "",
               deadline: float | None = None,
               others: Callable[[], bool] | None = None,
               other_frames: Callable[[list[bytes]], None] = lambda frames: None) -> None:
    """Wait until every worker is ready and subscribed, by ``deadline`` (default:
    ``timeout`` from now); raise ``WorkerStartupError`` on the first failure, naming the
    rank and carrying its traceback. ``others``: other workers share the sockets (a
    respawn): their messages go to ``other_frames`` (the channel's table), and the wait
    ends with ``ExecutorClosedError`` as soon as ``others()`` says the executor closes
    (its wake-up frame on the reply socket ends the poll)."""
    decoder: Decoder[Handshake] = Decoder(Handshake, allow_pickle=False)
    by_rank = {h.rank: h for h in handles}
    by_sentinel = {h.sentinel: h for h in handles}
    unsubscribed = {b"\x01" + rank_topic(h.rank): h for h in handles}
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(xpub, zmq.POLLIN)
    for h in handles:
        poller.register(h.sentinel, zmq.POLLIN)
    if deadline is None:
        deadline = time.monotonic() + timeout
    waiting = len(handles)
    while waiting or unsubscribed:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            late = [h.rank for h in handles if h.life.state is WorkerState.STARTING] or \
                [h.rank for h in unsubscribed.values()]
            raise WorkerStartupError(
                late[0], f"not ready after ready_timeout={timeout:g} s (ranks not ready: {late})")
        events = poller.poll(max(1, int(remaining * 1000)))
        if others is not None and others():
            raise ExecutorClosedError("the executor was shut down while ranks were started")
        for sock, _ in events:
            if sock is xpub:
                unsubscribed.pop(xpub.recv(), None)
            elif sock is pull:
                frames = pull.recv_multipart()
                try:
                    msg = decoder.decode(frames[:1])
                except MalformedMessage as e:
                    if others is None:
                        log.warning("gpuexec: dropped a malformed start-up message (%s)", e)
                    else:
                        other_frames(frames)
                    continue
                found = by_rank.get(msg.rank)
                if found is None:
                    continue
                h = found
                if msg.protocol != PROTOCOL_VERSION:
                    raise ProtocolError(
                        f"worker rank {h.rank} speaks protocol {msg.protocol}, the driver "
                        f"{PROTOCOL_VERSION}: both must run the same gpuexec version")
                match msg:
                    case Ready():
                        if h.life.state is WorkerState.STARTING:
                            h.life.advance(WorkerState.READY)
                            h.device, h.report = msg.device, msg.report
                            waiting -= 1
                    case StartupFailed():
                        type_name, message, tb = msg.error.texts()
                        raise WorkerStartupError(
                            h.rank, f"{type_name} in {msg.stage}: {message}", tb)
            else:
                h = by_sentinel[sock]
                h.reap(timeout=1.0)
                # A StartupFailed may have arrived just before the exit: prefer it.
                if pull.poll(50):
                    continue
                poller.unregister(sock)
                reason = f"exited with code {h.exitcode} before it was ready"
                if reimports_main(method) and main_lacks_guard() and \
                        b"\x01" + rank_topic(h.rank) in unsubscribed:
                    raise StartMethodError(f"worker rank {h.rank} {reason}: "
                                           + GUARD_HINT.format(method=repr(method)))
                tail = stderr_tail(h.rank)
                if tail:
                    reason += "\n--- last stderr lines of the worker ---\n" + tail
                raise WorkerStartupError(h.rank, reason)


def stop_workers(handles: Sequence[WorkerHandle], grace: float, term_grace: float = 2.0) -> None:
    """Wait ``grace`` s for the workers to exit, then SIGTERM, then SIGKILL; reap all.

    ``grace=0`` is a deliberate stop (a start-up that failed, already reported): the
    SIGTERM is then not worth a warning of its own."""

    def alive() -> list[WorkerHandle]:
        return [h for h in handles if h.reap() is None]

    for h in handles:
        with h.reap_lock:
            if h.life.state is not WorkerState.EXITED:
                h.life.advance(WorkerState.STOPPING)

    def wait(left: list[WorkerHandle], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while left and (remaining := deadline - time.monotonic()) > 0:
            wait_sentinels([h.sentinel for h in left], timeout=remaining)
            left = alive()

    wait(alive(), grace)
    if left := alive():
        if grace > 0:
            log.warning("gpuexec: %d worker(s) still running after %.1f s; sending SIGTERM",
                        len(left), grace)
        for h in left:
            h.process.terminate()
        wait(left, term_grace)
    if left := alive():
        log.warning("gpuexec: %d worker(s) ignored SIGTERM; sending SIGKILL", len(left))
        for h in left:
            h.process.kill()
        wait(left, 5.0)
    for h in handles:
        with h.reap_lock:
            if h.life.state is WorkerState.EXITED:
                continue
            h.process.join(timeout=0.1)
            code = h.process.exitcode
            try:
                h.process.close()
            except ValueError:
                continue  # still running after SIGKILL: unkillable (D state); nothing to do
            h.closed_exitcode = code
            h.life.advance(WorkerState.EXITED)

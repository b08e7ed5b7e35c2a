"""Releasing a collective when its call is cancelled (``distributed_backend`` only).

A method waiting in a torch.distributed collective sits in C++ with the GIL released:
the Python signal handler (:mod:`.cancel`) runs only once the collective returns, and a
peer that left the collective (it was cancelled at once, or it failed) never joins it.
So a worker with a process group also watches for the cancel signal from a thread::

    CANCEL_SIGNAL ──▶ CPython's C handler writes its number to the wake-up fd
    watcher thread (reads the fd) ──▶ the running call is cancelled on the board, still
      armed after ABORT_AFTER_S, and the main thread's innermost Python frame is in
      torch.distributed (it waits in a collective, not in user code)
        ──▶ the group's abort (:func:`.distributed.abort_in_flight`: NCCL's
            communicators aborted; gloo's connections to the peers shut down)
        ──▶ the collective raises here (then CallCancelled), and in every peer waiting
            in the same collective ("Connection closed by peer"): nobody hangs

The group cannot be used afterwards (its communicators are gone): every later
collective of this worker raises until the group is re-formed (``Executor.respawn``
of a rank regroups the survivors) or the executor is rebuilt. The abort is logged by
the worker.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from ..ipc.signals import CANCEL_SIGNAL
from .cancel import CancelPoint
from .distributed import abort_in_flight

log = logging.getLogger("gpuexec.worker")

ABORT_AFTER_S = 0.02  # the main thread's own handler had this long to act


class GroupAborter:
    """The watcher thread of one worker; see the module docstring."""

    def __init__(self, point: CancelPoint, rank: int) -> None:
        self.point = point
        self.rank = rank
        self.main = threading.main_thread().ident

    def start(self) -> None:
        """Main thread, once the group exists and the cancel handler is installed."""
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(r,), name="gpuexec-group-abort",
                         daemon=True).start()

    def _watch(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except InterruptedError:  # pragma: no cover - the thread takes no signals
                continue
            if not data:
                return
            if CANCEL_SIGNAL in data:
                self._check()

    def _check(self) -> None:
        point = self.point
        call = point.running
        board = point.board
        if board is None or not point.armed or not board.cancelled(call):
            return
        time.sleep(ABORT_AFTER_S)
        if point.armed and point.running == call and self._in_collective():
            log.warning("gpuexec: rank %d: its cancelled call %r waits in a collective; "
                        "aborting the torch.distributed group to release it and its peers",
                        self.rank, point.method)
            try:
                abort_in_flight()
            except Exception as e:
                log.warning("gpuexec: aborting the process group failed: %s", e)

    def _in_collective(self) -> bool:
        frame = sys._current_frames().get(self.main or 0)
        name = frame.f_globals.get("__name__", "") if frame is not None else ""
        return isinstance(name, str) and name.startswith("torch.distributed")

"""Worker classes for test_cancel.py (importable by path from every start method).

Each blocking method first creates the file ``started`` names, so a test waits for the
method to be running (an event) before it cancels; ``mark`` files record what the
method's ``finally`` blocks and handlers saw.
"""

from __future__ import annotations

import inspect
import itertools
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gpuexec import Worker
from gpuexec.errors import CallCancelled
from gpuexec.ipc.signals import CANCEL_SIGNAL
from gpuexec.worker import uncancellable


def _start(started: str) -> None:
    Path(f"{started}.{os.getpid()}").touch()


def _start_once_waiting(started: str, functions: tuple[str, ...]) -> None:
    """Create the ``started`` file from a thread once the main thread's innermost frame
    is one of ``functions`` (it waits in that torch.distributed call): a cancel sent
    after the file appears finds it there."""
    main = threading.main_thread().ident or 0

    def watch() -> None:
        while True:
            frame = sys._current_frames().get(main)
            if frame is not None and frame.f_code.co_name in functions:
                _start(started)
                return
            time.sleep(0.002)

    threading.Thread(target=watch, daemon=True).start()


class CancelWorker(Worker):
    def __init__(self) -> None:
        self.calls = 0

    def noop(self) -> int:
        self.calls += 1
        return self.rank

    def plan(self, *how: str) -> None:
        """What the ``quiet`` after next does: ``block(*how)`` (the next one, after a
        call with arguments, is the request loop's; the one after it the ring core's)."""
        self.planned: list[Any] = [None, how]

    def quiet(self) -> None:
        """A method by name without arguments returning None (the ring core answers it
        once the worker served it): counts, notes who called it, blocks as planned."""
        self.calls += 1
        self.caller = inspect.stack(0)[1].function
        planned = getattr(self, "planned", None)
        how = planned.pop(0) if planned else None
        if how is not None:
            self.block(*how)

    def block(self, how: str, started: str, mark: str = "") -> str:
        """Block in one of the ways a cancellation must interrupt; on the way out, write
        the exception that ended it to ``mark`` (from a ``finally`` block)."""
        seen = "returned"
        try:
            _start(started)
            if how == "loop":
                n = 0
                while True:
                    n += 1
            elif how == "sleep":
                time.sleep(60)
            elif how == "event":
                threading.Event().wait(60)
            elif how == "select":
                r, _w = os.pipe()
                select.select([r], [], [], 60)
            elif how == "poll":
                r, _w = os.pipe()
                p = select.poll()
                p.register(r, select.POLLIN)
                p.poll(60_000)
            elif how == "socket":
                a, _b = socket.socketpair()
                a.recv(1)
            elif how == "subprocess":
                subprocess.run(["sleep", "60"], check=False)
            elif how == "swallow":  # except Exception must not catch the cancellation
                try:
                    time.sleep(60)
                except Exception:
                    return "swallowed"
            elif how == "gil":  # C code that holds the GIL and never checks signals
                sum(itertools.repeat(1, 10**14))
            return "finished"
        except BaseException as e:
            seen = type(e).__qualname__ if not isinstance(e, CallCancelled) else \
                f"CallCancelled {e.method}"
            raise
        finally:
            if mark:
                Path(f"{mark}.{self.rank}").write_text(seen)

    def lose_the_first_signal(self, started: str, mark: str) -> str:
        """Take the first cancel signal away from the handler (as if it had gone astray),
        then sleep: only a later signal can end the sleep."""
        seen = "returned"
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {CANCEL_SIGNAL})
            _start(started)
            signal.sigtimedwait({CANCEL_SIGNAL}, 60)  # the first one, swallowed
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {CANCEL_SIGNAL})
            time.sleep(60)
            return "finished"
        except BaseException as e:
            seen = type(e).__qualname__
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {CANCEL_SIGNAL})
            Path(f"{mark}.{self.rank}").write_text(seen)

    def fail_or_block(self, failing: int, started: str, mark: str) -> str:
        """Rank ``failing`` raises once the others block; they block until interrupted."""
        if self.rank == failing:
            while len(list(Path(started).parent.glob(Path(started).name + ".*"))) < \
                    self.world_size - 1:
                time.sleep(0.005)
            raise RuntimeError(f"rank {self.rank} failed")
        return self.block("sleep", started, mark)

    def protected(self, started: str, mark: str) -> None:
        """A second in an uncancellable region (a sleep a cancellation would cut), then a
        long sleep; ``mark`` records how far it got."""
        try:
            with uncancellable():
                _start(started)
                time.sleep(1.0)
                Path(f"{mark}.{self.rank}").write_text("region ended")
            time.sleep(60)
            Path(f"{mark}.{self.rank}").write_text("not cancelled")
        except CallCancelled:
            path = Path(f"{mark}.{self.rank}")
            path.write_text((path.read_text() if path.exists() else "cut in the region")
                            + ", then cancelled")
            raise

    def until_file(self, started: str, release: str, mark: str) -> str:
        """Return once ``release`` exists (in small sleeps a cancellation would cut)."""
        seen = "returned"
        try:
            _start(started)
            while not os.path.exists(release):
                time.sleep(0.005)
            return "released"
        except BaseException as e:
            seen = type(e).__qualname__
            raise
        finally:
            Path(f"{mark}.{self.rank}").write_text(seen)

    def collective(self, started: str, sleeper: int) -> Any:
        """Rank ``sleeper`` sleeps in Python; every other rank waits in a gloo
        all-reduce that the sleeper never joins."""
        import torch
        import torch.distributed as dist

        if self.rank == sleeper:
            _start(started)
            time.sleep(60)
            return None
        t = torch.ones(2)
        _start_once_waiting(started, ("all_reduce",))
        dist.all_reduce(t)
        return t.tolist()

    def recv_from(self, src: int, started: str) -> Any:
        """Wait for a tensor from rank ``src`` (which is waiting for one from here)."""
        import torch
        import torch.distributed as dist

        t = torch.zeros(2)
        _start_once_waiting(started, ("recv",))
        dist.recv(t, src=src)
        return t.tolist()

    def nccl_barrier_behind(self, started: str, seconds: float) -> str:
        """A barrier that waits behind ``seconds`` of GPU work (the host blocks in it,
        inside torch.distributed, with the GIL released)."""
        import torch
        import torch.distributed as dist

        torch.cuda._sleep(int(seconds * 2e9))  # ~2 GHz: a kernel that spins that long
        _start_once_waiting(started, ("barrier",))
        dist.barrier()
        return "passed"

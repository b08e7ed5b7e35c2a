"""Worker classes for test_hosting: a hosted object, deferred replies, a shutdown hook."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gpuexec import Worker


class Engine:
    """An engine's own worker: its method names collide with gpuexec.Worker's."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.device_ready = False

    def init_device(self) -> str:
        self.device_ready = True
        return f"engine device {self.rank}"

    def shutdown(self) -> str:
        return "engine shutdown"

    def is_ready(self) -> bool:
        return self.device_ready


class HostWorker(Worker):
    """Hosts an Engine (calls go to it); records on_shutdown in a file per rank."""

    def __init__(self, marks: str, block_hook: bool = False) -> None:
        self.engine = Engine(self.rank)
        self.marks = Path(marks)
        self.block_hook = block_hook

    def rpc_target(self) -> object:
        return self.engine

    def on_shutdown(self) -> None:
        (self.marks / f"hook-{self.rank}-{os.getpid()}").write_text(self.engine.shutdown())
        if self.block_hook:
            threading.Event().wait()


class DeferringWorker(Worker):
    """Methods that return futures resolved by other threads (or already resolved)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(2)
        self.gates: dict[str, threading.Event] = {}
        self.pending: dict[str, Future[Any]] = {}

    def later(self, key: str, value: Any) -> Future[Any]:
        """Resolved when release(key) is called (by a later call)."""
        gate = self.gates.setdefault(key, threading.Event())

        def wait() -> Any:
            gate.wait()
            return value

        return self.pool.submit(wait)

    def release(self, key: str) -> str:
        self.gates.setdefault(key, threading.Event()).set()
        return f"released {key}"

    def soon(self, value: Any) -> Future[Any]:
        """Resolved by a pool thread as soon as it can (while this thread serves on)."""
        return self.pool.submit(lambda: value)

    def echo(self, value: Any) -> Any:
        return value

    def now(self, value: Any) -> Future[Any]:
        f: Future[Any] = Future()
        f.set_result(value)
        return f

    def failing(self, message: str) -> Future[Any]:
        def boom() -> Any:
            raise LookupError(f"{message} on rank {self.rank}")

        return self.pool.submit(boom)

    def cancelled(self) -> Future[Any]:
        f: Future[Any] = Future()
        f.cancel()
        return f

    def unsendable(self) -> Future[Any]:
        return self.now(threading.Lock())

    def env(self, *names: str) -> dict[str, str | None]:
        return {n: os.environ.get(n) for n in names}


class LeakingWorker(Worker):
    """Creates a named shared-memory segment and never removes it (as an engine's ring
    does when the worker is stopped mid-step)."""

    def leak(self) -> str:
        from multiprocessing import shared_memory

        self.segment = shared_memory.SharedMemory(create=True, size=4096)
        return self.segment.name

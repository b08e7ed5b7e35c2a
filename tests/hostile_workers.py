"""Worker classes for tests/test_hostile.py: a worker whose ``rpc_target()`` raises,
Future subclasses that refuse their done callbacks, a shutdown hook that cancels
deferred futures, and a worker that hosts an executor of its own."""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from gpuexec import Executor, Worker


class TargetRaises(Worker):
    def __init__(self, kind: str = "error") -> None:
        self.kind = kind

    def rpc_target(self) -> object:
        if self.kind == "exit":
            raise SystemExit(3)
        if self.kind == "interrupt":
            raise KeyboardInterrupt("no target")
        raise RuntimeError(f"no target on rank {self.rank}")


class TargetRaisesOnOneRank(Worker):
    def rpc_target(self) -> object:
        if self.rank == 1:
            raise LookupError("rank 1 has no target")
        return self


class _RefusingFuture(Future[Any]):
    def __init__(self, error: BaseException, call_back_first: bool = False) -> None:
        super().__init__()
        self.error = error
        self.call_back_first = call_back_first

    def add_done_callback(self, fn: Any) -> None:
        if self.call_back_first:
            self.set_result(1)
            super().add_done_callback(fn)
        raise self.error


class _BrokenResult(Future[Any]):
    def result(self, timeout: float | None = None) -> Any:
        raise ValueError("result() is broken")


class Deferring(Worker):
    """Methods returning futures, kept until ``on_shutdown`` cancels them."""

    def __init__(self, marker: str = "") -> None:
        self.pending: list[Future[Any]] = []
        self.marker = marker

    def refusing(self, kind: str) -> Future[Any]:
        errors: dict[str, BaseException] = {
            "error": RuntimeError("add_done_callback refused"),
            "exit": SystemExit(5),
            "interrupt": KeyboardInterrupt(),
            "after": RuntimeError("refused after calling back"),
        }
        return _RefusingFuture(errors[kind], call_back_first=kind == "after")

    def broken_result(self) -> Future[Any]:
        f = _BrokenResult()
        f.set_result(1)
        return f

    def later(self) -> Future[Any]:
        f: Future[Any] = Future()
        self.pending.append(f)
        return f

    def resolve_all(self) -> int:
        n = len(self.pending)
        for f in self.pending:
            f.set_result("late")
        self.pending = []
        return n

    def rank_pid(self) -> tuple[int, int]:
        return self.rank, os.getpid()

    def on_shutdown(self) -> None:
        for f in self.pending:
            f.cancel()
        for f in self.pending:  # set_result on others: also replies nobody reads
            if not f.done():
                f.set_result(None)
        if self.marker:
            Path(f"{self.marker}.{self.rank}").write_text(str(len(self.pending)))


class HostsExecutor(Worker):
    """Builds an executor of its own inside the worker, and never shuts it down."""

    def build(self, transport: str) -> list[Any]:
        self.inner = Executor("workers:EchoWorker", 1, device="cpu", transport=transport)
        return [self.inner.endpoints, [w.pid for w in self.inner.workers],
                self.inner.collective_rpc("add", args=(1, 2))]


class BecomesDict:
    """Pickles as another type: it would arrive as a dict."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, ((("a", 1),),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BecomesDict)

    __hash__ = object.__hash__


class BecomesInt(int):
    """An int subclass whose pickle rebuilds a plain int."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (int, (int(self),))


def becomes(kind: str) -> Any:
    return BecomesDict() if kind == "dict" else BecomesInt(5)

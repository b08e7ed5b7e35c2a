"""Worker classes the tests start (importable by path from every start method)."""

from __future__ import annotations

import inspect
import os
import sys
import time
from typing import Any

from gpuexec import Worker


class EchoWorker(Worker):
    def __init__(self, tag: str = "", **extra: Any) -> None:
        self.tag = tag
        self.extra = extra
        self.counter = 0

    def whoami(self) -> dict[str, Any]:
        return {"rank": self.rank, "local_rank": self.local_rank, "world_size": self.world_size,
                "local_world_size": self.local_world_size, "device": self.device,
                "pid": os.getpid(), "tag": self.tag, "extra": self.extra}

    def env(self, *names: str) -> dict[str, str | None]:
        return {n: os.environ.get(n) for n in names}

    def loaded(self, prefix: str) -> list[str]:
        """The modules under ``prefix`` this worker process has imported."""
        return sorted(m for m in sys.modules if m == prefix or m.startswith(prefix + "."))

    def echo(self, *args: Any, **kwargs: Any) -> Any:
        return {"args": list(args), "kwargs": kwargs}

    def add(self, a: Any, b: Any = 0) -> Any:
        return a + b + self.rank

    def bump(self) -> int:
        self.counter += 1
        return self.counter

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def fail(self, message: str = "boom") -> None:
        raise ValueError(f"{message} on rank {self.rank}")

    def fail_on(self, rank: int) -> int:
        if self.rank == rank:
            raise KeyError(f"only rank {rank}")
        return self.rank

    def shout(self, text: str) -> None:
        print(text, flush=True)
        print(text, file=sys.stderr, flush=True)

    def noop(self) -> None:
        return None

    def exit_now(self, code: int) -> None:
        os._exit(code)

    def spawn_child(self) -> int:
        import subprocess

        self.child = subprocess.Popen(["sleep", "60"])
        return self.child.pid

    def say_then_exit(self, text: str, code: int) -> None:
        print(text, file=sys.stderr, flush=True)
        os._exit(code)

    def unsendable(self) -> Any:
        return object.__new__(_Unpicklable)


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this object refuses to be pickled")


class BrokenInit(Worker):
    def __init__(self) -> None:
        raise RuntimeError("cannot load weights from /nowhere")


class ExitInit(Worker):
    def __init__(self) -> None:
        os._exit(7)


class SlowInit(Worker):
    def __init__(self, seconds: float) -> None:
        time.sleep(seconds)


class ShiftingWorker(Worker):
    """``turn``: a method by name (which the ring core answers: without arguments once the
    worker served it, with arguments at once) whose outcome changes from call to call, as
    ``plan`` says: every outcome must still reach the driver as the request loop gives
    it."""

    def __init__(self) -> None:
        self.turns = 0
        self.outcomes: list[str] = []
        self.callers: list[str] = []  # the function that called each turn

    def plan(self, *outcomes: str) -> None:
        self.outcomes = list(outcomes)

    def turn(self, *args: Any, **kwargs: Any) -> Any:
        from concurrent.futures import Future
        from threading import Timer

        self.turns += 1
        self.callers.append(inspect.stack(0)[1].function)
        what = self.outcomes.pop(0) if self.outcomes else "none"
        if what == "value":
            return self.turns
        if what == "echo":
            return {"args": list(args), "kwargs": kwargs}
        if what == "tuple":
            return args
        if what == "big":  # its reply is longer than a shared-memory slot
            return list(range(300_000))
        if what == "raise":
            raise ValueError(f"turn {self.turns} broke")
        if what == "exit":
            raise SystemExit(3)
        if what == "future":
            later: Future[str] = Future()
            Timer(0.05, later.set_result, (f"later {self.turns}",)).start()
            return later
        return None

    @property
    def broken(self) -> Any:  # looking the name up raises
        raise ValueError("no such thing")

    def swap(self) -> None:
        self.turn = lambda: f"swapped {self.rank}"  # type: ignore[method-assign]

    def hide(self) -> None:
        self.turn = 7  # type: ignore[assignment,method-assign]

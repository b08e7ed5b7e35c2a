"""Workers for the security and fuzz tests: only harmless methods, so that a mutated
request that happens to decode can call nothing that exits, sleeps long or spawns."""

from __future__ import annotations

import time
from typing import Any

from gpuexec import Worker


class SafeWorker(Worker):
    def add(self, a: Any, b: Any = 0) -> Any:
        return a + b + self.rank

    def echo(self, *args: Any, **kwargs: Any) -> Any:
        return {"args": list(args), "kwargs": kwargs}

    def noop(self) -> None:
        return None

    def nap(self, seconds: float) -> float:
        time.sleep(min(float(seconds), 5.0))
        return seconds

    def big(self, nbytes: int) -> bytes:
        return b"x" * int(nbytes)


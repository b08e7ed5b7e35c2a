"""Worker classes of the shutdown-race and limit tests (importable by every start method)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from gpuexec import Worker


class GateWorker(Worker):
    def wait_for(self, path: str, limit: float = 120.0) -> bool:
        """Block until ``path`` exists (a gate the test opens), at most ``limit`` s."""
        deadline = time.monotonic() + limit
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def add(self, a: int, payload: Any = None) -> int:
        return a + self.rank

    def count(self, arrays: list[Any]) -> list[int]:
        return [len(arrays), int(sum(int(a[0]) for a in arrays))]

    def many_arrays(self, n: int, nbytes: int) -> list[Any]:
        """``n`` arrays of ``nbytes`` bytes (one frame each: over the inline limit)."""
        one = np.full(nbytes, 1, dtype=np.uint8)
        return [one] * n

"""Worker classes for tests/test_logs.py (imported by name in the workers)."""

from __future__ import annotations

import time

from gpuexec import Worker


class RankOneFails(Worker):
    """Rank 1 fails in ``__init__`` while rank 0 is still starting (so it gets stopped)."""

    def __init__(self) -> None:
        if self.rank == 1:
            raise RuntimeError("rank one cannot start")
        time.sleep(30)

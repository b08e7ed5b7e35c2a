"""Worker classes and extensions for test_tp.py (importable by path from every start method)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from gpuexec import Worker


class ProbeWorker(Worker):
    """Calls whose worker-side timing the asyncio tests read."""

    def wait_for_file(self, path: str, limit: float = 30.0) -> float:
        """Block until ``path`` exists; the monotonic time (system-wide) when it returned."""
        deadline = time.monotonic() + limit
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} never appeared")
            time.sleep(0.005)
        return time.monotonic()

    def stamp(self) -> float:
        return time.monotonic()

    def add(self, a: int) -> int:
        return a + self.rank

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def exit_now(self, code: int) -> None:
        os._exit(code)


class DistWorker(Worker):
    """Reports the torch.distributed state the executor set up."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.initialized_in_init = dist.is_initialized()  # the group exists before __init__

    def state(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(t)
        return {"initialized": dist.is_initialized(), "in_init": self.initialized_in_init,
                "backend": str(dist.get_backend()), "rank": dist.get_rank(),
                "world_size": dist.get_world_size(), "sum": float(t.item()),
                "env": {k: os.environ.get(k) for k in
                        ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}}

    def probe_destroy(self, path: str) -> None:
        """Record, at shutdown, that the group was destroyed (wraps torch's function)."""
        import torch.distributed as dist

        original = dist.destroy_process_group

        def probe(*args: Any, **kwargs: Any) -> None:
            original(*args, **kwargs)
            Path(path).write_text(f"destroyed initialized={dist.is_initialized()}")

        dist.destroy_process_group = probe


class GreetExtension:
    """A worker extension: adds methods, replaces nothing."""

    def greet(self, name: str) -> str:
        return f"hello {name} from rank {self.rank} ({type(self).__name__})"  # type: ignore


class ClashExtension:
    def echo(self, *args: Any) -> str:  # EchoWorker already has echo
        return "shadowed"


class InitExtension:
    def __init__(self) -> None:
        pass

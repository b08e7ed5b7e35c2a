"""Workers for the respawn tests (importable by spawn and the zygote)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from gpuexec import Worker


class CountingWorker(Worker):
    """Counts its steps (a survivor's count shows it was not restarted). ``gate``: a
    directory; while ``<gate>/block-<rank>`` exists a *respawned* ``__init__`` waits,
    and ``<gate>/fail-<rank>`` makes it fail (the first start never looks)."""

    def __init__(self, tag: str = "", gate: str = "") -> None:
        self.tag = tag
        self.steps = 0
        self.replaced: list[list[int]] = []
        if gate:
            g = Path(gate)
            if (g / f"started-{self.rank}").exists():
                (g / f"init-{self.rank}").touch()
                if (g / f"fail-{self.rank}").exists():
                    raise RuntimeError("this replacement is told to fail")
                while (g / f"block-{self.rank}").exists():
                    time.sleep(0.01)
            (g / f"started-{self.rank}").touch()

    def step(self, x: Any) -> tuple[int, Any, int]:
        self.steps += 1
        return self.rank, x, self.steps

    def ident(self) -> dict[str, Any]:
        return {"rank": self.rank, "local_rank": self.local_rank, "device": self.device,
                "world_size": self.world_size, "pid": os.getpid(), "tag": self.tag,
                "env": os.environ.get("GX_RANK_ENV"), "steps": self.steps}

    def block(self, path: str) -> None:
        """Waits until ``path`` exists (a call in flight when its rank is killed)."""
        while not os.path.exists(path):
            time.sleep(0.01)

    def big_after(self, path: str, n: int) -> bytes:
        """``n`` bytes (over a ring slot: they travel by ZeroMQ) once ``path`` exists."""
        self.block(path)
        return bytes([self.rank]) * n

    def on_peers_replaced(self, ranks: list[int]) -> None:
        self.replaced.append(list(ranks))

    def replaced_log(self) -> list[list[int]]:
        return self.replaced


class GroupWorker(CountingWorker):
    """A rank of a group (``distributed_backend``, gloo on CPU or NCCL on GPUs): its
    collectives, and one that blocks on a peer that never joins."""

    def all_reduce(self) -> float:
        import torch
        import torch.distributed as dist

        self.steps += 1
        t = torch.tensor([float(self.rank + 1)], device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def all_reduce_without(self, absent: int) -> str:
        """All-reduce with every rank but ``absent`` (which is not called): blocks until
        the group is aborted or the absent rank's death breaks it; how it ended."""
        import torch
        import torch.distributed as dist

        try:
            t = torch.ones(1, device=self.device)
            dist.all_reduce(t)
            float(t.item())  # on a GPU: waits for the kernel, which waits for the peer
            self.released = "completed"
        except Exception as e:
            self.released = type(e).__name__
        return self.released

    def release_log(self) -> str:
        return getattr(self, "released", "")

    def group_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size()

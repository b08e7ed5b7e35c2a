"""Worker classes for the GPU tests. Importing this module touches GPU 0 on purpose:
it is the "library's import-time probe" that leaves a stale context on GPU 0."""

from __future__ import annotations

import os
from typing import Any

import torch

from gpuexec import Worker

if os.environ.get("GPUEXEC_TEST_TOUCH_GPU0") == "1":
    torch.cuda.mem_get_info(0)  # creates (retains) a primary context on GPU 0


class GpuWorker(Worker):
    def __init__(self, *tensors: torch.Tensor) -> None:
        self.kept = list(tensors)  # e.g. a CUDA tensor on GPU 0 passed in worker_args

    def matmul(self, n: int) -> float:
        g = torch.Generator(device="cpu").manual_seed(self.rank)
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        return float((a.to(self.device) @ a.to(self.device).T).trace().item())

    def facts(self) -> dict[str, Any]:
        return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "count": torch.cuda.device_count(), "current": torch.cuda.current_device(),
                "pid": os.getpid()}

    def nccl_allreduce(self, port: int) -> list[float]:
        import torch.distributed as dist

        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}",
                                rank=self.rank, world_size=self.world_size)
        t = torch.full((4,), float(self.rank + 1), device=self.device)
        dist.all_reduce(t)
        torch.cuda.synchronize()
        out = t.cpu().tolist()
        dist.destroy_process_group()
        return out

    def touch(self, ordinal: int) -> None:
        torch.cuda.mem_get_info(ordinal)

    def reinit(self) -> Any:
        return self.init_device()

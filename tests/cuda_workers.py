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


class ParkedWorker(GpuWorker):
    """Holds what a suspend must keep: a big tensor, cuBLAS state and a captured CUDA graph.

    :meth:`load` records reference results; :meth:`verify` recomputes them after a resume
    and compares bit for bit. :meth:`pinned_offload` / :meth:`pinned_reload` are the
    by-hand baseline: the big tensor copied to page-locked host memory and its device
    storage freed, then the reverse (the graph's tensors cannot be moved that way: a
    replay reads the addresses it captured). The host buffer is pinned with
    ``cudaHostRegister`` and unpinned afterwards rather than taken from torch's pinned
    cache, which keeps it page-locked (see :meth:`pin`).
    """

    def load(self, gib: float, n: int = 4096) -> dict[str, Any]:
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(1234 + self.rank)
        self.big = torch.rand(int(gib * 2**30) // 4, device=dev, generator=g)
        self.a = torch.randn(n, n, device=dev, generator=g)
        self.b = torch.randn(n, n, device=dev, generator=g)
        self.mm_ref = self.a @ self.b  # creates the cuBLAS handle and workspace
        self.x = torch.randn(n, n, device=dev, generator=g)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                torch.relu(self.x @ self.a)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.y = torch.relu(self.x @ self.a) + 1.0
        self.graph.replay()
        torch.cuda.synchronize()
        self.y_ref = self.y.clone()
        self.y.zero_()  # a replay after resume must recompute it
        self.big_sum = self._checksum()
        torch.cuda.empty_cache()
        return {"pid": os.getpid(), "big_bytes": self.big.numel() * 4,
                "reserved_bytes": torch.cuda.memory_reserved(dev)}

    def _checksum(self) -> float:
        """Sum of the big tensor in float64, in slices (no full-size temporary)."""
        total = sum(float(torch.sum(part, dtype=torch.float64)) for part in self.big.split(2**26))
        torch.cuda.synchronize()
        return total

    def verify(self) -> dict[str, bool]:
        self.graph.replay()
        mm = self.a @ self.b
        torch.cuda.synchronize()
        out = {"graph": bool(torch.equal(self.y, self.y_ref)),
               "matmul": bool(torch.equal(mm, self.mm_ref)),
               "data": self._checksum() == self.big_sum}
        del mm
        torch.cuda.empty_cache()
        return out

    def pin(self, mib: int, keep: bool = True) -> int:
        """``mib`` MiB of pinned host memory from torch's caching host allocator, filled
        from the GPU; ``keep`` False frees it at once (torch's cache keeps it pinned)."""
        pinned = torch.empty(mib * 2**20, dtype=torch.uint8, pin_memory=True)
        pinned.copy_(self.big.view(torch.uint8)[: pinned.numel()], non_blocking=True)
        torch.cuda.synchronize()
        if keep:
            self.pinned = pinned
        return int(pinned.numel())

    def pinned_offload(self) -> dict[str, float]:
        import time

        cudart = torch.cuda.cudart()
        t = time.perf_counter()
        self.host = torch.empty(self.big.shape, dtype=self.big.dtype)
        torch.cuda.check_error(cudart.cudaHostRegister(self.host.data_ptr(),
                                                       self.host.numel() * 4, 0))
        alloc = time.perf_counter() - t
        t = time.perf_counter()
        self.host.copy_(self.big, non_blocking=True)
        torch.cuda.synchronize()
        copy = time.perf_counter() - t
        self.big.untyped_storage().resize_(0)
        torch.cuda.empty_cache()
        return {"alloc_s": alloc, "copy_s": copy}

    def pinned_reload(self) -> dict[str, float]:
        import time

        t = time.perf_counter()
        self.big.untyped_storage().resize_(self.host.numel() * 4)
        self.big.copy_(self.host, non_blocking=True)
        torch.cuda.synchronize()
        copy = time.perf_counter() - t
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr()))
        del self.host
        return {"copy_s": copy}


class GroupWorker(ParkedWorker):
    """A :class:`ParkedWorker` in the executor's process group (``distributed_backend``)."""

    def allreduce(self, value: float) -> list[float]:
        """Sum over the ranks of ``value * (rank + 1)``, four times, through the group."""
        import torch.distributed as dist

        t = torch.full((4,), value * (self.rank + 1), device=self.device)
        dist.all_reduce(t)
        torch.cuda.synchronize()
        return [float(x) for x in t.tolist()]

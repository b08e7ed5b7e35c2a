"""The demo job behind ``python -m gpuexec demo`` (and the worker class it runs)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np

from .executor import Executor
from .executor.config import visible_gpu_count
from .ipc import ringcore
from .optional import torch_installed
from .worker import Worker


class DemoWorker(Worker):
    """Multiplies a seeded matrix on its device: real work on every rank (torch on the
    worker's device when torch is installed, numpy on the CPU otherwise)."""

    def info(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "device": self.device,
                "torch": _torch_version(), "env_rank": os.environ.get("RANK")}

    def matmul_checksum(self, seed: int, n: int) -> float:
        a = _matrix(seed + self.rank, n)
        if not torch_installed():
            return float(np.trace(a @ a.T))
        import torch

        t = torch.from_numpy(a).to(self.device)
        return float((t @ t.T).trace().item())

    def noop(self) -> None:
        return None


def _torch_version() -> str:
    if not torch_installed():
        return "not installed"
    import torch

    return str(torch.__version__)


def _matrix(seed: int, n: int) -> Any:
    """The same n x n float64 matrix in the driver and in the worker of that seed."""
    return np.random.default_rng(seed).standard_normal((n, n))


def reference_checksum(seed: int, rank: int, n: int) -> float:
    """trace(A A^T) of rank ``rank``'s matrix, computed in the driver with numpy."""
    a = _matrix(seed + rank, n)
    return float(np.trace(a @ a.T))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_demo(world_size: int | None = None, calls: int = 2000) -> int:
    """Run the demo; ``world_size`` None means one worker per visible GPU, else 2 CPU
    workers. Returns the exit status (1 when a worker's result differs)."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, not {calls}")
    gpus = visible_gpu_count()
    size = world_size if world_size is not None else (gpus if gpus else 2)
    t0 = time.perf_counter()
    with Executor(DemoWorker, size, device="auto") as ex:
        started = time.perf_counter() - t0
        print(f"gpuexec demo: {ex.world_size} worker(s), started in {started:.2f} s")
        print(f"start method: {ex.start_method}  ({ex.start_method_reason})")
        print(f"transport: {ex.transport}" + (f"  (ring core: {ringcore.describe()})"
                                              if ex.transport == "shm" else ""))
        print(f"{'rank':>4}  {'pid':>7}  {'device':<8}  {'torch':<14}  RANK env")
        for row in ex.collective_rpc("info"):
            print(f"{row['rank']:>4}  {row['pid']:>7}  {row['device']:<8}  {row['torch']:<14}  "
                  f"{row['env_rank']}")
        for rep in ex.device_reports:
            acts = ", ".join(f"cuda:{a.device} {a.action}" for a in rep.actions) or "none"
            print(f"device report rank {rep.rank}: {rep.device} {rep.driver or 'no CUDA driver'};"
                  f" stale contexts: {acts}; {rep.elapsed_ms:.1f} ms")
        n, seed = 256, 1234
        sums = ex.collective_rpc("matmul_checksum", args=(seed, n))
        ok = True
        for rank, got in enumerate(sums):
            want = reference_checksum(seed, rank, n)
            good = abs(got - want) <= 1e-6 * abs(want)
            ok &= good
            print(f"matmul {n}x{n} rank {rank}: trace(A A^T) = {got:.6f} "
                  f"({'matches' if good else 'DIFFERS from'} the driver's reference)")
        for _ in range(100):
            ex.collective_rpc("noop")
        lat = []
        for _ in range(calls):
            t = time.perf_counter()
            ex.collective_rpc("noop")
            lat.append((time.perf_counter() - t) * 1e6)
        print(f"no-op collective_rpc round trip over {calls} calls: "
              f"p50 {statistics.median(lat):.1f} us, p99 {percentile(lat, 0.99):.1f} us")
    return 0 if ok else 1

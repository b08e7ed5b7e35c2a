"""A 2-layer MLP sharded across gpuexec workers (Megatron-style tensor parallelism).

::

    x ──▶ [every rank] h_r = gelu(x @ W1[rows_r].T + b1[rows_r])   column-parallel linear
      ──▶ [every rank] y_r = h_r @ W2[:, rows_r].T                 row-parallel linear
      ──▶ all_reduce(sum over ranks) + b2 ──▶ y (identical on every rank)

Each worker builds the *full* weights from the seed (so no checkpoint is needed and the
driver can build the very same ones for its reference) and keeps only its shard. The
all_reduce runs over the torch.distributed group gpuexec made (``distributed_backend``):
gloo on CPU, NCCL on GPUs. Shared by ``tensor_parallel_mlp.py``, ``serving_loop.py`` and
``benchmarks/tp_step.py``; workers import it by name (the driver's ``sys.path`` travels
with them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpuexec import Worker


@dataclass(frozen=True)
class MLPWeights:
    w1: torch.Tensor  # [d_hidden, d_in]
    b1: torch.Tensor  # [d_hidden]
    w2: torch.Tensor  # [d_out, d_hidden]
    b2: torch.Tensor  # [d_out]


def build_weights(seed: int, d_in: int, d_hidden: int, d_out: int) -> MLPWeights:
    """The full fp32 weights, the same in every process for the same arguments."""
    g = torch.Generator().manual_seed(seed)
    return MLPWeights(
        w1=torch.randn(d_hidden, d_in, generator=g) / d_in ** 0.5,
        b1=torch.randn(d_hidden, generator=g) * 0.1,
        w2=torch.randn(d_out, d_hidden, generator=g) / d_hidden ** 0.5,
        b2=torch.randn(d_out, generator=g) * 0.1)


def make_input(seed: int, batch: int, d_in: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, d_in, generator=g)


def reference_forward(w: MLPWeights, x: torch.Tensor) -> torch.Tensor:
    """The unsharded model in one process: what the workers must reproduce."""
    return F.gelu(x @ w.w1.T + w.b1) @ w.w2.T + w.b2


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


class MLPShard:
    """Rank ``rank``'s shard of the MLP on ``device``, with its forward step; plain Python,
    so a baseline without gpuexec (``benchmarks/tp_step.py``) runs the very same code.
    ``d_hidden`` must divide by ``world_size``."""

    def __init__(self, rank: int, world_size: int, device: str, seed: int = 0,
                 d_in: int = 256, d_hidden: int = 1024, d_out: int = 256,
                 threads: int | None = None) -> None:
        if threads is not None:  # CPU shards: one core each instead of all of them
            torch.set_num_threads(threads)
        if d_hidden % world_size:
            raise ValueError(f"d_hidden={d_hidden} does not divide by world_size={world_size}")
        full = build_weights(seed, d_in, d_hidden, d_out)
        per = d_hidden // world_size
        rows = slice(rank * per, (rank + 1) * per)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.w1 = full.w1[rows].contiguous().to(device)     # column-parallel: output rows
        self.b1 = full.b1[rows].contiguous().to(device)
        self.w2 = full.w2[:, rows].contiguous().to(device)  # row-parallel: input columns
        self.b2 = full.b2.to(device)                        # added once, after the reduce
        self.on_cuda = device.startswith("cuda")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = F.gelu(x.to(self.device) @ self.w1.T + self.b1) @ self.w2.T
        if self.world_size > 1:
            if not dist.is_initialized():
                raise RuntimeError("world_size > 1 needs Executor(distributed_backend=...)")
            dist.all_reduce(y)
        return y + self.b2

    def timed_forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """The forward step and the seconds it took here (device synchronised); the output
        (on the CPU) only on rank 0."""
        t = time.perf_counter()
        y = self.forward(x)
        if self.on_cuda:
            torch.cuda.synchronize()
        out = y.cpu() if self.rank == 0 else None
        return out, time.perf_counter() - t


class TPMLPWorker(Worker):
    """A gpuexec worker hosting this rank's :class:`MLPShard`."""

    def __init__(self, seed: int = 0, d_in: int = 256, d_hidden: int = 1024,
                 d_out: int = 256, threads: int | None = None) -> None:
        self.shard = MLPShard(self.rank, self.world_size, self.device, seed, d_in, d_hidden,
                              d_out, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The full output (every rank has it; call with ``unique_reply_rank=0``)."""
        return self.shard.forward(x).cpu()

    def timed_forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """``forward`` plus the seconds it took inside this worker; only rank 0 sends the
        output back."""
        return self.shard.timed_forward(x)

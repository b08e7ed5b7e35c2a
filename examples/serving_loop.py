"""A toy serving engine: an asyncio loop that batches requests onto tensor-parallel workers.

    python examples/serving_loop.py --world-size 2 --device cpu
    python examples/serving_loop.py --world-size 2 --device cuda --max-concurrent-batches 1

::

    clients (closed loop) ──▶ request queue ──▶ batcher ──▶ collective_rpc_async("forward")
         ▲                                     (≤ max_batch rows,   │ up to
         └──── per-request futures ◀── scatter rows ◀───────────────┘ max_concurrent_batches
                                                                       steps in flight

The batcher forms a batch from whatever is queued the moment a step slot frees up, so
batches grow under load. With two steps in flight the next batch is already queued at
the workers while the current one computes, hiding the dispatch and gather. The model
is the TP MLP of ``tp_mlp.py``; the extension ``StepCounter`` (``worker_extension_cls``)
adds a method to it without subclassing. Every response is checked against the
single-process reference at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from tensor_parallel_mlp import resolve
from tp_mlp import TPMLPWorker, build_weights, reference_forward, relative_error

from gpuexec import Executor


class StepCounter:
    """A worker extension: methods an engine adds to a worker class it does not own."""

    def steps_served(self) -> int:
        return getattr(self, "_steps_served", 0)

    def counted_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._steps_served = self.steps_served() + 1
        return self.forward(x)  # type: ignore[attr-defined, no-any-return]


class Request:
    __slots__ = ("done", "x")

    def __init__(self, x: torch.Tensor, loop: asyncio.AbstractEventLoop) -> None:
        self.x = x
        self.done: asyncio.Future[torch.Tensor] = loop.create_future()


class Engine:
    """Batches queued requests into forward steps on the workers."""

    def __init__(self, ex: Executor, max_batch: int, max_in_flight: int) -> None:
        self.ex = ex
        self.max_batch = max_batch
        self.queue: asyncio.Queue[Request] = asyncio.Queue()
        self.slots = asyncio.Semaphore(max_in_flight)
        self.steps = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        while True:
            await self.slots.acquire()
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            task = asyncio.create_task(self.step(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def step(self, batch: list[Request]) -> None:
        try:
            x = torch.stack([r.x for r in batch])
            y = await self.ex.collective_rpc_async("counted_forward", args=(x,),
                                                   unique_reply_rank=0)
            self.steps += 1
            for i, r in enumerate(batch):
                r.done.set_result(y[i])
        except Exception as e:
            for r in batch:
                if not r.done.done():
                    r.done.set_exception(e)
        finally:
            self.slots.release()


async def client(engine: Engine, inputs: torch.Tensor, outputs: list[torch.Tensor | None],
                 first: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    for i in range(first, first + count):
        req = Request(inputs[i], loop)
        await engine.queue.put(req)
        outputs[i] = await req.done


async def serve(ex: Executor, args: argparse.Namespace,
                inputs: torch.Tensor) -> tuple[list[torch.Tensor | None], float, int]:
    engine = Engine(ex, args.max_batch, args.max_concurrent_batches)
    outputs: list[torch.Tensor | None] = [None] * len(inputs)
    per = len(inputs) // args.clients
    runner = asyncio.create_task(engine.run())
    t = time.perf_counter()
    await asyncio.gather(*[client(engine, inputs, outputs, c * per, per)
                           for c in range(args.clients)])
    wall = time.perf_counter() - t
    runner.cancel()
    return outputs, wall, engine.steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-concurrent-batches", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device, backend = resolve(args.device, args.backend)
    args.requests -= args.requests % args.clients
    dims = (256, 1024, 256)
    inputs = torch.randn(args.requests, dims[0], generator=torch.Generator().manual_seed(1))
    with Executor(TPMLPWorker, args.world_size, device=device, distributed_backend=backend,
                  worker_args=(args.seed, *dims), worker_extension_cls=StepCounter,
                  max_concurrent_batches=args.max_concurrent_batches) as ex:
        asyncio.run(serve(ex, args, inputs[: args.clients]))  # warm-up
        outputs, wall, steps = asyncio.run(serve(ex, args, inputs))
        served = ex.collective_rpc("steps_served")
    got = torch.stack([o for o in outputs if o is not None])
    err = relative_error(got, reference_forward(build_weights(args.seed, *dims), inputs))
    print(f"served {args.requests} requests from {args.clients} clients on {args.world_size} "
          f"{device} worker(s) ({backend}), {args.max_concurrent_batches} step(s) in flight")
    print(f"{steps} steps, mean batch {args.requests / steps:.1f}, {wall:.2f} s: "
          f"{args.requests / wall:.0f} requests/s, {steps / wall:.0f} steps/s")
    print(f"steps counted by the extension per rank: {served}; relative error {err:.2e}")
    return 0 if err <= 1e-5 and len(got) == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())

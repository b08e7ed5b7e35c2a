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

try:
    import torch
except ModuleNotFoundError:
    sys.exit("this example needs torch: pip install 'gpuexec[torch]'")

from tensor_parallel_mlp import add_model_options, resolve
from tp_mlp import TPMLPWorker, build_weights, reference_forward, relative_error

from gpuexec import ConfigError, Executor
from gpuexec.cli import positive_int


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


def shares(requests: int, clients: int) -> list[int]:
    """How many requests each client sends: every request is sent, none twice."""
    per, extra = divmod(requests, clients)
    return [per + (1 if c < extra else 0) for c in range(clients)]


async def serve(ex: Executor, args: argparse.Namespace,
                inputs: torch.Tensor) -> tuple[list[torch.Tensor | None], float, int]:
    engine = Engine(ex, args.max_batch, args.max_concurrent_batches)
    outputs: list[torch.Tensor | None] = [None] * len(inputs)
    counts = shares(len(inputs), args.clients)
    firsts = [sum(counts[:c]) for c in range(args.clients)]
    runner = asyncio.create_task(engine.run())
    t = time.perf_counter()
    await asyncio.gather(*[client(engine, inputs, outputs, first, count)
                           for first, count in zip(firsts, counts, strict=True) if count])
    wall = time.perf_counter() - t
    runner.cancel()
    return outputs, wall, engine.steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(p)
    p.add_argument("--requests", type=positive_int, default=2000, metavar="N",
                   help="requests served in the measured run (default: 2000)")
    p.add_argument("--clients", type=positive_int, default=64, metavar="N",
                   help="closed-loop clients, each with one request outstanding; more "
                        "clients than requests leaves the extra ones idle (default: 64)")
    p.add_argument("--max-batch", type=positive_int, default=32, metavar="N",
                   help="most requests in one forward step (default: 32)")
    p.add_argument("--max-concurrent-batches", type=positive_int, default=2, metavar="N",
                   help="forward steps in flight at once (default: 2)")
    args = p.parse_args(argv)
    dims = (256, 1024, 256)
    if dims[1] % args.world_size:
        p.error(f"--world-size {args.world_size} must divide the hidden size {dims[1]}")
    device, backend = resolve(args.device, args.backend)
    inputs = torch.randn(args.requests, dims[0], generator=torch.Generator().manual_seed(1))
    clients = min(args.clients, args.requests)
    try:
        ex = Executor(TPMLPWorker, args.world_size, device=device, distributed_backend=backend,
                      worker_args=(args.seed, *dims), worker_extension_cls=StepCounter,
                      max_concurrent_batches=args.max_concurrent_batches)
    except ConfigError as e:  # e.g. --device cuda without a GPU: refused before any start
        p.exit(2, f"{p.prog}: error: {e}\n")
    with ex:
        asyncio.run(serve(ex, args, inputs[:clients]))  # warm-up: one request per client
        before = ex.collective_rpc("steps_served")
        outputs, wall, steps = asyncio.run(serve(ex, args, inputs))
        after = ex.collective_rpc("steps_served")
    counted = [a - b for a, b in zip(after, before, strict=True)]
    got = [o for o in outputs if o is not None]
    err = relative_error(torch.stack(got),
                         reference_forward(build_weights(args.seed, *dims), inputs))
    print(f"served {len(got)} of {args.requests} requests from {clients} clients on "
          f"{args.world_size} {device} worker(s) ({backend}), "
          f"{args.max_concurrent_batches} step(s) in flight")
    print(f"{steps} steps, mean batch {len(got) / steps:.1f}, {wall:.2f} s: "
          f"{len(got) / wall:.0f} requests/s, {steps / wall:.0f} steps/s")
    print(f"steps counted by the extension per rank: {counted}; relative error {err:.2e}")
    return 0 if err <= 1e-5 and len(got) == args.requests and \
        all(c == steps for c in counted) else 1


if __name__ == "__main__":
    sys.exit(main())

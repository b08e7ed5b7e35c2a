"""The executor's share of a tensor-parallel forward step, against the compute.

For the TP MLP of ``examples/tp_mlp.py`` at world sizes 1, 2, 4 (gloo on CPU, NCCL on
GPUs), each step is ``collective_rpc("timed_forward", (x,))``: every worker times its
own forward (matmuls + all_reduce, device synchronised) and the driver times the call.
The executor's overhead per step is the call's wall time minus the slowest worker's
compute: dispatching the input, waking the workers, gathering the replies.

Baseline, measured in the same run: the very same shards and compute in processes
driven through plain ``multiprocessing.Pipe`` (send the input to each, receive each
reply), the usual hand-rolled alternative. A second table runs the same steps through
``collective_rpc_async`` with 1 and 2 batches in flight (steps/s).

Usage: ``python benchmarks/tp_step.py [--device cpu|cuda] [--sizes 1,2,4] [--out DIR]``.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402
from _common import add_out_option, arg_parser, machine, print_table, write_json  # noqa: E402
from tp_mlp import MLPShard, TPMLPWorker, make_input  # noqa: E402

from gpuexec import Executor  # noqa: E402


def _summary(walls: list[float], computes: list[float]) -> dict[str, float]:
    over = [w - c for w, c in zip(walls, computes, strict=True)]
    wall, compute, overhead = (statistics.median(v) * 1e6 for v in (walls, computes, over))
    return {"wall_p50_us": wall, "compute_p50_us": compute, "overhead_p50_us": overhead,
            "overhead_share": overhead / wall if wall else 0.0, "steps": len(walls)}


def run_gpuexec(n: int, device: str, backend: str, dims: tuple[int, int, int],
                x: torch.Tensor, steps: int, warmup: int, threads: int | None) -> dict[str, Any]:
    with Executor(TPMLPWorker, n, device=device, distributed_backend=backend,
                  worker_args=(0, *dims, threads)) as ex:
        walls, computes = [], []
        for i in range(warmup + steps):
            t = time.perf_counter()
            outs = ex.collective_rpc("timed_forward", args=(x,))
            wall = time.perf_counter() - t
            if i >= warmup:
                walls.append(wall)
                computes.append(max(sec for _, sec in outs))
        result = _summary(walls, computes)
        result["start_method"] = ex.start_method
        result["transport"] = ex.transport
        result["async_steps_per_s"] = {k: _async_rate(ex, x, steps, k) for k in (1, 2)}
    return result


def _async_rate(ex: Executor, x: torch.Tensor, steps: int, in_flight: int) -> float:
    """Steps/s with ``in_flight`` steps outstanding through ``collective_rpc_async``."""
    async def go() -> float:
        slots = asyncio.Semaphore(in_flight)

        async def one() -> None:
            async with slots:
                await ex.collective_rpc_async("timed_forward", args=(x,), unique_reply_rank=0)

        t = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(steps)])
        return steps / (time.perf_counter() - t)

    return asyncio.run(go())


def _pipe_worker(rank: int, n: int, device: str, backend: str, port: int,
                 dims: tuple[int, int, int], threads: int | None, conn: Connection) -> None:
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(rank)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group(backend, rank=rank, world_size=n)
    shard = MLPShard(rank, n, f"cuda:{rank}" if device == "cuda" else "cpu", 0, *dims, threads)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            break
        out, sec = shard.timed_forward(torch.from_numpy(msg))
        conn.send((None if out is None else out.numpy(), sec))
    dist.destroy_process_group()


def run_pipe(n: int, device: str, backend: str, dims: tuple[int, int, int],
             x: torch.Tensor, steps: int, warmup: int, threads: int | None) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(n)]
    procs = [ctx.Process(target=_pipe_worker, args=(r, n, device, backend, port, dims,
                                                    threads, pipes[r][1])) for r in range(n)]
    for p in procs:
        p.start()
    conns = [a for a, _ in pipes]
    for c in conns:
        c.recv()
    xs = x.numpy()
    walls, computes = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        for c in conns:
            c.send(xs)
        outs = [c.recv() for c in conns]
        wall = time.perf_counter() - t
        if i >= warmup:
            walls.append(wall)
            computes.append(max(sec for _, sec in outs))
    for c in conns:
        c.send(None)
    for p in procs:
        p.join(30)
    return _summary(walls, computes)


def main() -> int:
    ap = arg_parser(__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="gloo on cpu, NCCL on cuda")
    ap.add_argument("--sizes", default="1,2,4", metavar="N,N,...", help="world sizes")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=30, help="untimed steps before them")
    ap.add_argument("--batch", type=int, default=32, help="rows of the input")
    ap.add_argument("--dims", default="1024,4096,1024", help="d_in,d_hidden,d_out")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per worker (default: 1 on cpu, torch's own on cuda)")
    add_out_option(ap)
    args = ap.parse_args()
    threads = args.threads if args.threads is not None else \
        (1 if args.device == "cpu" else None)
    backend = "nccl" if args.device == "cuda" else "gloo"
    d_in, d_hidden, d_out = (int(v) for v in args.dims.split(","))
    dims = (d_in, d_hidden, d_out)
    x = make_input(0, args.batch, d_in)
    results = []
    for n in (int(v) for v in args.sizes.split(",")):
        ours = run_gpuexec(n, args.device, backend, dims, x, args.steps, args.warmup, threads)
        pipe = run_pipe(n, args.device, backend, dims, x, args.steps, args.warmup, threads)
        results.append({"world_size": n, "gpuexec": ours, "mp_pipe": pipe})
    print(f"TP MLP {d_in}->{d_hidden}->{d_out}, batch {args.batch}, {args.device}/{backend}, "
          f"{threads or 'default'} thread(s) per worker, {args.steps} steps (p50 per step)")
    print_table(["world", "compute us", "gpuexec wall us", "gpuexec overhead us", "share",
                 "Pipe wall us", "Pipe overhead us", "share"],
                [[r["world_size"], r["gpuexec"]["compute_p50_us"], r["gpuexec"]["wall_p50_us"],
                  r["gpuexec"]["overhead_p50_us"], f"{r['gpuexec']['overhead_share']:.1%}",
                  r["mp_pipe"]["wall_p50_us"], r["mp_pipe"]["overhead_p50_us"],
                  f"{r['mp_pipe']['overhead_share']:.1%}"] for r in results])
    print()
    print_table(["world", "async steps/s, 1 in flight", "async steps/s, 2 in flight"],
                [[r["world_size"], r["gpuexec"]["async_steps_per_s"][1],
                  r["gpuexec"]["async_steps_per_s"][2]] for r in results])
    path = write_json("tp_step.json", {
        "machine": machine(), "device": args.device, "backend": backend, "dims": dims,
        "batch": args.batch, "steps": args.steps, "threads_per_worker": threads,
        "results": results}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Broadcast throughput: one array sent to every worker, for 1 MiB, 64 MiB and 1 GiB.

Effective throughput = world_size x payload bytes / time until every worker has the
array and answered. gpuexec writes a large array once into shared memory that every
worker maps without a copy (``transport="shm"``); ``transport="zmq"`` sends it as
zero-copy ZeroMQ frames. Baselines in the same run: ``multiprocessing.Pipe`` (pickled
per worker), ``concurrent.futures.ProcessPoolExecutor`` (one task per worker), loky
(the ``bench`` extra; skipped with a note when not installed).
Target: 1 GiB to 4 workers at 10 GB/s effective or more.
Usage: ``python benchmarks/payload.py [--world 4] [--sizes-mib 1,64,1024] [--out DIR]``.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _common import add_out_option, arg_parser, machine, print_table, print_targets, write_json

from gpuexec import Executor, Worker


class Receiver(Worker):
    def shape(self, a: Any) -> list[int]:
        return list(a.shape)


def _shape(a: Any) -> list[int]:
    return list(a.shape)


def _pipe_worker(conn: Any) -> None:
    while True:
        a = conn.recv()
        if a is None:
            return
        conn.send(a.shape)


def bench_gpuexec(world: int, arr: np.ndarray, repeats: int, transport: str) -> float:
    with Executor(Receiver, world, device="cpu", transport=transport) as ex:
        ex.collective_rpc("shape", args=(arr[:10],))
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            ex.collective_rpc("shape", args=(arr,))
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_pipe(world: int, arr: np.ndarray, repeats: int) -> float:
    ctx = mp.get_context("fork")
    pairs = [ctx.Pipe() for _ in range(world)]
    procs = [ctx.Process(target=_pipe_worker, args=(child,)) for _, child in pairs]
    for p in procs:
        p.start()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for parent, _ in pairs:
            parent.send(arr)
        for parent, _ in pairs:
            parent.recv()
        times.append(time.perf_counter() - t)
    for parent, _ in pairs:
        parent.send(None)
    for p in procs:
        p.join()
    return statistics.median(times)


def bench_pool(world: int, arr: np.ndarray, repeats: int, loky: bool) -> float:
    if loky:
        from loky import get_reusable_executor

        pool: Any = get_reusable_executor(max_workers=world)
    else:
        pool = ProcessPoolExecutor(world, mp_context=mp.get_context("fork"))
    list(pool.map(_shape, [arr[:10]] * world))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        list(pool.map(_shape, [arr] * world))
        times.append(time.perf_counter() - t)
    if not loky:
        pool.shutdown()
    return statistics.median(times)


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--world", type=int, default=4, help="workers receiving the array")
    ap.add_argument("--sizes-mib", default="1,64,1024", metavar="MIB,MIB,...",
                    help="array sizes in MiB")
    ap.add_argument("--repeats", type=int, default=3,
                    help="sends per size and method, best kept (at most 2 for 1 GiB)")
    add_out_option(ap)
    args = ap.parse_args()
    notes = []
    have_loky = importlib.util.find_spec("loky") is not None
    if not have_loky:
        notes.append("loky not installed: skipped")
    rows: list[list[Any]] = []
    results = []
    for mib in (int(x) for x in args.sizes_mib.split(",")):
        arr = np.ones(mib * (1 << 20) // 8)
        reps = max(1, args.repeats if mib < 1024 else min(args.repeats, 2))
        cells = {"gpuexec shm": bench_gpuexec(args.world, arr, reps, "shm"),
                 "gpuexec zmq": bench_gpuexec(args.world, arr, reps, "zmq"),
                 "mp.Pipe": bench_pipe(args.world, arr, reps),
                 "ProcessPoolExecutor": bench_pool(args.world, arr, reps, False)}
        if have_loky:
            cells["loky"] = bench_pool(args.world, arr, reps, True)
        gbps = {k: args.world * arr.nbytes / v / 1e9 for k, v in cells.items()}
        rows.append([f"{mib} MiB", *(f"{v * 1e3:.1f} ms / {gbps[k]:.1f}" for k, v in
                                     cells.items())])
        results.append({"mib": mib, "seconds": cells, "effective_gb_per_s": gbps})
    heads = ["payload", *(f"{k} (time / GB/s)" for k in results[0]["seconds"])]
    print_table(heads, rows)
    for n in notes:
        print("note:", n)
    gib = [r for r in results if r["mib"] == 1024]
    best = max(gib[0]["effective_gb_per_s"][k] for k in ("gpuexec shm", "gpuexec zmq")) \
        if gib else None
    targets = print_targets([(
        "1 GiB to 4 workers at >= 10 GB/s effective (gpuexec, best transport)",
        f"{best:.1f} GB/s to {args.world} workers" if best is not None else "not measured",
        best >= 10 if best is not None and args.world == 4 else None)])
    path = write_json("payload.json", {"machine": machine(), "world": args.world,
                                       "results": results, "notes": notes,
                                       "targets": targets}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

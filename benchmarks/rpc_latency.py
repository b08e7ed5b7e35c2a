"""No-op ``collective_rpc`` round trip against a bare pyzmq PUB/PUSH round trip.

Both are measured in the same run, on the same machine, with the same message shape
(the msgspec-encoded ``Call`` out, one encoded ``Reply`` back per worker), workers
started the same way (fork). The ratio is the result; absolute times depend on the
host. Usage: ``python benchmarks/rpc_latency.py [--sizes 1,2,4,8] [--calls 3000]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec
import zmq
from _common import machine, print_table, time_calls, write_json

from gpuexec import Executor, Worker
from gpuexec.ipc.messages import Call, Reply


class NoopWorker(Worker):
    def noop(self) -> None:
        return None


def _bare_worker(rank: int, req: str, rep: str) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(req)
    push = ctx.socket(zmq.PUSH)
    push.connect(rep)
    reply = msgspec.msgpack.encode(Reply(0, rank))
    push.send(b"hello")
    while True:
        msg = sub.recv()
        if msg == b"stop":
            break
        push.send(reply)


def bare_pyzmq(n_workers: int, calls: int, warmup: int) -> dict[str, float]:
    d = tempfile.mkdtemp(prefix="gpx-bench-")
    req, rep = f"ipc://{d}/req", f"ipc://{d}/rep"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(req)
    pull = ctx.socket(zmq.PULL)
    pull.bind(rep)
    procs = [mp.get_context("fork").Process(target=_bare_worker, args=(r, req, rep))
             for r in range(n_workers)]
    for p in procs:
        p.start()
    for _ in procs:
        pull.recv()
    msg = msgspec.msgpack.encode(Call(1, "noop", None, [], {}))
    # Slow joiner: wait until every subscriber gets a broadcast.
    while True:
        pub.send(msg)
        if pull.poll(100):
            for _ in range(n_workers):
                pull.recv()
            break
    time.sleep(0.2)
    while pull.poll(50):
        pull.recv()

    def once() -> None:
        pub.send(msg)
        for _ in range(n_workers):
            pull.recv()

    out = time_calls(once, calls, warmup)
    pub.send(b"stop")
    for p in procs:
        p.join(5)
    ctx.destroy(linger=0)
    os.rmdir(d) if not os.listdir(d) else None
    return out


def gpuexec_rpc(n_workers: int, calls: int, warmup: int) -> dict[str, float]:
    with Executor(NoopWorker, n_workers, device="cpu", start_method="fork") as ex:
        return time_calls(lambda: ex.collective_rpc("noop"), calls, warmup)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="alternate the two, keep the best p50")
    ap.add_argument("--out", default=None, help="directory for the JSON (default results/)")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else \
        [n for n in (1, 2, 4, 8) if n <= 4 or n + 1 <= cpus]
    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    for n in sizes:
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for name, fn in (("bare_pyzmq", bare_pyzmq), ("gpuexec", gpuexec_rpc)):
                r = fn(n, args.calls, args.warmup)
                if name not in best or r["p50_us"] < best[name]["p50_us"]:
                    best[name] = r
        ratio = best["gpuexec"]["p50_us"] / best["bare_pyzmq"]["p50_us"]
        rows.append([n, best["bare_pyzmq"]["p50_us"], best["bare_pyzmq"]["p99_us"],
                     best["gpuexec"]["p50_us"], best["gpuexec"]["p99_us"], f"{ratio:.2f}x"])
        results.append({"world_size": n, **{k: v for k, v in best.items()},
                        "p50_ratio": ratio})
    print_table(["world", "bare p50 us", "bare p99 us", "gpuexec p50 us", "gpuexec p99 us",
                 "p50 ratio"], rows)
    print("target (issue 2): p50 ratio <= 1.3x at every world size")
    path = write_json("rpc_latency.json", {"machine": machine(), "calls": args.calls,
                                           "target_ratio": 1.3, "results": results}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the forensics cost: the time to collect every rank's stacks, and the metrics'
share of a call.

(a) ``Executor.stacks()`` at world sizes 1/2/4/8 (CPU workers, ZeroMQ), the ranks idle
    and the ranks inside a call blocked in ``Event.wait``: wall time of one collection,
    p50 and max over ``--trials``. Baseline in the same run: a no-op ``collective_rpc``
    at the same world size (the cost of asking every rank something through the normal
    channel, which a busy rank never answers). Target: p50 <= 100 ms at every size (the
    bound RpcTimeoutError and the hang report give it is 1 s).
(b) The hot-path cost of recording metrics: what the driver adds to one call (two
    clock reads, the request's size, the per-reply counters and ``CallMetrics.finished``,
    timed in a loop of ``--loops``), against the p50 of a no-op ``collective_rpc`` at
    world size 1 on the same host. Target: <= 1 % of that call. ``benchmarks/ab_rpc.py``
    measures the same end to end, A/B against another tree.

Usage: ``python benchmarks/forensics.py [--trials 20] [--sizes 1,2,4,8] [--out DIR]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_out_option, arg_parser, machine, print_table, time_calls, write_json

from gpuexec import Executor, Worker
from gpuexec.executor.metrics import CallMetrics

TARGET_STACKS_MS = 100.0
TARGET_METRICS_PCT = 1.0


class BenchWorker(Worker):
    def __init__(self) -> None:
        self.event = threading.Event()

    def noop(self) -> None:
        return None

    def wait_until(self, stop: str) -> None:
        while not os.path.exists(stop):
            self.event.wait(0.05)


def stacks_at(size: int, trials: int) -> dict[str, Any]:
    with Executor(BenchWorker, world_size=size, device="cpu", transport="zmq",
                  shutdown_timeout=0.5) as ex:
        rpc = time_calls(lambda: ex.collective_rpc("noop"), 200, 50)
        out: dict[str, Any] = {"noop_rpc_p50_ms": rpc["p50_us"] / 1000}
        with tempfile.TemporaryDirectory() as tmp:
            stop = os.path.join(tmp, "stop")
            for label in ("idle", "busy"):
                fut = ex.collective_rpc("wait_until", args=(stop,), non_block=True) \
                    if label == "busy" else None
                ex.stacks()  # warm
                samples = []
                for _ in range(trials):
                    t = time.perf_counter()
                    got = ex.stacks()
                    samples.append((time.perf_counter() - t) * 1000)
                    if not all("thread 0x" in text for text in got.values()):
                        raise RuntimeError(f"an incomplete answer: {got}")
                out[label] = {"p50_ms": statistics.median(samples), "max_ms": max(samples),
                              "samples_ms": samples}
                if fut is not None:
                    Path(stop).touch()
                    fut.result(timeout=30)
    return out


def metrics_cost(loops: int) -> dict[str, float]:
    """ns per call of what the driver records (finished + the per-reply counters)."""
    m = CallMetrics(1)
    replies, last = m.replies, m.last_reply
    error = None

    frames = [b"x" * 64]

    def record() -> None:  # what the driver added to a call, one rank, no error
        started = time.monotonic()        # PendingCall: when it was sent
        nbytes = len(frames[0]) if len(frames) == 1 else 0  # request bytes
        now = time.monotonic()            # deliver: once per batch of replies
        last[0] = now
        replies[0] += 1
        m.finished("noop", now - started, nbytes, error)  # finish

    def nothing() -> None:
        return None

    for fn in (record, nothing):  # warm
        for _ in range(1000):
            fn()
    cost = {}
    for name, fn in (("record", record), ("empty_call", nothing)):
        t = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        cost[name] = (time.perf_counter_ns() - t) / loops
    return {"record_ns": cost["record"] - cost["empty_call"], "loop_ns": cost["empty_call"]}


def main() -> int:
    ap = arg_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="stack collections per size")
    ap.add_argument("--sizes", default="1,2,4,8", help="world sizes, comma-separated")
    ap.add_argument("--loops", type=int, default=200_000,
                    help="calls timed for the metrics overhead")
    add_out_option(ap)
    args = ap.parse_args()
    results: dict[str, Any] = {"stacks": {}, "metrics": {}}
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        r = results["stacks"][size] = stacks_at(size, args.trials)
        for label in ("idle", "busy"):
            p50 = r[label]["p50_ms"]
            rows.append([f"(a) stacks() world {size}, ranks {label}", args.trials, p50,
                         r[label]["max_ms"], f"{r['noop_rpc_p50_ms']:.3f}",
                         f"p50 <= {TARGET_STACKS_MS:g} ms",
                         "met" if p50 <= TARGET_STACKS_MS else "missed"])
    with Executor(BenchWorker, world_size=1, device="cpu", transport="auto") as ex:
        rpc = time_calls(lambda: ex.collective_rpc("noop"), 5000, 500)
    cost = metrics_cost(args.loops)
    pct = 100 * cost["record_ns"] / (rpc["p50_us"] * 1000)
    results["metrics"] = {**cost, "noop_rpc_p50_us": rpc["p50_us"], "percent_of_call": pct}
    rows.append([f"(b) metrics recording per call ({cost['record_ns']:.0f} ns)", args.loops,
                 f"{pct:.2f} %", "-", f"{rpc['p50_us'] / 1000:.3f}",
                 f"<= {TARGET_METRICS_PCT:g} % of a call",
                 "met" if pct <= TARGET_METRICS_PCT else "missed"])
    print_table(["measurement", "n", "p50 ms", "max ms", "baseline: no-op rpc p50 ms",
                 "target", "met"], rows)
    path = write_json("forensics.json", {"machine": machine(), "trials": args.trials,
                                         "targets": {"stacks_p50_ms": TARGET_STACKS_MS,
                                                     "metrics_percent": TARGET_METRICS_PCT},
                                         "results": results}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

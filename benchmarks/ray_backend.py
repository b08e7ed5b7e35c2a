"""``collective_rpc`` through the Ray backend against plain Ray actor calls.

Same run, same Ray cluster (a local one unless ``RAY_ADDRESS`` is set), world sizes 1, 2,
4: a no-op ``collective_rpc`` to actors placed by the backend, over ZeroMQ tcp + CURVE
(``transport="tcp"``) and over the shared-memory rings (``"auto"``, which picks them when
every actor is on the driver's node, as on a one-host cluster), against
``ray.get([a.noop.remote() for a in actors])`` on plain Ray actors placed the same way
(one bundle each). Also: the time from SIGKILL of an actor to ``WorkerDiedError`` in a
pending call. Target: at most 1 s.
Usage: ``python benchmarks/ray_backend.py [--sizes 1,2,4] [--calls 2000] [--rounds 2]
[--out DIR]``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray
from _common import (
    add_out_option,
    arg_parser,
    machine,
    print_table,
    print_targets,
    time_calls,
    write_json,
)

from gpuexec import Executor, Worker
from gpuexec.errors import WorkerDiedError


class NoopWorker(Worker):
    def noop(self) -> None:
        return None

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@ray.remote(num_cpus=0.01)
class PlainActor:
    def noop(self) -> None:
        return None


def plain_ray(n: int, calls: int, warmup: int) -> dict[str, float]:
    actors = [PlainActor.remote() for _ in range(n)]  # type: ignore[attr-defined]
    ray.get([a.noop.remote() for a in actors])
    out = time_calls(lambda: ray.get([a.noop.remote() for a in actors]), calls, warmup)
    for a in actors:
        ray.kill(a)
    return out


def gpuexec_ray(n: int, calls: int, warmup: int, transport: str) -> dict[str, float]:
    with Executor(NoopWorker, n, device="cpu", backend="ray", transport=transport,
                  ray_resources={"CPU": 0.01}) as ex:
        if transport == "auto" and ex.transport != "shm":
            print(f"note: transport 'auto' gave {ex.transport!r} (actors off this node?)")
        return time_calls(lambda: ex.collective_rpc("noop"), calls, warmup)


def _kill(pid: int, when: list[float]) -> None:
    when.append(time.monotonic())
    os.kill(pid, signal.SIGKILL)


def death_detection(trials: int) -> list[float]:
    out = []
    for _ in range(trials):
        with Executor(NoopWorker, 2, device="cpu", backend="ray",
                      ray_resources={"CPU": 0.01}) as ex:
            killed: list[float] = []
            threading.Timer(0.3, _kill, args=(ex.workers[1].pid, killed)).start()
            try:
                ex.collective_rpc("sleep", args=(30,))
            except WorkerDiedError:
                out.append((time.monotonic() - killed[0]) * 1e3)
    return out


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--sizes", default="1,2,4", metavar="N,N,...", help="world sizes")
    ap.add_argument("--calls", type=int, default=2000, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=200, help="untimed calls before them")
    ap.add_argument("--death-trials", type=int, default=5,
                    help="actors SIGKILLed to time the WorkerDiedError")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternate plain Ray, tcp and rings this often; keep each one's best")
    add_out_option(ap)
    args = ap.parse_args()
    ray.init(log_to_driver=False)
    rows: list[list[Any]] = []
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        # Alternate the two, keep each one's best p50: a fresh local Ray cluster keeps
        # starting its own helpers for a while, which would land on whichever ran first.
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for name in ("plain", "tcp", "shm"):
                r = plain_ray(n, args.calls, args.warmup) if name == "plain" else \
                    gpuexec_ray(n, args.calls, args.warmup, "tcp" if name == "tcp" else "auto")
                if name not in best or r["p50_us"] < best[name]["p50_us"]:
                    best[name] = r
        plain, tcp, shm = best["plain"], best["tcp"], best["shm"]
        rows.append([n, plain["p50_us"], plain["p99_us"], tcp["p50_us"], tcp["p99_us"],
                     shm["p50_us"], shm["p99_us"],
                     f"{plain['p50_us'] / tcp['p50_us']:.1f}x",
                     f"{plain['p50_us'] / shm['p50_us']:.1f}x"])
        results.append({"world_size": n, "plain_ray": plain, "gpuexec_ray_tcp": tcp,
                        "gpuexec_ray_shm": shm,
                        "speedup_p50_tcp": plain["p50_us"] / tcp["p50_us"],
                        "speedup_p50_shm": plain["p50_us"] / shm["p50_us"]})
    print_table(["world", "ray.get(actors) p50 us", "p99 us", "gpuexec tcp p50 us", "p99 us",
                 "gpuexec shm p50 us", "p99 us", "tcp faster", "shm faster"], rows)
    deaths = sorted(death_detection(args.death_trials))
    if deaths:
        print(f"actor SIGKILL -> WorkerDiedError: p50 {deaths[len(deaths) // 2]:.0f} ms, "
              f"max {deaths[-1]:.0f} ms over {len(deaths)} trials")
    targets = print_targets([(
        "actor SIGKILL -> WorkerDiedError, every trial <= 1000 ms",
        f"max {deaths[-1]:.0f} ms over {len(deaths)} trials" if deaths else "not measured",
        deaths[-1] <= 1000 if deaths else None)])
    path = write_json("ray_backend.json", {"machine": machine(), "results": results,
                                           "death_detection_ms": deaths, "targets": targets},
                      args.out)
    print(f"wrote {path}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

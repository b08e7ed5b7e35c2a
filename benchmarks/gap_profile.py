"""Where the time of a call goes when calls come ``--gap-ms`` apart (bursty serving).

For each call: the request leg (driver enters ``collective_rpc`` -> the worker enters the
method, both on CLOCK_MONOTONIC, one clock for every process) and the reply leg (the
worker enters the method -> ``collective_rpc`` returns), p50 over ``--calls`` calls, in
four set-ups measured in the same run:

* ``sleep``: the driver sleeps through the gap (time.sleep), workers forecast arrivals;
* ``sleep, no forecast``: the same with the arrival forecast off (plain futex sleep);
* ``busy driver``: the driver spins through the gap instead of sleeping (is the driver's
  own wake-up, cold caches and clock, part of the cost?);
* ``back to back``: no gap at all (the floor).

Usage: ``python benchmarks/gap_profile.py [--world 1] [--gap-ms 5] [--calls 300]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_out_option, arg_parser, machine, print_table, write_json

import gpuexec.ipc.forecast as forecast
from gpuexec import Executor, Worker


class StampWorker(Worker):
    def stamp(self) -> float:
        return time.monotonic()


def _p50(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def measure(world: int, gap_s: float, calls: int, busy: bool, use_forecast: bool
            ) -> dict[str, float]:
    saved = forecast.MAX_DUTY
    forecast.MAX_DUTY = saved if use_forecast else 0.0  # fork: the workers inherit it
    try:
        ex = Executor(StampWorker, world, device="cpu", start_method="fork", transport="shm")
    finally:
        forecast.MAX_DUTY = saved
    with ex:
        for _ in range(50):
            ex.collective_rpc("stamp")
        req: list[float] = []
        rep: list[float] = []
        total: list[float] = []
        for _ in range(calls):
            if gap_s > 0:
                if busy:
                    end = time.monotonic() + gap_s
                    while time.monotonic() < end:
                        pass
                else:
                    time.sleep(gap_s)
            t0 = time.monotonic()
            stamps = ex.collective_rpc("stamp")
            t1 = time.monotonic()
            last = max(stamps)
            req.append((last - t0) * 1e6)
            rep.append((t1 - last) * 1e6)
            total.append((t1 - t0) * 1e6)
    return {"p50_us": _p50(total), "request_leg_p50_us": _p50(req),
            "reply_leg_p50_us": _p50(rep)}


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--world", type=int, default=1, help="workers")
    ap.add_argument("--gap-ms", type=float, default=5.0, help="spacing of the calls, ms")
    ap.add_argument("--calls", type=int, default=300, help="timed calls per set-up")
    add_out_option(ap)
    args = ap.parse_args()
    gap = args.gap_ms / 1000
    setups: list[tuple[str, float, bool, bool]] = [
        ("sleep", gap, False, True), ("sleep, no forecast", gap, False, False),
        ("busy driver", gap, True, True), ("back to back", 0.0, False, True)]
    rows: list[list[Any]] = []
    results = {}
    for name, g, busy, fc in setups:
        r = measure(args.world, g, args.calls, busy, fc)
        results[name] = r
        rows.append([name, r["p50_us"], r["request_leg_p50_us"], r["reply_leg_p50_us"]])
    print_table([f"world {args.world}, gap {args.gap_ms:g} ms", "p50 us",
                 "request leg p50 us", "reply leg p50 us"], rows)
    path = write_json(f"gap_profile_w{args.world}.json",
                      {"machine": machine(), "gap_ms": args.gap_ms, "results": results},
                      args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One side of ``ab_rpc.py``: a long-lived process that times ``collective_rpc`` with the
``gpuexec`` package it finds first on ``sys.path`` (the tree under test).

It reads one JSON request per line on stdin, ``{"transport", "world", "kind", "calls",
"warmup", "gap_ms"}``, and answers one JSON line: the p50 of the timed calls and the
driver thread's CPU time per call. Executors stay open between requests (one per
transport and world size), so a measurement costs milliseconds and the two sides can be
interleaved finely. Its stdout is kept for the answers: anything printed by the package
or the workers goes to stderr.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import gpuexec
from gpuexec import Executor, Worker

SMALL_ARGS = (1, "x")
SMALL_KWARGS = {"c": [1.0, 2.0]}


class AbWorker(Worker):
    def noop(self) -> None:
        return None

    def small(self, a: int, b: str, c: list[float] | None = None) -> int:
        return a


def measure(fn: Callable[[], Any], calls: int, warmup: int, gap_s: float) -> dict[str, float]:
    for _ in range(warmup):
        if gap_s:
            time.sleep(gap_s)
        fn()
    lat: list[float] = []
    cpu = 0.0
    for _ in range(calls):
        if gap_s:
            time.sleep(gap_s)
        c, t = time.thread_time(), time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t) * 1e6)
        cpu += time.thread_time() - c
    return {"p50_us": statistics.median(lat), "cpu_us": cpu / calls * 1e6}


def call_of(ex: Executor, kind: str) -> Callable[[], Any]:
    run = ex.collective_rpc
    if kind == "noop":
        return lambda: run("noop")
    return lambda: run("small", args=SMALL_ARGS, kwargs=SMALL_KWARGS)


def main() -> int:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else prints must not corrupt the answers
    executors: dict[tuple[str, int], Executor] = {}
    answers.write(json.dumps({"package": gpuexec.__file__}) + "\n")
    try:
        for line in sys.stdin:
            req = json.loads(line)
            key = (req["transport"], req["world"])
            ex = executors.get(key)
            if ex is None:
                ex = executors[key] = Executor(AbWorker, req["world"], device="cpu",
                                               start_method="fork", transport=key[0])
            result = measure(call_of(ex, req["kind"]), req["calls"], req["warmup"],
                             req["gap_ms"] / 1000)
            answers.write(json.dumps(result) + "\n")
    finally:
        for ex in executors.values():
            ex.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

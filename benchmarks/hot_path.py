"""The shared-memory hot path against its physical floor, on both ring cores, in one run.

For each world size, measured in the same run on the same host:

* ``floor``: the pure-Python floor of the same handshake, no serialization, no executor:
  the driver bumps a counter in shared memory, every worker spins on it and answers by
  storing it in its own cache line, the driver spins until every answer is there. What
  any Python driver and Python workers must pay for one round trip through shared
  memory.
* ``msgspec``: encoding and decoding a small call and its reply (one process).
* gpuexec ``collective_rpc`` over shared memory, no-op and small arguments (two values
  and a keyword list), with the compiled ring core and with the pure-Python one (the
  driver's and the workers' core both chosen by ``GPUEXEC_CORE``).
* with ``--gap-ms``: calls that far apart (p50, and the busiest worker's CPU share).
* vLLM's shared-memory ``MessageQueue`` (a broadcast of a no-op request to the workers,
  each answering in its own queue), where ``vllm.distributed.device_communicators.
  shm_broadcast`` can be imported (``--vllm-path`` adds a directory holding the copied
  modules); skipped with a note otherwise.

Targets (p50): compiled no-op <= ``--floor-factor`` x the floor at every size (4 on a
GPU host with a core per process, 5 on a small one); small arguments <= 1.5x the no-op;
compiled <= 1/5 of vLLM's queue where it was measured; with calls 5 ms apart each worker
<= 5 % of a core. The compiled / pure-Python ratio is reported.
Usage: ``python benchmarks/hot_path.py [--sizes 1,2,4,8] [--calls 2000] [--out DIR]``.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec
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
from gpuexec.ipc import ringcore
from gpuexec.ipc.messages import Call, Reply, ToDriver, ToWorker

SMALL_ARGS = (1, "x")
SMALL_KWARGS = {"c": [1.0, 2.0]}
LINE = 64


class HotWorker(Worker):
    def noop(self) -> None:
        return None

    def small(self, a: int, b: str, c: list[float] | None = None) -> int:
        return a

    def core(self) -> str:
        return ringcore.current().NAME

    def cpu_s(self) -> float:
        t = os.times()
        return t.user + t.system


# -- the floor -------------------------------------------------------------------------

def _floor_worker(buf: Any, rank: int) -> None:
    view = memoryview(buf)
    u64 = struct.Struct("<Q")
    seen = 0
    mine = LINE * (rank + 1)
    while True:
        seq = u64.unpack_from(view, 0)[0]
        if seq == seen:
            continue
        if seq == 0xFFFFFFFFFFFFFFFF:
            return
        seen = seq
        u64.pack_into(view, mine, seq)


def floor_round_trip(world: int, calls: int, warmup: int) -> dict[str, float]:
    buf = mmap.mmap(-1, LINE * (world + 1))
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_floor_worker, args=(buf, r), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    view = memoryview(buf)
    u64 = struct.Struct("<Q")
    offsets = [LINE * (r + 1) for r in range(world)]
    state = {"seq": 0}

    def once() -> None:
        seq = state["seq"] = state["seq"] + 1
        u64.pack_into(view, 0, seq)
        for off in offsets:
            while u64.unpack_from(view, off)[0] != seq:
                pass

    try:
        return time_calls(once, calls, warmup)
    finally:
        u64.pack_into(view, 0, 0xFFFFFFFFFFFFFFFF)
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        view.release()
        buf.close()


def msgspec_small(calls: int) -> float:
    enc = msgspec.msgpack.Encoder()
    dec_w = msgspec.msgpack.Decoder(ToWorker)
    dec_d = msgspec.msgpack.Decoder(ToDriver)
    call = Call(1, "small", None, list(SMALL_ARGS), SMALL_KWARGS)
    reply = Reply(1, 0, 1)

    def once() -> None:
        dec_w.decode(enc.encode(call))
        dec_d.decode(enc.encode(reply))

    return time_calls(once, calls, calls // 10)["p50_us"]


# -- gpuexec -----------------------------------------------------------------------------

def gpuexec_run(world: int, core: str, calls: int, warmup: int, gap_ms: float
                ) -> dict[str, Any]:
    ringcore.select(core)
    with Executor(HotWorker, world, device="cpu", transport="shm", start_method="fork",
                  env={ringcore.ENV: core}) as ex:
        cores = set(ex.collective_rpc("core")) | {ringcore.current().NAME}
        if cores != {core}:
            raise RuntimeError(f"asked for the {core} core, got {cores}")
        run = ex.collective_rpc
        out: dict[str, Any] = {
            "noop": time_calls(lambda: run("noop"), calls, warmup),
            "small": time_calls(lambda: run("small", args=SMALL_ARGS, kwargs=SMALL_KWARGS),
                                calls, warmup),
        }
        if gap_ms:
            gap = gap_ms / 1000
            lat = []
            for _ in range(50):
                time.sleep(gap)
                run("noop")
            cpu0, t0 = ex.collective_rpc("cpu_s"), time.monotonic()
            for _ in range(max(100, calls // 10)):
                time.sleep(gap)
                t = time.perf_counter()
                run("noop")
                lat.append((time.perf_counter() - t) * 1e6)
            wall = time.monotonic() - t0
            cpu = [b - a for a, b in zip(cpu0, ex.collective_rpc("cpu_s"), strict=True)]
            out["spaced"] = {"p50_us": statistics.median(lat),
                             "worker_cpu_share": max(cpu) / wall}
        return out


# -- vLLM's MessageQueue -------------------------------------------------------------------

def _vllm_worker(handle: Any, rank: int, conn: Any) -> None:
    """vLLM's worker side: reader ``rank`` of the broadcast queue, writer of its own
    reply queue, whose handle goes back to the driver (as vLLM's executor does it)."""
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    req = MessageQueue.create_from_handle(handle, rank)
    rep = MessageQueue(1, 1, max_chunk_bytes=1 << 20, max_chunks=8)
    conn.send(rep.export_handle())
    req.wait_until_ready()
    rep.wait_until_ready()
    while True:
        msg = req.dequeue()
        if msg == "stop":
            return
        rep.enqueue(None)


def vllm_round_trip(world: int, calls: int, warmup: int) -> dict[str, float] | str:
    try:
        from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
    except Exception as e:  # not installed, or its imports are missing
        return f"vLLM's shm_broadcast not importable ({type(e).__name__}: {e})"
    req = MessageQueue(world, world, max_chunk_bytes=1 << 20, max_chunks=8)
    ctx = mp.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(world)]
    procs = [ctx.Process(target=_vllm_worker, args=(req.export_handle(), r, pipes[r][1]),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    readers = [MessageQueue.create_from_handle(a.recv(), 0) for a, _ in pipes]
    req.wait_until_ready()
    for r in readers:
        r.wait_until_ready()
    call = ("execute", "noop", (), {})

    def once() -> None:
        req.enqueue(call)
        for r in readers:
            r.dequeue()

    try:
        return time_calls(once, calls, warmup)
    finally:
        req.enqueue("stop")
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()


def main() -> int:
    ap = arg_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,2,4,8", help="world sizes, comma-separated")
    ap.add_argument("--calls", type=int, default=2000, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=300, help="untimed calls before them")
    ap.add_argument("--gap-ms", type=float, default=5.0,
                    help="spacing of the spaced mode (0: skip it)")
    ap.add_argument("--floor-factor", type=float, default=4.0,
                    help="target: compiled no-op p50 <= this x the floor")
    ap.add_argument("--vllm-path", default=None, metavar="DIR",
                    help="a directory to import vLLM's shm_broadcast from (default: "
                         "vLLM as installed; without it vLLM's queue is not measured)")
    add_out_option(ap)
    args = ap.parse_args()
    if args.vllm_path:
        sys.path.insert(0, args.vllm_path)
    sizes = [int(s) for s in args.sizes.split(",")]
    if ringcore.load("auto").NAME != "compiled":
        print(f"note: {ringcore.describe()}; only the pure-Python core is measured",
              file=sys.stderr)
    cores = ["compiled", "python"] if ringcore.load("auto").NAME == "compiled" else ["python"]
    codec_us = msgspec_small(20000)
    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    targets: list[tuple[str, str, bool | None]] = []
    for n in sizes:
        floor = floor_round_trip(n, args.calls, args.warmup)["p50_us"]
        got = {c: gpuexec_run(n, c, args.calls, args.warmup, args.gap_ms) for c in cores}
        vllm = vllm_round_trip(n, args.calls, args.warmup)
        vllm_us = vllm["p50_us"] if isinstance(vllm, dict) else None
        best = got[cores[0]]
        noop, small = best["noop"]["p50_us"], best["small"]["p50_us"]
        py_noop = got["python"]["noop"]["p50_us"]
        spaced = best.get("spaced")
        checks = [
            (f"world {n}: no-op p50 <= {args.floor_factor:g}x floor",
             f"{noop / floor:.1f}x", noop <= args.floor_factor * floor),
            (f"world {n}: small arguments p50 <= 1.5x no-op", f"{small / noop:.2f}x",
             small <= 1.5 * noop),
            (f"world {n}: >= 5x faster than vLLM's queue",
             "-" if vllm_us is None else f"{vllm_us / noop:.1f}x",
             None if vllm_us is None else noop * 5 <= vllm_us),
            (f"world {n}: worker CPU <= 5 % with calls {args.gap_ms:g} ms apart",
             "-" if not spaced else f"{100 * spaced['worker_cpu_share']:.1f} %",
             None if not spaced else spaced["worker_cpu_share"] <= 0.05)]
        targets.extend(checks)
        rows.append([n, f"{floor:.2f}", f"{noop:.1f}", f"{small:.1f}", f"{py_noop:.1f}",
                     f"{py_noop / noop:.2f}", f"{noop / floor:.1f}",
                     "-" if vllm_us is None else f"{vllm_us:.1f}",
                     "-" if vllm_us is None else f"{vllm_us / noop:.1f}",
                     "-" if not spaced else f"{spaced['p50_us']:.0f}",
                     "-" if not spaced else f"{100 * spaced['worker_cpu_share']:.1f}"])
        results.append({"world": n, "floor_us": floor, "cores": got, "vllm": vllm})
    print(f"ring core: {ringcore.load('auto').NAME}; msgspec encode+decode of a small call "
          f"and its reply: {codec_us:.2f} us; targets: compiled no-op <= "
          f"{args.floor_factor:g}x floor, small <= 1.5x no-op, >= 5x vLLM, spaced worker "
          f"CPU <= 5 % (p50, microseconds)")
    if not isinstance(results[0]["vllm"], dict):
        print(f"vLLM: {results[0]['vllm']}")
    print_table(["world", "floor", "noop", "small", "py noop", "py/compiled", "x floor",
                 "vLLM", "vLLM/ours", f"{args.gap_ms:g}ms apart", "worker cpu %"], rows)
    verdicts = print_targets(targets)
    path = write_json("hot_path.json", {"machine": machine(), "codec_us": codec_us,
                                        "floor_factor": args.floor_factor,
                                        "results": results, "targets": verdicts}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time from ``Executor(...)`` to every worker ready (torch imported, device initialised).

For each start method (spawn, forkserver, subprocess, zygote first start and warm
start) and world size, a fresh driver process builds an executor whose workers import
torch and, on a GPU host, create their CUDA context; the driver never touches CUDA
itself. The floor, measured in the same run, is CUDA's own initialisation: a process
that has already imported torch, timed from its first CUDA call to a ready context on
its device (CPU hosts have no floor). On GPU hosts ``isolate_devices=True`` is also
timed (warm zygote), to see whether one visible device per worker shortens CUDA's
initialisation. Targets: warm zygote within 1.3x of the floor at 4 GPUs and at
least 3x faster than spawn; on CPU at least 3x faster than spawn.
Usage: ``python benchmarks/startup.py [--sizes 1,2,4] [--repeats 3] [--out DIR]``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_out_option,
    arg_parser,
    machine,
    print_table,
    print_targets,
    write_json,
)

from gpuexec import Worker  # noqa: E402
from gpuexec.executor.config import visible_gpu_count  # noqa: E402


class TorchWorker(Worker):
    """Ready means: torch imported and, on a GPU, a context on this worker's device."""

    def __init__(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.zeros(1, device=self.device)


ONE_RUN = """
import sys, time, json
sys.path[:0] = {paths!r}
from gpuexec import Executor
out = []
for i in range({count}):
    t = time.perf_counter()
    ex = Executor("startup:TorchWorker", {world}, start_method={method!r},
                  isolate_devices={isolate!r}, keep_zygote=True)
    out.append(time.perf_counter() - t)
    ex.shutdown()
print("RESULT", json.dumps(out))
"""

FLOOR = """
import time, torch
t = time.perf_counter()
torch.zeros(1, device="cuda:0")
torch.cuda.synchronize()
print("RESULT", time.perf_counter() - t)
"""


def _run(code: str) -> Any:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")) if p))
    env.pop("GPUEXEC_START_METHOD", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, env=env, cwd=str(ROOT))
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"run failed ({r.returncode}): {r.stderr[-2000:]}")


def measure(method: str, world: int, isolate: bool, count: int) -> list[float]:
    paths = [str(ROOT), str(ROOT / "benchmarks")]
    return list(_run(ONE_RUN.format(paths=paths, count=count, world=world, method=method,
                                    isolate=isolate)))


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--sizes", default="", metavar="N,N,...",
                    help="world sizes (default: 1, 2, 4, 8 up to the GPU count; 1, 2, 4 on CPU)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh drivers per configuration")
    add_out_option(ap)
    args = ap.parse_args()
    gpus = visible_gpu_count()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else \
        [n for n in (1, 2, 4, 8) if (n <= gpus if gpus else n <= 4)]
    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    floor = statistics.median(_run(FLOOR) for _ in range(args.repeats)) if gpus else None
    for world in sizes:
        cells: dict[str, float] = {}
        for method in ("spawn", "forkserver", "subprocess"):
            cells[method] = statistics.median(
                measure(method, world, False, 1)[0] for _ in range(args.repeats))
        first, warm = [], []
        for _ in range(args.repeats):
            times = measure("zygote", world, False, 3)
            first.append(times[0])
            warm.append(statistics.median(times[1:]))
        cells["zygote first"] = statistics.median(first)
        cells["zygote warm"] = statistics.median(warm)
        if gpus:
            cells["zygote warm isolated"] = statistics.median(
                statistics.median(measure("zygote", world, True, 3)[1:])
                for _ in range(args.repeats))
        speedup = cells["spawn"] / cells["zygote warm"]
        vs_floor = cells["zygote warm"] / floor if floor else None
        rows.append([world, *(f"{cells[k]:.3f}" for k in cells), f"{speedup:.1f}x",
                     f"{vs_floor:.2f}x" if vs_floor else "-"])
        results.append({"world_size": world, "seconds": cells, "spawn_over_zygote_warm": speedup,
                        "zygote_warm_over_floor": vs_floor})
    heads = ["world", "spawn s", "forkserver s", "subprocess s", "zygote first s",
             "zygote warm s"] + (["zygote warm isolated s"] if gpus else []) + \
        ["spawn / zygote warm", "zygote warm / floor"]
    print_table(heads, rows)
    if floor:
        print(f"floor (CUDA init in a process that imported torch): {floor:.3f} s")
    checks: list[tuple[str, str, bool | None]] = []
    for r in results:
        checks.append((f"world {r['world_size']}: zygote warm >= 3x faster than spawn",
                       f"{r['spawn_over_zygote_warm']:.1f}x",
                       r["spawn_over_zygote_warm"] >= 3))
        if r["world_size"] == 4 and gpus:
            checks.append(("4 GPUs: zygote warm within 1.3x of the floor",
                           f"{r['zygote_warm_over_floor']:.2f}x",
                           r["zygote_warm_over_floor"] <= 1.3))
    targets = print_targets(checks)
    path = write_json("startup.json", {"machine": machine(), "floor_s": floor,
                                       "repeats": args.repeats, "results": results,
                                       "targets": targets}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stale CUDA primary contexts: MiB each worker holds on GPUs not its own, release off/on.

Every worker imports a module that probes GPU 0 at import time (the common way a stale
context appears: a library calling ``torch.cuda.mem_get_info(0)`` or similar). With
``release_stale_contexts=False`` that context stays; with it on, ``init_device``
releases it. NVML measures each worker's memory on every GPU; the worker's report says
how long the release took. Targets: 0 MiB on foreign GPUs for every worker; the release
adds at most 5 ms. Usage: ``python benchmarks/stale_contexts.py [--out DIR]`` on a host
with two or more GPUs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_out_option,
    arg_parser,
    machine,
    print_table,
    print_targets,
    write_json,
)

from gpuexec import Executor  # noqa: E402
from gpuexec.executor.config import visible_gpu_count  # noqa: E402


def measure(release: bool, world: int) -> list[dict[str, Any]]:
    import pynvml

    pynvml.nvmlInit()
    t = time.perf_counter()
    with Executor("cuda_workers:GpuWorker", world, release_stale_contexts=release,
                  env={"GPUEXEC_TEST_TOUCH_GPU0": "1"}) as ex:
        start_s = time.perf_counter() - t
        time.sleep(0.3)
        rows = []
        for w, rep in zip(ex.workers, ex.device_reports, strict=True):
            mem: dict[int, float] = {}
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.pid == w.pid:
                        mem[i] = (p.usedGpuMemory or 0) / 2**20
            own = rep.nvml_index if rep.nvml_index is not None else w.gpu
            rows.append({"rank": w.rank, "release": release, "own_gpu": own,
                         "own_mib": mem.get(own or 0, 0.0),
                         "foreign_mib": sum(v for k, v in mem.items() if k != own),
                         "foreign_by_gpu": {k: v for k, v in mem.items() if k != own},
                         "release_ms": rep.release_ms, "init_device_ms": rep.elapsed_ms,
                         "actions": [f"cuda:{a.device} {a.action}" for a in rep.actions],
                         "start_s": start_s})
        return rows


def main() -> int:
    ap = arg_parser(__doc__)
    add_out_option(ap)
    args = ap.parse_args()
    world = visible_gpu_count()
    if world < 2:
        print("stale_contexts: needs two or more GPUs; skipped")
        return 0
    rows = measure(False, world) + measure(True, world)
    print_table(["release", "rank", "own GPU MiB", "foreign MiB", "release ms",
                 "init_device ms", "actions"],
                [[r["release"], r["rank"], r["own_mib"], r["foreign_mib"], r["release_ms"],
                  r["init_device_ms"], "; ".join(r["actions"])] for r in rows])
    on = [r for r in rows if r["release"]]
    worst_foreign = max(r["foreign_mib"] for r in on)
    worst_ms = max(r["release_ms"] for r in on)
    targets = print_targets([
        ("release on: no MiB left on another rank's GPU", f"max {worst_foreign:.0f} MiB",
         worst_foreign == 0),
        ("release on: each release <= 5 ms", f"max {worst_ms:.2f} ms", worst_ms <= 5)])
    path = write_json("stale_contexts.json", {"machine": machine(), "world_size": world,
                                              "rows": rows, "targets": targets}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Suspend/resume through the CUDA driver's checkpoint API vs. moving tensors by hand.

One worker per size holds ``GIB`` GiB in one tensor plus cuBLAS state and a captured
CUDA graph (``tests/cuda_workers.py:ParkedWorker``). Measured in the same run, per size:

* ``Executor.suspend()`` / ``resume()`` wall time, the driver's own lock / checkpoint /
  restore / unlock times (from the reports), GPU memory freed (NVML, whole device), and
  whether graph replay, a matmul and the big tensor are bit-identical after resume;
* the baseline an engine would write itself: the big tensor copied to pinned host memory
  and its device storage freed, then allocated and copied back (pinning, with
  ``cudaHostRegister``, timed apart: an engine can keep the buffer). It cannot move the
  graph's tensors (a replay reads the captured addresses) nor cuBLAS or NCCL state; the
  checkpoint moves everything;
* probes: a worker that holds pinned host memory from torch's caching host allocator
  (kept, or freed back to torch's cache), suspended: does the checkpoint accept it, and
  what does a failure leave behind?

GB/s: bytes the worker had reserved on the GPU (checkpoint) or the tensor's bytes
(baseline) over the copy time. Usage: ``python benchmarks/suspend.py [--gib 1 8 32]
[--out DIR]`` on a host with a GPU and NVIDIA driver 570+.
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

from _common import add_out_option, arg_parser, machine, print_table, write_json  # noqa: E402

from gpuexec import Executor  # noqa: E402

GIB = 2**30


def used_mib(index: int = 0) -> float:
    import pynvml

    pynvml.nvmlInit()
    return float(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used
                 ) / 2**20


def measure(gib: float) -> dict[str, Any]:
    with Executor("cuda_workers:ParkedWorker", 1, device="cuda") as ex:
        report = ex.device_reports[0]
        loaded = ex.collective_rpc("load", args=(gib,), unique_reply_rank=0)
        gpu = report.nvml_index or 0
        row: dict[str, Any] = {"gib": gib, "checkpointable": report.checkpointable,
                               "big_bytes": loaded["big_bytes"],
                               "reserved_bytes": loaded["reserved_bytes"]}
        # baseline first (its pinned buffer is gone before the checkpoint)
        off = ex.collective_rpc("pinned_offload", unique_reply_rank=0)
        base_freed = used_mib(gpu)
        back = ex.collective_rpc("pinned_reload", unique_reply_rank=0)
        row["pinned"] = {"alloc_s": off["alloc_s"], "offload_s": off["copy_s"],
                         "reload_s": back["copy_s"],
                         "offload_gbps": loaded["big_bytes"] / off["copy_s"] / 1e9,
                         "reload_gbps": loaded["big_bytes"] / back["copy_s"] / 1e9}
        row["pinned"]["intact"] = ex.collective_rpc("verify", unique_reply_rank=0)
        before = used_mib(gpu)
        row["pinned"]["freed_mib"] = before - base_freed
        t = time.perf_counter()
        (sus,) = ex.suspend()
        suspend_s = time.perf_counter() - t
        parked = used_mib(gpu)
        held = ex.collective_rpc("verify", non_block=True)  # waits in the driver
        ex.check_health()  # a parked worker still answers pings
        held_while_suspended = not held.done()
        t = time.perf_counter()
        (res,) = ex.resume()
        resume_s = time.perf_counter() - t
        intact = held.result(timeout=120)[0]
        moved = loaded["reserved_bytes"]
        row["checkpoint"] = {
            "suspend_s": suspend_s, "resume_s": resume_s, "steps_suspend": sus.steps,
            "steps_resume": res.steps, "freed_mib": before - parked,
            "report_gpu_mib": sus.gpu_mib, "report_host_bytes": sus.host_bytes,
            "checkpoint_gbps": moved / sus.steps["checkpoint"] / 1e9,
            "restore_gbps": moved / res.steps["restore"] / 1e9,
            "held_while_suspended": held_while_suspended, "intact": intact}
        return row


def pinned_probe(mib: int, keep: bool) -> dict[str, Any]:
    """Suspend a worker holding ``mib`` MiB of torch-pinned host memory (``keep`` False:
    freed back to torch's pinned cache, which stays page-locked)."""
    from gpuexec.errors import CheckpointError

    with Executor("cuda_workers:ParkedWorker", 1, device="cuda") as ex:
        ex.collective_rpc("load", args=(1.0,))
        ex.collective_rpc("pin", args=(mib, keep))
        out: dict[str, Any] = {"pinned_mib": mib, "kept": keep}
        try:
            ex.suspend(timeout=60)
        except CheckpointError as e:
            out.update(suspended=False, error=str(e), states=e.states,
                       usable_after=_usable(ex))
            try:
                out["resume_after_failure"] = [r.state for r in ex.resume(timeout=60)]
            except Exception as e2:  # recorded: what a user would see
                out["resume_after_failure"] = f"{type(e2).__name__}: {e2}"
            t = time.perf_counter()
            ex.shutdown()
            out["shutdown_s"] = time.perf_counter() - t
            return out
        ex.resume(timeout=60)
        out.update(suspended=True, intact=ex.collective_rpc("verify")[0])
        return out


def _usable(ex: Executor) -> Any:
    try:
        return ex.collective_rpc("verify", timeout=20)[0]
    except Exception as e:  # recorded, not raised: this is the probe's result
        return f"{type(e).__name__}: {e}"


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, nargs="+", default=[1.0, 8.0, 32.0],
                        help="GiB of GPU memory each measurement parks and restores")
    add_out_option(parser)
    parser.add_argument("--probes", default="64:keep,1024:keep,1024:free",
                        help="pinned-memory probes, MiB:keep|free, comma-separated ('' none)")
    args = parser.parse_args()
    rows = [measure(g) for g in args.gib]
    probes = []
    for item in filter(None, args.probes.split(",")):
        mib, how = item.split(":")
        probes.append(pinned_probe(int(mib), how == "keep"))
        print(f"pinned-memory probe: {probes[-1]}")
    print_table(
        ["GiB", "suspend s", "resume s", "freed MiB", "ckpt GB/s", "restore GB/s",
         "pinned out GB/s", "pinned in GB/s", "pin alloc s", "intact (ckpt/pinned)"],
        [[r["gib"], r["checkpoint"]["suspend_s"], r["checkpoint"]["resume_s"],
          r["checkpoint"]["freed_mib"], r["checkpoint"]["checkpoint_gbps"],
          r["checkpoint"]["restore_gbps"], r["pinned"]["offload_gbps"],
          r["pinned"]["reload_gbps"], r["pinned"]["alloc_s"],
          f"{all(r['checkpoint']['intact'].values())}/{all(r['pinned']['intact'].values())}"]
         for r in rows])
    path = write_json("suspend.json", {"machine": machine(), "rows": rows,
                                        "pinned_probes": probes}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""``python -m gpuexec demo | doctor``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def doctor() -> int:
    """What this machine and this process look like to gpuexec."""
    from .executor.config import visible_gpu_count
    from .executor.start_method import cuda_state, resolve_start_method
    from .worker import nvml
    from .worker.cuda_driver import load_driver

    # Read this process's own state first: loading the driver below maps libcuda.
    state = cuda_state()
    _, reason = resolve_start_method("auto")
    print(f"this process: {state.describe()}")
    print(f"start_method='auto' would choose: {reason}")
    gpus = visible_gpu_count()
    print(f"visible GPUs: {gpus}")
    driver = load_driver()
    if driver is None:
        print("CUDA driver: not found (no libcuda.so.1): CPU workers only")
        return 0
    try:
        print(f"CUDA driver: {driver.describe()}")
    except Exception as e:  # a broken driver install is a finding, not a crash
        print(f"CUDA driver: {driver.path} ({e})")
    if not nvml.available():
        print("NVML: pynvml not installed; cannot list processes holding GPU memory")
        return 0
    several = nvml.processes_on_several_gpus()
    if not several:
        print("processes holding memory on more than one GPU: none")
    for pid, gpus_mib in sorted(several.items()):
        held = ", ".join(f"GPU {i}: {mib:.0f} MiB" for i, mib in sorted(gpus_mib.items()))
        print(f"pid {pid} holds memory on {len(gpus_mib)} GPUs ({held})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuexec")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="start workers, run a few calls, print a report")
    demo.add_argument("--world-size", type=int, default=None)
    demo.add_argument("--calls", type=int, default=2000)
    sub.add_parser("doctor", help="report CUDA and start-method facts")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.world_size, args.calls)
    return doctor()


if __name__ == "__main__":
    sys.exit(main())

"""The ``gpuexec`` command (also ``python -m gpuexec``): ``demo``, ``doctor`` and ``stacks``.

Argument errors exit with status 2 and a one-line usage message (argparse), never a
traceback; values that cannot work (``--calls 0``, ``--world-size 0``) are refused
before any worker starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from .errors import CudaDriverError

if TYPE_CHECKING:
    from .worker.cuda_driver import CudaDriver


def doctor() -> int:
    """What this machine and this process look like to gpuexec."""
    from . import nvml
    from .cuda_state import cuda_state
    from .executor.calls import describe_steps
    from .executor.config import visible_gpu_count
    from .executor.start_method import resolve_start_method
    from .ipc import ringcore
    from .optional import torch_installed
    from .worker.cuda_driver import load_driver

    # Read this process's own state first: loading the driver below maps libcuda.
    state = cuda_state()
    _, reason = resolve_start_method("auto")
    print(f"this process: {state.describe()}")
    print(f"start_method='auto' would choose: {reason}")
    print("torch: " + ("installed" if torch_installed() else
                       "not installed (tensor payloads and distributed_backend need it: "
                       "pip install 'gpuexec[torch]')"))
    print(f"shared-memory ring core: {ringcore.describe()}")
    print(f"call table steps: {describe_steps()}")
    driver = load_driver()
    if driver is None:
        nodes = visible_gpu_count()
        print("visible GPUs: 0" + (f" ({nodes} NVIDIA device node(s), but no CUDA driver "
                                   "library)" if nodes else ""))
        print("CUDA driver: not found (no libcuda.so.1): CPU workers only")
        return 0
    try:
        print(f"CUDA driver: {driver.describe()}")
    except Exception as e:  # a broken driver install is a finding, not a crash
        print(f"CUDA driver: {driver.path} ({e})")
    for line in gpu_lines(driver):
        print(line)
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


def gpu_lines(driver: CudaDriver) -> list[str]:
    """Every GPU the CUDA driver reports to this process (after ``CUDA_VISIBLE_DEVICES``):
    ordinal, name, memory, compute capability, and whether this process holds its primary
    context. Asks libcuda itself (``cuInit`` in this process), so it needs no torch and
    sees what workers will see; a query that fails is reported on its line."""
    try:
        driver.init()
        count = driver.device_count()
    except CudaDriverError as e:
        return [f"visible GPUs: 0 ({e})"]
    lines = [f"visible GPUs: {count}"]
    for ordinal in range(count):
        try:
            dev = driver.device(ordinal)
            major, minor = driver.compute_capability(dev)
            gib = driver.device_memory(dev) / (1 << 30)
            _, active = driver.primary_ctx_state(dev)
            lines.append(f"  GPU {ordinal}: {driver.device_name(dev)}, {gib:.1f} GiB, "
                         f"compute capability {major}.{minor}, context in this process: "
                         f"{'yes' if active else 'no'}")
        except CudaDriverError as e:
            lines.append(f"  GPU {ordinal}: {e}")
    return lines


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (anything else is a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def build_parser(prog: str = "gpuexec") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="gpuexec: a CUDA-aware multi-process worker executor.")
    parser.add_argument("--version", action="version", version=f"gpuexec {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{demo,doctor,stacks}",
                                help="what to do")
    demo = sub.add_parser(
        "demo", help="start workers, check a matrix product on each, time no-op calls",
        description="Start workers, run a seeded matrix product on every rank and check it "
                    "against the driver's own result, then time no-op collective_rpc calls.")
    demo.add_argument("--world-size", type=positive_int, default=None, metavar="N",
                      help="number of workers (default: one per visible GPU, else 2 on "
                           "the CPU)")
    demo.add_argument("--calls", type=positive_int, default=2000, metavar="N",
                      help="no-op calls timed for the p50/p99 round trip (default: 2000)")
    sub.add_parser("doctor", help="report CUDA, torch and start-method facts",
                   description="Report what this machine and this process look like to "
                               "gpuexec: CUDA state, the start method 'auto' picks, the CUDA "
                               "driver, every GPU it reports (name, memory, compute "
                               "capability, whether this process has a context on it), "
                               "processes holding memory on several GPUs.")
    stacks = sub.add_parser(
        "stacks", help="print every thread's stack of each worker of a running driver",
        description="Print every thread's Python stack in each worker of the executors of "
                    "the driver process PID (or of the worker PID alone), as the workers' "
                    "signal handlers write them; works while a worker holds the GIL. Same "
                    "user only; not for executors on transport='tcp' (give a worker's pid).")
    stacks.add_argument("pid", type=positive_int, metavar="PID",
                        help="the driver's (or one worker's) process id")
    stacks.add_argument("--timeout", type=float, default=1.0, metavar="S",
                        help="seconds to wait for the answers (default: 1)")
    return parser


def print_stacks(pid: int, timeout: float) -> int:
    """``gpuexec stacks PID``: 0 when stacks were printed, 1 when no worker was found."""
    from .executor.stacks import collect, find_workers

    found = find_workers(pid)
    if not found:
        print(f"no gpuexec workers found for process {pid} (a driver on transport='tcp' "
              "is not found this way: give a worker's pid)", file=sys.stderr)
        return 1
    for directory, pids in sorted(found.items()):
        for rank, text in collect(directory, pids, timeout).items():
            print(f"--- rank {rank} (pid {pids[rank]}) ---\n{text.rstrip()}\n")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "gpuexec") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo
        from .errors import ConfigError

        try:
            return run_demo(args.world_size, args.calls)
        except ConfigError as e:  # e.g. more workers than GPUs: a usage error, not a crash
            parser.exit(2, f"{prog} demo: error: {e}\n")
    if args.command == "stacks":
        if not args.timeout > 0:
            parser.exit(2, f"{prog} stacks: error: --timeout must be positive\n")
        return print_stacks(args.pid, args.timeout)
    return doctor()


if __name__ == "__main__":
    sys.exit(main())

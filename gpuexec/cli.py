"""The ``gpuexec`` command (also ``python -m gpuexec``): ``demo`` and ``doctor``.

Argument errors exit with status 2 and a one-line usage message (argparse), never a
traceback; values that cannot work (``--calls 0``, ``--world-size 0``) are refused
before any worker starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def doctor() -> int:
    """What this machine and this process look like to gpuexec."""
    from .cuda_state import cuda_state
    from .executor.config import visible_gpu_count
    from .executor.start_method import resolve_start_method
    from .ipc import ringcore
    from .optional import torch_installed
    from .worker import nvml
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,doctor}",
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
                               "gpuexec: CUDA state, the start method 'auto' picks, GPUs, "
                               "the CUDA driver, processes holding memory on several GPUs.")
    return parser


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
    return doctor()


if __name__ == "__main__":
    sys.exit(main())

"""``python -m gpuexec demo | doctor``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def doctor() -> int:
    """What this machine and this process look like to gpuexec."""
    from .executor.config import visible_gpu_count
    from .executor.start_method import cuda_state, resolve_start_method
    from .worker.cuda_driver import load_driver

    driver = load_driver()
    print(f"CUDA driver library: {driver.path if driver else 'not found (no CUDA driver)'}")
    print(f"visible GPUs: {visible_gpu_count()}")
    print(f"this process: {cuda_state().describe()}")
    _, reason = resolve_start_method("auto")
    print(f"start_method='auto' would choose: {reason}")
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

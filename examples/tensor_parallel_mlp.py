"""Tensor-parallel MLP on gpuexec workers, checked against a single-process reference.

    python examples/tensor_parallel_mlp.py --world-size 2 --device cpu          # gloo
    python examples/tensor_parallel_mlp.py --world-size 2 --device cuda         # NCCL

Each worker builds the full weights from the seed and keeps its shard (see
``tp_mlp.py``); the driver builds the same weights, runs the unsharded model and prints
the relative error of the workers' output. Exit status 1 when it is above 1e-5 (fp32).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    import torch  # noqa: F401  (the model is torch; gpuexec itself does not need it)
except ModuleNotFoundError:
    sys.exit("this example needs torch: pip install 'gpuexec[torch]'")

from tp_mlp import TPMLPWorker, build_weights, make_input, reference_forward, relative_error

from gpuexec import ConfigError, Executor
from gpuexec.cli import positive_int
from gpuexec.executor.config import visible_gpu_count

TOLERANCE = 1e-5


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The options both examples share: workers, device, backend, seed."""
    p.add_argument("--world-size", type=positive_int, default=2, metavar="N",
                   help="tensor-parallel workers; must divide the hidden size (default: 2)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                   help="where the workers compute (default: auto, cuda when a GPU is visible)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                   help="torch.distributed backend (default: nccl on cuda, gloo on cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights (default: 0)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(p)
    p.add_argument("--batch", type=positive_int, default=32, metavar="N",
                   help="rows of the input (default: 32)")
    p.add_argument("--d-in", type=positive_int, default=256, metavar="N",
                   help="input features (default: 256)")
    p.add_argument("--d-hidden", type=positive_int, default=1024, metavar="N",
                   help="hidden features, split across the workers (default: 1024)")
    p.add_argument("--d-out", type=positive_int, default=256, metavar="N",
                   help="output features (default: 256)")
    args = p.parse_args(argv)
    if args.d_hidden % args.world_size:
        p.error(f"--d-hidden {args.d_hidden} does not divide by --world-size "
                f"{args.world_size}")
    return args


def resolve(device: str, backend: str | None) -> tuple[str, str]:
    """("cuda" | "cpu", backend) the way the executor resolves ``device="auto"``."""
    if device == "auto":
        device = "cuda" if visible_gpu_count() > 0 else "cpu"
    return device, backend or ("nccl" if device == "cuda" else "gloo")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, backend = resolve(args.device, args.backend)
    dims = (args.d_in, args.d_hidden, args.d_out)
    x = make_input(args.seed, args.batch, args.d_in)
    t = time.perf_counter()
    try:
        ex = Executor(TPMLPWorker, args.world_size, device=device, distributed_backend=backend,
                      worker_args=(args.seed, *dims))
    except ConfigError as e:  # e.g. --device cuda without a GPU: refused before any start
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    with ex:
        started = time.perf_counter() - t
        outs = ex.collective_rpc("forward", args=(x,))
    # The reference runs only now: a driver that ran multi-threaded torch kernels before
    # forking gives children whose first parallel kernel can hang (OpenMP is not
    # fork-safe), which matters where start_method="auto" falls back to fork.
    ref = reference_forward(build_weights(args.seed, *dims), x)
    err = max(relative_error(out, ref) for out in outs)  # every rank holds the output
    print(f"tensor-parallel MLP {args.d_in}->{args.d_hidden}->{args.d_out}, batch "
          f"{args.batch}: world_size={args.world_size} device={device} backend={backend} "
          f"(start {started:.2f} s, {ex.start_method})")
    ok = err <= TOLERANCE
    print(f"relative error vs single-process reference: {err:.3e} "
          f"({'ok' if ok else 'FAILED'}, tolerance {TOLERANCE:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

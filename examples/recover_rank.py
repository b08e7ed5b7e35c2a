"""A tensor-parallel model that keeps serving when one of its ranks is SIGKILLed.

    python examples/recover_rank.py --world-size 4 --device cpu            # gloo
    python examples/recover_rank.py --world-size 2 --device cuda           # NCCL
    python examples/recover_rank.py --auto          # recovered by on_worker_death="respawn"

The model is the tensor-parallel MLP of ``tp_mlp.py``: each rank holds a shard, and every
forward step ends in an all-reduce over the process group. The driver serves a stream of
requests; in the middle it SIGKILLs one rank (``--kill-rank``, default the last), the
call in flight fails with ``WorkerDiedError``, and the driver calls
``Executor.respawn()`` (or, with ``--auto``, lets ``on_worker_death="respawn"`` do it):
a new process takes the dead rank's place, rebuilds its shard from the seed (its
``__init__``, as at the first start), the survivors abort the old group and every rank
joins a new one. Serving then goes on.

It checks, and exits 1 unless all hold:

* every output after the recovery is bitwise identical to the output of the same
  request before the death, and matches the single-process reference;
* the survivors' step counters went on from where they were (they were not restarted),
  the new rank's counter started again from zero;
* ``on_peers_replaced`` ran on every survivor.

It prints the time from the SIGKILL to the first correct answer after the recovery.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    import torch
except ModuleNotFoundError:
    sys.exit("this example needs torch: pip install 'gpuexec[torch]'")

from tensor_parallel_mlp import add_model_options, resolve
from tp_mlp import TPMLPWorker, build_weights, make_input, reference_forward, relative_error

from gpuexec import ConfigError, Executor, WorkerDiedError
from gpuexec.cli import positive_int

TOLERANCE = 1e-5
DIMS = (256, 1024, 256)


class ServingShard(TPMLPWorker):
    """A rank of the served model: its shard, and what it has done since it started."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed, *DIMS, threads=1)  # one thread: the same sums every time
        self.steps = 0
        self.peers_replaced: list[int] = []

    def step(self, x: torch.Tensor) -> torch.Tensor | None:
        """One forward step; the output comes back from rank 0 only."""
        self.steps += 1
        y = self.shard.forward(x)
        return y.cpu() if self.rank == 0 else None

    def state(self) -> tuple[int, list[int], int]:
        return self.steps, self.peers_replaced, os.getpid()

    def on_peers_replaced(self, ranks: list[int]) -> None:
        self.peers_replaced.extend(ranks)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(p)
    p.add_argument("--requests", type=positive_int, default=20, metavar="N",
                   help="requests served; the kill comes after half of them (default: 20)")
    p.add_argument("--kill-rank", type=int, default=None, metavar="R",
                   help="the rank to SIGKILL (default: the last)")
    p.add_argument("--auto", action="store_true",
                   help="recover with on_worker_death='respawn' instead of calling respawn()")
    args = p.parse_args(argv)
    if DIMS[1] % args.world_size:
        p.error(f"--world-size {args.world_size} must divide the hidden size {DIMS[1]}")
    if args.kill_rank is None:
        args.kill_rank = args.world_size - 1
    if not 0 <= args.kill_rank < args.world_size:
        p.error(f"--kill-rank must be a rank in 0..{args.world_size - 1}")
    return args


def serve(ex: Executor, x: torch.Tensor) -> torch.Tensor:
    out = ex.collective_rpc("step", args=(x,), unique_reply_rank=0)
    assert isinstance(out, torch.Tensor)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, backend = resolve(args.device, args.backend)
    inputs = [make_input(args.seed + i, 8, DIMS[0]) for i in range(args.requests)]
    half = args.requests // 2
    try:
        ex = Executor(ServingShard, args.world_size, device=device, distributed_backend=backend,
                      worker_args=(args.seed,), on_worker_death="respawn" if args.auto
                      else "fail")
    except ConfigError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    with ex:
        before = [serve(ex, x) for x in inputs[:half]]
        pids = [w.pid for w in ex.workers]
        victim = args.kill_rank
        t_kill = time.perf_counter()
        os.kill(pids[victim], signal.SIGKILL)
        try:  # the call in flight, or the next one, sees the death
            while True:
                serve(ex, inputs[half])
                if ex.is_failed:
                    break
        except WorkerDiedError as e:
            print(f"request {half}: {type(e).__name__}: {e}".splitlines()[0])
        if args.auto:
            while ex.is_failed or ex.dead_ranks:  # the executor replaces the rank itself
                time.sleep(0.001)
            how = f"automatic: {ex.recoveries[-1].detail}"
        else:
            (report,) = ex.respawn()
            how = (f"respawn(): rank {report.rank} pid {report.old_pid} ({report.old_signal}) "
                   f"-> pid {report.new_pid} in {report.seconds:.3f} s")
        first = serve(ex, inputs[0])
        recovered = time.perf_counter() - t_kill
        after = [first] + [serve(ex, x) for x in inputs[1:]]
        states = ex.collective_rpc("state")
    same = all(torch.equal(a, b) for a, b in zip(before, after[:half], strict=True))
    weights = build_weights(args.seed, *DIMS)
    err = max(relative_error(out, reference_forward(weights, x))
              for out, x in zip(after, inputs, strict=True))
    steps = [s for s, _, _ in states]
    expected = [half + 1 + args.requests if r != victim else args.requests
                for r in range(args.world_size)]
    survivors_ok = all(steps[r] >= expected[r] for r in range(args.world_size)
                       if r != victim) and steps[victim] == args.requests
    hooks_ok = all(states[r][1] == [victim] for r in range(args.world_size) if r != victim)
    print(f"tensor-parallel MLP, world_size={args.world_size} device={device} "
          f"backend={backend} start_method={ex.start_method}")
    print(f"SIGKILL rank {victim} after {half} requests; {how}")
    print(f"recovered: {recovered * 1000:.1f} ms from SIGKILL to the first correct answer")
    print(f"outputs after recovery identical to before: {'yes' if same else 'NO'}; "
          f"relative error vs reference {err:.2e}")
    print(f"steps per rank: {steps} (the survivors went on; rank {victim} started again); "
          f"pids {[p for _, _, p in states]} (was {pids})")
    print(f"on_peers_replaced([{victim}]) on every survivor: {'yes' if hooks_ok else 'NO'}")
    ok = same and err <= TOLERANCE and survivors_ok and hooks_ok
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

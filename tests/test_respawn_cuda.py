"""On real GPUs (``pytest -m cuda``): respawn with an NCCL group.

NCCL does not notice a dead peer: a survivor blocked in a collective with it waits
until the group is aborted (the respawn's ABORT_SIGNAL). Needs two GPUs (NCCL refuses
two ranks on one GPU).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from respawn_workers import GroupWorker

from gpuexec import Executor, WorkerDiedError
from gpuexec.executor.config import visible_gpu_count

pytestmark = pytest.mark.cuda

GPUS = visible_gpu_count()
need2 = pytest.mark.skipif(GPUS < 2, reason="needs two CUDA GPUs")


def _kill(ex: Executor, rank: int) -> None:
    os.kill(ex.workers[rank].pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not ex.is_failed:
        assert time.monotonic() < deadline, "the death was never noticed"
        time.sleep(0.005)


@need2
@pytest.mark.parametrize("transport", ["shm", "zmq"])
def test_nccl_survivor_released_and_group_rebuilt(transport: str, no_leaks: None) -> None:
    world = min(GPUS, 4)
    with Executor(GroupWorker, world, device="cuda", transport=transport,
                  distributed_backend="nccl", distributed_timeout=120) as ex:
        total = float(sum(range(1, world + 1)))
        assert ex.collective_rpc("all_reduce") == [total] * world
        victim = world - 1
        stuck = ex.collective_rpc("all_reduce_without", args=(victim,),
                                  ranks=list(range(victim)), non_block=True)
        time.sleep(0.5)  # the survivors are in the collective, waiting for the victim
        _kill(ex, victim)
        with pytest.raises(WorkerDiedError):
            stuck.result(timeout=60)
        t = time.monotonic()
        (r,) = ex.respawn(timeout=120)
        print(f"NCCL respawn at world size {world}: {r.seconds:.2f} s "
              f"(wall {time.monotonic() - t:.2f} s)")
        assert r.rank == victim
        assert all(ex.collective_rpc("release_log")[:victim])  # released, not hanging
        assert ex.collective_rpc("group_size") == [world] * world
        assert ex.collective_rpc("all_reduce") == [total] * world
        assert ex.collective_rpc("replaced_log") == [[[victim]]] * victim + [[]]
        # the rank that hosts the rendezvous
        _kill(ex, 0)
        ex.respawn(timeout=120)
        assert ex.collective_rpc("all_reduce") == [total] * world


@need2
def test_nccl_stuck_rank_killed_by_respawn(no_leaks: None) -> None:
    """A rank that is alive but stuck: respawn(kill=True) is the way out."""
    with Executor(GroupWorker, 2, device="cuda", distributed_backend="nccl",
                  distributed_timeout=120) as ex:
        stuck = ex.collective_rpc("all_reduce_without", args=(1,), ranks=[0], non_block=True)
        time.sleep(0.5)
        (r,) = ex.respawn([1], kill=True, timeout=120)
        assert r.killed and r.old_signal == "SIGKILL"
        with pytest.raises(WorkerDiedError):
            stuck.result(timeout=60)
        assert ex.collective_rpc("all_reduce") == [3.0, 3.0]

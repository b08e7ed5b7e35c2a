"""On a real GPU (``pytest -m cuda``, one GPU is enough for most): suspend and resume
through the CUDA driver's checkpoint API (NVIDIA driver 570+). The tests at world size 2
need two GPUs: a collective group across the suspend, and a worker that holds a stale
context on another GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from conftest import ROOT, subprocess_env, wait_gone

from gpuexec import Executor
from gpuexec.errors import CheckpointUnsupportedError
from gpuexec.executor.config import visible_gpu_count

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(visible_gpu_count() < 1, reason="needs a CUDA GPU")]


def _process_mib(pid: int) -> float:
    import pynvml

    pynvml.nvmlInit()
    total = 0.0
    for i in range(pynvml.nvmlDeviceGetCount()):
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
            if p.pid == pid:
                total += (p.usedGpuMemory or 0) / 2**20
    return total


@pytest.mark.parametrize("start_method", ["fork", "auto"])  # fork first: NVML comes later
def test_suspend_frees_the_gpu_and_resume_keeps_graph_matmul_and_data(start_method: str) -> None:
    with Executor("cuda_workers:ParkedWorker", 1, device="cuda",
                  start_method=start_method) as ex:
        report = ex.device_reports[0]
        assert report.checkpointable, report.checkpoint_detail
        loaded = ex.collective_rpc("load", args=(2.0,), unique_reply_rank=0)
        pid = ex.workers[0].pid
        assert _process_mib(pid) >= 2048
        (sus,) = ex.suspend(timeout=120)
        assert (sus.state, sus.changed) == ("checkpointed", True)
        assert set(sus.steps) == {"lock", "checkpoint"}
        assert _process_mib(pid) == 0.0  # nothing left on any GPU
        if sus.gpu_mib is not None:
            assert sus.gpu_mib >= 2048
        assert ex.is_suspended
        pending = ex.collective_rpc("verify", non_block=True)  # held in the driver
        ex.check_health()  # the locked worker's Python still answers
        assert not pending.done()
        assert [r.changed for r in ex.suspend()] == [False]
        (res,) = ex.resume(timeout=120)
        assert (res.state, res.changed) == ("running", True)
        assert pending.result(timeout=60) == [{"graph": True, "matmul": True, "data": True}]
        assert _process_mib(pid) >= 2048
        assert ex.collective_rpc("verify") == [{"graph": True, "matmul": True, "data": True}]
        for _ in range(2):  # again and again: nothing accumulates
            assert [r.state for r in ex.suspend(timeout=120)] == ["checkpointed"]
            assert [r.state for r in ex.resume(timeout=120)] == ["running"]
        assert ex.collective_rpc("verify") == [{"graph": True, "matmul": True, "data": True}]
        print(f"suspend {sus}\nresume {res}")
        # the driver parks device memory in the worker's own host memory
        assert sus.host_bytes is not None and sus.host_bytes >= loaded["big_bytes"] // 2


def test_driver_killed_while_suspended_leaves_no_process_and_no_gpu_memory() -> None:
    script = textwrap.dedent("""
        import os, sys, time
        import psutil
        from gpuexec import Executor
        ex = Executor("cuda_workers:ParkedWorker", 1, device="cuda")
        ex.collective_rpc("load", args=(1.0,))
        ex.suspend()
        kids = [p.pid for p in psutil.Process().children(recursive=True)]
        print(" ".join(map(str, kids)), flush=True)
        time.sleep(600)
    """)
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env(**{k: v for k, v in os.environ.items()
                                                    if k.startswith(("CUDA", "NVIDIA"))}),
                              cwd=ROOT)
    try:
        assert driver.stdout is not None
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert pids, "the driver printed no children"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
        assert wait_gone(pids, timeout=10) == []
        deadline = time.monotonic() + 10
        while any(_process_mib(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in pids if _process_mib(p)] == []
        assert [p for p in pids if psutil.pid_exists(p)] == [] or wait_gone(pids) == []
    finally:
        if driver.poll() is None:
            driver.kill()


@pytest.mark.parametrize("world", [1, 2])
def test_suspend_across_an_nccl_group(world: int) -> None:
    """A process group with a live NCCL communicator survives suspend and resume: every
    rank's GPU memory goes to zero and the same all-reduce gives the same result after."""
    if visible_gpu_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    expected = [[1.5 * world * (world + 1) / 2] * 4] * world
    with Executor("cuda_workers:GroupWorker", world, device="cuda",
                  distributed_backend="nccl") as ex:
        assert ex.collective_rpc("allreduce", args=(1.5,), timeout=120) == expected
        ex.collective_rpc("load", args=(0.5,))
        pids = [w.pid for w in ex.workers]
        t = time.monotonic()
        reports = ex.suspend(timeout=300)
        suspended = time.monotonic() - t
        assert [r.state for r in reports] == ["checkpointed"] * world
        assert [_process_mib(p) for p in pids] == [0.0] * world
        t = time.monotonic()
        assert [r.state for r in ex.resume(timeout=300)] == ["running"] * world
        resumed = time.monotonic() - t
        assert ex.collective_rpc("allreduce", args=(1.5,), timeout=120) == expected
        assert ex.collective_rpc("verify") == [{"graph": True, "matmul": True,
                                                "data": True}] * world
        print(f"nccl world {world}: suspend {suspended:.2f} s, resume {resumed:.2f} s, "
              f"freed {[r.gpu_mib for r in reports]} MiB")


@pytest.mark.skipif(visible_gpu_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("release", [True, False])
def test_suspend_of_a_worker_holding_a_stale_context(release: bool) -> None:
    """Rank 1 imports a library that touches GPU 0 (a stale context there) and works on
    GPU 1. With the release (the default) it suspends and resumes like any worker and
    leaves nothing on either GPU; without it, its device report says it cannot be
    checkpointed and ``suspend()`` refuses before touching anything (the executor goes
    on)."""
    with Executor("cuda_workers:ParkedWorker", 2, device="cuda",
                  env={"GPUEXEC_TEST_TOUCH_GPU0": "1"},
                  release_stale_contexts=release) as ex:
        ex.collective_rpc("load", args=(0.5,))
        pid = ex.workers[1].pid
        if release:
            reports = ex.suspend(timeout=300)
            assert [r.state for r in reports] == ["checkpointed"] * 2
            assert _process_mib(pid) == 0.0
            assert [r.state for r in ex.resume(timeout=300)] == ["running"] * 2
            print(f"stale context released: freed {[r.gpu_mib for r in reports]} MiB")
        else:
            assert not ex.device_reports[1].checkpointable
            with pytest.raises(CheckpointUnsupportedError) as info:
                ex.suspend(timeout=300)
            assert set(info.value.reasons) == {1} and "0" in info.value.reasons[1]
            assert not ex.is_suspended
            print(f"stale context kept: {info.value}")
        assert ex.collective_rpc("verify") == [{"graph": True, "matmul": True,
                                                "data": True}] * 2

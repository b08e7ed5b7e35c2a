"""On a real GPU (``pytest -m cuda``, one GPU is enough): suspend and resume through the
CUDA driver's checkpoint API (NVIDIA driver 570+)."""

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

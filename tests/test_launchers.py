"""gpuexec's own launchers: the zygote and the fresh-interpreter subprocess."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from conftest import wait_gone, worker_children
from workers import BrokenInit, EchoWorker

from gpuexec import ConfigError, Executor, WorkerStartupError
from gpuexec.executor.zygote_client import get_zygote, release_zygote, zygote_pids


def _zygote_pid(ex: Executor) -> int:
    return int(ex.start_method_reason.split("zygote pid ")[1].split(",")[0])


def test_zygote_is_clean_and_reused() -> None:
    with Executor(EchoWorker, 2, device="cpu", start_method="zygote") as ex:
        first = _zygote_pid(ex)
    zygote, warm = get_zygote(("torch",), 30)
    assert warm and zygote.pid == first
    assert zygote.hello.threads == 1 and not zygote.hello.cuda_initialized
    assert "torch" in zygote.hello.preloaded
    release_zygote(("torch",), keep_warm=True)
    with Executor(EchoWorker, 2, device="cpu", start_method="zygote") as ex:
        assert "warm zygote" in ex.start_method_reason and _zygote_pid(ex) == first


def test_zygote_workers_take_the_drivers_environment_and_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Executor(EchoWorker, 1, device="cpu", start_method="zygote"):
        pass  # the zygote exists before the variable below
    monkeypatch.setenv("GPUEXEC_TEST_LATE", "set-after-the-zygote")
    monkeypatch.chdir(tmp_path)
    with Executor(EchoWorker, 2, device="cpu", start_method="zygote",
                  env={"PER_EXECUTOR": "x"}) as ex:
        envs = ex.collective_rpc("env", args=("GPUEXEC_TEST_LATE", "PER_EXECUTOR", "RANK"))
        assert envs == [{"GPUEXEC_TEST_LATE": "set-after-the-zygote", "PER_EXECUTOR": "x",
                         "RANK": str(r)} for r in range(2)]
        assert ex.collective_rpc(lambda w: os.getcwd()) == [str(tmp_path)] * 2


def test_zygote_death_is_survived_and_replaced() -> None:
    ex = Executor(EchoWorker, 2, device="cpu", start_method="zygote")
    old = _zygote_pid(ex)
    os.kill(old, signal.SIGKILL)
    assert wait_gone([old], timeout=5) == []
    # Its workers belong to the driver's executor and keep working...
    assert ex.collective_rpc("add", args=(1,)) == [1, 2]
    pids = [w.pid for w in ex.workers]
    ex.shutdown()  # ...and still stop, although no one can report their exit codes now
    assert wait_gone(pids, timeout=5) == []
    with Executor(EchoWorker, 1, device="cpu", start_method="zygote") as ex2:
        assert _zygote_pid(ex2) != old and "new zygote" in ex2.start_method_reason
        assert ex2.collective_rpc("add", args=(2,)) == [2]


def test_worker_death_under_the_zygote_has_its_exit_code() -> None:
    from gpuexec import WorkerDiedError

    with Executor(EchoWorker, 2, device="cpu", start_method="zygote") as ex:
        with pytest.raises(WorkerDiedError) as info:
            ex.collective_rpc("exit_now", args=(5,), ranks=[0])
        assert info.value.exitcode == 5


def test_zygote_preload_list_and_failures(caplog: pytest.LogCaptureFixture) -> None:
    with Executor(EchoWorker, 1, device="cpu", start_method="zygote",
                  preload=["json", "no_such_module_for_the_zygote"]) as ex:
        assert ex.collective_rpc(lambda w: __import__("sys").modules.get("json") is not None) \
            == [True]
    assert "no_such_module_for_the_zygote" in caplog.text


def test_subprocess_workers_are_fresh_interpreters() -> None:
    t = time.monotonic()
    with Executor(EchoWorker, 2, device="cpu", start_method="subprocess") as ex:
        assert time.monotonic() - t < 30
        # A fresh interpreter: nothing of this (pytest) process's modules is there.
        assert ex.collective_rpc(lambda w: "pytest" in __import__("sys").modules) \
            == [False, False]
        assert ex.collective_rpc("add", args=(3,)) == [3, 4]


def _children() -> set[int]:
    """This process's live children, multiprocessing's helpers excepted, and its zygotes."""
    return {p.pid for p in worker_children()} | zygote_pids()


def test_zygote_ends_with_the_last_executor_that_uses_it() -> None:
    """By default nothing of gpuexec's outlives the executors: the zygote is stopped when
    the last executor using it shuts down (also after a failed start)."""
    preload = ("json",)  # a zygote of its own, not the warm one other tests share
    before = _children()
    a = Executor(EchoWorker, 1, device="cpu", start_method="zygote", preload=preload,
                 keep_zygote=False)
    zygote = _zygote_pid(a)
    assert "new zygote" in a.start_method_reason
    with Executor(EchoWorker, 1, device="cpu", start_method="zygote", preload=preload,
                  keep_zygote=False) as b:
        assert _zygote_pid(b) == zygote  # shared while both run
        a.shutdown()
        assert psutil.pid_exists(zygote) and zygote in zygote_pids()  # b still uses it
        assert b.collective_rpc("add", args=(1,)) == [1]
    assert wait_gone([zygote], timeout=10) == []
    assert zygote not in zygote_pids()
    assert _children() - before == set()
    with pytest.raises(WorkerStartupError):
        Executor(BrokenInit, 1, device="cpu", start_method="zygote", preload=preload,
                 keep_zygote=False)
    assert _children() - before == set()


def test_keep_zygote_keeps_it_warm_for_the_next_executor() -> None:
    preload = ("json", "csv")
    with Executor(EchoWorker, 1, device="cpu", start_method="zygote", preload=preload,
                  keep_zygote=True) as ex:
        zygote = _zygote_pid(ex)
    assert psutil.pid_exists(zygote) and zygote in zygote_pids()
    with Executor(EchoWorker, 1, device="cpu", start_method="zygote", preload=preload,
                  keep_zygote=False) as ex:
        assert "warm zygote" in ex.start_method_reason and _zygote_pid(ex) == zygote
    assert wait_gone([zygote], timeout=10) == []


def test_keep_zygote_is_checked() -> None:
    with pytest.raises(ConfigError, match="keep_zygote must be True, False or None"):
        Executor(EchoWorker, 1, device="cpu", keep_zygote="yes")  # type: ignore[arg-type]
@pytest.mark.parametrize("start_method", ["zygote", "subprocess", "spawn", "forkserver"])
def test_a_worker_never_loads_the_drivers_modules(start_method: str) -> None:
    """Importing ``gpuexec`` is lazy: a worker (any start method that does not inherit
    the driver's memory) loads the worker room and the wire, never ``gpuexec.executor``."""
    with Executor(EchoWorker, 1, device="cpu", start_method=start_method) as ex:
        [executor_modules] = ex.collective_rpc("loaded", args=("gpuexec.executor",))
        [worker_modules] = ex.collective_rpc("loaded", args=("gpuexec.worker",))
    assert executor_modules == []
    assert "gpuexec.worker.process" in worker_modules  # the check looked at a worker

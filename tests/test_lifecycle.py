"""Start-up failures, worker death, shutdown and cleanup, through the public API."""

from __future__ import annotations

import gc
import os
import signal
import time

import pytest
from conftest import START_METHODS, gpuexec_dirs, wait_gone
from workers import BrokenInit, EchoWorker, ExitInit, SlowInit

from gpuexec import (
    Executor,
    ExecutorClosedError,
    RemoteError,
    WorkerDiedError,
    WorkerStartupError,
)


@pytest.mark.parametrize("method", START_METHODS)
def test_shutdown_removes_processes_and_ipc_dir(method: str, no_leaks: None) -> None:
    dirs_before = gpuexec_dirs()
    ex = Executor(EchoWorker, 2, device="cpu", start_method=method)
    assert len(gpuexec_dirs() - dirs_before) == 1
    (ipc_dir,) = gpuexec_dirs() - dirs_before
    assert os.stat(ipc_dir).st_mode & 0o777 == 0o700
    pids = [w.pid for w in ex.workers]
    ex.shutdown()
    ex.shutdown()  # idempotent
    assert wait_gone(pids, timeout=0.5) == []
    assert not os.path.exists(ipc_dir)
    assert ex.is_closed
    with pytest.raises(ExecutorClosedError):
        ex.collective_rpc("noop")
    with pytest.raises(ExecutorClosedError):
        ex.check_health()


def test_context_manager_and_garbage_collection(no_leaks: None) -> None:
    with Executor(EchoWorker, 1, device="cpu") as ex:
        pids = [w.pid for w in ex.workers]
    assert wait_gone(pids, timeout=0.5) == []
    ex2 = Executor(EchoWorker, 2, device="cpu")
    pids = [w.pid for w in ex2.workers]
    del ex2
    gc.collect()
    assert wait_gone(pids, timeout=5) == []


def test_pending_calls_fail_when_shut_down_from_another_thread(no_leaks: None) -> None:
    ex = Executor(EchoWorker, 2, device="cpu")
    fut = ex.collective_rpc("sleep", args=(5,), non_block=True)
    t = time.monotonic()
    ex.shutdown(timeout=0.2)
    assert time.monotonic() - t < 4.5  # grace, then SIGTERM: never the 5 s sleep
    with pytest.raises(ExecutorClosedError):
        fut.result(timeout=1)


@pytest.mark.parametrize("method", START_METHODS)
def test_exception_in_worker_init(method: str, no_leaks: None) -> None:
    with pytest.raises(WorkerStartupError) as info:
        Executor(BrokenInit, 2, device="cpu", start_method=method)
    err = info.value
    assert "RuntimeError in __init__: cannot load weights from /nowhere" in str(err)
    assert "BrokenInit" in err.remote_traceback or "__init__" in err.remote_traceback
    assert "cannot load weights" in str(err.__cause__)


def test_worker_exits_during_init(no_leaks: None) -> None:
    with pytest.raises(WorkerStartupError, match="exited with code 7 before it was ready"):
        Executor(ExitInit, 2, device="cpu")


def test_unknown_class_name_fails_in_worker(no_leaks: None) -> None:
    with pytest.raises(WorkerStartupError, match="AttributeError in import"):
        Executor("lazy_workers:NoSuchWorkerClass", 1, device="cpu")


def test_ready_timeout(no_leaks: None) -> None:
    t = time.monotonic()
    with pytest.raises(WorkerStartupError, match=r"not ready after ready_timeout=0\.5 s"):
        Executor(SlowInit, 2, device="cpu", worker_args=(30,), ready_timeout=0.5)
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("how", ["exit", "sigkill", "segfault"])
def test_worker_death_fails_pending_and_later_calls(how: str, no_leaks: None) -> None:
    with Executor(EchoWorker, 2, device="cpu") as ex:
        _check_death(ex, how)


def _check_death(ex: Executor, how: str) -> None:
    fired: list[int] = []
    ex.register_failure_callback(lambda: fired.append(1))
    victim = ex.workers[1]
    if how == "exit":
        call = lambda: ex.collective_rpc("exit_now", args=(3,), ranks=[1])  # noqa: E731
    elif how == "segfault":
        call = lambda: ex.collective_rpc(  # noqa: E731
            lambda w: __import__("ctypes").string_at(0), ranks=[1])
    else:
        fut = ex.collective_rpc("sleep", args=(30,), ranks=[1], non_block=True)
        os.kill(victim.pid, signal.SIGKILL)
        call = lambda: fut.result(timeout=10)  # noqa: E731
    t = time.monotonic()
    with pytest.raises(WorkerDiedError) as info:
        call()
    assert time.monotonic() - t < 5
    err = info.value
    assert err.rank == 1 and err.pid == victim.pid
    expected = {"exit": (3, None), "sigkill": (-9, "SIGKILL"), "segfault": (-11, "SIGSEGV")}
    assert (err.exitcode, err.signal_name) == expected[how]
    assert ex.is_failed
    with pytest.raises(WorkerDiedError):
        ex.collective_rpc("noop", ranks=[0])
    deadline = time.monotonic() + 2  # callbacks run after the calls are failed
    while not fired and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fired == [1]
    ex.register_failure_callback(lambda: fired.append(2))  # already failed: runs at once
    assert fired == [1, 2]


def test_remote_error_is_not_a_death(no_leaks: None) -> None:
    with Executor(EchoWorker, 2, device="cpu") as ex:
        for _ in range(3):
            with pytest.raises(RemoteError):
                ex.collective_rpc("fail")
        assert not ex.is_failed
        assert ex.collective_rpc("add", args=(1,)) == [1, 2]


def test_worker_output_is_prefixed_with_rank(capfd: pytest.CaptureFixture[str]) -> None:
    with Executor(EchoWorker, 2, device="cpu") as ex:
        ex.collective_rpc("shout", args=("hello-prefix",))
    out, err = capfd.readouterr()
    for stream in (out, err):
        for rank, pid in ((0, ex.workers[0].pid), (1, ex.workers[1].pid)):
            assert f"(rank {rank} pid {pid}) hello-prefix" in stream


def test_many_cycles_leave_nothing(no_leaks: None) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    for i in range(10):
        with Executor(EchoWorker, 2, device="cpu") as ex:
            assert ex.collective_rpc("add", args=(i,)) == [i, i + 1]
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2


def test_died_error_carries_the_last_stderr_lines(no_leaks: None) -> None:
    with Executor(EchoWorker, 2, device="cpu") as ex:
        with pytest.raises(WorkerDiedError) as info:
            ex.collective_rpc("say_then_exit", args=("last words of rank one", 4), ranks=[1])
    assert info.value.exitcode == 4
    assert "last words of rank one" in info.value.stderr_tail
    assert "last stderr lines" in str(info.value)


def test_segfault_traceback_reaches_the_error(no_leaks: None) -> None:
    with Executor(EchoWorker, 1, device="cpu") as ex:
        with pytest.raises(WorkerDiedError) as info:
            ex.collective_rpc(lambda w: __import__("ctypes").string_at(0))
    assert info.value.signal_name == "SIGSEGV"
    assert "Segmentation fault" in info.value.stderr_tail


@pytest.mark.parametrize("how", ["shutdown", "sigterm"])
def test_worker_children_are_reaped(how: str, no_leaks: None) -> None:
    ex = Executor(EchoWorker, 1, device="cpu")
    child = ex.collective_rpc("spawn_child")[0]
    assert wait_gone([child], timeout=0.1) == [child]  # running
    if how == "sigterm":
        os.kill(ex.workers[0].pid, signal.SIGTERM)
        with pytest.raises(WorkerDiedError) as info:
            ex.collective_rpc("noop", timeout=5)
        assert info.value.exitcode == 128 + signal.SIGTERM
    ex.shutdown()
    assert wait_gone([child], timeout=2) == []


def test_lifecycle_transitions_follow_the_table() -> None:
    """Only the table's transitions exist; of two racing shutdowns exactly one wins."""
    from gpuexec.executor.lifecycle import ExecutorState, Lifecycle

    life = Lifecycle()
    assert life.state is ExecutorState.STARTING
    assert not life.advance(ExecutorState.RUNNING, ExecutorState.CLOSED)  # not started
    assert life.advance(ExecutorState.STARTING, ExecutorState.RUNNING)
    assert [life.advance(ExecutorState.RUNNING, ExecutorState.CLOSED) for _ in range(2)] == \
        [True, False]
    assert life.state is ExecutorState.CLOSED
    with pytest.raises(AssertionError, match="CLOSED -> RUNNING"):
        life.advance(ExecutorState.CLOSED, ExecutorState.RUNNING)


def test_worker_lifecycle_follows_its_table() -> None:
    from gpuexec.executor.worker_state import WorkerLifecycle, WorkerState

    life = WorkerLifecycle()
    assert life.state is WorkerState.STARTING
    with pytest.raises(AssertionError, match="STARTING -> EXITED"):
        life.advance(WorkerState.EXITED)  # never reaped without being stopped
    life.advance(WorkerState.READY)
    with pytest.raises(AssertionError, match="READY -> STARTING"):
        life.advance(WorkerState.STARTING)
    life.advance(WorkerState.STOPPING)
    life.advance(WorkerState.STOPPING)  # stopping twice is allowed
    life.advance(WorkerState.EXITED)
    assert life.state is WorkerState.EXITED
    failed = WorkerLifecycle()
    failed.advance(WorkerState.STOPPING)  # a start abandoned before the worker was ready
    assert failed.state is WorkerState.STOPPING

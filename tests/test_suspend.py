"""CPU tests of suspend/resume: the checkpoint binding, the controller process, the call
gate, and ``Executor.suspend/resume`` against the fake libcuda (``tests/fake_libcuda.c``).

The fake's checkpoint entry points keep a state per pid and are scripted through files
(``FAKECUDA_CHECKPOINT_SCRIPT``: injected CUresults and delays per symbol and pid;
``FAKECUDA_CHECKPOINT_LOG``: every call, in order), because they run in the controller
process, out of reach of the fake's in-process control API.

The executor tests run CPU workers and admit them as if they were CUDA workers (the only
stand-in: ``refusal`` is patched to find nothing wrong); the controller, the driver calls
on the workers' pids, the ordering, the rollback and the held calls are the real thing.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, subprocess_env, wait_gone, worker_children
from fakecuda import FakeCuda, build_fake_libcuda

import gpuexec.executor.executor as executor_module
from gpuexec import Executor
from gpuexec.errors import (
    CheckpointError,
    CheckpointTimeoutError,
    CheckpointUnsupportedError,
    CudaDriverError,
    ExecutorClosedError,
    GpuexecError,
    HeldCallTimeoutError,
    InvalidArgumentError,
    RpcTimeoutError,
    ValueNotCarriedError,
    WorkerDiedError,
)
from gpuexec.ipc.reports import ContextAction
from gpuexec.worker import cuda_driver
from gpuexec.worker.cuda_driver import CudaDriver, load_driver
from gpuexec.worker.device import _not_checkpointable

LOCK, CKPT = "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint"
RESTORE, UNLOCK = "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock"
WORKER = "workers:EchoWorker"


@pytest.fixture(scope="session")
def fake_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_libcuda(tmp_path_factory.mktemp("fakecuda-suspend"))


class Script:
    """The fake's script and call log for the controller processes of one test."""

    def __init__(self, tmp: Path) -> None:
        self.script = tmp / "script"
        self.log = tmp / "log"
        self.script.write_text("")
        self.log.write_text("")

    def fail(self, symbol: str, pid: int | str, code: int, delay_ms: int = 0) -> None:
        with self.script.open("a") as f:
            f.write(f"{symbol} {pid} {code} {delay_ms}\n")

    def clear(self) -> None:
        self.script.write_text("")

    def calls(self) -> list[tuple[str, int, int]]:
        out = []
        for line in self.log.read_text().splitlines():
            symbol, pid, code = line.split()
            out.append((symbol, int(pid), int(code)))
        return out


@pytest.fixture
def script(tmp_path: Path, fake_path: Path, monkeypatch: pytest.MonkeyPatch) -> Script:
    """The fake is the controller's libcuda; CPU workers are admitted as CUDA workers."""
    s = Script(tmp_path)
    monkeypatch.setenv(cuda_driver.LIBCUDA_ENV, str(fake_path))
    monkeypatch.setenv("FAKECUDA_CHECKPOINT_SCRIPT", str(s.script))
    monkeypatch.setenv("FAKECUDA_CHECKPOINT_LOG", str(s.log))
    monkeypatch.setattr(executor_module, "refusal", lambda *args: {})
    return s


@pytest.fixture
def ex(script: Script, no_leaks: None) -> Iterator[Executor]:
    with Executor(WORKER, 3, device="cpu", start_method="fork") as executor:
        yield executor


def pids(ex: Executor) -> list[int]:
    return [w.pid for w in ex.workers]


# -- the binding -------------------------------------------------------------------------


def test_argument_structs_have_the_cuda_h_layout() -> None:
    c = cuda_driver
    for struct in (c.CUcheckpointLockArgs, c.CUcheckpointCheckpointArgs,
                   c.CUcheckpointRestoreArgs, c.CUcheckpointUnlockArgs):
        assert ctypes.sizeof(struct) == 64, struct
    assert (c.CUcheckpointLockArgs.timeoutMs.offset, c.CUcheckpointLockArgs.reserved0.offset,
            c.CUcheckpointLockArgs.reserved1.offset) == (0, 4, 8)
    assert (c.CUcheckpointRestoreArgs.gpuPairs.offset,
            c.CUcheckpointRestoreArgs.gpuPairsCount.offset,
            c.CUcheckpointRestoreArgs.reserved1.offset) == (0, 8, 56)
    assert ctypes.sizeof(c.CUcheckpointGpuPair) == 32


@pytest.fixture
def driver(fake_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[
        tuple[CudaDriver, Script]]:
    s = Script(tmp_path)
    monkeypatch.setenv("FAKECUDA_CHECKPOINT_SCRIPT", str(s.script))
    monkeypatch.setenv("FAKECUDA_CHECKPOINT_LOG", str(s.log))
    fake = FakeCuda(fake_path)
    fake.reset()
    drv = load_driver(str(fake_path))
    assert drv is not None
    drv.init()
    yield drv, s
    fake.reset()


def test_binding_walks_every_state_and_refuses_illegal_transitions(
        driver: tuple[CudaDriver, Script]) -> None:
    drv, log = driver
    pid = os.getpid()
    assert drv.supports_checkpoint
    assert drv.process_state(pid) == "running"
    for call, wrong_now in ((drv.checkpoint_checkpoint, "running"),
                            (drv.checkpoint_restore, "running"),
                            (drv.checkpoint_unlock, "running")):
        with pytest.raises(CudaDriverError) as info:
            call(pid)
        assert (info.value.name, info.value.code) == ("CUDA_ERROR_ILLEGAL_STATE", 401)
        assert drv.process_state(pid) == wrong_now
    drv.checkpoint_lock(pid, 1000)
    assert drv.process_state(pid) == "locked"
    drv.checkpoint_checkpoint(pid)
    assert drv.process_state(pid) == "checkpointed"
    drv.checkpoint_restore(pid)
    assert drv.process_state(pid) == "locked"
    drv.checkpoint_unlock(pid)
    assert drv.process_state(pid) == "running"
    assert [c[0] for c in log.calls()] == [CKPT, RESTORE, UNLOCK, LOCK, CKPT, RESTORE, UNLOCK]


def test_binding_scripted_errors_and_lock_timeout(driver: tuple[CudaDriver, Script]) -> None:
    drv, s = driver
    pid = os.getpid()
    s.fail(CKPT, pid, 2)
    drv.checkpoint_lock(pid)
    with pytest.raises(CudaDriverError) as info:
        drv.checkpoint_checkpoint(pid)
    assert (info.value.function, info.value.name, info.value.text) == (
        CKPT, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory")
    assert drv.process_state(pid) == "locked"  # a failed call changes nothing
    drv.checkpoint_unlock(pid)
    s.clear()
    s.fail(LOCK, "*", 0, delay_ms=5000)
    with pytest.raises(CudaDriverError) as info:
        drv.checkpoint_lock(pid, timeout_ms=20)  # the driver's own timeout
    assert info.value.name == "CUDA_ERROR_TIMEOUT"
    with pytest.raises(CudaDriverError) as info:
        drv.process_state(2**22 + 12345)  # no such process
    assert info.value.name == "CUDA_ERROR_INVALID_VALUE"


def test_driver_without_checkpoint_api(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = build_fake_libcuda(tmp_path_factory.mktemp("old"),
                              defines=["OMIT_cuCheckpointProcessCheckpoint"])
    drv = load_driver(str(path))
    assert drv is not None and not drv.supports_checkpoint
    assert drv.symbols[CKPT] is None
    with pytest.raises(CudaDriverError) as info:
        drv.checkpoint_checkpoint(os.getpid())
    assert info.value.name == "SYMBOL_NOT_FOUND"


def test_checkpointable_verdict_of_a_worker() -> None:
    assert _not_checkpointable(True, "CUDA 12.8 (libcuda.so.1)", []) == ""
    assert "570" in _not_checkpointable(False, "CUDA 12.4 (libcuda.so.1)", [])
    assert "could not be initialised" in _not_checkpointable(True, "", [])
    released = ContextAction(device=0, uuid="", action="released", result="CUDA_SUCCESS")
    kept = ContextAction(device=2, uuid="", action="retained_elsewhere", result="CUDA_SUCCESS")
    assert _not_checkpointable(True, "CUDA 12.8", [released]) == ""
    assert "GPUs [2]" in _not_checkpointable(True, "CUDA 12.8", [released, kept])


# -- refusals: before anything is touched ------------------------------------------------


def test_cpu_workers_are_refused_before_anything_starts(no_leaks: None) -> None:
    with Executor(WORKER, 2, device="cpu", start_method="fork") as ex:
        assert [r.checkpointable for r in ex.device_reports] == [False, False]
        children = {p.pid for p in worker_children()}
        with pytest.raises(CheckpointUnsupportedError, match="CPU workers") as info:
            ex.suspend()
        assert isinstance(info.value, GpuexecError) and -1 in info.value.reasons
        assert {p.pid for p in worker_children()} == children  # no controller started
        assert not ex.is_suspended
        assert ex.collective_rpc("bump") == [1, 1]


@pytest.mark.parametrize("library", ["missing", "old"])
def test_no_checkpoint_capable_driver_is_refused_before_any_lock(
        library: str, script: Script, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch, no_leaks: None) -> None:
    path = tmp_path_factory.mktemp("x") / "libcuda.so.1" if library == "missing" else \
        build_fake_libcuda(tmp_path_factory.mktemp("old"),
                           defines=["OMIT_cuCheckpointProcessLock"])
    monkeypatch.setenv(cuda_driver.LIBCUDA_ENV, str(path))
    with Executor(WORKER, 2, device="cpu", start_method="fork") as ex:
        with pytest.raises(CheckpointUnsupportedError,
                           match="no CUDA driver" if library == "missing" else "570"):
            ex.suspend()
        assert script.calls() == []
        assert not ex.is_suspended and ex.collective_rpc("bump") == [1, 1]


def test_a_pid_the_driver_does_not_know_is_refused_before_any_lock(
        ex: Executor, script: Script) -> None:
    script.fail("cuCheckpointProcessGetState", pids(ex)[1], 1)
    with pytest.raises(CheckpointUnsupportedError, match="rank 1") as info:
        ex.suspend()
    assert set(info.value.reasons) == {1}
    assert [c for c in script.calls() if c[0] == LOCK] == []
    assert ex.collective_rpc("bump") == [1, 1, 1]


# -- the happy path and its order --------------------------------------------------------


def test_suspend_locks_all_before_checkpointing_any_and_resume_restores_all_first(
        ex: Executor, script: Script) -> None:
    reports = ex.suspend(timeout=30)
    assert [(r.rank, r.pid, r.operation, r.state, r.changed) for r in reports] == [
        (w.rank, w.pid, "suspend", "checkpointed", True) for w in ex.workers]
    assert all(set(r.steps) == {"lock", "checkpoint"} for r in reports)
    assert all(r.seconds == pytest.approx(sum(r.steps.values())) for r in reports)
    assert ex.is_suspended
    reports = ex.resume(timeout=30)
    assert [(r.operation, r.state, r.changed) for r in reports] == [("resume", "running", True)] * 3
    assert all(set(r.steps) == {"restore", "unlock"} for r in reports)
    assert not ex.is_suspended
    calls = script.calls()
    assert all(code == 0 for _, _, code in calls)  # no delays scripted: no "under way" lines
    symbols = [c[0] for c in calls]
    assert symbols == [LOCK] * 3 + [CKPT] * 3 + [RESTORE] * 3 + [UNLOCK] * 3
    for symbol in (LOCK, CKPT, RESTORE, UNLOCK):
        assert sorted(pid for s, pid, _ in calls if s == symbol) == sorted(pids(ex))
    assert ex.collective_rpc("bump") == [1, 1, 1]


def test_suspend_twice_and_resume_when_running_change_nothing(
        ex: Executor, script: Script) -> None:
    again = ex.resume()
    assert [(r.state, r.changed, r.seconds) for r in again] == [("running", False, 0.0)] * 3
    assert script.calls() == []  # not even the controller was needed
    ex.suspend()
    n = len(script.calls())
    assert [(r.state, r.changed) for r in ex.suspend()] == [("checkpointed", False)] * 3
    assert len(script.calls()) == n and ex.is_suspended
    ex.resume()
    assert [r.changed for r in ex.resume()] == [False] * 3


# -- calls while suspended ---------------------------------------------------------------


def test_calls_are_held_unsent_until_resume(ex: Executor) -> None:
    ex.suspend()
    blocking: list[object] = []
    started = threading.Event()

    def call() -> None:
        started.set()
        blocking.append(ex.collective_rpc("bump"))

    thread = threading.Thread(target=call)
    thread.start()
    started.wait()
    future = ex.collective_rpc("bump", non_block=True)
    with pytest.raises(HeldCallTimeoutError) as info:
        ex.collective_rpc("bump", timeout=0.05)
    assert isinstance(info.value, RpcTimeoutError) and info.value.ranks == ()
    ex.check_health()  # a locked worker's Python answers pings
    assert not future.done() and thread.is_alive()
    ex.resume()
    thread.join(10)
    results = sorted([future.result(timeout=10), blocking[0]])
    assert results == [[1, 1, 1], [2, 2, 2]]  # each held call ran once; the timed-out one never
    assert ex.collective_rpc("bump") == [3, 3, 3]


def test_async_forms_and_held_async_calls(ex: Executor) -> None:
    async def main() -> list[object]:
        await ex.suspend_async()
        held = asyncio.ensure_future(ex.collective_rpc_async("bump"))
        await asyncio.sleep(0.05)
        assert not held.done()
        with pytest.raises(HeldCallTimeoutError):
            await ex.collective_rpc_async("bump", timeout=0.05)
        reports = await ex.resume_async()
        return [await held, [r.state for r in reports]]

    assert asyncio.run(main()) == [[1, 1, 1], ["running"] * 3]


# -- failures and rollback ---------------------------------------------------------------


def test_checkpoint_failure_on_one_rank_rolls_every_rank_back(
        ex: Executor, script: Script) -> None:
    bad = pids(ex)[1]
    script.fail(CKPT, bad, 2)
    with pytest.raises(CheckpointError) as info:
        ex.suspend()
    e = info.value
    assert not isinstance(e, CheckpointTimeoutError)
    assert e.operation == "suspend" and set(e.failures) == {1}
    assert (e.failures[1].function, e.failures[1].name, e.failures[1].code) == (
        CKPT, "CUDA_ERROR_OUT_OF_MEMORY", 2)
    assert "rank 1: cuCheckpointProcessCheckpoint failed: CUDA_ERROR_OUT_OF_MEMORY" in str(e)
    assert e.states == {0: "running", 1: "running", 2: "running"}
    calls = script.calls()
    restores = [pid for s, pid, _ in calls if s == RESTORE]
    assert sorted(restores) == sorted(p for p in pids(ex) if p != bad)
    assert sorted(pid for s, pid, _ in calls if s == UNLOCK) == sorted(pids(ex))
    assert not ex.is_suspended
    assert ex.collective_rpc("bump") == [1, 1, 1]


def test_lock_failure_unlocks_the_others_and_checkpoints_nothing(
        ex: Executor, script: Script) -> None:
    script.fail(LOCK, pids(ex)[0], 999)
    with pytest.raises(CheckpointError, match="rank 0: cuCheckpointProcessLock failed: "
                                              "CUDA_ERROR_UNKNOWN"):
        ex.suspend()
    calls = script.calls()
    assert [s for s, _, _ in calls if s in (CKPT, RESTORE)] == []
    assert sorted(pid for s, pid, _ in calls if s == UNLOCK) == sorted(pids(ex)[1:])
    assert ex.collective_rpc("bump") == [1, 1, 1]


def test_lock_that_outlasts_the_timeout_is_a_typed_timeout(ex: Executor, script: Script) -> None:
    script.fail(LOCK, pids(ex)[2], 0, delay_ms=10_000)
    with pytest.raises(CheckpointTimeoutError) as info:
        ex.suspend(timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert info.value.failures[2].name == "CUDA_ERROR_TIMEOUT"
    assert set(info.value.states.values()) == {"running"}
    assert not ex.is_suspended and ex.collective_rpc("bump") == [1, 1, 1]


def test_a_rollback_the_driver_refuses_keeps_calls_held_until_resume_succeeds(
        ex: Executor, script: Script) -> None:
    script.fail(CKPT, pids(ex)[1], 2)
    script.fail(UNLOCK, pids(ex)[0], 999)
    with pytest.raises(CheckpointError) as info:
        ex.suspend()
    assert info.value.states == {0: "locked", 1: "running", 2: "running"}
    assert ex.is_suspended  # rank 0 is still locked: nothing may be sent
    with pytest.raises(HeldCallTimeoutError):
        ex.collective_rpc("bump", timeout=0.05)
    script.clear()
    assert [r.state for r in ex.resume()] == ["running"] * 3
    assert ex.collective_rpc("bump") == [1, 1, 1]


def test_restore_failure_leaves_the_rank_parked_and_resume_can_be_retried(
        ex: Executor, script: Script) -> None:
    ex.suspend()
    script.fail(RESTORE, pids(ex)[2], 2)
    with pytest.raises(CheckpointError) as info:
        ex.resume()
    assert info.value.operation == "resume" and set(info.value.failures) == {2}
    assert info.value.states == {0: "running", 1: "running", 2: "checkpointed"}
    assert ex.is_suspended
    script.clear()
    reports = ex.resume()
    assert [(r.state, r.changed, set(r.steps)) for r in reports] == [
        ("running", False, set()), ("running", False, set()),
        ("running", True, {"restore", "unlock"})]
    assert ex.collective_rpc("bump") == [1, 1, 1]


def test_controller_dying_mid_step_is_a_checkpoint_error_and_resume_recovers(
        ex: Executor, script: Script) -> None:
    script.fail(LOCK, "*", 0, delay_ms=60_000)
    errors: list[BaseException] = []

    def suspend() -> None:
        try:
            ex.suspend()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=suspend)
    thread.start()
    while thread.is_alive() and (LOCK, pids(ex)[0], -1) not in script.calls():  # under way
        threading.Event().wait(0.01)
    (controller,) = [p for p in psutil.Process().children()
                     if "checkpoint_controller" in " ".join(p.cmdline())]
    controller.kill()
    thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], CheckpointError), errors
    assert "checkpoint controller" in str(errors[0]) and errors[0].failures == {}
    assert ex.is_suspended  # the workers may be locked: calls stay held
    script.clear()
    assert [r.state for r in ex.resume()] == ["running"] * 3  # a new controller
    assert ex.collective_rpc("bump") == [1, 1, 1]


def test_resume_waits_for_a_suspend_under_way_only_up_to_its_timeout(
        ex: Executor, script: Script) -> None:
    script.fail(LOCK, pids(ex)[0], 0, delay_ms=1000)
    thread = threading.Thread(target=ex.suspend)
    thread.start()
    while thread.is_alive() and (LOCK, pids(ex)[0], -1) not in script.calls():
        threading.Event().wait(0.01)
    with pytest.raises(CheckpointTimeoutError, match="still under way"):
        ex.resume(timeout=0.05)
    thread.join(30)
    assert ex.is_suspended
    assert [r.state for r in ex.resume()] == ["running"] * 3


def test_errors_survive_pickling_with_their_fields() -> None:
    import pickle

    failure = CudaDriverError(CKPT, 2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory")
    e = pickle.loads(pickle.dumps(CheckpointTimeoutError("suspend", {1: failure},
                                                         {0: "running", 1: "locked"}, "late")))
    assert type(e) is CheckpointTimeoutError and isinstance(e, TimeoutError)
    assert (e.operation, e.failures[1].name, e.states, e.reason) == (
        "suspend", "CUDA_ERROR_OUT_OF_MEMORY", {0: "running", 1: "locked"}, "late")
    held = pickle.loads(pickle.dumps(HeldCallTimeoutError("forward", 2.0)))
    assert (held.method, held.timeout, held.ranks) == ("forward", 2.0, ())
    refused = pickle.loads(pickle.dumps(CheckpointUnsupportedError({-1: "CPU workers"})))
    assert refused.reasons == {-1: "CPU workers"} and "CPU workers" in str(refused)


# -- deaths and shutdown -----------------------------------------------------------------


def test_worker_dying_while_suspended_fails_held_calls_with_worker_died(ex: Executor) -> None:
    ex.suspend()
    future = ex.collective_rpc("bump", non_block=True)
    victim = ex.workers[1]
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(WorkerDiedError) as info:
        future.result(timeout=10)
    assert (info.value.rank, info.value.pid) == (1, victim.pid)
    with pytest.raises(WorkerDiedError):
        ex.resume()


def test_shutdown_while_suspended_fails_held_calls_and_leaves_nothing(
        script: Script, no_leaks: None) -> None:
    ex = Executor(WORKER, 2, device="cpu", start_method="fork")
    ex.suspend()
    future = ex.collective_rpc("bump", non_block=True)
    ex.shutdown()
    with pytest.raises(ExecutorClosedError):
        future.result(timeout=10)
    with pytest.raises(ExecutorClosedError):
        ex.suspend()


def test_driver_killed_while_suspended_leaves_no_process(script: Script, fake_path: Path) -> None:
    code = textwrap.dedent("""
        import time, psutil
        import gpuexec.executor.executor as m
        m.refusal = lambda *args: {}
        from gpuexec import Executor
        ex = Executor("workers:EchoWorker", 2, device="cpu", start_method="fork")
        ex.suspend()
        print(" ".join(str(p.pid) for p in psutil.Process().children(recursive=True)), flush=True)
        time.sleep(600)
    """)
    env = subprocess_env(**{k: os.environ[k] for k in (
        cuda_driver.LIBCUDA_ENV, "FAKECUDA_CHECKPOINT_SCRIPT", "FAKECUDA_CHECKPOINT_LOG")})
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT)
    try:
        assert driver.stdout is not None
        children = [int(p) for p in driver.stdout.readline().split()]
        controllers = [p for p in children
                       if "checkpoint_controller" in " ".join(psutil.Process(p).cmdline())]
        assert len(controllers) == 1 and len(children) >= 3
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
        assert wait_gone(children, timeout=10) == []
    finally:
        if driver.poll() is None:
            driver.kill()


# -- hostile use: forks, bad calls, bad arguments, cancelled held calls ------------------


def _in_fork(attempts: dict[str, Callable[[], object]]) -> dict[str, str]:
    """Run each attempt in an ``os.fork`` child of this process; what each raised (its
    type name, or "no error"), and whether it raised at once (before a 5 s alarm)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            signal.alarm(20)  # a call that waits is reported by the parent as missing
            out = {}
            for name, attempt in attempts.items():
                try:
                    attempt()
                    out[name] = "no error"
                except BaseException as e:
                    out[name] = type(e).__name__
            os.write(write, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text) if text else {}


def test_a_fork_of_the_driver_can_neither_suspend_resume_nor_call_the_parents_workers(
        ex: Executor, script: Script) -> None:
    for parent_suspended in (False, True):
        if parent_suspended:
            ex.suspend()
        before = script.calls()

        async def held() -> object:
            return await ex.collective_rpc_async("bump", timeout=3)

        async def suspend_async() -> object:
            return await ex.suspend_async(timeout=3)

        attempts: dict[str, Callable[[], object]] = {
            "suspend": lambda: ex.suspend(),
            "suspend_timeout": lambda: ex.suspend(timeout=3),
            "resume": lambda: ex.resume(),
            "suspend_async": lambda: asyncio.run(suspend_async()),
            "resume_async": lambda: asyncio.run(ex.resume_async()),
            "call": lambda: ex.collective_rpc("bump"),
            "call_timeout": lambda: ex.collective_rpc("bump", timeout=3),
            "non_block": lambda: ex.collective_rpc("bump", non_block=True),
            "async": lambda: asyncio.run(held()),
            "bad_call": lambda: ex.collective_rpc("bump", args="abc"),
            "check_health": lambda: ex.check_health(),
            "stats": lambda: ex.stats(),
        }
        assert _in_fork(attempts) == dict.fromkeys(attempts, "ForeignProcessError")
        assert script.calls() == before  # no lock, checkpoint, restore or unlock from it
        assert ex.is_suspended is parent_suspended
        if parent_suspended:
            ex.resume()
        n = 1 + parent_suspended  # one bump per round: nothing of the child's ran
        assert ex.collective_rpc("bump") == [n] * 3


BAD_CALLS: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"args": "abc"}, InvalidArgumentError),
    ({"args": {"a": 1}}, InvalidArgumentError),
    ({"args": 5}, InvalidArgumentError),
    ({"kwargs": [1, 2]}, InvalidArgumentError),
    ({"kwargs": {1: 2}}, InvalidArgumentError),
    ({"ranks": [7]}, InvalidArgumentError),
    ({"ranks": []}, InvalidArgumentError),
    ({"ranks": [0, 0]}, InvalidArgumentError),
    ({"ranks": [True]}, InvalidArgumentError),
    ({"ranks": "01"}, InvalidArgumentError),
    ({"unique_reply_rank": 5}, InvalidArgumentError),
    ({"ranks": [0], "unique_reply_rank": 1}, InvalidArgumentError),
    ({"timeout": -1}, InvalidArgumentError),
    ({"timeout": "3"}, InvalidArgumentError),
    ({"timeout": float("nan")}, InvalidArgumentError),
    ({"args": (threading.Lock(),)}, ValueNotCarriedError),
    ({"kwargs": {"x": [1, {"k": (lambda: None, threading.Lock())}]}}, ValueNotCarriedError),
    ({"args": (2**70, "x\ud800", open(os.devnull, "rb"))}, ValueNotCarriedError),
]


@pytest.mark.parametrize(("bad", "error"), BAD_CALLS)
def test_a_bad_call_made_while_suspended_fails_at_once_in_every_mode(
        ex: Executor, bad: dict[str, Any], error: type[Exception]) -> None:
    ex.suspend()
    # No timeout (it would wait until resume if held) and a short one (HeldCallTimeoutError
    # if held): the typed error comes from the call itself, in each mode.
    for extra in ({}, {"timeout": 30}):
        kw = {**extra, **bad}
        with pytest.raises(error):
            ex.collective_rpc("echo", **kw)
        with pytest.raises(error):
            ex.collective_rpc("echo", non_block=True, **kw)

        async def in_loop(kw: dict[str, Any] = kw) -> object:
            return await ex.collective_rpc_async("echo", **kw)

        with pytest.raises(error):
            asyncio.run(in_loop())
    with pytest.raises(InvalidArgumentError):
        ex.collective_rpc("echo", non_block="yes")  # type: ignore[call-overload]
    with pytest.raises(InvalidArgumentError):
        ex.collective_rpc(42)  # type: ignore[call-overload]
    ex.resume()
    assert ex.collective_rpc("bump") == [1, 1, 1]  # nothing of them was sent


@pytest.mark.parametrize("timeout", [float("inf"), 1e300, 10**400, 2**64, 1e9])
def test_suspend_and_resume_timeouts_beyond_any_deadline_wait_without_overflow(
        ex: Executor, timeout: float) -> None:
    assert [r.state for r in ex.suspend(timeout=timeout)] == ["checkpointed"] * 3
    held = ex.collective_rpc("bump", non_block=True, timeout=timeout)
    assert [r.state for r in ex.resume(timeout=timeout)] == ["running"] * 3
    assert held.result(timeout=30) == [1, 1, 1]


@pytest.mark.parametrize("timeout", ["3", b"3", 0, -1, float("-inf"), float("nan"), True,
                                     [3], complex(1, 0), Decimal("1e400000")])
def test_bad_suspend_and_resume_timeouts_are_typed_errors(ex: Executor, timeout: object
                                                          ) -> None:
    for operation in (ex.suspend, ex.resume):
        with pytest.raises(InvalidArgumentError, match="timeout"):
            operation(timeout=timeout)  # type: ignore[arg-type]
    assert not ex.is_suspended
    assert ex.collective_rpc("bump") == [1, 1, 1]


def test_a_cpu_executor_refuses_suspend_with_any_valid_timeout(no_leaks: None) -> None:
    with Executor(WORKER, 1, device="cpu") as ex:
        for timeout in (None, float("inf"), 1e300, 5):
            for operation in (ex.suspend, ex.resume):
                if operation == ex.resume:
                    assert operation(timeout=timeout)[0].changed is False
                    continue
                with pytest.raises(CheckpointUnsupportedError):
                    operation(timeout=timeout)
        with pytest.raises(InvalidArgumentError):
            ex.suspend(timeout="soon")  # type: ignore[arg-type]


def test_a_cancelled_held_call_is_never_sent(ex: Executor) -> None:
    ex.suspend()
    kept = ex.collective_rpc("bump", non_block=True)
    cancelled = [ex.collective_rpc("bump", non_block=True, timeout=t) for t in (None, 60)]
    assert all(f.cancel() for f in cancelled)

    async def in_loop() -> None:
        task = asyncio.ensure_future(ex.collective_rpc_async("bump"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(in_loop())
    ex.resume()
    assert kept.result(timeout=30) == [1, 1, 1]
    assert all(f.cancelled() for f in cancelled)
    assert ex.collective_rpc("bump") == [2, 2, 2]  # only the kept call ran


def test_many_held_calls_take_no_thread_each_and_all_run_once(ex: Executor) -> None:
    ex.suspend()
    threads = threading.active_count()
    futures = [ex.collective_rpc("bump", ranks=[0], non_block=True) for _ in range(200)]
    timed = [ex.collective_rpc("bump", ranks=[0], non_block=True, timeout=0.05)
             for _ in range(20)]
    assert threading.active_count() <= threads + 1  # one thread holds them all
    for f in timed:
        with pytest.raises(HeldCallTimeoutError):
            f.result(timeout=30)
    for f in futures[::2]:
        f.cancel()
    ex.resume()
    results = sorted(f.result(timeout=60)[0] for f in futures[1::2])
    assert results == list(range(1, 101))
    assert ex.collective_rpc("bump", ranks=[0]) == [101]


def test_held_calls_fail_when_the_executor_shuts_down_while_suspended(
        script: Script, no_leaks: None) -> None:
    ex = Executor(WORKER, 2, device="cpu", start_method="fork")
    ex.suspend()
    futures = [ex.collective_rpc("bump", non_block=True) for _ in range(5)]
    ex.shutdown()
    for f in futures:
        with pytest.raises(ExecutorClosedError):
            f.result(timeout=30)

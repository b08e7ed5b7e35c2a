"""Fault injection through the public API: dead drivers, signals, dead and hung workers.

Drivers that must die run as subprocesses (``python -c`` with a small script) so that
the test can SIGKILL, SIGTERM or SIGINT them and then check with psutil what is left.
Every timing bound is generous for a loaded 2-core CI machine; the figures observed
are attached to the report with ``record_property``.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import START_METHODS, gpuexec_dirs, subprocess_env, wait_gone, worker_children
from workers import EchoWorker

from gpuexec import Executor, RpcTimeoutError, WorkerDiedError

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


# -- helpers: a driver subprocess ---------------------------------------------------------

def _gone(pid: int) -> bool:
    """Not running: no such process, or a zombie nobody reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_all_gone(pids: list[int], t0: float, limit: float) -> tuple[float, list[int]]:
    """Poll every 1 ms until every pid is gone; (seconds since ``t0``, pids left)."""
    left = list(pids)
    while left and time.monotonic() - t0 < limit:
        left = [p for p in left if not _gone(p)]
        if left:
            time.sleep(0.001)
    return time.monotonic() - t0, left


class Driver:
    """A ``python -c`` driver; stdout lines are timestamped as they arrive."""

    def __init__(self, script: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = subprocess_env()["PYTHONPATH"]
        env.pop("GPUEXEC_START_METHOD", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env, cwd=str(ROOT), start_new_session=True)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.stderr: list[str] = []
        self.pids: list[int] = []
        self._workers: list[psutil.Process] = []  # to kill at cleanup, never a reused pid
        self.ipc_dir = ""
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line.rstrip("\n")))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def expect(self, word: str, timeout: float = 30.0) -> tuple[float, str]:
        """Wait for a stdout line starting with ``word``: (arrival time, the rest)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.proc.poll() is not None and self.lines.empty()):
                state = ""
                if self.proc.poll() is None:  # still running: where is it stuck, and why?
                    try:
                        with open(f"/proc/{self.proc.pid}/status") as f:
                            state = "".join(x for x in f if x.startswith(("Sig", "Shd")))
                        self.proc.send_signal(signal.SIGUSR1)  # faulthandler: all stacks
                    except OSError:
                        pass
                time.sleep(0.5)  # let the stderr reader catch up
                raise AssertionError(f"driver never printed {word!r} (exit "
                                     f"{self.proc.poll()}); {state}stderr:\n"
                                     f"{''.join(self.stderr)}")
            try:
                t, line = self.lines.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                continue
            head, _, rest = line.partition(" ")
            if head == word:
                return t, rest

    def ready(self) -> None:
        """Read the PIDS and DIR lines, then wait for READY."""
        self.pids = json.loads(self.expect("PIDS")[1])
        for pid in self.pids:
            try:
                self._workers.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        self.ipc_dir = self.expect("DIR")[1]
        self.expect("READY")
        assert len(self.pids) == 2 and os.path.isdir(self.ipc_dir)

    def cleanup(self) -> None:
        self.proc.kill()  # our child: its pid stays ours until wait()
        for w in self._workers:
            try:
                if w.is_running():  # same pid *and* start time: not a reused pid
                    w.kill()
            except psutil.Error:
                pass
        self.proc.wait(timeout=10)
        if self.ipc_dir:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


@pytest.fixture
def driver() -> Iterator[Callable[[str], Driver]]:
    made: list[Driver] = []

    def start(script: str) -> Driver:
        d = Driver(script)
        made.append(d)
        return d

    yield start
    for d in made:
        d.cleanup()


PREAMBLE = """
import faulthandler, json, os, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's post-mortem
from gpuexec import Executor
from workers import EchoWorker

def announce(ex):
    print("PIDS", json.dumps([w.pid for w in ex.workers]), flush=True)
    print("DIR", os.path.dirname(ex.endpoints[0].removeprefix("ipc://")), flush=True)
"""


# -- the driver dies ----------------------------------------------------------------------

SIGKILL_DRIVER = PREAMBLE + """
ex = Executor(EchoWorker, 2, device="cpu", start_method={method!r})
fut = ex.collective_rpc("sleep", args=(60,), ranks=[1], non_block=True)
announce(ex)
time.sleep(0.2)  # rank 1 is inside its 60 s call
print("READY", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("method", START_METHODS)
def test_sigkill_of_driver_ends_its_workers(method: str, driver: Callable[[str], Driver],
                                            record_property: Callable[[str, Any], None]) -> None:
    d = driver(SIGKILL_DRIVER.format(method=method))
    d.ready()
    helpers = [c.pid for c in psutil.Process(d.proc.pid).children(recursive=True)
               if c.pid not in d.pids]  # forkserver, resource tracker
    assert not any(_gone(p) for p in d.pids)
    t0 = time.monotonic()
    os.kill(d.proc.pid, signal.SIGKILL)
    elapsed, left = _wait_all_gone(d.pids, t0, limit=5.0)
    record_property("workers_gone_s", round(elapsed, 4))
    assert left == [], f"workers still running 5 s after the driver's SIGKILL: {left}"
    assert elapsed < 2.0, f"workers took {elapsed:.3f} s to exit (target 1 s)"
    assert d.proc.wait(timeout=5) == -signal.SIGKILL
    # Nothing the driver started outlives it (multiprocessing's helpers exit on EOF),
    # and the workers remove the dead driver's private directory.
    assert wait_gone(helpers, timeout=5.0) == []
    deadline = time.monotonic() + 2.0
    while os.path.exists(d.ipc_dir) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(d.ipc_dir)


SIGTERM_DRIVER = PREAMBLE + """
ex = Executor(EchoWorker, 2, device="cpu", start_method="fork", shutdown_timeout=1.0)
announce(ex)
print("READY", flush=True)
if {blocked!r}:
    ex.collective_rpc("sleep", args=(30,))  # the main thread is inside a blocking call
else:
    fut = ex.collective_rpc("sleep", args=(30,), ranks=[1], non_block=True)
    time.sleep(30)  # the main thread is outside gpuexec
print("RETURNED", flush=True)
"""


@pytest.mark.parametrize("where", ["blocked_in_call", "idle"])
def test_sigterm_to_driver_shuts_down_and_exits(where: str, driver: Callable[[str], Driver],
                                                record_property: Callable[[str, Any], None]
                                                ) -> None:
    """gpuexec's SIGTERM handler (installed over SIG_DFL only) shuts every live executor
    down, then ends the process as if killed by SIGTERM. Busy workers ignore the
    Shutdown message, so this takes the script's shutdown_timeout (1 s) plus SIGTERM."""
    d = driver(SIGTERM_DRIVER.format(blocked=where == "blocked_in_call"))
    d.ready()
    time.sleep(0.2)  # the call has reached the workers
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    try:
        code = d.proc.wait(timeout=6)
    except subprocess.TimeoutExpired:
        pytest.fail("driver still running 6 s after SIGTERM; its stderr:\n" + "".join(d.stderr))
    exited = time.monotonic() - t0
    record_property("driver_exit_s", round(exited, 3))
    assert exited < 5.0, f"driver took {exited:.2f} s to exit after SIGTERM"
    assert code in (-signal.SIGTERM, 128 + signal.SIGTERM), (code, "".join(d.stderr))
    assert wait_gone(d.pids, timeout=2.0) == []
    assert not os.path.exists(d.ipc_dir), \
        f"ipc directory {d.ipc_dir} left behind: the executor was not shut down on SIGTERM"


USER_SIGTERM_DRIVER = PREAMBLE + """
signal.signal(signal.SIGTERM, lambda *_: print("USER-HANDLER", flush=True))
ex = Executor(EchoWorker, 2, device="cpu", start_method="fork", shutdown_timeout=1.0)
announce(ex)
print("READY", flush=True)
ex.collective_rpc("sleep", args=(30,))
print("RETURNED", flush=True)
"""


def test_user_sigterm_handler_is_left_alone(driver: Callable[[str], Driver]) -> None:
    d = driver(USER_SIGTERM_DRIVER)
    d.ready()
    time.sleep(0.2)
    d.proc.send_signal(signal.SIGTERM)
    d.expect("USER-HANDLER", timeout=5.0)
    time.sleep(0.3)
    assert d.proc.poll() is None, "the driver exited although its own handler ignores SIGTERM"
    assert not any(_gone(p) for p in d.pids) and os.path.isdir(d.ipc_dir)


SIGINT_DRIVER = PREAMBLE + """
# Ctrl-C as in a terminal, also when the tests run as a background job (which starts
# every child with SIGINT ignored: the driver would never see this test's SIGINT).
signal.signal(signal.SIGINT, signal.default_int_handler)
t = None
try:
    with Executor(EchoWorker, 2, device="cpu", start_method="fork",
                  shutdown_timeout=0.5) as ex:
        announce(ex)
        print("READY", flush=True)
        try:
            ex.collective_rpc("sleep", args=(30,))
        except KeyboardInterrupt:
            print("CAUGHT", flush=True)
            raise
        print("RETURNED", flush=True)
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
"""


@pytest.mark.usefixtures("ring_core")  # the driver asleep in either core's futex wait
def test_ctrl_c_during_long_call(driver: Callable[[str], Driver],
                                 record_property: Callable[[str, Any], None]) -> None:
    d = driver(SIGINT_DRIVER)
    d.ready()
    time.sleep(0.3)  # blocked in the call
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGINT)  # the driver alone, not its process group
    t_caught, _ = d.expect("CAUGHT", timeout=10)
    t_done, _ = d.expect("INTERRUPTED", timeout=10)
    record_property("keyboard_interrupt_s", round(t_caught - t0, 4))
    record_property("shutdown_done_s", round(t_done - t0, 4))
    assert t_caught - t0 < 1.0, f"KeyboardInterrupt took {t_caught - t0:.3f} s"
    # __exit__: shutdown_timeout 0.5 s, then SIGTERM (workers ignore only SIGINT).
    assert t_done - t0 < 4.0, f"shutdown after Ctrl-C took {t_done - t0:.3f} s"
    assert d.proc.wait(timeout=10) == 0, "".join(d.stderr)
    assert wait_gone(d.pids, timeout=1.0) == []
    assert not os.path.exists(d.ipc_dir)


# -- a worker dies in the middle of a blocking call ---------------------------------------

def _kill_after(pid: int, delay: float) -> tuple[dict[str, float], threading.Timer]:
    when: dict[str, float] = {}

    def fire() -> None:
        when["t"] = time.perf_counter()
        os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(delay, fire)
    timer.start()
    return when, timer


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("target", ["rank1", "all"])
def test_sigkill_of_worker_during_blocking_call(method: str, target: str, no_leaks: None,
                                                record_property: Callable[[str, Any], None]
                                                ) -> None:
    ranks = [1] if target == "rank1" else None  # "all": rank 0 stays busy in its call
    with Executor(EchoWorker, 2, device="cpu", start_method=method,
                  shutdown_timeout=0.3) as ex:
        victim = ex.workers[1]
        when, timer = _kill_after(victim.pid, 0.2)
        t_call = time.perf_counter()
        with pytest.raises(WorkerDiedError) as info:
            ex.collective_rpc("sleep", args=(30,), ranks=ranks)
        t_err = time.perf_counter()
        timer.join()
        latency = t_err - when["t"]
        record_property("kill_to_error_s", round(latency, 4))
        assert 0.15 < when["t"] - t_call and latency < 1.0, \
            f"WorkerDiedError {latency:.3f} s after the SIGKILL"
        err = info.value
        assert (err.rank, err.pid, err.exitcode, err.signal_name) == \
            (1, victim.pid, -9, "SIGKILL")
        assert ex.is_failed
        with pytest.raises(WorkerDiedError):
            ex.collective_rpc("noop", ranks=[0])


def _exit3(w: Any) -> None:
    if w.rank == 1:
        os._exit(3)
    time.sleep(30)


def _segfault(w: Any) -> None:
    if w.rank == 1:
        ctypes.string_at(0)
    time.sleep(30)


@pytest.mark.parametrize(("fn", "expected", "text"),
                         [(_exit3, (3, None), "exited with code 3"),
                          (_segfault, (-11, "SIGSEGV"), "was killed by SIGSEGV")],
                         ids=["exit3", "segfault"])
def test_worker_dies_inside_a_call_while_others_are_busy(
        fn: Callable[[Any], None], expected: tuple[int, str | None], text: str, no_leaks: None,
        record_property: Callable[[str, Any], None]) -> None:
    with Executor(EchoWorker, 2, device="cpu", start_method="fork",
                  shutdown_timeout=0.3) as ex:
        victim = ex.workers[1]
        t = time.monotonic()
        with pytest.raises(WorkerDiedError) as info:
            ex.collective_rpc(fn)  # rank 0 sleeps 30 s: the death must not wait for it
        elapsed = time.monotonic() - t
        record_property("call_to_error_s", round(elapsed, 4))
        assert elapsed < 1.0, f"WorkerDiedError after {elapsed:.3f} s"
        err = info.value
        assert (err.rank, err.pid) == (1, victim.pid)
        assert (err.exitcode, err.signal_name) == expected
        assert text in str(err)


# -- a worker hangs -----------------------------------------------------------------------

def _rank1_hangs(w: Any) -> int:
    time.sleep(30 if w.rank == 1 else 0)
    return int(w.rank)


def test_timeout_and_health_check_name_the_busy_rank(
        no_leaks: None, record_property: Callable[[str, Any], None]) -> None:
    # cancel_on_timeout=False: the busy ranks stay busy (the default would interrupt them)
    with Executor(EchoWorker, 2, device="cpu", start_method="fork",
                  shutdown_timeout=0.3, cancel_on_timeout=False) as ex:
        t = time.monotonic()
        with pytest.raises(RpcTimeoutError) as info:
            ex.collective_rpc(_rank1_hangs, timeout=0.3)
        elapsed = time.monotonic() - t
        record_property("rpc_timeout_s", round(elapsed, 4))
        assert 0.29 <= elapsed < 1.5
        assert info.value.ranks == (1,) and "did not answer: [1]" in str(info.value)
        assert isinstance(info.value, TimeoutError)

        t = time.monotonic()
        with pytest.raises(RpcTimeoutError) as info:
            ex.check_health(timeout=0.3)
        elapsed = time.monotonic() - t
        record_property("health_timeout_s", round(elapsed, 4))
        assert 0.29 <= elapsed < 1.5
        assert info.value.ranks == (1,)

        assert ex.collective_rpc("add", args=(1,), ranks=[0]) == [1]  # rank 0 still serves
        with pytest.raises(RpcTimeoutError) as info:
            ex.collective_rpc("sleep", args=(30,), ranks=[0], timeout=0.3)
        assert info.value.ranks == (0,) and info.value.method == "sleep"
        with pytest.raises(RpcTimeoutError) as info:
            ex.check_health(timeout=0.3)
        assert info.value.ranks == (0, 1)
        assert not ex.is_failed


# -- many executors, nothing left behind ----------------------------------------------------

def test_50_create_shutdown_cycles_leak_nothing(
        record_property: Callable[[str, Any], None]) -> None:
    children_before = {p.pid for p in worker_children()}
    fds_before = len(os.listdir("/proc/self/fd"))
    shm_before = set(os.listdir("/dev/shm"))
    dirs_before = gpuexec_dirs()
    pids: list[int] = []
    t = time.monotonic()
    for i in range(50):
        with Executor(EchoWorker, 2, device="cpu", start_method="fork") as ex:
            pids += [w.pid for w in ex.workers]
            assert ex.collective_rpc("add", args=(i,)) == [i, i + 1]
    record_property("cycles_s", round(time.monotonic() - t, 2))
    assert len(set(pids)) == 100
    leftover = [p.pid for p in worker_children() if p.pid not in children_before]
    assert wait_gone(leftover, timeout=2.0) == [], f"processes left: {leftover}"
    assert [p for p in pids if not _gone(p)] == []
    fds_after = len(os.listdir("/proc/self/fd"))
    assert fds_after <= fds_before + 3, f"file descriptors: {fds_before} -> {fds_after}"
    assert gpuexec_dirs() - dirs_before == set()
    assert set(os.listdir("/dev/shm")) - shm_before == set()

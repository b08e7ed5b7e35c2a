"""No process outlives its driver or its worker: the guardian, under every start method.

A worker that holds the GIL in a C call (``ctypes.PyDLL`` runs a C function without
releasing it; ``time.sleep`` would release it) cannot run a Python thread: a watchdog
thread in it would wait for the call to end. What ends it here is its guardian, a
separate process. The C calls last 60 s, so each bound below (5 s, generous for a loaded
2-core machine) can only be met by the guardian; the figures observed are attached to the
report with ``record_property``, and ``benchmarks/failure_detection.py`` measures them.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import test_faults
from conftest import START_METHODS, wait_gone
from test_faults import PREAMBLE, Driver
from workers import EchoWorker

from gpuexec import Executor, WorkerDiedError
from gpuexec.ipc.signals import CANCEL_SIGNAL

driver = test_faults.driver  # the fixture: a driver subprocess, cleaned up afterwards

BOUND_S = 5.0  # every C call below lasts 60 s


def _spawn(w: Any, detached: bool) -> list[int]:
    """Start a grandchild in the worker's process group and, when ``detached``, one
    more in a session of its own (``setsid``): outside the group, still below the worker."""
    kids = [subprocess.Popen(["sleep", "60"])]
    if detached:
        kids.append(subprocess.Popen(["sleep", "60"], start_new_session=True))
    w.kids = kids  # the worker keeps its Popen objects
    return [k.pid for k in kids]


def _hold_gil(w: Any, marker: str) -> None:
    """Hold the GIL in C for 60 s, after creating the file ``marker``. SIGTERM and the
    cancel signal are blocked (either would cut the C ``sleep`` short and run the
    worker's handler): only a SIGKILL ends this worker, as it would one spinning in C."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, CANCEL_SIGNAL})
    Path(marker).touch()
    ctypes.PyDLL(None).sleep(60)


def _wait_file(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _all_gone(procs: list[psutil.Process], t0: float, limit: float) -> tuple[float, list[int]]:
    """Poll until every process is gone (a zombie counts as gone); (seconds since ``t0``,
    pids left). ``psutil.Process`` checks the start time: a reused pid is not ours."""
    left = procs
    while left and time.monotonic() - t0 < limit:
        still = []
        for p in left:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    still.append(p)
            except psutil.NoSuchProcess:
                pass
        left = still
        if left:
            time.sleep(0.001)
    return time.monotonic() - t0, [p.pid for p in left]


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


# -- the driver is SIGKILLed ----------------------------------------------------------------

def _kill_driver(d: Driver, everything: list[psutil.Process],
                 record_property: Callable[[str, Any], None]) -> None:
    """SIGKILL the driver; every process in ``everything`` must be gone within BOUND_S,
    and the driver's private directory too."""
    t0 = time.monotonic()
    os.kill(d.proc.pid, signal.SIGKILL)
    elapsed, left = _all_gone(everything, t0, BOUND_S)
    record_property("all_gone_s", round(elapsed, 4))
    assert left == [], f"still running {BOUND_S:g} s after the driver's SIGKILL: {left}"
    assert not os.path.exists(d.ipc_dir)


GIL_DRIVER = PREAMBLE + """
from test_orphans import _hold_gil, _spawn, _wait_file
ex = Executor(EchoWorker, 2, device="cpu", start_method={method!r}, preload=())
announce(ex)
print("READY", flush=True)
print("KIDS", json.dumps(ex.collective_rpc(_spawn, args=(True,), ranks=[1])[0]), flush=True)
marker = os.path.join(os.path.dirname(ex.endpoints[0].removeprefix("ipc://")), "in_c")
fut = ex.collective_rpc(_hold_gil, args=(marker,), ranks=[1], non_block=True)
_wait_file(marker)
print("IN_C", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("method", START_METHODS)
def test_driver_sigkill_ends_a_worker_that_holds_the_gil(
        method: str, driver: Callable[[str], Driver],
        record_property: Callable[[str, Any], None]) -> None:
    d = driver(GIL_DRIVER.format(method=method))
    d.ready()
    kids = json.loads(d.expect("KIDS")[1])
    d.expect("IN_C")
    time.sleep(0.1)  # rank 1 is inside its 60 s C call
    everything = _descendants(d.proc.pid)  # workers, guardians, helpers, grandchildren
    assert set(d.pids) | set(kids) <= {p.pid for p in everything}
    _kill_driver(d, everything, record_property)


SHUTDOWN_DRIVER = PREAMBLE + """
from test_orphans import _hold_gil, _spawn, _wait_file
ex = Executor(EchoWorker, 2, device="cpu", start_method={method!r}, preload=())
announce(ex)
print("READY", flush=True)
print("KIDS", json.dumps(ex.collective_rpc(_spawn, args=(True,))), flush=True)
marker = os.path.join(os.path.dirname(ex.endpoints[0].removeprefix("ipc://")), "in_c")
fut = ex.collective_rpc(_hold_gil, args=(marker,), ranks=[1], non_block=True)
_wait_file(marker)
print("SHUTDOWN", flush=True)
ex.shutdown(timeout=60)  # rank 1 cannot answer: the driver waits here
"""


@pytest.mark.parametrize("method", START_METHODS)
def test_driver_sigkill_during_shutdown_leaves_nothing(
        method: str, driver: Callable[[str], Driver],
        record_property: Callable[[str, Any], None]) -> None:
    """Rank 0 has stopped (its grandchildren with it), rank 1 holds the GIL, the driver
    waits in ``shutdown()`` and is SIGKILLed there."""
    d = driver(SHUTDOWN_DRIVER.format(method=method))
    d.ready()
    kids = [pid for rank in json.loads(d.expect("KIDS")[1]) for pid in rank]
    d.expect("SHUTDOWN")
    assert wait_gone([d.pids[0], *kids[:2]], timeout=BOUND_S) == []  # rank 0 stopped
    everything = _descendants(d.proc.pid)
    assert {d.pids[1], *kids[2:]} <= {p.pid for p in everything}
    _kill_driver(d, everything, record_property)


# -- a worker dies ----------------------------------------------------------------------------

def _exit3(w: Any) -> None:
    os._exit(3)


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("how", ["sigkill", "exit", "sigkill_in_shutdown"])
def test_grandchildren_die_with_their_worker(method: str, how: str, tmp_path: Path,
                                             no_leaks: None,
                                             record_property: Callable[[str, Any], None]
                                             ) -> None:
    """Whatever ends rank 1 (a SIGKILL from outside, its own ``os._exit``, or the SIGKILL
    that ends a ``shutdown()`` it cannot answer because it holds the GIL), what it started
    in its process group goes with it."""
    ex = Executor(EchoWorker, 2, device="cpu", start_method=method, shutdown_timeout=0.2,
                  terminate_timeout=0.3)
    try:
        victim = ex.workers[1].pid
        kids = [psutil.Process(p) for p in ex.collective_rpc(_spawn, args=(False,),
                                                              ranks=[1])[0]]
        t0 = time.monotonic()
        if how == "sigkill":
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(WorkerDiedError, match="SIGKILL"):  # pending, or refused
                ex.collective_rpc("noop", ranks=[1])
        elif how == "exit":
            with pytest.raises(WorkerDiedError, match="exited with code 3"):
                ex.collective_rpc(_exit3, ranks=[1])
        else:
            marker = str(tmp_path / "in_c")
            ex.collective_rpc(_hold_gil, args=(marker,), ranks=[1], non_block=True)
            _wait_file(marker)
            t0 = time.monotonic()
            ex.shutdown()  # Shutdown message, SIGTERM (not run: the GIL), then SIGKILL
        elapsed, left = _all_gone(kids, t0, BOUND_S)
        record_property("grandchildren_gone_s", round(elapsed, 4))
        assert left == [], f"grandchildren of a dead worker still running: {left}"
    finally:
        ex.shutdown()


def test_grandchildren_outside_the_group_go_at_a_clean_stop(no_leaks: None) -> None:
    """A grandchild in a session of its own leaves the worker's process group; while it
    is below the worker, a clean stop finds it through the process tree."""
    ex = Executor(EchoWorker, 1, device="cpu", start_method="fork")
    kids = ex.collective_rpc(_spawn, args=(True,))[0]
    assert psutil.Process(kids[1]).pid == os.getsid(kids[1])  # it left the group
    ex.shutdown()
    assert wait_gone(kids, timeout=BOUND_S) == []


def test_a_worker_leads_its_own_group_with_one_guardian(no_leaks: None) -> None:
    with Executor(EchoWorker, 2, device="cpu", start_method="fork") as ex:
        for w in ex.workers:
            assert os.getpgid(w.pid) == w.pid != os.getpgid(0)
            guards = psutil.Process(w.pid).children()
            assert [g.name() for g in guards] == ["gpuexec-guard"]
            assert os.getpgid(guards[0].pid) == w.pid
        assert ex.collective_rpc("noop") == [None, None]
        guard_pids = [psutil.Process(w.pid).children()[0].pid for w in ex.workers]
    assert wait_gone(guard_pids, timeout=BOUND_S) == []


@pytest.mark.parametrize("method", ["fork", "subprocess"])
def test_workers_outlive_the_thread_that_built_their_executor(method: str,
                                                              no_leaks: None) -> None:
    """What ends a worker is its driver *process* exiting, never the end of the thread
    that started it (as ``PR_SET_PDEATHSIG`` would)."""
    made: list[Executor] = []
    builder = threading.Thread(target=lambda: made.append(
        Executor(EchoWorker, 2, device="cpu", start_method=method)))
    builder.start()
    builder.join()
    (ex,) = made
    try:
        task = f"/proc/self/task/{builder.native_id}"
        while os.path.exists(task):  # the kernel has ended the thread itself
            time.sleep(0.001)
        assert ex.collective_rpc("add", args=(1,)) == [1, 2]
        assert ex.collective_rpc("add", args=(2,)) == [2, 3]
    finally:
        ex.shutdown()

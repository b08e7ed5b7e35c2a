"""An executor belongs to the process that built it: forks of the driver can neither use
it nor stop it, and the parent keeps serving right answers from the same workers.

The driver runs as a subprocess (``fork_driver.py``): it forks with ``os.fork`` (the child
tries every call, shuts down, drops the executor and exits normally, so atexit handlers
and finalizers run), with a ``multiprocessing`` fork child, and with a child that builds
an executor of its own; the parent checks its executor after each.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import subprocess_env, wait_gone
from workers import EchoWorker

from gpuexec import Executor
from gpuexec.errors import ForeignProcessError, GpuexecError

TESTS = Path(__file__).resolve().parent
ENTRY_POINTS = {"collective_rpc", "non_block", "async", "check_health",
                "register_failure_callback"}


def _run_driver(transport: str, method: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, str(TESTS / "fork_driver.py"), transport, method],
        capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=str(TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("method", ["zygote", "fork"])
@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_forked_children_cannot_use_or_stop_the_parents_executor(transport: str,
                                                                 method: str) -> None:
    lines = _run_driver(transport, method)
    children = [line for line in lines if line["who"] == "child"]
    steps = {line["step"]: line for line in lines if line["who"] == "parent"}
    refused = [c for c in children if "attempts" in c]
    assert [c["kind"] for c in refused] == ["os.fork", "multiprocessing"]
    for child in refused:
        assert child["attempts"] == dict.fromkeys(ENTRY_POINTS, "ForeignProcessError"), child
    own = next(c for c in children if c["kind"] == "own executor")
    assert own["value"] == [7] and own["workers_are_new"]
    for step in ("os.fork child exited", "multiprocessing child exited",
                 "own-executor child exited"):
        assert steps[step]["status"] == 0, steps[step]
    for step in ("before", "after os.fork", "after multiprocessing",
                 "after own-executor child"):
        assert steps[step] == {"who": "parent", "step": step, "right": True,
                               "same_workers": True, "ipc_dir": True}
    assert steps["new executor"]["value"] == [5]  # the parent's start method still works
    assert steps["shut down"]["ipc_dir"] is False
    assert wait_gone(steps["start"]["pids"]) == []


def test_collecting_a_foreign_copy_sends_nothing(no_leaks: None) -> None:
    """In-process: a child forked while a non_block call is in flight drops its copy of
    the executor; the parent's call and the later ones still complete."""
    ex = Executor(EchoWorker, 2, device="cpu", transport="shm")
    try:
        fut = ex.collective_rpc("sleep", args=(0.2,), non_block=True)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's exit code is the assertion
            code = 1
            try:
                try:
                    ex.collective_rpc("noop")
                except ForeignProcessError:
                    ex.shutdown()
                    del ex
                    gc.collect()
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert fut.result(timeout=30) == [0.2, 0.2]
        assert ex.collective_rpc("add", args=(1,)) == [1, 2]
        assert all(psutil.Process(w.pid).is_running() for w in ex.workers)
    finally:
        ex.shutdown()


def test_foreign_process_error_is_typed() -> None:
    e = ForeignProcessError(10, 11)
    assert isinstance(e, GpuexecError)
    assert (e.owner_pid, e.pid) == (10, 11)
    assert "process 10" in str(e) and "process 11" in str(e)

"""Failure callbacks have returned before any caller is told of the death."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import pytest
from conftest import wait_gone
from workers import EchoWorker

from gpuexec import Executor, WorkerDiedError


@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_callbacks_return_before_any_caller_sees_the_death(transport: str) -> None:
    order: list[str] = []
    in_callback = threading.Event()
    release = threading.Event()
    inner: list[BaseException] = []
    ex = Executor(EchoWorker, 2, device="cpu", start_method="zygote", transport=transport)
    pids = [w.pid for w in ex.workers]
    sleeper: Future[Any] = ex.collective_rpc("sleep", args=(60,), ranks=[1], non_block=True)

    def callback() -> None:
        in_callback.set()
        try:  # a call made by the callback itself is told at once (no wait on itself)
            ex.collective_rpc("noop")
        except WorkerDiedError as e:
            inner.append(e)
        release.wait(60)
        order.append("callback")

    ex.register_failure_callback(callback)
    told = threading.Event()

    def caller() -> None:
        try:
            ex.collective_rpc("exit_now", args=(3,), ranks=[0])
        except WorkerDiedError:
            order.append("caller")
            told.set()

    late_told = threading.Event()

    def late_caller() -> None:
        in_callback.wait(60)
        try:
            ex.collective_rpc("noop")
        except WorkerDiedError:
            late_told.set()

    threads = [threading.Thread(target=caller), threading.Thread(target=late_caller)]
    for t in threads:
        t.start()
    try:
        assert in_callback.wait(60)
        # While the callback runs, nobody is told: the caller, a new call, the future.
        assert not told.wait(0.5) and not late_told.is_set() and not sleeper.done()
        assert inner and inner[0].rank == 0
    finally:
        release.set()
        for t in threads:
            t.join(60)
    assert order == ["callback", "caller"]
    assert late_told.is_set()
    with pytest.raises(WorkerDiedError) as info:
        sleeper.result(timeout=60)
    assert info.value.rank == 0 and info.value.exitcode == 3
    ex.shutdown(timeout=0.1)  # rank 1 is still asleep: no need to wait for it
    assert wait_gone(pids) == []

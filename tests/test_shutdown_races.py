"""Shutdown from any thread and from callbacks, concurrently with calls, on both
transports: every racing call ends with its result or ``ExecutorClosedError`` (never a
socket or memoryview error), nothing hangs, nothing is left behind. And the send side
honours the call's own deadline: a request that finds the ring full waits for room only
as long as its call may wait.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from race_workers import GateWorker

from gpuexec import Executor, ExecutorClosedError, RpcTimeoutError, WorkerDiedError

TRANSPORTS = ["zmq", "shm"]
JOIN_S = 60.0  # a bound for "did not hang" on a loaded 2-core machine, never approached


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    """A file the workers' ``wait_for`` blocks on until the test creates it."""
    path = tmp_path / "gate"
    yield path
    path.touch()


def _finish_all(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a calling thread hung"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shutdown_while_threads_submit(transport: str, no_leaks: None) -> None:
    ex = Executor(GateWorker, 2, device="cpu", transport=transport)
    errors: list[BaseException] = []
    futures: list[Future[Any]] = []
    started = threading.Barrier(7)
    progress = threading.Semaphore(0)
    # A payload that takes a while to encode (and, over shm, to copy into a segment)
    # widens the window between a call's checks and its send.
    payload = np.ones(2 << 20, dtype=np.uint8)

    def caller(i: int) -> None:
        started.wait()
        n = 0
        while True:
            try:
                if n % 3 == 2:
                    futures.append(ex.collective_rpc("add", args=(n, payload),
                                                     non_block=True))
                else:
                    assert ex.collective_rpc("add", args=(n, payload)) == [n, n + 1]
                    progress.release()
            except ExecutorClosedError:
                return
            except BaseException as e:
                errors.append(e)
                return
            n += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    started.wait()
    for _ in range(20):  # the callers are well under way
        assert progress.acquire(timeout=JOIN_S)
    ex.shutdown()
    _finish_all(threads)
    assert errors == []
    for fut in futures:
        try:
            value = fut.result(timeout=JOIN_S)
        except ExecutorClosedError:
            continue
        assert isinstance(value, list) and len(value) == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shutdown_while_async_tasks_run(transport: str, no_leaks: None) -> None:
    ex = Executor(GateWorker, 2, device="cpu", transport=transport, max_concurrent_batches=8)

    async def main() -> list[Any]:
        async def one(i: int) -> Any:
            return await ex.collective_rpc_async("add", args=(i,))

        tasks = [asyncio.ensure_future(one(i)) for i in range(200)]
        await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(None, ex.shutdown)
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(main())
    for i, out in enumerate(outcomes):
        assert out == [i, i + 1] or isinstance(out, ExecutorClosedError), out


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shutdown_in_a_failure_callback_with_a_future_outstanding(transport: str, gate: Path,
                                                                  no_leaks: None) -> None:
    ex = Executor(GateWorker, 2, device="cpu", transport=transport)
    done = threading.Event()

    def on_failure() -> None:
        ex.shutdown(timeout=0.5)
        done.set()

    ex.register_failure_callback(on_failure)
    fut = ex.collective_rpc("wait_for", args=(str(gate),), ranks=[1], non_block=True)
    ex.collective_rpc(lambda w: os._exit(3), ranks=[0], non_block=True)
    assert done.wait(JOIN_S), "shutdown() inside the failure callback hung"
    with pytest.raises((WorkerDiedError, ExecutorClosedError)):
        fut.result(timeout=JOIN_S)
    with pytest.raises(ExecutorClosedError):
        ex.collective_rpc("add", args=(1,))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shutdown_in_a_done_callback(transport: str, no_leaks: None) -> None:
    ex = Executor(GateWorker, 2, device="cpu", transport=transport)
    done = threading.Event()
    seen: list[Any] = []

    def on_done(fut: Future[Any]) -> None:
        seen.append(fut.result())
        ex.shutdown(timeout=0.5)
        done.set()

    ex.collective_rpc("add", args=(1,), non_block=True).add_done_callback(on_done)
    assert done.wait(JOIN_S), "shutdown() inside a done callback hung"
    assert seen == [[1, 2]]
    with pytest.raises(ExecutorClosedError):
        ex.collective_rpc("add", args=(1,))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_done_callback_may_make_calls(transport: str, no_leaks: None) -> None:
    with Executor(GateWorker, 2, device="cpu", transport=transport) as ex:
        done = threading.Event()
        seen: list[Any] = []

        def on_done(fut: Future[Any]) -> None:
            seen.append(ex.collective_rpc("add", args=(fut.result()[1],)))
            done.set()

        ex.collective_rpc("add", args=(1,), non_block=True).add_done_callback(on_done)
        assert done.wait(JOIN_S), "a call inside a done callback hung"
        assert seen == [[2, 3]]


class _Senders:
    """Calls made one by one on threads of their own, until one waits for room in the
    request ring (collective_rpc returns only once the request is in the ring)."""

    def __init__(self, ex: Executor) -> None:
        self.futures: dict[int, Future[Any]] = {}
        self.threads: list[threading.Thread] = []
        while True:
            sent = threading.Event()
            thread = threading.Thread(target=self._send, args=(ex, len(self.threads), sent))
            self.threads.append(thread)
            thread.start()
            if not sent.wait(1.0):  # this one waits for room: the ring is full
                return

    def _send(self, ex: Executor, i: int, sent: threading.Event) -> None:
        try:
            self.futures[i] = ex.collective_rpc("add", args=(i,), non_block=True)
        except BaseException as e:
            self.futures[i] = Future()
            self.futures[i].set_exception(e)
        sent.set()

    def outcomes(self) -> list[Future[Any]]:
        _finish_all(self.threads)
        return [self.futures[i] for i in range(len(self.threads))]


def test_a_full_ring_waits_only_as_long_as_the_call_may(gate: Path, no_leaks: None) -> None:
    with Executor(GateWorker, 1, device="cpu", transport="shm") as ex:
        blocked = ex.collective_rpc("wait_for", args=(str(gate),), non_block=True)
        senders = _Senders(ex)
        with pytest.raises(RpcTimeoutError) as info:
            ex.collective_rpc("add", args=(-1,), timeout=0.5)
        assert (info.value.method, info.value.timeout, info.value.ranks) == ("add", 0.5, (0,))
        # why the ring is full: the rank is still in the call that waits for the gate
        assert sorted(info.value.stacks) == [0]
        assert "running 'wait_for'" in info.value.stacks[0].split("\n")[0]
        gate.touch()
        assert blocked.result(timeout=JOIN_S) == [True]
        results = [f.result(timeout=JOIN_S) for f in senders.outcomes()]
        assert results == [[i] for i in range(len(results))]
        # the refused call was never sent: nothing came back for it
        assert ex.collective_rpc("add", args=(5,)) == [5]
        assert ex.stats().late_replies == 0


@pytest.mark.parametrize("round_", range(3))
def test_close_while_a_sender_waits_for_ring_room(round_: int, gate: Path,
                                                  no_leaks: None) -> None:
    """The old deadlock's shape: a sender waiting for room in the request ring while
    close() runs, with a blocking caller holding the pump lock (its worker is busy) and
    futures outstanding (the monitor pumps too). Every thread must end, every call with
    ExecutorClosedError."""
    ex = Executor(GateWorker, 1, device="cpu", transport="shm")
    waiter_error: list[BaseException] = []

    def wait_at_gate() -> None:
        try:
            ex.collective_rpc("wait_for", args=(str(gate),))
        except BaseException as e:
            waiter_error.append(e)

    waiter = threading.Thread(target=wait_at_gate)
    waiter.start()
    senders = _Senders(ex)
    time.sleep(0.05 * round_)  # vary where the sender is in its wait
    closer = threading.Thread(target=ex.shutdown, kwargs={"timeout": 0.2})
    closer.start()
    _finish_all([closer, waiter])
    assert len(waiter_error) == 1 and isinstance(waiter_error[0], ExecutorClosedError)
    for fut in senders.outcomes():
        with pytest.raises(ExecutorClosedError):
            fut.result(timeout=0)

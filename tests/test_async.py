"""``collective_rpc_async`` in an asyncio loop: results, overlap, bounds, cancellation,
timeouts and worker death, through the public API (no timing targets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tp_workers import ProbeWorker

from gpuexec import (
    Executor,
    ExecutorClosedError,
    RemoteError,
    RpcTimeoutError,
    WorkerDiedError,
)


@pytest.fixture(scope="module")
def ex() -> Iterator[Executor]:
    executor = Executor(ProbeWorker, 2, device="cpu", max_concurrent_batches=2)
    yield executor
    executor.shutdown()


async def until(cond: Callable[[], bool], limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


def test_results_like_collective_rpc(ex: Executor) -> None:
    async def go() -> None:
        assert await ex.collective_rpc_async("add", args=(10,)) == [10, 11]
        assert await ex.collective_rpc_async("add", (1,), unique_reply_rank=1) == 2
        assert await ex.collective_rpc_async("add", kwargs={"a": 5}, ranks=[1]) == [6]
        assert await ex.collective_rpc_async(lambda w, k: w.rank * k, args=(3,)) == [0, 3]
        with pytest.raises(RemoteError) as info:
            await ex.collective_rpc_async("add", args=("x",))
        assert info.value.rank == 0 and info.value.type_name == "TypeError"
        many = await asyncio.gather(*[ex.collective_rpc_async("add", args=(i,))
                                      for i in range(20)])
        assert many == [[i, i + 1] for i in range(20)]

    asyncio.run(go())


def test_two_batches_in_flight_overlap(ex: Executor, tmp_path: Path) -> None:
    flag = tmp_path / "go"

    async def go() -> None:
        before = ex.stats().calls
        first = asyncio.create_task(ex.collective_rpc_async("wait_for_file", args=(str(flag),)))
        second = asyncio.create_task(ex.collective_rpc_async("stamp"))
        await until(lambda: ex.stats().calls == before + 2)  # both sent...
        sent_both = time.monotonic()
        assert not first.done() and not second.done()       # ...while the first still runs
        flag.touch()
        finished_first, started_second = await asyncio.gather(first, second)
        for rank in range(2):  # in order per worker, and the second was queued meanwhile
            assert sent_both < finished_first[rank] <= started_second[rank]

    asyncio.run(go())


def test_max_concurrent_batches_bounds_outstanding_calls(ex: Executor, tmp_path: Path) -> None:
    flag = tmp_path / "go"

    async def go() -> None:
        before = ex.stats().calls
        tasks = [asyncio.create_task(ex.collective_rpc_async("wait_for_file", args=(str(flag),)))
                 for _ in range(3)]
        await until(lambda: ex.stats().calls == before + 2)
        await asyncio.sleep(0.3)  # room for a third send, if the bound let it through
        assert ex.stats().calls == before + 2
        assert not any(t.done() for t in tasks)
        flag.touch()
        await asyncio.gather(*tasks)
        assert ex.stats().calls == before + 3

    asyncio.run(go())


def test_cancellation_cancels_the_call_in_the_workers(ex: Executor) -> None:
    async def go() -> None:
        before = ex.stats()
        task = asyncio.create_task(ex.collective_rpc_async("sleep", args=(30.0,)))
        await until(lambda: ex.stats().calls == before.calls + 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the workers were interrupted: the next call does not wait out the 30 s sleep
        assert await ex.collective_rpc_async("add", args=(1,)) == [1, 2]
        after = ex.stats()
        assert after.cancelled == before.cancelled + 1
        assert after.cancelled_replies == before.cancelled_replies + 2  # both ranks stopped
        assert after.late_replies == before.late_replies

    asyncio.run(go())
    assert not ex.is_failed
    assert ex.collective_rpc("add", args=(2,)) == [2, 3]


def test_timeout_raises_rpc_timeout_error(ex: Executor) -> None:
    async def go() -> None:
        with pytest.raises(RpcTimeoutError) as info:
            await ex.collective_rpc_async("sleep", args=(0.5,), timeout=0.05)
        assert info.value.ranks == (0, 1)
        assert await ex.collective_rpc_async("add", args=(0,)) == [0, 1]

    asyncio.run(go())


def test_worker_death_raises_worker_died_error() -> None:
    with Executor(ProbeWorker, 2, device="cpu", shutdown_timeout=0.2) as ex:
        async def go() -> None:
            pending = asyncio.create_task(ex.collective_rpc_async("sleep", args=(30,),
                                                                  ranks=[0]))
            with pytest.raises(WorkerDiedError) as info:
                await ex.collective_rpc_async("exit_now", args=(3,), ranks=[1])
            assert (info.value.rank, info.value.exitcode) == (1, 3)
            with pytest.raises(WorkerDiedError):
                await pending
            with pytest.raises(WorkerDiedError):
                await ex.collective_rpc_async("add", args=(0,))

        asyncio.run(go())
        assert ex.is_failed
    with pytest.raises(ExecutorClosedError):
        asyncio.run(ex.collective_rpc_async("add", args=(0,)))

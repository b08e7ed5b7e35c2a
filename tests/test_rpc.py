"""collective_rpc through the public API, for every start method and world sizes 1, 2, 4."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
from conftest import START_METHODS, wait_gone
from workers import EchoWorker

from gpuexec import Executor, RemoteError, RpcTimeoutError
from gpuexec.errors import CallCancelledError, ValueNotCarriedError

CASES = [(m, n, "zmq") for m in START_METHODS for n in (1, 2, 4)] + \
    [(m, n, "shm") for m in ("zygote", "fork") for n in (1, 2, 4)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{n}-{t}" for m, n, t in CASES])
def ex(request: pytest.FixtureRequest) -> Iterator[Executor]:
    method, n, transport = request.param
    executor = Executor(EchoWorker, n, device="cpu", start_method=method, transport=transport,
                        worker_args=("t",), worker_kwargs={"alpha": 1},
                        env={"GPUEXEC_TEST_EXTRA": "yes"})
    pids = [w.pid for w in executor.workers]
    yield executor
    executor.shutdown()
    assert wait_gone(pids) == []


def test_identity_and_layout(ex: Executor) -> None:
    infos = ex.collective_rpc("whoami")
    n = ex.world_size
    assert [i["rank"] for i in infos] == list(range(n))
    assert [i["local_rank"] for i in infos] == list(range(n))
    assert {i["world_size"] for i in infos} == {n}
    assert {i["local_world_size"] for i in infos} == {n}
    assert {i["device"] for i in infos} == {"cpu"}
    assert {i["tag"] for i in infos} == {"t"}
    assert infos[0]["extra"] == {"alpha": 1}
    assert [i["pid"] for i in infos] == [w.pid for w in ex.workers]
    assert len({i["pid"] for i in infos} | {os.getpid()}) == n + 1
    assert [w.rank for w in ex.workers] == list(range(n))
    assert {w.device for w in ex.workers} == {"cpu"}


def test_worker_environment(ex: Executor) -> None:
    envs = ex.collective_rpc("env", args=("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                          "LOCAL_WORLD_SIZE", "GPUEXEC_TEST_EXTRA"))
    for rank, env in enumerate(envs):
        assert env == {"RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(ex.world_size),
                       "LOCAL_WORLD_SIZE": str(ex.world_size), "GPUEXEC_TEST_EXTRA": "yes"}


def test_args_kwargs_and_results_in_rank_order(ex: Executor) -> None:
    assert ex.collective_rpc("add", args=(10,), kwargs={"b": 5}) == \
        [15 + r for r in range(ex.world_size)]
    out = ex.collective_rpc("echo", args=(1, "two", [3.0], {"k": None}), kwargs={"x": b"\x00"})
    assert out == [{"args": [1, "two", [3.0], {"k": None}], "kwargs": {"x": b"\x00"}}] \
        * ex.world_size


def test_callable_runs_as_fn_worker_args(ex: Executor) -> None:
    offset = 100
    assert ex.collective_rpc(lambda w, a, b=0: w.rank * a + b + offset, args=(2,),
                             kwargs={"b": 1}) == [r * 2 + 101 for r in range(ex.world_size)]

    def nested(worker: EchoWorker) -> str:
        return f"{type(worker).__name__}:{worker.rank}"

    assert ex.collective_rpc(nested) == [f"EchoWorker:{r}" for r in range(ex.world_size)]


def test_ranks_subset_and_unique_reply(ex: Executor) -> None:
    last = ex.world_size - 1
    assert ex.collective_rpc("add", args=(0,), ranks=[last]) == [last]
    assert ex.collective_rpc("add", args=(1,), unique_reply_rank=last) == 1 + last
    if ex.world_size > 1:
        assert ex.collective_rpc("add", args=(0,), ranks=[1, 0]) == [1, 0]
        before = ex.collective_rpc("bump")
        ex.collective_rpc("bump", ranks=[0])
        after = ex.collective_rpc("bump")
        assert after[0] == before[0] + 2 and after[1] == before[1] + 1


def test_non_block_returns_future(ex: Executor) -> None:
    futs = [ex.collective_rpc("add", args=(i,), non_block=True) for i in range(20)]
    assert all(isinstance(f, Future) for f in futs)
    assert [f.result(timeout=30) for f in futs] == \
        [[i + r for r in range(ex.world_size)] for i in range(20)]
    fut = ex.collective_rpc("fail", non_block=True)
    with pytest.raises(RemoteError):
        fut.result(timeout=30)


def test_remote_error_and_worker_lives_on(ex: Executor) -> None:
    with pytest.raises(RemoteError) as info:
        ex.collective_rpc("fail", args=("kaput",))
    err = info.value
    assert err.rank == 0
    assert err.type_name == "ValueError"
    assert err.remote_message.startswith("kaput on rank 0")
    assert "in fail" in err.remote_traceback and "ValueError: kaput" in err.remote_traceback
    assert str(err.__cause__) == err.remote_traceback
    assert ex.collective_rpc("add", args=(1,)) == [1 + r for r in range(ex.world_size)]
    if ex.world_size > 1:
        with pytest.raises(RemoteError) as info2:
            ex.collective_rpc("fail_on", args=(1,))
        assert info2.value.rank == 1 and info2.value.type_name == "KeyError"


def test_every_failed_rank_has_its_own_error(ex: Executor) -> None:
    """The lowest failed rank's error is raised, its message exactly the worker's; every
    failed rank's own error (rank, type, message, traceback) is in ``errors``."""
    n = ex.world_size
    with pytest.raises(RemoteError) as info:
        ex.collective_rpc("fail", args=("kaput",))
    err = info.value
    assert err.remote_message == "kaput on rank 0"
    assert sorted(err.errors) == list(range(n)) and err.errors[0] is err
    for rank, e in err.errors.items():
        assert isinstance(e, RemoteError)
        assert (e.rank, e.type_name, e.remote_message) == (rank, "ValueError",
                                                           f"kaput on rank {rank}")
        assert f"ValueError: kaput on rank {rank}" in e.remote_traceback
        assert rank == 0 or e.errors == {rank: e}
    if n > 1:
        others = ", ".join(str(r) for r in range(1, n))
        assert str(err).endswith(f"kaput on rank 0 (rank{'s' if n > 2 else ''} {others} "
                                 "failed too: see .errors)")
        copy = pickle.loads(pickle.dumps(err))
        assert sorted(copy.errors) == list(range(n)) and copy.errors[0] is copy
        assert copy.errors[n - 1].remote_message == f"kaput on rank {n - 1}"
    else:
        assert str(err).endswith(": kaput on rank 0")


def test_unknown_method_names_it(ex: Executor) -> None:
    with pytest.raises(RemoteError, match="no method 'does_not_exist'") as info:
        ex.collective_rpc("does_not_exist")
    assert info.value.type_name == "AttributeError"
    with pytest.raises(RemoteError, match="no method '__class__'"):
        ex.collective_rpc("__class__")


def test_unsendable_result_is_a_typed_error_naming_the_rank(ex: Executor) -> None:
    with pytest.raises(ValueNotCarriedError, match="refuses to be pickled") as info:
        ex.collective_rpc("unsendable")
    assert (info.value.rank, info.value.path) == (0, "result")
    assert info.value.type_name == "workers._Unpicklable"
    assert "refuses to be pickled" in info.value.remote_traceback
    assert ex.collective_rpc("noop") == [None] * ex.world_size


def test_timeout_then_correct_result(ex: Executor) -> None:
    with pytest.raises(RpcTimeoutError) as info:
        ex.collective_rpc("sleep", args=(0.5,), timeout=0.1)
    assert isinstance(info.value, TimeoutError)
    assert info.value.ranks == tuple(range(ex.world_size))
    assert "did not answer" in str(info.value)
    # The answers of the timed-out (and cancelled) call must not be taken for this call's.
    assert ex.collective_rpc("add", args=(7,)) == [7 + r for r in range(ex.world_size)]
    stats = ex.stats()
    assert stats.cancelled_replies + stats.late_replies >= ex.world_size


def test_timeout_names_only_the_silent_ranks(ex: Executor) -> None:
    if ex.world_size < 2:
        pytest.skip("needs two ranks")
    fut = ex.collective_rpc("sleep", args=(0.6,), ranks=[1], non_block=True)
    with pytest.raises(RpcTimeoutError) as info:
        ex.collective_rpc("add", args=(0,), timeout=0.2)
    assert info.value.ranks == (1,)
    assert fut.result(timeout=10) == [0.6]


def test_check_health(ex: Executor) -> None:
    ex.check_health(timeout=10)
    if ex.world_size < 2:
        return
    fut = ex.collective_rpc("sleep", args=(30,), ranks=[ex.world_size - 1], non_block=True)
    with pytest.raises(RpcTimeoutError) as info:
        ex.check_health(timeout=0.2)
    assert info.value.ranks == (ex.world_size - 1,)
    with pytest.raises(CallCancelledError, match="check_health found rank"):
        fut.result(timeout=10)  # what the silent rank ran was interrupted
    ex.check_health(timeout=10)


def test_argument_errors_do_not_send(ex: Executor) -> None:
    calls = ex.stats().calls
    with pytest.raises(ValueError, match="out of range"):
        ex.collective_rpc("noop", ranks=[ex.world_size])
    with pytest.raises(ValueError, match="unique_reply_rank"):
        ex.collective_rpc("noop", ranks=[0], unique_reply_rank=ex.world_size + 3)
    with pytest.raises(ValueError, match="timeout"):
        ex.collective_rpc("noop", timeout=0)
    with pytest.raises(TypeError):
        ex.collective_rpc(42)  # type: ignore[call-overload]
    assert ex.stats().calls == calls

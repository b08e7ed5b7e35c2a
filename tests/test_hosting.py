"""Features for workers that host an engine's object: deferred replies (a method returns a
Future), the worker's shutdown hook, calls routed to a hosted object, per-rank env."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import wait_gone
from hosting_workers import DeferringWorker, HostWorker

from gpuexec import ConfigError, Executor, RemoteError
from gpuexec.errors import ValueNotCarriedError

TRANSPORTS = ["zmq", "shm"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_deferred_reply_lets_the_worker_serve_on(transport: str) -> None:
    with Executor(DeferringWorker, 2, device="cpu", transport=transport) as ex:
        first = ex.collective_rpc("later", args=("a", {"step": 1}), non_block=True)
        # The worker is free while "a" is outstanding: later calls are answered first.
        assert ex.collective_rpc("now", args=([1, 2],)) == [[1, 2], [1, 2]]
        assert not first.done()
        assert ex.collective_rpc("release", args=("a",)) == ["released a"] * 2
        assert first.result(timeout=30) == [{"step": 1}, {"step": 1}]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_deferred_replies_resolve_out_of_order(transport: str) -> None:
    with Executor(DeferringWorker, 2, device="cpu", transport=transport) as ex:
        a = ex.collective_rpc("later", args=("a", "A"), non_block=True)
        b = ex.collective_rpc("later", args=("b", "B"), unique_reply_rank=1, non_block=True)
        ex.collective_rpc("release", args=("b",))
        assert b.result(timeout=30) == "B"
        assert not a.done()
        ex.collective_rpc("release", args=("a",))
        assert a.result(timeout=30) == ["A", "A"]
        assert ex.stats().late_replies == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_deferred_replies_from_other_threads_and_direct_ones_all_arrive_whole(
        transport: str) -> None:
    """Replies sent by pool threads (futures resolving) while the serving thread sends
    its own: every one arrives, whole and to its call (a worker's replies leave one at
    a time once a method returned a Future)."""
    with Executor(DeferringWorker, 2, device="cpu", transport=transport) as ex:
        assert ex.collective_rpc("echo", args=("before",)) == ["before"] * 2
        futures = []
        for i in range(300):
            method = "soon" if i % 2 else "echo"
            value = {"i": i, "pad": "x" * (i % 7) * 500}
            futures.append((value, ex.collective_rpc(method, args=(value,), non_block=True)))
        for value, future in futures:
            assert future.result(timeout=60) == [value, value]
        assert ex.stats().late_replies == 0
        assert ex.stats().malformed == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_deferred_failures_are_typed(transport: str) -> None:
    with Executor(DeferringWorker, 2, device="cpu", transport=transport) as ex:
        with pytest.raises(RemoteError) as info:
            ex.collective_rpc("failing", args=("no",))
        assert info.value.rank == 0 and info.value.type_name == "LookupError"
        assert "no on rank 0" in str(info.value)
        with pytest.raises(RemoteError) as info:
            ex.collective_rpc("cancelled")
        assert "CancelledError" in info.value.type_name
        with pytest.raises(ValueNotCarriedError) as unsent:  # a deferred result, too
            ex.collective_rpc("unsendable")
        assert unsent.value.rank == 0 and unsent.value.path == "result"
        assert "cannot be carried faithfully" in str(unsent.value)
        assert ex.collective_rpc("now", args=(7,)) == [7, 7]  # still usable


def test_calls_go_to_the_hosted_object(tmp_path: Path) -> None:
    with Executor(HostWorker, 2, device="cpu", worker_args=(str(tmp_path),)) as ex:
        # init_device is the engine's, not gpuexec.Worker's (which returns a report).
        assert ex.collective_rpc("init_device") == ["engine device 0", "engine device 1"]
        assert ex.collective_rpc("is_ready") == [True, True]
        assert ex.collective_rpc(lambda engine: type(engine).__name__) == ["Engine"] * 2
        with pytest.raises(RemoteError, match="Engine has no method 'on_shutdown'"):
            ex.collective_rpc("on_shutdown")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shutdown_hook_runs_in_every_worker(tmp_path: Path, transport: str) -> None:
    ex = Executor(HostWorker, 3, device="cpu", transport=transport,
                  worker_args=(str(tmp_path),))
    pids = [w.pid for w in ex.workers]
    ex.shutdown()
    assert wait_gone(pids) == []
    marks = sorted(p.name for p in tmp_path.iterdir())
    assert marks == sorted(f"hook-{r}-{pid}" for r, pid in enumerate(pids))
    assert {p.read_text() for p in tmp_path.iterdir()} == {"engine shutdown"}


def test_shutdown_hook_runs_on_sigterm(tmp_path: Path) -> None:
    with Executor(HostWorker, 2, device="cpu", worker_args=(str(tmp_path),)) as ex:
        victim = ex.workers[1].pid
        os.kill(victim, signal.SIGTERM)
        assert wait_gone([victim]) == []
        assert [p.name for p in tmp_path.iterdir()] == [f"hook-1-{victim}"]


def test_sigterm_bounds_a_hanging_hook_by_shutdown_timeout(tmp_path: Path) -> None:
    with Executor(HostWorker, 1, device="cpu", worker_args=(str(tmp_path), True),
                  shutdown_timeout=2.0) as ex:
        victim = ex.workers[0].pid
        os.kill(victim, signal.SIGTERM)
        # The hook blocks forever; the worker still exits once shutdown_timeout passed.
        assert wait_gone([victim], timeout=30) == []
        assert [p.name for p in tmp_path.iterdir()] == [f"hook-0-{victim}"]


def test_graceful_shutdown_escalates_past_a_hanging_hook(tmp_path: Path) -> None:
    ex = Executor(HostWorker, 2, device="cpu", worker_args=(str(tmp_path), True),
                  shutdown_timeout=0.5, terminate_timeout=0.5)
    pids = [w.pid for w in ex.workers]
    start = time.monotonic()
    ex.shutdown()
    assert wait_gone(pids) == []
    assert time.monotonic() - start < 30  # no wait beyond the escalation
    assert len(list(tmp_path.iterdir())) == 2  # ran once per worker, not again on SIGTERM


@pytest.mark.parametrize("env", [
    [{"SLOT": "a"}, {"SLOT": "b"}, {"SLOT": "c"}],
    lambda rank: {"SLOT": "abc"[rank]},
], ids=["list", "callable"])
def test_per_rank_environment(env: object) -> None:
    with Executor(DeferringWorker, 3, device="cpu", env=env) as ex:  # type: ignore[arg-type]
        assert ex.collective_rpc("env", args=("SLOT", "RANK")) == [
            {"SLOT": s, "RANK": str(r)} for r, s in enumerate("abc")]


@pytest.mark.parametrize(("env", "match"), [
    ([{"A": "1"}], "env has 1 entries but world_size is 2"),
    ([{"A": "1"}, {"A": 2}], r"env\[1\] entries must be str -> str"),
    ([{"A": "1"}, "B=2"], r"env\[1\] must be a mapping"),
    (lambda rank: {"A": "1"} if rank == 0 else None, r"env\(1\) must be a mapping"),
    (lambda rank: 1 / rank, r"env\(0\) raised ZeroDivisionError"),
    ({"A": "x\0y"}, "env entries must be str -> str"),
    ("A=1", "env must be a mapping, a sequence of one mapping per rank or a callable"),
])
def test_bad_per_rank_environment_fails_before_start(env: object, match: str) -> None:
    from conftest import worker_children

    before = {p.pid for p in worker_children()}
    with pytest.raises(ConfigError, match=match):
        Executor(DeferringWorker, 2, device="cpu", env=env)  # type: ignore[arg-type]
    assert {p.pid for p in worker_children()} <= before


@pytest.mark.parametrize("how", ["graceful", "sigterm"])
def test_shared_memory_a_worker_leaves_is_removed(how: str) -> None:
    """Stopping a worker kills its children, but not multiprocessing's resource tracker,
    which removes the segments the worker created and left behind."""
    from hosting_workers import LeakingWorker

    ex = Executor(LeakingWorker, 1, device="cpu")
    name = ex.collective_rpc("leak", unique_reply_rank=0)
    assert os.path.exists(f"/dev/shm/{name}")
    pid = ex.workers[0].pid
    if how == "sigterm":
        os.kill(pid, signal.SIGTERM)
        assert wait_gone([pid]) == []
    ex.shutdown()
    assert wait_gone([pid]) == []
    deadline = time.monotonic() + 30
    while os.path.exists(f"/dev/shm/{name}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/dev/shm/{name}")

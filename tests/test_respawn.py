"""Replacing dead or stuck ranks in place (``Executor.respawn``, ``on_worker_death``),
through the public API, on both transports and under fork, the zygote and spawn."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import wait_gone
from respawn_workers import CountingWorker

from gpuexec import Executor, Recovery, RespawnReport, WorkerDiedError
from gpuexec.errors import (
    ConfigError,
    ExecutorClosedError,
    InvalidArgumentError,
    RespawnError,
    WorkerStartupError,
)

TRANSPORTS = ["shm", "zmq"]
METHODS = ["fork", "zygote", "spawn"]


def _until(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for an event the test caused (bounded only so a bug cannot hang the run)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def _kill(ex: Executor, rank: int) -> int:
    pid = ex.workers[rank].pid
    os.kill(pid, signal.SIGKILL)
    _until(lambda: ex.is_failed, f"rank {rank}'s death noticed")
    return pid


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_respawn_replaces_a_killed_rank(transport: str, method: str, tmp_path: Path,
                                         no_leaks: None) -> None:
    with Executor(CountingWorker, 3, device="cpu", transport=transport, start_method=method,
                  worker_kwargs={"tag": "t"}, env=lambda r: {"GX_RANK_ENV": f"e{r}"}) as ex:
        before = ex.collective_rpc("ident")
        assert ex.collective_rpc("step", args=(1,)) == [(0, 1, 1), (1, 1, 1), (2, 1, 1)]
        in_flight = ex.collective_rpc("block", args=(str(tmp_path / "go"),), non_block=True)
        old_pid = _kill(ex, 1)
        with pytest.raises(WorkerDiedError) as died:
            in_flight.result(timeout=30)
        assert died.value.rank == 1
        with pytest.raises(WorkerDiedError):
            ex.collective_rpc("step", args=(2,))
        (tmp_path / "go").touch()  # the survivors' block() returns: their replies are late

        reports = ex.respawn()

        assert len(reports) == 1 and isinstance(reports[0], RespawnReport)
        r = reports[0]
        assert (r.rank, r.old_pid, r.old_exitcode, r.old_signal, r.killed) == \
            (1, old_pid, -signal.SIGKILL, "SIGKILL", False)
        assert r.new_pid == ex.workers[1].pid != old_pid and r.seconds > 0
        assert not ex.is_failed
        # the call in flight at the death stays ended
        with pytest.raises(WorkerDiedError):
            in_flight.result(timeout=0)
        after = ex.collective_rpc("ident")
        for b, a in zip(before, after):
            assert {k: a[k] for k in ("rank", "local_rank", "device", "world_size", "tag",
                                      "env")} == \
                {k: b[k] for k in ("rank", "local_rank", "device", "world_size", "tag", "env")}
        assert [a["pid"] for a in after] == [before[0]["pid"], r.new_pid, before[2]["pid"]]
        # survivors kept their state; the new rank starts from its __init__
        assert ex.collective_rpc("step", args=(3,)) == [(0, 3, 2), (1, 3, 1), (2, 3, 2)]
        assert ex.collective_rpc("step", args=(4,), ranks=[1]) == [(1, 4, 2)]
        assert ex.collective_rpc("step", args=(5,), unique_reply_rank=1) == (1, 5, 3)
        big = bytes(3 << 20)  # over a ring slot: the overflow path to the new rank
        assert [x[1] == big for x in ex.collective_rpc("step", args=(big,))] == [True] * 3
        ex.check_health()
    assert wait_gone([old_pid, r.new_pid]) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_live_rank_refused_unless_kill(transport: str, no_leaks: None) -> None:
    with Executor(CountingWorker, 2, device="cpu", transport=transport,
                  start_method="fork") as ex:
        ex.collective_rpc("step", args=(0,))
        pids = [w.pid for w in ex.workers]
        assert ex.respawn() == []  # nothing dead
        with pytest.raises(RespawnError, match=r"rank\(s\) \[0\] are alive.*kill=True") as e:
            ex.respawn([0])
        assert e.value.ranks == [0]
        assert [w.pid for w in ex.workers] == pids and not ex.is_failed
        failures: list[int] = []
        ex.register_failure_callback(lambda: failures.append(1))
        (r,) = ex.respawn([0], kill=True)
        assert (r.rank, r.old_pid, r.killed, r.old_signal) == (0, pids[0], True, "SIGKILL")
        _until(lambda: failures == [1], "the failure callback")  # the kill was a failure
        assert not ex.is_failed
        assert ex.collective_rpc("step", args=(1,)) == [(0, 1, 1), (1, 1, 2)]
    assert wait_gone(pids) == []


def test_respawn_refusals_and_bad_arguments(no_leaks: None) -> None:
    with pytest.raises(ConfigError, match="on_worker_death"):
        Executor(CountingWorker, 1, device="cpu", on_worker_death="restart")
    with pytest.raises(ConfigError, match="max_respawns"):
        Executor(CountingWorker, 1, device="cpu", max_respawns=0)
    ex = Executor(CountingWorker, 2, device="cpu", start_method="fork")
    with pytest.raises(InvalidArgumentError, match="not ranks of this executor"):
        ex.respawn([2])
    with pytest.raises(InvalidArgumentError):
        ex.respawn(1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="timeout"):
        ex.respawn(timeout=0)
    ex.shutdown()
    with pytest.raises(ExecutorClosedError):
        ex.respawn()
    with pytest.raises(ExecutorClosedError):
        ex.respawn([0], kill=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_replacement_that_fails_leaves_the_rank_dead(transport: str, tmp_path: Path,
                                                      no_leaks: None) -> None:
    with Executor(CountingWorker, 2, device="cpu", transport=transport, start_method="fork",
                  worker_kwargs={"gate": str(tmp_path)}) as ex:
        _kill(ex, 1)
        (tmp_path / "fail-1").touch()
        with pytest.raises(RespawnError, match=r"respawning rank\(s\) \[1\] failed") as e:
            ex.respawn()
        assert isinstance(e.value.__cause__, WorkerStartupError)
        assert "told to fail" in str(e.value.__cause__)
        assert ex.is_failed
        with pytest.raises(WorkerDiedError):
            ex.collective_rpc("step", args=(1,))
        (tmp_path / "fail-1").unlink()
        (r,) = ex.respawn()
        assert r.rank == 1 and not ex.is_failed
        assert ex.collective_rpc("step", args=(2,)) == [(0, 2, 1), (1, 2, 1)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_death_of_a_survivor_during_respawn(transport: str, tmp_path: Path,
                                            no_leaks: None) -> None:
    """Rank 0 dies while rank 1's replacement is in its __init__: the respawn fails
    (the survivors did not all take the new peer), both ranks stay dead, and a second
    respawn replaces both; calls made meanwhile get WorkerDiedError at once."""
    with Executor(CountingWorker, 3, device="cpu", transport=transport, start_method="fork",
                  worker_kwargs={"gate": str(tmp_path)}) as ex:
        ex.collective_rpc("step", args=(0,))
        _kill(ex, 1)
        (tmp_path / "block-1").touch()
        out: list[BaseException] = []

        def run() -> None:
            try:
                ex.respawn()
            except BaseException as e:
                out.append(e)

        t = threading.Thread(target=run)
        t.start()
        _until((tmp_path / "init-1").exists, "the replacement's __init__ started")
        with pytest.raises(WorkerDiedError):  # at once, not after the respawn
            ex.collective_rpc("step", args=(1,))
        pid0 = ex.workers[0].pid
        os.kill(pid0, signal.SIGKILL)
        _until(lambda: 0 in ex.dead_ranks, "rank 0's death seen")
        (tmp_path / "block-1").unlink()
        t.join(60)
        (err,) = out
        assert isinstance(err, RespawnError) and err.ranks == [1]
        assert isinstance(err.__cause__, WorkerDiedError) and err.__cause__.rank == 0
        assert ex.is_failed and ex.dead_ranks == [0, 1]
        with pytest.raises(WorkerDiedError):
            ex.collective_rpc("step", args=(1,))
        r0, r1 = ex.respawn()
        assert (r0.rank, r0.old_pid, r1.rank) == (0, pid0, 1)
        assert not ex.is_failed
        assert ex.collective_rpc("step", args=(2,)) == [(0, 2, 1), (1, 2, 1), (2, 2, 2)]


@pytest.mark.parametrize("transport", [*TRANSPORTS, "tcp"])
def test_second_death_right_after(transport: str, no_leaks: None) -> None:
    with Executor(CountingWorker, 2, device="cpu", transport=transport,
                  start_method="zygote") as ex:
        _kill(ex, 1)
        ex.respawn()
        _kill(ex, 1)  # the replacement dies at once
        with pytest.raises(WorkerDiedError) as e:
            ex.collective_rpc("step", args=(1,))
        assert e.value.rank == 1
        assert ex.dead_ranks == [1]
        os.kill(ex.workers[0].pid, signal.SIGKILL)
        _until(lambda: ex.dead_ranks == [0, 1], "rank 0's death seen")
        reports = ex.respawn()
        assert [r.rank for r in reports] == [0, 1]
        assert ex.collective_rpc("step", args=(2,)) == [(0, 2, 1), (1, 2, 1)]


def test_shutdown_during_respawn(tmp_path: Path, no_leaks: None) -> None:
    ex = Executor(CountingWorker, 2, device="cpu", start_method="fork",
                  worker_kwargs={"gate": str(tmp_path)})
    _kill(ex, 1)
    (tmp_path / "block-1").touch()
    out: list[BaseException] = []

    def run() -> None:
        try:
            ex.respawn()
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    _until((tmp_path / "init-1").exists, "the replacement's __init__ started")
    ex.shutdown()
    t.join(60)
    assert len(out) == 1 and isinstance(out[0], ExecutorClosedError)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_automatic_mode(transport: str, no_leaks: None) -> None:
    with Executor(CountingWorker, 2, device="cpu", transport=transport, start_method="fork",
                  on_worker_death="respawn", max_respawns=1, respawn_window=600) as ex:
        gave_up: list[int] = []
        ex.register_failure_callback(lambda: gave_up.append(len(ex.recoveries)))
        ex.collective_rpc("step", args=(0,))
        pid = _kill(ex, 1)
        _until(lambda: len(ex.recoveries) == 1, "the automatic respawn")
        (rec,) = ex.recoveries
        assert isinstance(rec, Recovery)
        assert (rec.rank, rec.outcome) == (1, "respawned")
        assert rec.reports[0].old_pid == pid and f"pid {pid} ->" in rec.detail
        _until(lambda: not ex.is_failed, "calls flow again")
        assert ex.collective_rpc("step", args=(1,)) == [(0, 1, 2), (1, 1, 1)]
        assert gave_up == []  # a death that was repaired is no failure of the executor
        _kill(ex, 0)  # a second death within the window: over max_respawns
        _until(lambda: len(ex.recoveries) == 2, "the limit noted")
        assert ex.recoveries[1].outcome == "limit"
        assert "max_respawns=1" in ex.recoveries[1].detail
        assert ex.is_failed
        _until(lambda: gave_up == [2], "the failure callback, once the recovery gave up")
        with pytest.raises(WorkerDiedError):
            ex.collective_rpc("step", args=(2,))
        # an explicit respawn still works
        assert [r.rank for r in ex.respawn()] == [0]
        assert ex.collective_rpc("step", args=(3,)) == [(0, 3, 1), (1, 3, 2)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_gloo_group_rebuilt_and_survivors_released(transport: str, no_leaks: None) -> None:
    """Ranks 0-2 are blocked in an all-reduce that rank 3 never joins; rank 3 is
    SIGKILLed (ranks not connected to it in gloo's ring stay blocked until the group is
    aborted). The survivors are released, the group is re-formed with the new rank 3
    (same world size), on_peers_replaced([3]) ran on the survivors only, and the
    survivors kept their state."""
    pytest.importorskip("torch")
    from respawn_workers import GroupWorker

    with Executor(GroupWorker, 4, device="cpu", transport=transport, start_method="zygote",
                  distributed_backend="gloo", distributed_timeout=60) as ex:
        assert ex.collective_rpc("all_reduce") == [10.0] * 4
        stuck = ex.collective_rpc("all_reduce_without", args=(3,), ranks=[0, 1, 2],
                                  non_block=True)
        _kill(ex, 3)
        try:  # rank 3 was not a target: the survivors' answers may beat the death
            assert all(stuck.result(timeout=30))
        except WorkerDiedError:
            pass
        (r,) = ex.respawn(timeout=60)
        assert r.rank == 3
        released = ex.collective_rpc("release_log")
        assert all(released[:3]) and released[3] == ""
        assert ex.collective_rpc("group_size") == [4] * 4
        assert ex.collective_rpc("all_reduce") == [10.0] * 4
        assert ex.collective_rpc("replaced_log") == [[[3]], [[3]], [[3]], []]
        assert ex.collective_rpc("step", args=(0,)) == \
            [(0, 0, 3), (1, 0, 3), (2, 0, 3), (3, 0, 2)]
        # and again: rank 0, which hosts the rendezvous, dies
        _kill(ex, 0)
        ex.respawn(timeout=60)
        assert ex.collective_rpc("all_reduce") == [10.0] * 4
        assert ex.collective_rpc("replaced_log") == [[], [[3], [0]], [[3], [0]], [[0]]]


def test_on_peers_replaced_without_a_backend(no_leaks: None) -> None:
    with Executor(CountingWorker, 3, device="cpu", start_method="fork") as ex:
        _kill(ex, 2)
        ex.respawn()
        assert ex.collective_rpc("replaced_log") == [[[2]], [[2]], []]


def test_respawn_async(no_leaks: None) -> None:
    import asyncio

    with Executor(CountingWorker, 2, device="cpu", start_method="fork") as ex:
        _kill(ex, 0)
        (r,) = asyncio.run(ex.respawn_async())
        assert r.rank == 0 and not ex.is_failed
        assert ex.collective_rpc("step", args=(1,)) == [(0, 1, 1), (1, 1, 1)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_large_late_replies_around_a_respawn(transport: str, tmp_path: Path,
                                             no_leaks: None) -> None:
    """Replies too big for a ring slot, sent by the survivors after the death (late) and
    during the respawn, never pair with the wrong announcement: calls after the
    respawn get their own large replies."""
    n = 3 << 20
    with Executor(CountingWorker, 3, device="cpu", transport=transport, start_method="fork",
                  worker_kwargs={"gate": str(tmp_path)}) as ex:
        late = ex.collective_rpc("big_after", args=(str(tmp_path / "go"), n), non_block=True)
        _kill(ex, 2)
        (tmp_path / "block-2").touch()  # the replacement waits in its __init__ ...
        out: list[object] = []
        t = threading.Thread(target=lambda: out.append(ex.respawn()))
        t.start()
        _until((tmp_path / "init-2").exists, "the replacement's __init__ started")
        (tmp_path / "go").touch()  # ... while the survivors send their large replies
        time.sleep(0.2)  # let them arrive during the respawn (either way must work)
        (tmp_path / "block-2").unlink()
        t.join(60)
        assert len(out) == 1
        with pytest.raises(WorkerDiedError):
            late.result(timeout=0)
        for _ in range(3):
            got = ex.collective_rpc("big_after", args=(str(tmp_path / "go"), n), timeout=30)
            assert got == [bytes([r]) * n for r in range(3)]
        stats = ex.stats()
        assert stats.late_replies >= 2
        assert "overflow_lost" not in stats.malformed_by_reason  # no reply waited in vain


def test_shutdown_during_an_automatic_respawn(tmp_path: Path, no_leaks: None) -> None:
    ex = Executor(CountingWorker, 2, device="cpu", start_method="fork",
                  worker_kwargs={"gate": str(tmp_path)}, on_worker_death="respawn")
    (tmp_path / "block-1").touch()
    _kill(ex, 1)
    _until((tmp_path / "init-1").exists, "the automatic replacement's __init__ started")
    ex.shutdown()  # ends the respawn under way and stops the replacement too
    assert ex.recoveries == []
    with pytest.raises(ExecutorClosedError):
        ex.respawn()

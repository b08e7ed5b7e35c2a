"""Cancellation through the public API: ``Future.cancel()``, asyncio (test_async.py),
timeouts, ``check_health``, Ctrl-C, shutdown, a worker's death, ``cancel_grace`` and
collectives. The methods (tests/cancel_workers.py) announce that they run by creating a
file, so every test waits on that event, never on a clock."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cancel_workers import CancelWorker
from conftest import START_METHODS, subprocess_env

from gpuexec import Executor
from gpuexec.errors import (
    CallCancelledError,
    ConfigError,
    ExecutorClosedError,
    RemoteError,
    RpcTimeoutError,
    WorkerDiedError,
)

HOWS = ["loop", "sleep", "event", "select", "poll", "socket", "subprocess", "swallow"]


def started(prefix: Path, n: int, limit: float = 60.0) -> None:
    """Wait until ``n`` workers created their ``prefix.<pid>`` file."""
    deadline = time.monotonic() + limit
    while len(list(prefix.parent.glob(prefix.name + ".*"))) < n:
        assert time.monotonic() < deadline, f"{prefix.name}: the method never started"
        time.sleep(0.005)


def marks(prefix: Path, ranks: int) -> list[str]:
    return [Path(f"{prefix}.{r}").read_text() for r in range(ranks)]


@pytest.fixture(params=["zmq", "shm"])
def ex(request: pytest.FixtureRequest) -> Iterator[Executor]:
    with Executor(CancelWorker, 2, device="cpu", transport=request.param) as executor:
        yield executor


def test_future_cancel_interrupts_every_blocking_kind(ex: Executor, tmp_path: Path) -> None:
    for n, how in enumerate(HOWS):
        before = ex.stats()
        go, mark = tmp_path / f"go{n}", tmp_path / f"mark{n}"
        future = ex.collective_rpc("block", args=(how, str(go), str(mark)), non_block=True)
        started(go, 2)
        assert future.cancel() is True, how
        assert future.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result()
        # the next call answers: both ranks left the method (60 s otherwise)
        assert ex.collective_rpc("noop") == [0, 1], how
        assert marks(mark, 2) == ["CallCancelled block"] * 2, how  # its finally ran
        after = ex.stats()
        assert after.cancelled == before.cancelled + 1
        assert after.cancelled_replies == before.cancelled_replies + 2
        assert after.timeouts == before.timeouts and after.cancel_kills == 0


@pytest.mark.parametrize("method", START_METHODS)
def test_cancel_under_every_start_method(method: str, tmp_path: Path, no_leaks: None) -> None:
    with Executor(CancelWorker, 2, device="cpu", start_method=method) as ex:
        for how in ("loop", "sleep"):
            go, mark = tmp_path / f"go-{how}", tmp_path / f"mark-{how}"
            future = ex.collective_rpc("block", args=(how, str(go), str(mark)),
                                       non_block=True)
            started(go, 2)
            assert future.cancel()
            assert ex.collective_rpc("noop") == [0, 1]
            assert marks(mark, 2) == ["CallCancelled block"] * 2


def test_a_finished_call_cannot_be_cancelled(ex: Executor) -> None:
    future = ex.collective_rpc("noop", non_block=True)
    assert future.result() == [0, 1]
    assert future.cancel() is False and not future.cancelled()
    assert ex.stats().cancelled == 0


def test_a_queued_call_is_cancelled_before_it_runs(ex: Executor, tmp_path: Path) -> None:
    go, mark = tmp_path / "go", tmp_path / "mark"
    first = ex.collective_rpc("block", args=("sleep", str(go), str(mark)), non_block=True)
    queued = ex.collective_rpc("noop", non_block=True)
    started(go, 2)
    assert queued.cancel() and first.cancel()
    assert ex.collective_rpc(lambda w: w.calls) == [0, 0]  # noop never ran
    assert ex.stats().cancelled_replies == 4


def test_a_bare_call_answered_in_the_ring_core_is_cancelled_and_skipped_alike(
        ex: Executor, tmp_path: Path) -> None:
    """A call by name without arguments, once served, runs in the worker's ring core
    (shared memory): it is interrupted as the request loop's calls are, with its own
    name, and one queued behind a cancelled call is still skipped."""
    for _ in range(3):
        assert ex.collective_rpc("quiet") == [None, None]
    for n, how in enumerate(("loop", "sleep")):
        go, mark = tmp_path / f"go-{how}", tmp_path / f"mark-{how}"
        ex.collective_rpc("plan", args=(how, str(go), str(mark)))
        assert ex.collective_rpc("quiet") == [None, None]
        future = ex.collective_rpc("quiet", non_block=True)
        started(go, 2)
        assert future.cancel()
        callers = ex.collective_rpc(lambda w: w.caller)
        assert ex.collective_rpc("quiet") == [None, None]
        assert marks(mark, 2) == ["CallCancelled quiet"] * 2
        # The core ran the first (ZeroMQ: the request loop); after a cancellation the
        # loop looks at the cancel board before the next requests, so it runs them.
        assert callers == ["serve" if ex.transport == "shm" and n == 0 else "_run"] * 2
    calls = ex.collective_rpc(lambda w: w.calls)
    go, mark = tmp_path / "go", tmp_path / "mark"
    first = ex.collective_rpc("block", args=("sleep", str(go), str(mark)), non_block=True)
    queued = ex.collective_rpc("quiet", non_block=True)
    started(go, 2)
    assert queued.cancel() and first.cancel()
    assert ex.collective_rpc(lambda w: w.calls) == calls  # the queued quiet never ran
    assert ex.collective_rpc("quiet") == [None, None]


def test_the_method_sees_a_base_exception_and_except_exception_does_not_stop_it(
        ex: Executor, tmp_path: Path) -> None:
    go, mark = tmp_path / "go", tmp_path / "mark"
    future = ex.collective_rpc("block", args=("swallow", str(go), str(mark)), non_block=True)
    started(go, 2)
    future.cancel()
    assert ex.collective_rpc("noop") == [0, 1]
    assert marks(mark, 2) == ["CallCancelled block"] * 2  # not "swallowed"


def test_an_uncancellable_region_is_finished_first(ex: Executor, tmp_path: Path) -> None:
    go, mark = tmp_path / "go", tmp_path / "mark"
    future = ex.collective_rpc("protected", args=(str(go), str(mark)), non_block=True)
    started(go, 2)
    assert future.cancel()
    assert ex.collective_rpc("noop") == [0, 1]
    assert marks(mark, 2) == ["region ended, then cancelled"] * 2


def test_a_rank_that_fails_releases_the_ranks_still_running_the_call(
        ex: Executor, tmp_path: Path) -> None:
    go, mark = tmp_path / "go", tmp_path / "mark"
    with pytest.raises(RemoteError, match="rank 0 failed") as info:
        ex.collective_rpc("fail_or_block", args=(0, str(go), str(mark)))
    assert info.value.rank == 0
    assert ex.collective_rpc("noop") == [0, 1]  # rank 1 left its 60 s sleep
    assert Path(f"{mark}.1").read_text() == "CallCancelled fail_or_block"
    assert ex.stats().cancel_kills == 0


def test_a_timeout_cancels_the_call_in_the_silent_ranks(ex: Executor, tmp_path: Path) -> None:
    go, mark = tmp_path / "go", tmp_path / "mark"
    with pytest.raises(RpcTimeoutError) as info:
        ex.collective_rpc("block", args=("sleep", str(go), str(mark)), timeout=0.5)
    assert info.value.ranks == (0, 1)
    assert ex.collective_rpc("noop") == [0, 1]
    assert marks(mark, 2) == ["CallCancelled block"] * 2
    stats = ex.stats()
    assert (stats.timeouts, stats.cancelled) == (1, 0)


def test_a_future_timeout_cancels_too(ex: Executor, tmp_path: Path) -> None:
    go, mark = tmp_path / "go", tmp_path / "mark"
    future = ex.collective_rpc("block", args=("event", str(go), str(mark)), timeout=0.5,
                               non_block=True)
    with pytest.raises(RpcTimeoutError):
        future.result()
    assert ex.collective_rpc("noop") == [0, 1]
    assert marks(mark, 2) == ["CallCancelled block"] * 2


def test_cancel_on_timeout_false_lets_the_call_run_on(tmp_path: Path) -> None:
    go, mark, release = tmp_path / "go", tmp_path / "mark", tmp_path / "release"
    with Executor(CancelWorker, 2, device="cpu", cancel_on_timeout=False) as ex:
        with pytest.raises(RpcTimeoutError):
            ex.collective_rpc("until_file", args=(str(go), str(release), str(mark)),
                              timeout=0.3)
        release.touch()
        assert ex.collective_rpc("noop") == [0, 1]
        assert marks(mark, 2) == ["returned"] * 2  # it ran to its end
        assert ex.stats().late_replies == 2


def test_check_health_timeout_cancels_what_the_silent_ranks_run(
        ex: Executor, tmp_path: Path) -> None:
    go, mark = tmp_path / "go", tmp_path / "mark"
    future = ex.collective_rpc("block", args=("sleep", str(go), str(mark)), ranks=[1],
                               non_block=True)
    started(go, 1)
    with pytest.raises(RpcTimeoutError) as info:
        ex.check_health(timeout=0.3)
    assert info.value.ranks == (1,)
    with pytest.raises(CallCancelledError, match="check_health found rank 1 silent"):
        future.result()
    ex.check_health()
    assert Path(f"{mark}.1").read_text() == "CallCancelled block"


def test_check_health_timeout_without_cancel_on_timeout(tmp_path: Path) -> None:
    go, mark, release = tmp_path / "go", tmp_path / "mark", tmp_path / "release"
    with Executor(CancelWorker, 2, device="cpu", cancel_on_timeout=False) as ex:
        future = ex.collective_rpc("until_file", args=(str(go), str(release), str(mark)),
                                   non_block=True)
        started(go, 2)
        with pytest.raises(RpcTimeoutError):
            ex.check_health(timeout=0.3)
        assert not future.done()
        release.touch()
        assert future.result() == ["released", "released"]


def test_a_cancel_signal_that_went_astray_is_sent_again(ex: Executor, tmp_path: Path) -> None:
    go, mark = tmp_path / "go", tmp_path / "mark"
    future = ex.collective_rpc("lose_the_first_signal", args=(str(go), str(mark)),
                               non_block=True)
    started(go, 2)
    assert future.cancel()
    assert ex.collective_rpc("noop") == [0, 1]  # well before cancel_grace (5 s)
    assert marks(mark, 2) == ["CallCancelled"] * 2
    stats = ex.stats()
    assert stats.cancel_kills == 0 and stats.cancelled_replies == 2


def ctrl_c_once_started(go: Path, call: Callable[[], Any]) -> None:
    """Run ``call`` and press Ctrl-C once both ranks started: it raises KeyboardInterrupt."""

    def interrupt_when_started() -> None:
        started(go, 2)
        # a real SIGINT (interrupt_main() would not wake a thread blocked in poll)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    # Python's own Ctrl-C handler, also when pytest was started with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_a_waiting_call_cancels_it(ex: Executor, tmp_path: Path) -> None:
    go, mark = tmp_path / "go", tmp_path / "mark"
    ctrl_c_once_started(go, lambda: ex.collective_rpc("block",
                                                      args=("sleep", str(go), str(mark))))
    assert ex.collective_rpc("noop") == [0, 1]
    assert marks(mark, 2) == ["CallCancelled block"] * 2
    assert ex.stats().cancelled == 1


@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_ctrl_c_and_a_timeout_in_a_call_by_name_cancel_it(transport: str,
                                                          tmp_path: Path) -> None:
    """A blocking call by name without arguments, the round trip the compiled core makes
    in one call over shared memory: Ctrl-C while it waits, and its timeout, cancel it in
    every rank and leave the executor usable (no lock left taken)."""
    go, mark = tmp_path / "go", tmp_path / "mark"
    with Executor(CancelWorker, 2, device="cpu", transport=transport,
                  rpc_timeout=60) as ex:
        ex.collective_rpc("plan", args=("sleep", str(go), str(mark)))
        assert ex.collective_rpc("quiet") == [None, None]  # the next one blocks
        ctrl_c_once_started(go, lambda: ex.collective_rpc("quiet"))
        assert ex.collective_rpc("quiet") == [None, None]
        assert marks(mark, 2) == ["CallCancelled quiet"] * 2
        assert ex.stats().cancelled == 1
    go, mark = tmp_path / "go2", tmp_path / "mark2"
    with Executor(CancelWorker, 2, device="cpu", transport=transport,
                  rpc_timeout=0.5) as ex:
        ex.collective_rpc("plan", args=("sleep", str(go), str(mark)))
        assert ex.collective_rpc("quiet") == [None, None]
        with pytest.raises(RpcTimeoutError) as info:
            ex.collective_rpc("quiet")
        assert info.value.method == "quiet" and info.value.ranks == (0, 1)
        assert ex.collective_rpc("quiet") == [None, None]
        assert marks(mark, 2) == ["CallCancelled quiet"] * 2
        assert ex.stats().timeouts == 1


def test_shutdown_cancels_running_calls(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                        no_leaks: None) -> None:
    go, mark = tmp_path / "go", tmp_path / "mark"
    ex = Executor(CancelWorker, 2, device="cpu", shutdown_timeout=30)
    future = ex.collective_rpc("block", args=("sleep", str(go), str(mark)), non_block=True)
    started(go, 2)
    with caplog.at_level(logging.WARNING, logger="gpuexec"):
        ex.shutdown()
    with pytest.raises(ExecutorClosedError):
        future.result()
    assert marks(mark, 2) == ["CallCancelled block"] * 2
    assert "SIGTERM" not in caplog.text  # they stopped: no escalation


def _die_or_sleep(worker: CancelWorker, go: str) -> None:
    if worker.rank == 0:
        started(Path(go), worker.world_size - 1)
        os._exit(3)
    Path(f"{go}.{os.getpid()}").touch()
    time.sleep(60)


@pytest.mark.parametrize("transport", ["zmq", "shm"])
@pytest.mark.parametrize("method", START_METHODS)
def test_survivors_of_a_death_stop_at_once(method: str, transport: str, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture,
                                           no_leaks: None) -> None:
    ex = Executor(CancelWorker, 3, device="cpu", start_method=method, transport=transport,
                  shutdown_timeout=30)
    with pytest.raises(WorkerDiedError) as info:
        ex.collective_rpc(_die_or_sleep, args=(str(tmp_path / "go"),))
    assert (info.value.rank, info.value.exitcode, info.value.reason) == (0, 3, "")
    with caplog.at_level(logging.WARNING, logger="gpuexec"):
        ex.shutdown()
    assert "still running" not in caplog.text and "SIGTERM" not in caplog.text


def test_a_method_that_does_not_stop_is_killed_after_cancel_grace(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, no_leaks: None) -> None:
    go = tmp_path / "go"
    died = threading.Event()
    with Executor(CancelWorker, 2, device="cpu", cancel_grace=0.5) as ex:
        ex.register_failure_callback(died.set)
        future = ex.collective_rpc("block", args=("gil", str(go)), ranks=[1],
                                   non_block=True)
        started(go, 1)
        with caplog.at_level(logging.WARNING, logger="gpuexec"):
            assert future.cancel()
            with pytest.raises(WorkerDiedError) as info:
                ex.collective_rpc("noop")
        assert died.wait(30)
        e = info.value
        assert e.rank == 1 and e.signal_name == "SIGKILL"
        assert "did not stop within cancel_grace=0.5 s" in e.reason and "'block'" in e.reason
        assert e.reason in str(e) and "out-of-memory" not in str(e)
        assert ex.stats().cancel_kills == 1
        assert "killing worker rank 1" in caplog.text


def test_cancel_grace_is_checked() -> None:
    for bad in (0, -1.0, "5", float("nan")):
        with pytest.raises(ConfigError, match="cancel_grace"):
            Executor(CancelWorker, 1, device="cpu", cancel_grace=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cancel_on_timeout"):
        Executor(CancelWorker, 1, device="cpu", cancel_on_timeout=1)  # type: ignore[arg-type]


def test_stats_and_log_tell_timeouts_cancels_and_kills_apart(
        ex: Executor, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    go, mark = tmp_path / "go", tmp_path / "mark"
    with caplog.at_level(logging.INFO, logger="gpuexec"):
        with pytest.raises(RpcTimeoutError):
            ex.collective_rpc("block", args=("sleep", str(go), str(mark)), timeout=0.2)
        future = ex.collective_rpc("block", args=("sleep", str(go) + "b", str(mark)),
                                   non_block=True)
        started(Path(str(go) + "b"), 2)
        future.cancel()
        ex.collective_rpc("noop")
    stats = ex.stats()
    assert (stats.timeouts, stats.cancelled, stats.cancel_kills) == (1, 1, 0)
    assert "'block' timed out after 0.2 s; interrupting ranks [0, 1]" in caplog.text
    assert "'block' cancelled (Future.cancel()); interrupting ranks [0, 1]" in caplog.text


# -- collectives (gloo on CPU) -----------------------------------------------------------

def test_a_cancelled_rank_waiting_in_a_collective_is_released(tmp_path: Path,
                                                               no_leaks: None) -> None:
    pytest.importorskip("torch")
    go = tmp_path / "go"
    with Executor(CancelWorker, 2, device="cpu", distributed_backend="gloo",
                  cancel_grace=60) as ex:
        # rank 0 sleeps in Python, rank 1 waits in an all-reduce rank 0 never joins
        future = ex.collective_rpc("collective", args=(str(go), 0), non_block=True)
        started(go, 2)
        assert future.cancel()
        assert ex.collective_rpc("noop") == [0, 1]  # rank 1 was released, not killed
        assert ex.stats().cancel_kills == 0


def test_peers_waiting_on_a_cancelled_rank_are_released_with_an_error(
        tmp_path: Path, no_leaks: None) -> None:
    pytest.importorskip("torch")
    go0, go1 = tmp_path / "go0", tmp_path / "go1"
    with Executor(CancelWorker, 2, device="cpu", distributed_backend="gloo",
                  cancel_grace=60) as ex:
        # each rank waits for a tensor from the other: neither call can end by itself
        a = ex.collective_rpc("recv_from", args=(1, str(go0)), ranks=[0], non_block=True)
        b = ex.collective_rpc("recv_from", args=(0, str(go1)), ranks=[1], non_block=True)
        started(go0, 1)
        started(go1, 1)
        assert a.cancel()
        with pytest.raises(RemoteError, match="Connection closed by peer"):
            b.result(timeout=60)
        assert ex.collective_rpc("noop") == [0, 1]
        assert ex.stats().cancel_kills == 0


@pytest.mark.cuda
def test_a_cancelled_rank_in_an_nccl_barrier_aborts_its_group(tmp_path: Path,
                                                              no_leaks: None) -> None:
    """World size 1 on one GPU: the host waits in a barrier behind 3 s of GPU work; the
    cancel aborts the NCCL communicator, the call ends with the GPU work (not after
    ``cancel_grace``), and the worker serves the next call."""
    from gpuexec.executor.config import visible_gpu_count

    if visible_gpu_count() < 1:
        pytest.skip("needs a CUDA GPU")
    go = tmp_path / "go"
    with Executor(CancelWorker, 1, device="cuda", distributed_backend="nccl",
                  cancel_grace=60) as ex:
        future = ex.collective_rpc("nccl_barrier_behind", args=(str(go), 3.0),
                                   non_block=True)
        started(go, 1)
        assert future.cancel()
        assert ex.collective_rpc("noop") == [0]
        stats = ex.stats()
        assert stats.cancel_kills == 0 and stats.cancelled_replies == 1


# -- Ctrl-C in a script ------------------------------------------------------------------

_SCRIPT = """
import signal, sys
from gpuexec import Executor
from cancel_workers import CancelWorker

if __name__ == "__main__":
    # Ctrl-C as in a terminal, also under a CI that started the tests with SIGINT ignored
    # (a background job of a non-interactive shell passes that on to every child).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    how, go = sys.argv[1], sys.argv[2]
    with Executor(CancelWorker, 2, device="cpu", shutdown_timeout=60, cancel_grace=None) as ex:
        print("ready", flush=True)
        try:
            ex.collective_rpc("block", args=(how, go))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            ex.shutdown()
"""


def _driver(tmp_path: Path, how: str) -> tuple[subprocess.Popen[str], Path]:
    script = tmp_path / "driver.py"
    script.write_text(_SCRIPT)
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, str(script), how, str(go)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=subprocess_env())
    assert _line(proc) == "ready\n"
    started(go, 2)
    return proc, go


def _line(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """The driver's next line of output, or the test fails after ``timeout`` (the driver
    killed), never waiting forever."""
    assert proc.stdout is not None
    stdout, got = proc.stdout, []
    reader = threading.Thread(target=lambda: got.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not got:
        proc.kill()
        raise AssertionError(f"no line from the driver within {timeout:g} s")
    return got[0]


def test_ctrl_c_in_with_leaves_at_once_without_escalation(tmp_path: Path,
                                                         no_leaks: None) -> None:
    proc, _ = _driver(tmp_path, "sleep")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert out == "interrupted\n"
    assert "still running" not in err and "SIGTERM" not in err, err


def test_a_second_ctrl_c_during_shutdown_exits_quietly(tmp_path: Path,
                                                       no_leaks: None) -> None:
    proc, _ = _driver(tmp_path, "gil")  # will not stop: the shutdown waits
    proc.send_signal(signal.SIGINT)
    assert _line(proc) == "interrupted\n"
    # Again until it exits: a Ctrl-C that lands before shutdown() began only moves the
    # shutdown to __exit__; one during the shutdown ends the process.
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(0.2)
        except subprocess.TimeoutExpired:
            pass
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err == "gpuexec: interrupted again during shutdown; exiting now\n"

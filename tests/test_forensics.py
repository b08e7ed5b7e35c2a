"""Forensics through the public API: stacks on demand and on timeout, status, metrics,
the hang report; under both transports."""

from __future__ import annotations

import logging
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gpuexec import Executor, RankStatus
from gpuexec.errors import (
    ExecutorClosedError,
    InvalidArgumentError,
    RpcTimeoutError,
    WorkerDiedError,
)

WORKER = "forensics_workers:StuckWorker"


def wait_for(path: Path, timeout: float = 30.0) -> None:
    """Wait for the worker to have entered its method (it writes ``path`` first)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"the worker never entered ({path})"
        time.sleep(0.01)


def executor(transport: str, world_size: int = 2, **kwargs: Any) -> Executor:
    return Executor(WORKER, world_size=world_size, device="cpu", transport=transport,
                    shutdown_timeout=0.2, **kwargs)


@pytest.fixture(params=["zmq", "shm"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_stacks_of_a_waiting_a_spinning_and_a_gil_holding_rank(
        transport: str, tmp_path: Path, no_leaks: None) -> None:
    marker, stop = tmp_path / "in", tmp_path / "stop"
    with executor(transport, world_size=3) as ex:
        idle = ex.stacks()
        assert sorted(idle) == [0, 1, 2]
        for rank, text in idle.items():
            assert text.startswith(f"rank {rank} (pid {ex.workers[rank].pid}): idle")
            assert "(most recent call first)" in text
        fut = ex.collective_rpc("by_rank", args=(str(marker), str(stop)), non_block=True)
        for rank in range(3):
            wait_for(tmp_path / f"in.{rank}")
        stacks = ex.stacks(timeout=5.0)
        stop.touch()
        for rank, inner in enumerate(["by_rank", "spinning_in_python", "holding_the_gil"]):
            head, dump = stacks[rank].split("\n\n", 1)
            assert head.startswith(f"rank {rank} (pid {ex.workers[rank].pid}): running "
                                   f"'by_rank' for ")
            assert "innermost frames of the thread that runs calls" in head
            assert f"in {inner}" in head, stacks[rank]
            assert f"in {inner}" in dump and "in by_rank" in dump
        assert "in wait" in stacks[0].split("\n\n")[0]
        assert fut.result(timeout=60)[0::2] == [0, 2]


def test_timeout_error_carries_the_stacks_of_the_silent_ranks_only(
        transport: str, tmp_path: Path, no_leaks: None) -> None:
    marker = tmp_path / "in"
    # cancel_on_timeout=False: rank 1 runs on (status is checked below); the stacks are
    # taken before a timeout cancels, so they are the same either way
    with executor(transport, cancel_on_timeout=False) as ex:
        with pytest.raises(RpcTimeoutError) as info:
            ex.collective_rpc("stuck_on", args=(1, str(marker)), timeout=1.0)
        err = info.value
        assert err.ranks == (1,)
        assert sorted(err.stacks) == [1]
        head = err.stacks[1].split("\n\n", 1)[0]
        assert head.startswith(f"rank 1 (pid {ex.workers[1].pid}): running 'stuck_on' for ")
        assert "in stuck_on" in head and "in wait" in head
        assert head in str(err)  # the message shows the innermost frames
        assert "thread 0x" in err.stacks[1]
        assert ex.collective_rpc("ok", ranks=[0]) == [0]  # still usable
        # rank 1 still runs the call that timed out: status says so until its late reply
        assert [(s.state, s.method) for s in ex.status()] == [("idle", None),
                                                              ("busy", "stuck_on")]
        (tmp_path / "in.stop").touch()
        assert ex.collective_rpc("ok") == [0, 1]
        assert [(s.state, s.calls_completed) for s in ex.status()] == [("idle", 3),
                                                                       ("idle", 1)]


def test_stacks_of_a_stopped_worker_say_so_within_the_bound(no_leaks: None) -> None:
    with executor("zmq") as ex:
        pid = ex.workers[1].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            stacks = ex.stacks(timeout=0.3)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert "idle" in stacks[0].split("\n")[0] and "thread 0x" in stacks[0]
        assert "no stacks: no answer within 0.3 s; the process is T (stopped)" in stacks[1]
        assert "idle" in ex.stacks()[1].split("\n")[0]  # answers again once continued


@pytest.mark.parametrize("start_method", ["zygote", "subprocess", "fork", "spawn",
                                          "forkserver"])
def test_stacks_under_every_start_method(start_method: str) -> None:
    with Executor(WORKER, world_size=1, device="cpu", start_method=start_method,
                  transport="zmq", shutdown_timeout=0.2) as ex:
        text = ex.stacks()[0]
    assert text.startswith(f"rank 0 (pid {ex.workers[0].pid}): idle; innermost frames")
    assert "in run_worker" in text  # the worker's main (it may still be sending Ready)


def test_status_fields(transport: str, tmp_path: Path, no_leaks: None) -> None:
    with executor(transport) as ex:
        first = ex.status()
        assert [s.rank for s in first] == [0, 1]
        assert all(isinstance(s, RankStatus) for s in first)
        for s, w in zip(first, ex.workers, strict=True):
            assert (s.pid, s.state, s.method, s.running_s) == (w.pid, "idle", None, None)
            assert s.calls_completed == 0 and s.since_last_reply_s is None
            assert s.rss_bytes is not None and s.rss_bytes > 1 << 20
            assert s.cpu_s is not None and s.cpu_s >= 0 and s.cpu_percent is None
            assert s.gpu_memory_mib is None  # CPU workers: NVML is not asked
        ex.collective_rpc("ok")
        ex.collective_rpc("ok", ranks=[1])
        fut = ex.collective_rpc("stuck_on", args=(1, str(tmp_path / "in")), ranks=[1],
                                non_block=True)
        wait_for(tmp_path / "in")
        now = ex.status()
        assert [s.calls_completed for s in now] == [1, 2]
        assert now[0].state == "idle" and now[0].method is None
        assert (now[1].state, now[1].method) == ("busy", "stuck_on")
        assert now[1].running_s is not None and now[1].running_s >= 0
        assert now[0].since_last_reply_s is not None and now[0].since_last_reply_s >= 0
        assert now[1].cpu_percent is not None and now[1].cpu_percent >= 0
        (tmp_path / "in.stop").touch()
        assert fut.result(timeout=30) == [1]
    after = ex.status()
    assert [s.state for s in after] == ["exited", "exited"]
    assert after[0].rss_bytes is None


def test_status_names_a_dead_rank(no_leaks: None) -> None:
    with executor("zmq") as ex:
        with pytest.raises(WorkerDiedError):
            ex.collective_rpc(lambda w: os._exit(3), ranks=[1])
        states = [s.state for s in ex.status()]
        assert states == ["idle", "dead"]
        assert "has exited" in ex.stacks()[1]
        assert ex.status()[1].rss_bytes is None
        ex.respawn()  # the replacement has its own channel, status and death count
        new = ex.status()[1]
        assert (new.state, new.pid) == ("idle", ex.workers[1].pid)
        assert new.rss_bytes is not None
        assert ex.stacks()[1].startswith(f"rank 1 (pid {ex.workers[1].pid}): idle")


def _scrape(host: str, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_over_http(transport: str, tmp_path: Path, no_leaks: None) -> None:
    pytest.importorskip("prometheus_client")
    with executor(transport) as ex:
        host, port = ex.serve_metrics()
        assert port > 0
        for _ in range(3):
            ex.collective_rpc("ok")
        with pytest.raises(Exception, match="missing"):
            ex.collective_rpc("fail", ranks=[1])
        with pytest.raises(RpcTimeoutError):
            ex.collective_rpc("stuck_on", args=(0, str(tmp_path / "in")), timeout=0.5)
        got = _scrape(host, port)
        assert got[("gpuexec_calls_total", (("rank", "0"),))] == 3
        assert got[("gpuexec_calls_total", (("rank", "1"),))] == 5  # ok x3, fail, stuck_on
        assert got[("gpuexec_errors_total", (("kind", "KeyError"), ("rank", "1")))] == 1
        assert got[("gpuexec_timeouts_total", (("rank", "0"),))] == 1
        assert got[("gpuexec_timeouts_total", (("rank", "1"),))] == 0
        assert got[("gpuexec_method_calls_total", (("method", "ok"),))] == 3
        assert got[("gpuexec_method_errors_total",
                    (("kind", "RpcTimeoutError"), ("method", "stuck_on")))] == 1
        assert got[("gpuexec_call_latency_seconds_count", (("method", "ok"),))] == 3
        assert got[("gpuexec_call_latency_seconds_bucket",
                    (("le", "+Inf"), ("method", "ok")))] == 3
        assert got[("gpuexec_request_bytes_total", (("method", "ok"),))] > 0
        assert got[("gpuexec_worker_resident_bytes", (("rank", "1"),))] > 0
        assert got[("gpuexec_worker_deaths_total", (("rank", "0"),))] == 0
        for _ in range(3):
            ex.collective_rpc("ok")
        again, sent = _scrape(host, port), ("gpuexec_request_bytes_total", (("method", "ok"),))
        assert again[sent] == 2 * got[sent]  # every call's request counted, however sent
    with pytest.raises(OSError):  # the server stopped with the executor
        _scrape(host, port)


def test_metrics_count_a_cancelled_call_per_rank_running_it(
        tmp_path: Path, no_leaks: None) -> None:
    pytest.importorskip("prometheus_client")
    with executor("shm") as ex:
        host, port = ex.serve_metrics()
        fut = ex.collective_rpc("blocked_in_wait", args=(str(tmp_path / "in"), 3600.0),
                                ranks=[1], non_block=True)
        wait_for(tmp_path / "in")
        assert ex.status()[1].method == "blocked_in_wait"
        assert fut.cancel()
        assert ex.collective_rpc("ok") == [0, 1]  # rank 1 stopped the cancelled call
        got = _scrape(host, port)
        assert got[("gpuexec_cancellations_total", (("rank", "1"),))] == 1
        assert got[("gpuexec_cancellations_total", (("rank", "0"),))] == 0
        assert got[("gpuexec_timeouts_total", (("rank", "1"),))] == 0
        assert got[("gpuexec_method_errors_total",
                    (("kind", "CancelledError"), ("method", "blocked_in_wait")))] == 1
        assert [s.method for s in ex.status()] == [None, None]


def test_metrics_collector_in_an_engines_registry(no_leaks: None) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    registry = prometheus_client.CollectorRegistry()
    with executor("zmq") as ex:
        registry.register(ex.metrics_collector())
        ex.collective_rpc("ok")
        text = prometheus_client.generate_latest(registry).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"gpuexec_calls", "gpuexec_call_latency_seconds", "gpuexec_errors"} <= names
    assert all(n.startswith("gpuexec_") for n in names)


def test_hang_report_logs_once_per_call_without_cancelling(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, no_leaks: None) -> None:
    caplog.set_level(logging.WARNING, logger="gpuexec")
    with executor("zmq", hang_report_after=0.2) as ex:
        fut = ex.collective_rpc("stuck_on", args=(1, str(tmp_path / "in")), non_block=True)
        wait_for(tmp_path / "in")
        deadline = time.monotonic() + 30
        while not [r for r in caplog.records if "still running" in r.getMessage()]:
            assert time.monotonic() < deadline, "no hang report"
            time.sleep(0.02)
        (tmp_path / "in.stop").touch()
        assert fut.result(timeout=30) == [0, 1]  # not cancelled
    reports = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert len(reports) == 1, reports
    assert "'stuck_on' is still running on ranks [1]" in reports[0]
    assert "in stuck_on" in reports[0]


def test_bad_arguments(no_leaks: None) -> None:
    with pytest.raises(InvalidArgumentError, match="hang_report_after"):
        Executor(WORKER, world_size=1, device="cpu", hang_report_after=0)
    with executor("zmq", world_size=1) as ex:
        with pytest.raises(InvalidArgumentError):
            ex.stacks(timeout=0)
        with pytest.raises(InvalidArgumentError):
            ex.stacks(ranks=[5])
        with pytest.raises(InvalidArgumentError):
            ex.serve_metrics(port=-1)
    with pytest.raises(ExecutorClosedError):
        ex.stacks()


def test_stacks_command_for_a_driver_or_a_worker(
        transport: str, capsys: pytest.CaptureFixture[str], no_leaks: None) -> None:
    from gpuexec.cli import main

    with executor(transport) as ex:
        assert main(["stacks", str(os.getpid())]) == 0
        out = capsys.readouterr().out
        for rank, w in enumerate(ex.workers):
            assert f"--- rank {rank} (pid {w.pid}) ---\n" in out
        assert out.count("(most recent call first)") >= 2 and "in run_worker" in out
        assert main(["stacks", str(ex.workers[1].pid)]) == 0
        out = capsys.readouterr().out
        assert f"--- rank 1 (pid {ex.workers[1].pid}) ---" in out and "rank 0" not in out
    assert main(["stacks", str(os.getpid())]) == 1
    assert "no gpuexec workers found" in capsys.readouterr().err


def test_timeout_error_keeps_its_stacks_through_pickle() -> None:
    import pickle

    err = RpcTimeoutError("forward", 2.0, [1], {1: "rank 1 (pid 7): running 'forward'\n\n"
                                                   "Thread 0x1 (most recent call first):"})
    again = pickle.loads(pickle.dumps(err))
    assert (again.method, again.timeout, again.ranks) == ("forward", 2.0, (1,))
    assert again.stacks == err.stacks and str(again) == str(err)
    assert str(err).endswith("\nrank 1 (pid 7): running 'forward'")
    assert RpcTimeoutError("forward", 2.0, [1]).stacks == {}

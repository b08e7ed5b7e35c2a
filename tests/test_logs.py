"""Log hygiene: one line per event, and the rank prefix on everything a worker prints."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from log_workers import RankOneFails
from workers import EchoWorker

from gpuexec import Executor, WorkerDiedError, WorkerStartupError
from gpuexec.worker.stdio import RECORD_HEADER, read_tail


def test_startup_failure_stops_the_others_without_a_sigterm_notice(
        caplog: pytest.LogCaptureFixture, no_leaks: None) -> None:
    caplog.set_level(logging.INFO, logger="gpuexec")
    with pytest.raises(WorkerStartupError, match="rank one cannot start"):
        Executor(RankOneFails, 2, device="cpu")
    assert not [r for r in caplog.records if "SIGTERM" in r.getMessage()]


def test_segfault_dump_lines_carry_the_rank_prefix(no_leaks: None) -> None:
    with Executor(EchoWorker, 1, device="cpu") as ex:
        pid = ex.workers[0].pid
        with pytest.raises(WorkerDiedError) as info:
            ex.collective_rpc(lambda w: __import__("ctypes").string_at(0))
    lines = info.value.stderr_tail.splitlines()
    assert lines[0] == f"(rank 0 pid {pid}) Fatal Python error: Segmentation fault"
    assert all(ln.startswith(f"(rank 0 pid {pid})") for ln in lines)
    assert any("string_at" in ln for ln in lines)


def test_read_tail_prefixes_raw_lines_and_hides_the_header(tmp_path: Path) -> None:
    record = tmp_path / "stderr.3"
    prefix = "(rank 3 pid 42) "
    record.write_text(f"{prefix}{RECORD_HEADER}\n{prefix}warming up\n")
    assert read_tail(str(record)) == f"{prefix}warming up"
    with record.open("a") as f:
        f.write("Fatal Python error: Aborted\n\n  File \"x.py\", line 1 in f\n")
    assert read_tail(str(record)).splitlines() == [
        f"{prefix}Fatal Python error: Aborted", prefix.rstrip(),
        f'{prefix}  File "x.py", line 1 in f']
    assert read_tail(str(tmp_path / "missing")) == ""
